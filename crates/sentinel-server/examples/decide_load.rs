//! Open-loop load generator for `POST /api/v1/decide`: sends at a fixed rate over kept-alive
//! connections and measures each latency from when the request was *due*, not when it was sent,
//! so a stalled server cannot hide its queue (no coordinated omission). Prints the achieved rate
//! and the latency percentiles.
//!
//! `cargo run --release -p sentinel-server --example decide_load -- URL KEY [RATE=20000] [SECONDS=10] [CONNECTIONS=64]`
//! (`SHOW_STALLS=1` prints every request slower than 20 ms, with when it was due.)

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const BODY: &str = r#"{"action":"search_web","cost_usd":0.001,"agent_id":"bench","session_id":"s1","run_id":"r1","args":{"query":"quarterly revenue","max_results":10}}"#;

/// Reads one response; returns its status.
async fn response(r: &mut BufReader<tokio::net::tcp::OwnedReadHalf>) -> std::io::Result<u16> {
    let mut line = String::new();
    r.read_line(&mut line).await?;
    let status = line.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let mut len = 0usize;
    loop {
        line.clear();
        if r.read_line(&mut line).await? == 0 {
            return Err(std::io::Error::other("connection closed"));
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            len = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    Ok(status)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(url), Some(key)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: decide_load URL KEY [RATE=20000] [SECONDS=10] [CONNECTIONS=64]");
        std::process::exit(2);
    };
    let num = |i: usize, d: f64| args.get(i).and_then(|x| x.parse().ok()).unwrap_or(d);
    let (rate, secs, conns) = (num(3, 20_000.0), num(4, 10.0), num(5, 64.0) as usize);
    let addr: SocketAddr = url.trim_start_matches("http://").trim_end_matches('/').parse()?;
    // `LOAD_PATH=/healthz` measures a trivial GET instead: the peer that shows what the machine,
    // the HTTP stack and this generator cost by themselves.
    let request = match std::env::var("LOAD_PATH") {
        Ok(path) => format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\n\r\n"),
        Err(_) => format!(
            "POST /api/v1/decide HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{BODY}",
            BODY.len()
        ),
    };
    let show_stalls: u32 = std::env::var("SHOW_STALLS").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    let interval = Duration::from_secs_f64(conns as f64 / rate);
    let start = Instant::now() + Duration::from_millis(100);
    let end = start + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for c in 0..conns {
        let request = request.clone();
        tasks.push(tokio::spawn(async move {
            let stream = TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            let (rd, mut wr) = stream.into_split();
            let mut rd = BufReader::new(rd);
            let mut lat = Vec::with_capacity((secs * rate / conns as f64) as usize + 16);
            let mut bad = 0u64;
            // Stagger the connections across one interval.
            let mut due = start + interval.mul_f64(c as f64 / conns as f64);
            let mut prev_done = start;
            while due < end {
                tokio::time::sleep_until(due.into()).await;
                // Latency counts from when the request was due if the server was still busy with
                // the previous one (its queue), else from when it was sent: the timer's own
                // millisecond granularity is the generator's delay, not the server's.
                let from = if prev_done > due { due } else { Instant::now() };
                wr.write_all(request.as_bytes()).await?;
                if response(&mut rd).await? != 200 {
                    bad += 1;
                }
                prev_done = Instant::now();
                let l = prev_done.duration_since(from).as_micros() as u32;
                lat.push(l);
                if show_stalls > 0 && l > show_stalls {
                    eprintln!(
                        "stall {:.3}s after start: {:.1} ms",
                        from.duration_since(start).as_secs_f64(),
                        f64::from(l) / 1000.0
                    );
                }
                due += interval;
            }
            Ok::<_, std::io::Error>((lat, bad))
        }));
    }
    let mut all = Vec::new();
    let mut bad = 0;
    for t in tasks {
        let (l, b) = t.await??;
        all.extend(l);
        bad += b;
    }
    let took = start.elapsed().as_secs_f64();
    all.sort_unstable();
    let pct = |p: f64| {
        let i = ((all.len() as f64 * p).ceil() as usize).saturating_sub(1).min(all.len().saturating_sub(1));
        all.get(i).copied().unwrap_or(0) as f64 / 1000.0
    };
    println!(
        "SUMMARY decide open-loop: offered {rate:.0}/s over {conns} connections, achieved {:.0}/s; latency p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms; non-200 {bad}",
        all.len() as f64 / took,
        pct(0.50),
        pct(0.90),
        pct(0.99),
        pct(0.999),
        pct(1.0)
    );
    Ok(())
}
