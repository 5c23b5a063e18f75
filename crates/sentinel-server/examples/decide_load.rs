//! Open-loop load generator for `POST /api/v1/decide`: sends at a fixed rate over kept-alive
//! connections and measures each latency from when the request was *due*, not when it was sent,
//! so a stalled server cannot hide its queue (no coordinated omission). Prints the achieved rate
//! and the latency percentiles.
//!
//! `cargo run --release -p sentinel-server --example decide_load -- URL KEY [RATE=20000] [SECONDS=10] [CONNECTIONS=64]`
//!
//! `PACING` chooses when requests are due:
//! - `tick` (the default, and the generator of every figure before 2026-12-06): tokio tasks on
//!   tokio's timer, whose resolution is one millisecond, so every request due within a millisecond
//!   is sent at its tick: bursts of RATE/1000 requests at once, harsher on the tail than
//!   independent agents are.
//! - `poisson`: each connection's requests are due at exponentially distributed
//!   intervals (so all of them together are a Poisson stream of RATE per second, the usual model of
//!   many independent agents), and each connection is a thread that sleeps until its next request
//!   is due with the kernel's high-resolution timer.
//! - `uniform`: the same threads, each connection due at a fixed interval, staggered.
//!
//! `SHOW_STALLS=<µs>` prints every request slower than that, with when it was due.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

const BODY: &str = r#"{"action":"search_web","cost_usd":0.001,"agent_id":"bench","session_id":"s1","run_id":"r1","args":{"query":"quarterly revenue","max_results":10}}"#;

/// The `Content-Length` of a header line, if it is that header.
fn content_length(l: &str) -> Option<usize> {
    let (k, v) = l.split_once(':')?;
    if k.eq_ignore_ascii_case("content-length") { v.trim().parse().ok() } else { None }
}

fn status_of(line: &str) -> u16 {
    line.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}

/// Reads one response (async); returns its status.
async fn response_async(r: &mut tokio::io::BufReader<tokio::net::tcp::OwnedReadHalf>) -> std::io::Result<u16> {
    let mut line = String::new();
    r.read_line(&mut line).await?;
    let status = status_of(&line);
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
        len = content_length(l).unwrap_or(len);
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    Ok(status)
}

/// Reads one response (blocking); returns its status. `line` and `body` are reused buffers.
fn response_blocking(
    r: &mut BufReader<std::net::TcpStream>,
    line: &mut String,
    body: &mut Vec<u8>,
) -> std::io::Result<u16> {
    line.clear();
    r.read_line(line)?;
    let status = status_of(line);
    let mut len = 0usize;
    loop {
        line.clear();
        if r.read_line(line)? == 0 {
            return Err(std::io::Error::other("connection closed"));
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        len = content_length(l).unwrap_or(len);
    }
    body.resize(len, 0);
    r.read_exact(body)?;
    Ok(status)
}

/// SplitMix64: a small, seeded generator, so a run's arrival times are reproducible.
struct SplitMix(u64);

impl SplitMix {
    fn next_f64(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        // 53 random bits in [0, 1).
        (z >> 11) as f64 / (1u64 << 53) as f64
    }

    /// An exponentially distributed interval with the given mean.
    fn exponential(&mut self, mean: Duration) -> Duration {
        mean.mul_f64(-(1.0 - self.next_f64()).ln())
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Pacing {
    Poisson,
    Uniform,
    Tick,
}

/// What one connection measured: latencies in µs, and the answers that were not 200.
type Measured = (Vec<u32>, u64);

struct Plan {
    addr: SocketAddr,
    request: String,
    interval: Duration,
    start: Instant,
    end: Instant,
    show_stalls: u32,
    expected: usize,
}

impl Plan {
    /// The latency of one request: from when it was due if the previous one was still being
    /// answered then (its queue), else from when it was sent, so the generator's own wake-up delay
    /// is not counted as the server's.
    fn record(&self, lat: &mut Vec<u32>, due: Instant, sent: Instant, prev_done: Instant, done: Instant) {
        let from = if prev_done > due { due } else { sent };
        let l = done.duration_since(from).as_micros() as u32;
        lat.push(l);
        if self.show_stalls > 0 && l > self.show_stalls {
            eprintln!(
                "stall {:.3}s after start: {:.1} ms",
                from.duration_since(self.start).as_secs_f64(),
                f64::from(l) / 1000.0
            );
        }
    }
}

/// One connection on a thread of its own, sleeping until each request is due.
fn connection_thread(plan: &Plan, c: usize, conns: usize, pacing: Pacing) -> std::io::Result<Measured> {
    let stream = std::net::TcpStream::connect(plan.addr)?;
    stream.set_nodelay(true)?;
    let mut wr = stream.try_clone()?;
    let mut rd = BufReader::new(stream);
    let (mut line, mut body) = (String::new(), Vec::new());
    let mut lat = Vec::with_capacity(plan.expected);
    let mut bad = 0u64;
    let mut rng = SplitMix(0x5EED_0000 + c as u64);
    let mut due = match pacing {
        Pacing::Poisson => plan.start + rng.exponential(plan.interval),
        _ => plan.start + plan.interval.mul_f64(c as f64 / conns as f64),
    };
    let mut prev_done = plan.start;
    while due < plan.end {
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        let sent = Instant::now();
        wr.write_all(plan.request.as_bytes())?;
        if response_blocking(&mut rd, &mut line, &mut body)? != 200 {
            bad += 1;
        }
        let done = Instant::now();
        plan.record(&mut lat, due, sent, prev_done, done);
        prev_done = done;
        due += match pacing {
            Pacing::Poisson => rng.exponential(plan.interval),
            _ => plan.interval,
        };
    }
    Ok((lat, bad))
}

/// One connection as a tokio task on tokio's millisecond timer.
async fn connection_task(plan: std::sync::Arc<Plan>, c: usize, conns: usize) -> std::io::Result<Measured> {
    let stream = tokio::net::TcpStream::connect(plan.addr).await?;
    stream.set_nodelay(true)?;
    let (rd, mut wr) = stream.into_split();
    let mut rd = tokio::io::BufReader::new(rd);
    let mut lat = Vec::with_capacity(plan.expected);
    let mut bad = 0u64;
    let mut due = plan.start + plan.interval.mul_f64(c as f64 / conns as f64);
    let mut prev_done = plan.start;
    while due < plan.end {
        tokio::time::sleep_until(due.into()).await;
        let sent = Instant::now();
        wr.write_all(plan.request.as_bytes()).await?;
        if response_async(&mut rd).await? != 200 {
            bad += 1;
        }
        let done = Instant::now();
        plan.record(&mut lat, due, sent, prev_done, done);
        prev_done = done;
        due += plan.interval;
    }
    Ok((lat, bad))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(url), Some(key)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: decide_load URL KEY [RATE=20000] [SECONDS=10] [CONNECTIONS=64]");
        std::process::exit(2);
    };
    let num = |i: usize, d: f64| args.get(i).and_then(|x| x.parse().ok()).unwrap_or(d);
    let (rate, secs, conns) = (num(3, 20_000.0), num(4, 10.0), num(5, 64.0) as usize);
    let pacing = match std::env::var("PACING").as_deref() {
        Ok("tick") | Err(_) => Pacing::Tick,
        Ok("poisson") => Pacing::Poisson,
        Ok("uniform") => Pacing::Uniform,
        Ok(other) => return Err(format!("PACING={other}: expected poisson, uniform or tick").into()),
    };
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
    let start = Instant::now() + Duration::from_millis(100);
    let plan = std::sync::Arc::new(Plan {
        addr,
        request,
        interval: Duration::from_secs_f64(conns as f64 / rate),
        start,
        end: start + Duration::from_secs_f64(secs),
        show_stalls: std::env::var("SHOW_STALLS").ok().and_then(|v| v.parse().ok()).unwrap_or(0),
        expected: (secs * rate / conns as f64 * 1.2) as usize + 16,
    });
    let results: Vec<std::io::Result<Measured>> = if pacing == Pacing::Tick {
        let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
        rt.block_on(async {
            let tasks: Vec<_> = (0..conns).map(|c| tokio::spawn(connection_task(plan.clone(), c, conns))).collect();
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.unwrap_or_else(|e| Err(std::io::Error::other(e))));
            }
            out
        })
    } else {
        std::thread::scope(|s| {
            let threads: Vec<_> = (0..conns)
                .map(|c| {
                    let plan = &plan;
                    s.spawn(move || connection_thread(plan, c, conns, pacing))
                })
                .collect();
            threads.into_iter().map(|t| t.join().unwrap_or_else(|_| Err(std::io::Error::other("panicked")))).collect()
        })
    };
    let mut all = Vec::new();
    let mut bad = 0;
    for r in results {
        let (l, b) = r?;
        all.extend(l);
        bad += b;
    }
    let took = start.elapsed().as_secs_f64();
    all.sort_unstable();
    let pct = |p: f64| {
        let i = ((all.len() as f64 * p).ceil() as usize).saturating_sub(1).min(all.len().saturating_sub(1));
        all.get(i).copied().unwrap_or(0) as f64 / 1000.0
    };
    let name = match pacing {
        Pacing::Poisson => "poisson",
        Pacing::Uniform => "uniform",
        Pacing::Tick => "tick",
    };
    println!(
        "SUMMARY decide open-loop ({name} arrivals): offered {rate:.0}/s over {conns} connections, achieved {:.0}/s; latency p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms; non-200 {bad}",
        all.len() as f64 / took,
        pct(0.50),
        pct(0.90),
        pct(0.99),
        pct(0.999),
        pct(1.0)
    );
    Ok(())
}
