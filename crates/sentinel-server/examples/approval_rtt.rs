//! Approval round trip over loopback: an agent's call needs approval and it long-polls `wait`; a
//! human approves through the API; the time is measured from the approve request being sent until
//! the agent has its allowed decision (wait answered, then `/decide` with `approval_id`).
//!
//! `cargo run --release -p sentinel-server --example approval_rtt -- URL ADMIN_KEY [ROUNDS=200]`
//! The server needs a policy whose approvals cover the action `wire` (the example creates one).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn request(addr: SocketAddr, method: &str, path: &str, key: &str, body: Option<&Value>) -> (u16, Value) {
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else { return (0, Value::Null) };
    let _ = s.set_nodelay(true);
    let body = body.map(Value::to_string).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    if s.write_all(req.as_bytes()).await.is_err() {
        return (0, Value::Null);
    }
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf).await;
    let text = String::from_utf8_lossy(&buf);
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let payload = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, serde_json::from_str(payload).unwrap_or(Value::Null))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(url), Some(key)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: approval_rtt URL ADMIN_KEY [ROUNDS=200]");
        std::process::exit(2);
    };
    let rounds: usize = args.get(3).and_then(|x| x.parse().ok()).unwrap_or(200);
    let addr: SocketAddr = url.trim_start_matches("http://").trim_end_matches('/').parse()?;
    let policy = json!({"name": "rtt", "approvals": {"actions": ["wire"], "timeout_seconds": 60}});
    let (s, _) = request(addr, "POST", "/api/v1/policies", key, Some(&policy)).await;
    if s != 201 && s != 409 {
        return Err(format!("cannot create the policy: HTTP {s}").into());
    }
    let mut times = Vec::with_capacity(rounds);
    for i in 0..rounds {
        let call = json!({"action": "wire", "agent_id": "rtt", "args": {"n": i}});
        let (_, d) = request(addr, "POST", "/api/v1/decide", key, Some(&call)).await;
        let id = d.pointer("/approval_request/id").and_then(Value::as_str).ok_or("no approval request")?.to_string();
        // The agent waits...
        let (k, wid) = (key.clone(), id.clone());
        let waiter = tokio::spawn(async move {
            let (_, w) =
                request(addr, "GET", &format!("/api/v1/approvals/{wid}/wait?timeout_seconds=30"), &k, None).await;
            let redeem = json!({"action": "wire", "agent_id": "rtt", "args": {"n": i}, "approval_id": wid});
            let (_, d) = request(addr, "POST", "/api/v1/decide", &k, Some(&redeem)).await;
            (w, d, Instant::now())
        });
        tokio::time::sleep(Duration::from_millis(5)).await; // the wait is in place
        // ...a human approves.
        let sent = Instant::now();
        let (s, _) =
            request(addr, "POST", &format!("/api/v1/approvals/{id}/approve"), key, Some(&json!({"reason": "ok"})))
                .await;
        if s != 200 {
            return Err(format!("approve failed: HTTP {s}").into());
        }
        let (w, d, resumed) = waiter.await?;
        if w.get("status").and_then(Value::as_str) != Some("approved")
            || d.get("verdict").and_then(Value::as_str) != Some("allow")
        {
            return Err(format!("unexpected: wait {w}, decide {d}").into());
        }
        times.push(resumed.duration_since(sent).as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    let pct = |p: f64| times.get(((times.len() as f64 * p).ceil() as usize).saturating_sub(1)).copied().unwrap_or(0.0);
    println!(
        "SUMMARY approval round trip: {rounds} rounds, approve sent → agent holds an allowed decision: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        pct(0.5),
        pct(0.9),
        pct(0.99),
        pct(1.0)
    );
    Ok(())
}
