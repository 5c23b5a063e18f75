//! Load generator for `POST /api/v1/ledger`: writes real hash-chained ledgers with the core's
//! writer (one per stream), then uploads them in batches over HTTP from several streams at once,
//! and prints entries per second.
//!
//! `cargo run --release -p sentinel-server --example ingest_load -- URL KEY [LINES] [BATCH] [STREAMS]`

use std::net::SocketAddr;
use std::time::Instant;

use sentinel_core::{ChainWriter, LogOptions};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn ledger(dir: &std::path::Path, stream: usize, lines: usize) -> Result<Vec<String>, Box<dyn std::error::Error>> {
    let path = dir.join(format!("ledger-{stream}.jsonl"));
    let w = ChainWriter::open(&path, LogOptions::default())?;
    for i in 0..lines {
        w.append(&json!({
            "id": uuid::Uuid::now_v7().to_string(),
            "timestamp": sentinel_core::ledger::now_rfc3339(),
            "action": if i % 3 == 0 { "search_web" } else { "call_llm" },
            "cost_usd": 0.0125,
            "duration_ms": 182.5,
            "outcome": "success",
            "tags": ["prod", "research"],
            "payload": {"inputs": {"query": format!("quarterly revenue for account {i}"), "max_results": 10},
                        "outputs": {"results": 10, "summary": "ok"}},
            "agent_id": format!("agent-{stream}"),
            "run_id": format!("run-{}", i / 1000),
            "session_id": "session-1",
            "estimated_cost_usd": 0.0125,
            "policy_version": "3f2a9c1e4b5d6a7f",
        }))?;
    }
    drop(w);
    Ok(std::fs::read_to_string(&path)?.lines().map(str::to_string).collect())
}

async fn post(addr: SocketAddr, key: &str, body: &str) -> Result<u16, std::io::Error> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let head = format!(
        "POST /api/v1/ledger HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await?;
    s.write_all(body.as_bytes()).await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf);
    Ok(text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(url), Some(key)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: ingest_load URL KEY [LINES=200000] [BATCH=500] [STREAMS=4]");
        std::process::exit(2);
    };
    let num = |i: usize, d: usize| args.get(i).and_then(|x| x.parse().ok()).unwrap_or(d);
    let (lines, batch, streams) = (num(3, 200_000), num(4, 500), num(5, 4));
    let addr: SocketAddr = url.trim_start_matches("http://").trim_end_matches('/').parse()?;
    let dir = tempfile::tempdir()?;
    let tag = uuid::Uuid::now_v7().simple().to_string();
    let mut bodies: Vec<Vec<String>> = Vec::new();
    for s in 0..streams {
        let l = ledger(dir.path(), s, lines / streams)?;
        bodies.push(
            l.chunks(batch).map(|c| json!({"stream": format!("bench-{tag}-{s}"), "ledger": c}).to_string()).collect(),
        );
    }
    let total: usize = bodies.iter().map(|b| b.len()).sum();
    eprintln!("{} lines in {total} batches of {batch} over {streams} streams", lines / streams * streams);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for b in bodies {
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            let mut worst = 0u128;
            for body in b {
                let t = Instant::now();
                let status = post(addr, &key, &body).await?;
                if status != 200 {
                    return Err(std::io::Error::other(format!("HTTP {status}")));
                }
                worst = worst.max(t.elapsed().as_micros());
            }
            Ok::<u128, std::io::Error>(worst)
        }));
    }
    let mut worst = 0;
    for t in tasks {
        worst = worst.max(t.await??);
    }
    let secs = started.elapsed().as_secs_f64();
    let n = lines / streams * streams;
    println!(
        "SUMMARY ingest: {n} entries in {secs:.2}s = {:.0} entries/s (batches of {batch}, {streams} streams; slowest batch {:.1} ms)",
        n as f64 / secs,
        worst as f64 / 1000.0
    );
    Ok(())
}
