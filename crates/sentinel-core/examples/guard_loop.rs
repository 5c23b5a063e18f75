//! One thread deciding and finishing guarded calls as fast as it can, on the Python benchmark's
//! policy (budgets, 1,000 denied names, a rate limit, 20 rules), with the ledger on: the calling
//! thread's cost per call, and how long the writer thread then needs to write what is left.
//!
//! `cargo run --release -p sentinel-core --example guard_loop [CALLS=200000]`
#![allow(clippy::unwrap_used, clippy::print_stdout, clippy::panic)]
/// As in the Python extension: entries are freed on the writer thread.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Instant;

use sentinel_core::guard::CallOutcome;
use sentinel_core::ledger::LogOptions;
use sentinel_core::{ActionRequest, Begun, Engine, Guard, PolicySet, load};
use serde_json::json;

fn main() {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(200_000);
    let mut y = String::from("budgets:\n  session: 1000000\n  run: 1000000\ndenied_actions:\n");
    for i in 0..1000 {
        let _ = writeln!(y, "  - forbidden_tool_{i:04}");
    }
    y.push_str("rate_limits:\n  tool: { max_count: 10000000, window_seconds: 1 }\nrules:\n");
    for i in 0..20 {
        let pattern = if i % 2 == 0 { "tool" } else { "tool*" };
        let action = if i % 3 == 0 { "require_approval" } else { "block" };
        let _ = writeln!(
            y,
            "  - {{ id: rule_{i}, function_pattern: \"{pattern}\", conditions: [{{ param: amount, operator: gt, value: {} }}], action: {action} }}",
            1_000_000 + i
        );
    }
    let docs = load::parse_yaml("bench.yaml", "bench", &y).unwrap();
    let engine = Arc::new(Engine::new(PolicySet::compile(docs).unwrap()));
    // The decision alone, reservation given back.
    let args = json!({"query": "q", "amount": 7});
    let tags0: Vec<String> = Vec::new();
    let req = ActionRequest::new("tool").agent("a").run("r").session("s").cost(0.000_001).args(&args).tags(&tags0);
    let t = Instant::now();
    for _ in 0..n {
        let mut d = engine.decide(&req);
        if let Some(r) = d.take_reservation() {
            r.release();
        }
    }
    println!("decide alone: {:.0} ns per call", t.elapsed().as_secs_f64() * 1e9 / n as f64);
    if std::env::var_os("DECIDE_ONLY").is_some() {
        return;
    }
    let t = Instant::now();
    let mut x = 0usize;
    for _ in 0..n {
        let mut idbuf = uuid::Uuid::encode_buffer();
        x += uuid::Uuid::now_v7().hyphenated().encode_lower(&mut idbuf).len();
    }
    println!("uuid: {:.0} ns", t.elapsed().as_secs_f64() * 1e9 / n as f64);
    let t = Instant::now();
    for _ in 0..n {
        let mut idbuf = uuid::Uuid::encode_buffer();
        let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let ts = uuid::Timestamp::from_unix(uuid::NoContext, since.as_secs(), since.subsec_nanos());
        x += uuid::Uuid::new_v7(ts).hyphenated().encode_lower(&mut idbuf).len();
    }
    println!("uuid without context, clock included: {:.0} ns", t.elapsed().as_secs_f64() * 1e9 / n as f64);
    let t = Instant::now();
    for _ in 0..n {
        x += sentinel_core::ledger::Rfc3339::now().as_str().len();
    }
    println!("timestamp: {:.0} ns", t.elapsed().as_secs_f64() * 1e9 / n as f64);
    let t = Instant::now();
    let (pi, po) = (json!({"args": ["q"], "kwargs": {"amount": 7}}), json!(7));
    let mut b2 = Vec::new();
    for _ in 0..n {
        b2.clear();
        serde_json::to_writer(&mut b2, &sentinel_core::redact::Redacted(&pi)).unwrap();
        serde_json::to_writer(&mut b2, &sentinel_core::redact::Redacted(&po)).unwrap();
    }
    println!("payload: {:.0} ns ({x})", t.elapsed().as_secs_f64() * 1e9 / n as f64);
    // Serializing one ledger line alone (what `finish` does on the caller's thread).
    let inputs = json!({"args": ["q"], "kwargs": {"amount": 7}});
    let outputs = json!(7);
    let mut d = engine.decide(&req);
    drop(d.take_reservation());
    let mut buf = Vec::with_capacity(1024);
    let t = Instant::now();
    for _ in 0..n {
        buf.clear();
        let mut idbuf = uuid::Uuid::encode_buffer();
        let id = uuid::Uuid::now_v7().hyphenated().encode_lower(&mut idbuf);
        let ts = sentinel_core::ledger::Rfc3339::now();
        let line = sentinel_core::records::LedgerLine {
            id,
            timestamp: ts.as_str(),
            action: "tool",
            cost_usd: 0.000_001,
            duration_ms: 0.0123,
            outcome: "success",
            tags: &tags0,
            payload: sentinel_core::records::PayloadRef {
                inputs: sentinel_core::redact::Redacted(&inputs),
                outputs: sentinel_core::redact::Redacted(&outputs),
            },
            agent_id: "default",
            run_id: "default",
            session_id: "session-1444308d3acd",
            estimated_cost_usd: 0.000_001,
            decision: Some((&d).into()),
            policy_version: &d.policy_version,
            approval: None,
            intervention_id: None,
        };
        line.write_json(&mut buf).unwrap();
    }
    println!("one ledger line serialized: {:.0} ns ({} bytes)", t.elapsed().as_secs_f64() * 1e9 / n as f64, buf.len());
    let dir = tempfile::tempdir().unwrap();
    let g = Guard::open(dir.path(), engine, LogOptions::default()).unwrap();
    let tags: Vec<String> = Vec::new();
    let t = Instant::now();
    for i in 0..n {
        let args = json!({"query": "q", "amount": i});
        let req = ActionRequest::new("tool").agent("a").run("r").session("s").cost(0.000_001).args(&args).tags(&tags);
        let inputs = json!({"args": ["q"], "kwargs": {"amount": i}});
        match g.begin(&req, inputs).unwrap() {
            Begun::Proceed(p) => {
                g.finish(*p, CallOutcome::Success(json!(i)), None).unwrap();
            }
            Begun::Stop { .. } => panic!("the benchmark call must be allowed"),
        }
    }
    let calls = t.elapsed();
    g.flush().unwrap();
    let all = t.elapsed();
    println!(
        "caller: {:.0} ns per call; writer caught up {:.1} ms after the last call ({:.0} ns per call overall)",
        calls.as_secs_f64() * 1e9 / n as f64,
        (all - calls).as_secs_f64() * 1e3,
        all.as_secs_f64() * 1e9 / n as f64
    );
}
