//! Ledger append (hash-chained, redacted, one write(2) per entry) and verify throughput.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use sentinel_core::ledger::{LogOptions, verify};
use sentinel_core::{Engine, Guard, PolicySet};
use serde_json::json;

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(Engine::new(PolicySet::compile(Vec::new()).unwrap()));
    let guard = Guard::open(dir.path(), engine, LogOptions::default()).unwrap();
    let inputs = json!({"args": [], "kwargs": {"query": "Python best practices", "limit": 10, "api_key": "sk-abcdefghijklmnopqrstuv"}});
    let outputs = json!({"results": ["a", "b", "c"], "count": 3});
    let tags = vec!["search".to_string(), "api".to_string()];
    let mut g = c.benchmark_group("ledger");
    g.measurement_time(Duration::from_secs(4)).warm_up_time(Duration::from_secs(1)).sample_size(30);
    g.throughput(Throughput::Elements(1));
    g.bench_function("append_redacted_chained", |b| {
        b.iter(|| {
            guard
                .record("search_tool", &inputs, &outputs, 0.01, 234.5, "success", &tags, ("agent", "run", "session"))
                .unwrap()
        })
    });
    g.finish();
    drop(guard);

    // Verify throughput over a fresh ledger of 300,000 entries.
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(Engine::new(PolicySet::compile(Vec::new()).unwrap()));
    let guard = Guard::open(dir.path(), engine, LogOptions { rotate_bytes: 1 << 40, ..LogOptions::default() }).unwrap();
    let n = 300_000u64;
    let t = Instant::now();
    for _ in 0..n {
        guard
            .record("search_tool", &inputs, &outputs, 0.01, 234.5, "success", &tags, ("agent", "run", "session"))
            .unwrap();
    }
    let append = t.elapsed();
    drop(guard);
    let path = dir.path().join("ledger.jsonl");
    let size = std::fs::metadata(&path).unwrap().len();
    let mut best = Duration::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        let r = verify(&path).unwrap();
        best = best.min(t.elapsed());
        assert!(r.ok() && r.entries == n);
    }
    println!(
        "\nSUMMARY ledger: append {:.0} entries/s ({} entries, {:.0} bytes/entry, one thread); verify {:.0} entries/s (best of 5)",
        n as f64 / append.as_secs_f64(),
        n,
        size as f64 / n as f64,
        n as f64 / best.as_secs_f64()
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
