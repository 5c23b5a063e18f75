//! `decide()` including reservation on a large policy: 10,000 denied names, 1,000 conditional
//! rules, 100 rate limits, three scoped policies merged. Also shows that latency does not grow
//! with the number of denied names. After criterion, prints per-call p50/p99 measured one call
//! at a time.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::fmt::Write as _;
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use sentinel_core::load::parse_yaml;
use sentinel_core::{ActionRequest, Engine, PolicySet, Usd};
use serde_json::json;

/// Builds the large policy file. `denied` names go in the global policy.
pub fn large_policy(denied: usize) -> String {
    let mut y = String::from("policies:\n");
    let parts =
        [("global-prod", "global", 500usize, 50usize), ("agent-bot", "agent", 300, 30), ("run-7", "run", 200, 20)];
    for (pi, (name, scope, rules, limits)) in parts.iter().enumerate() {
        let _ = writeln!(y, "  - name: {name}\n    scope: {scope}");
        match *scope {
            "agent" => y.push_str("    agent_id: bot\n"),
            "run" => y.push_str("    run_id: run-7\n"),
            _ => {}
        }
        y.push_str(
            "    budgets:\n      session: 1000000\n      run: 1000000\n      actions:\n        search_web: 1000000\n",
        );
        if pi == 0 {
            y.push_str("    denied_actions:\n");
            for i in 0..denied {
                let _ = writeln!(y, "      - denied_action_{i:06}");
            }
            y.push_str("    approvals:\n      actions: [wire_money]\n      cost_threshold_usd: 1000\n");
        }
        y.push_str("    rate_limits:\n");
        for i in 0..*limits {
            let _ = writeln!(y, "      tool_{pi}_{i}: {{ max_count: 100, window_seconds: 60 }}");
        }
        if pi == 0 {
            y.push_str("      search_web: { max_count: 100000, window_seconds: 0.001 }\n");
        }
        y.push_str("    rules:\n");
        let ops = [
            ("gt", "1000000"),
            ("eq", "\"blocked-region\""),
            ("starts_with", "\"/etc\""),
            ("in", "[\"xx\", \"yy\"]"),
            ("matches", "\"^DROP\\\\s\""),
        ];
        let params = ["amount", "region", "path", "region", "query"];
        for i in 0..*rules {
            let (op, val) = ops[i % ops.len()];
            let param = params[i % params.len()];
            // Most rules target other tools; a few match the benchmarked action.
            let pattern = if i % 100 == 0 { "search_*".to_string() } else { format!("tool_{pi}_{i}_*") };
            let action = ["block", "warn", "require_approval"][i % 3];
            let _ = writeln!(
                y,
                "      - {{ id: r{pi}_{i}, function_pattern: \"{pattern}\", conditions: [{{ param: {param}, operator: {op}, value: {val} }}], action: {action} }}"
            );
        }
    }
    y
}

fn engine(denied: usize) -> Engine {
    let docs = parse_yaml("large.yaml", "large", &large_policy(denied)).unwrap();
    Engine::new(PolicySet::compile(docs).unwrap())
}

fn bench(c: &mut Criterion) {
    let args = json!({"query": "rust sliding window", "amount": 42, "region": "eu", "path": "/home/a"});
    let mut g = c.benchmark_group("decide");
    g.measurement_time(Duration::from_secs(4)).warm_up_time(Duration::from_secs(1)).sample_size(40);
    for denied in [100usize, 10_000, 100_000] {
        let e = engine(denied);
        let req = ActionRequest::new("search_web").agent("bot").run("run-7").session("s").cost(0.000_001).args(&args);
        // Sanity: the benchmarked call is allowed and reserves.
        let mut d = e.decide(&req);
        assert!(d.permits(), "{}", d.message);
        d.take_reservation().unwrap().settle(Usd::from_micros(1));
        g.bench_function(BenchmarkId::new("allow_with_reservation", denied), |b| {
            b.iter(|| {
                let mut d = e.decide(black_box(&req));
                if let Some(r) = d.take_reservation() {
                    r.settle(Usd::from_micros(1));
                }
                black_box(d.verdict)
            })
        });
        let denied_req = ActionRequest::new("denied_action_000050").agent("bot").run("run-7").session("s").args(&args);
        g.bench_function(BenchmarkId::new("deny_listed", denied), |b| {
            b.iter(|| black_box(e.decide(black_box(&denied_req)).verdict))
        });
    }
    g.finish();

    // Per-call percentiles, one timed call at a time, on the 10,000-name policy.
    let e = engine(10_000);
    let req = ActionRequest::new("search_web").agent("bot").run("run-7").session("s").cost(0.000_001).args(&args);
    let mut samples = Vec::with_capacity(400_000);
    for i in 0..450_000 {
        let t = Instant::now();
        let mut d = e.decide(black_box(&req));
        if let Some(r) = d.take_reservation() {
            r.settle(Usd::from_micros(1));
        }
        let ns = t.elapsed().as_nanos() as u64;
        if i >= 50_000 {
            samples.push(ns);
        }
    }
    samples.sort_unstable();
    let p = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    println!(
        "\nSUMMARY decide (10,000 denied, 1,000 rules, 100 rate limits, 3 policies; allow + reservation + settle): p50 {} ns, p90 {} ns, p99 {} ns over {} calls",
        p(0.5),
        p(0.9),
        p(0.99),
        samples.len()
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
