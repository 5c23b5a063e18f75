//! Best-of-20 append throughput on short runs (less sensitive to a noisy machine than one long run).
#![allow(clippy::unwrap_used, clippy::print_stdout)]
use std::sync::Arc;
use std::time::Instant;

use sentinel_core::ledger::{Handoff, LogOptions};
use sentinel_core::{Engine, Guard, PolicySet};
use serde_json::json;

fn main() {
    for (name, handoff) in
        [("group commit (default)", Handoff::Group { window: Handoff::WINDOW }), ("every entry", Handoff::EveryEntry)]
    {
        let dir = tempfile::tempdir().unwrap();
        let opts = LogOptions { handoff, ..LogOptions::default() };
        let g = Guard::open(dir.path(), Arc::new(Engine::new(PolicySet::empty())), opts).unwrap();
        let inputs = json!({"args": [], "kwargs": {"query": "Python best practices", "limit": 10, "api_key": "sk-abcdefghijklmnopqrstuv"}});
        let outputs = json!({"results": ["a", "b", "c"], "count": 3});
        let tags = vec!["search".to_string(), "api".to_string()];
        let mut best = f64::MAX;
        for _ in 0..20 {
            let t = Instant::now();
            for _ in 0..20_000 {
                g.record("search_tool", &inputs, &outputs, 0.01, 234.5, "success", &tags, ("agent", "run", "session"))
                    .unwrap();
            }
            best = best.min(t.elapsed().as_secs_f64() / 20_000.0);
        }
        g.flush().unwrap();
        println!("append best-of-20, {name}: {:.0} ns/entry = {:.0} entries/s", best * 1e9, 1.0 / best);
    }
}
