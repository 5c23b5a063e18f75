#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
//! Invariants, checked on random inputs: no overspend under racing threads, exact sliding windows,
//! and a hash chain that detects any edit, deletion or reordering.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use proptest::prelude::*;
use sentinel_core::ledger::{ChainWriter, Handoff, LogOptions, verify};
use sentinel_core::load::parse_yaml;
use sentinel_core::{ActionRequest, Engine, ManualClock, PolicySet, Usd};
use serde_json::json;

fn engine_from(yaml: &str, clock: Arc<ManualClock>) -> Engine {
    let docs = parse_yaml("p.yaml", "p", yaml).unwrap();
    Engine::with_clock(PolicySet::compile(docs).unwrap(), clock)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    /// Threads race for one session's run, session and action budgets. Nothing ever exceeds a
    /// limit, and the spend equals the sum of the allowed costs exactly.
    #[test]
    fn racing_threads_never_overspend(
        session in 1u64..400,
        run in 1u64..300,
        action in 1u64..200,
        costs in prop::collection::vec(prop::collection::vec(0u64..40, 20..60), 4),
        release_every in 2usize..7,
    ) {
        let yaml = format!(
            "budgets:\n  session: {}\n  run: {}\n  actions:\n    hot: {}\n",
            session as f64 / 100.0, run as f64 / 100.0, action as f64 / 100.0
        );
        let engine = Arc::new(engine_from(&yaml, Arc::new(ManualClock::new(1))));
        let allowed = Arc::new(AtomicU64::new(0));
        let allowed_hot = Arc::new(AtomicU64::new(0));
        std::thread::scope(|s| {
            for (t, thread_costs) in costs.iter().enumerate() {
                let engine = Arc::clone(&engine);
                let allowed = Arc::clone(&allowed);
                let allowed_hot = Arc::clone(&allowed_hot);
                s.spawn(move || {
                    for (i, c) in thread_costs.iter().enumerate() {
                        let cost = *c as f64 / 100.0;
                        let action = if i % 2 == 0 { "hot" } else { "cold" };
                        let req = ActionRequest::new(action).session("s").run("r").cost(cost);
                        let mut d = engine.decide(&req);
                        if let Some(r) = d.take_reservation() {
                            if (i + t) % release_every == 0 {
                                r.release();
                            } else {
                                let micros = Usd::from_f64(cost).unwrap().micros();
                                allowed.fetch_add(micros, Ordering::SeqCst);
                                if action == "hot" {
                                    allowed_hot.fetch_add(micros, Ordering::SeqCst);
                                }
                                r.settle(Usd::from_f64(cost).unwrap());
                            }
                        }
                    }
                });
            }
        });
        let spend = engine.spend("s", "r");
        let total = allowed.load(Ordering::SeqCst);
        prop_assert_eq!(spend.session_total.micros(), total);
        prop_assert_eq!(spend.run_total.micros(), total);
        prop_assert!(total <= session * 10_000, "session spend {} over limit {}", total, session * 10_000);
        prop_assert!(total <= run * 10_000, "run spend {} over limit {}", total, run * 10_000);
        let hot = spend.actions.iter().find(|(a, _)| a == "hot").map_or(0, |(_, s)| s.spent.micros());
        prop_assert_eq!(hot, allowed_hot.load(Ordering::SeqCst));
        prop_assert!(hot <= action * 10_000);
    }

    /// For random call times: no window of `window` seconds ever holds more than `max_count`
    /// allowed calls, and a call is denied only when its window is already full.
    #[test]
    fn sliding_window_is_exact(
        max_count in 1u32..6,
        window_ms in 1u64..5_000,
        gaps in prop::collection::vec(0u64..3_000, 1..120),
    ) {
        let clock = Arc::new(ManualClock::new(0));
        let yaml = format!(
            "rate_limits:\n  act: {{ max_count: {max_count}, window_seconds: {} }}\n",
            window_ms as f64 / 1000.0
        );
        let engine = engine_from(&yaml, clock.clone());
        let window_ns = window_ms * 1_000_000;
        let mut now = 0u64;
        let mut allowed: Vec<u64> = Vec::new();
        for gap in gaps {
            now += gap * 1_000_000;
            clock.set_nanos(now);
            let mut d = engine.decide(&ActionRequest::new("act"));
            let in_window = allowed.iter().filter(|t| **t + window_ns > now).count();
            if d.permits() {
                prop_assert!(in_window < max_count as usize, "allowed with a full window");
                allowed.push(now);
                if let Some(r) = d.take_reservation() { r.settle(Usd::ZERO); }
            } else {
                prop_assert_eq!(in_window, max_count as usize, "denied with room in the window");
                let retry = d.retry_after_seconds.unwrap();
                prop_assert!(retry > 0.0 && retry <= window_ms as f64 / 1000.0 + 1e-9);
            }
        }
        for (i, t) in allowed.iter().enumerate() {
            let inside = allowed.iter().skip(i).take_while(|u| **u < t + window_ns).count();
            prop_assert!(inside <= max_count as usize);
        }
    }
}

/// Writes a ledger of `n` entries and returns its bytes.
fn write_ledger(dir: &std::path::Path, n: usize, seed: u64) -> Vec<u8> {
    let path = dir.join("ledger.jsonl");
    let w = ChainWriter::open(&path, LogOptions::default()).unwrap();
    for i in 0..n {
        w.append(&json!({"id": i, "action": format!("act_{}", (seed + i as u64) % 7), "cost_usd": 0.01 * i as f64, "payload": {"inputs": {"q": "x".repeat((seed as usize + i) % 5)}}}))
            .unwrap();
    }
    w.flush().unwrap();
    std::fs::read(&path).unwrap()
}

#[derive(Debug, Clone)]
enum Tamper {
    Byte { pos: usize, value: u8 },
    DeleteLine(usize),
    Swap(usize, usize),
}

fn lines_of(b: &[u8]) -> Vec<Vec<u8>> {
    b.split_inclusive(|c| *c == b'\n').map(<[u8]>::to_vec).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, .. ProptestConfig::default() })]

    /// Any single-byte edit, deleted line or swapped pair of lines is detected; an untouched ledger verifies.
    #[test]
    fn any_tampering_is_detected(
        n in 2usize..12,
        seed in 0u64..1000,
        kind in 0u8..3,
        a in any::<prop::sample::Index>(),
        b in any::<prop::sample::Index>(),
        value in any::<u8>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.jsonl");
        let original = write_ledger(dir.path(), n, seed);
        let untouched = verify(&path).unwrap();
        prop_assert!(untouched.ok(), "untouched ledger failed: {:?}", untouched.failure);
        prop_assert_eq!(untouched.entries, n as u64);

        let tamper = match kind {
            0 => Tamper::Byte { pos: a.index(original.len()), value },
            1 => Tamper::DeleteLine(a.index(n)),
            _ => {
                let i = a.index(n);
                let mut j = b.index(n);
                if i == j { j = (i + 1) % n; }
                Tamper::Swap(i.min(j), i.max(j))
            }
        };
        let mut bytes = original.clone();
        match &tamper {
            Tamper::Byte { pos, value } => {
                if bytes[*pos] == *value { return Ok(()); }
                bytes[*pos] = *value;
            }
            Tamper::DeleteLine(i) => {
                let mut ls = lines_of(&bytes);
                ls.remove(*i);
                bytes = ls.concat();
            }
            Tamper::Swap(i, j) => {
                let mut ls = lines_of(&bytes);
                ls.swap(*i, *j);
                bytes = ls.concat();
            }
        }
        std::fs::write(&path, &bytes).unwrap();
        let report = verify(&path).unwrap();
        prop_assert!(!report.ok(), "tampering not detected: {:?}", tamper);
    }
}

#[test]
fn verify_names_the_first_bad_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.jsonl");
    let bytes = write_ledger(dir.path(), 5, 1);
    let mut ls = lines_of(&bytes);
    let edited = String::from_utf8(ls[2].clone()).unwrap().replace("act_", "ACT_");
    ls[2] = edited.into_bytes();
    std::fs::write(&path, ls.concat()).unwrap();
    let f = verify(&path).unwrap().failure.unwrap();
    assert_eq!(f.line, 3);
    assert_eq!(f.seq, Some(3));
    assert!(f.problem.contains("edited"), "{}", f.problem);
}

#[test]
fn chain_continues_across_rotated_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.jsonl");
    let w = ChainWriter::open(
        &path,
        LogOptions { rotate_bytes: 600, handoff: Handoff::EveryEntry, ..LogOptions::default() },
    )
    .unwrap();
    for i in 0..40 {
        w.append(&json!({"i": i, "pad": "p".repeat(50)})).unwrap();
    }
    drop(w);
    let r = verify(&path).unwrap();
    assert!(r.ok(), "{:?}", r.failure);
    assert!(r.files.len() > 3, "expected rotation, got {:?}", r.files);
    assert_eq!(r.entries, 40);
    // Reopening continues the chain from the newest segment.
    let w = ChainWriter::open(
        &path,
        LogOptions { rotate_bytes: 600, handoff: Handoff::EveryEntry, ..LogOptions::default() },
    )
    .unwrap();
    assert_eq!(w.append(&json!({"i": 40})).unwrap().seq, 41);
    drop(w);
    assert!(verify(&path).unwrap().ok());
    // Removing a whole rotated segment is detected.
    std::fs::remove_file(&r.files[1]).unwrap();
    let broken = verify(&path).unwrap();
    assert!(!broken.ok());
}

#[test]
fn a_second_writer_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.jsonl");
    let _w = ChainWriter::open(&path, LogOptions::default()).unwrap();
    let e = ChainWriter::open(&path, LogOptions::default()).unwrap_err();
    assert!(e.to_string().contains("in use by another process"), "{e}");
}

/// Large ledgers are verified in parallel pieces: a problem anywhere, including right at a piece
/// boundary, is still found and reported at its exact line.
#[test]
fn parallel_verify_reports_the_exact_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.jsonl");
    {
        let w = ChainWriter::open(&path, LogOptions { rotate_bytes: 1 << 40, ..LogOptions::default() }).unwrap();
        for i in 0..12_000 {
            w.append(&json!({"i": i, "pad": "x".repeat(200)})).unwrap();
        }
    }
    let original = std::fs::read(&path).unwrap();
    assert!(original.len() > 2 << 20, "needs to be big enough to be split");
    assert!(verify(&path).unwrap().ok());
    let lines = lines_of(&original);
    for target in [1usize, 2_999, 5_999, 6_000, 6_001, 9_000, 11_999] {
        // An edit inside line `target` (0-based).
        let mut ls = lines.clone();
        let pos = ls[target].len() / 2;
        ls[target][pos] ^= 0x01;
        std::fs::write(&path, ls.concat()).unwrap();
        let f = verify(&path).unwrap().failure.expect("edit detected");
        assert_eq!(f.line, target as u64 + 1, "edit in line {}", target + 1);
        // Two lines swapped.
        let first = target.min(lines.len() - 2);
        let mut ls = lines.clone();
        ls.swap(first, first + 1);
        std::fs::write(&path, ls.concat()).unwrap();
        let f = verify(&path).unwrap().failure.expect("swap detected");
        assert_eq!(f.line, first as u64 + 1, "swap at line {}", first + 1);
    }
}

#[test]
fn opening_a_ledger_with_an_edited_last_line_names_that_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.jsonl");
    let bytes = write_ledger(dir.path(), 4, 3);
    let mut ls = lines_of(&bytes);
    ls[3] = String::from_utf8(ls[3].clone()).unwrap().replace("act_", "ACT_").into_bytes();
    std::fs::write(&path, ls.concat()).unwrap();
    let e = ChainWriter::open(&path, LogOptions::default()).unwrap_err().to_string();
    assert!(e.contains("line 4") && e.contains("hash does not match"), "{e}");
}

/// Group commit: entries reach the file by themselves shortly after `append`, in whole lines, and
/// dropping the writer writes the rest and anchors the end.
#[test]
fn group_commit_writes_whole_lines_soon_and_everything_at_drop() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.jsonl");
    let w = ChainWriter::open(&path, LogOptions::default()).unwrap();
    for i in 0..100 {
        w.append(&json!({"i": i})).unwrap();
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut seen = 0;
    while seen < 100 && std::time::Instant::now() < deadline {
        let bytes = std::fs::read(&path).unwrap();
        assert!(bytes.is_empty() || bytes.ends_with(b"\n"), "a reader only ever sees whole lines");
        seen = bytes.iter().filter(|b| **b == b'\n').count();
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert_eq!(seen, 100, "the writer thread wrote every entry without being asked");
    for i in 100..150 {
        w.append(&json!({"i": i})).unwrap();
    }
    drop(w);
    let r = verify(&path).unwrap();
    assert!(r.ok() && r.anchored, "{r:?}");
    assert_eq!((r.entries, r.anchor_seq), (150, Some(150)));
}
