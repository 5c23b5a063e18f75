#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
//! Durability: a writer killed with SIGKILL loses no entry whose call had returned (handing each
//! entry to the OS) or that was flushed (group commit), and a torn last line is set aside so the
//! chain continues verifiably.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sentinel_core::guard::{INTERVENTIONS_FILE, LEDGER_FILE};
use sentinel_core::ledger::{ChainWriter, Handoff, LogOptions, read_all, verify};
use sentinel_core::load::parse_yaml;
use sentinel_core::{ActionRequest, Begun, CallOutcome, Engine, Guard, PolicySet};
use serde_json::json;

const CHILD_ENV: &str = "SENTINEL_CRASH_CHILD_DIR";
const GROUP_ENV: &str = "SENTINEL_CRASH_CHILD_GROUP";

/// Runs only inside the child process: append guarded calls forever, acknowledging each one.
/// With group commit it acknowledges only what it flushed, every 50 calls.
#[test]
fn crash_child() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let group = std::env::var_os(GROUP_ENV).is_some();
    let handoff = if group { Handoff::Group { window: Handoff::WINDOW } } else { Handoff::EveryEntry };
    let engine = Arc::new(Engine::new(PolicySet::compile(Vec::new()).unwrap()));
    let opts = LogOptions { rotate_bytes: 256 * 1024, handoff, ..LogOptions::default() };
    let guard = Guard::open(std::path::Path::new(&dir), engine, opts).unwrap();
    let mut out = std::io::stdout().lock();
    for i in 0u64.. {
        let args = json!({"i": i, "text": "x".repeat((i % 200) as usize)});
        let req = ActionRequest::new("work").args(&args).cost(0.001);
        let Begun::Proceed(permit) = guard.begin(&req, args.clone()).unwrap() else { panic!("denied") };
        let appended = guard.finish(*permit, CallOutcome::Success(json!({"ok": i})), None).unwrap();
        if group {
            if !appended.seq.is_multiple_of(50) {
                continue;
            }
            guard.flush().unwrap();
        }
        // The entry is with the OS: acknowledge it.
        writeln!(out, "{}", appended.seq).unwrap();
        out.flush().unwrap();
    }
}

#[test]
fn sigkill_loses_no_acknowledged_entry() {
    sigkill_rounds(false);
}

#[test]
fn sigkill_with_group_commit_loses_nothing_flushed_and_keeps_the_chain() {
    sigkill_rounds(true);
}

fn sigkill_rounds(group: bool) {
    let dir = tempfile::tempdir().unwrap();
    for round in 0..3 {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        if group {
            cmd.env(GROUP_ENV, "1");
        }
        let mut child = cmd
            .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut acked = 0u64;
        let started = Instant::now();
        // Kill it somewhere in the middle of its work.
        let target = 300 + round * 517;
        while acked < target && started.elapsed() < Duration::from_secs(60) {
            match lines.next() {
                Some(Ok(l)) => {
                    if let Ok(n) = l.trim().parse::<u64>() {
                        acked = n;
                    }
                }
                _ => break,
            }
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        // Anything acknowledged after we stopped reading is still in the pipe.
        for l in lines.map_while(Result::ok) {
            if let Ok(n) = l.trim().parse::<u64>() {
                acked = acked.max(n);
            }
        }
        assert!(acked > 0, "child acknowledged nothing");
        let ledger = dir.path().join(LEDGER_FILE);
        // Reopening recovers (a torn line, if any, is set aside) and the chain verifies.
        drop(ChainWriter::open(&ledger, LogOptions::default()).unwrap());
        let report = verify(&ledger).unwrap();
        assert!(report.ok(), "round {round}: {:?}", report.failure);
        assert!(report.last_seq >= acked, "round {round}: acknowledged {acked} but ledger ends at {}", report.last_seq);
        let seqs: Vec<u64> = read_all(&ledger).unwrap().iter().map(|v| v["seq"].as_u64().unwrap()).collect();
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1));
    }
}

#[test]
fn torn_last_line_is_set_aside_and_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(Engine::new(PolicySet::compile(Vec::new()).unwrap()));
    {
        let g = Guard::open(dir.path(), Arc::clone(&engine), LogOptions::default()).unwrap();
        for i in 0..3 {
            let args = json!({"i": i});
            let Begun::Proceed(p) = g.begin(&ActionRequest::new("a").args(&args), args.clone()).unwrap() else {
                panic!()
            };
            g.finish(*p, CallOutcome::Success(json!(null)), None).unwrap();
        }
    }
    let ledger = dir.path().join(LEDGER_FILE);
    // A crash in the middle of a write leaves half a line.
    let mut f = std::fs::OpenOptions::new().append(true).open(&ledger).unwrap();
    let torn: &[u8] = br#"{"id":"half-written","action":"a","cost_"#;
    f.write_all(torn).unwrap();
    drop(f);
    let before = verify(&ledger).unwrap();
    assert!(before.failure.unwrap().problem.contains("torn"));

    let g = Guard::open(dir.path(), engine, LogOptions::default()).unwrap();
    assert_eq!(g.ledger().recovery().torn_bytes, torn.len() as u64);
    drop(g);
    let after = verify(&ledger).unwrap();
    assert!(after.ok(), "{:?}", after.failure);
    let entries = read_all(&ledger).unwrap();
    let last = entries.last().unwrap();
    assert_eq!(last["outcome"], "recovered");
    assert_eq!(last["payload"]["inputs"]["torn_bytes"], torn.len());
    let quarantined = std::fs::read_to_string(dir.path().join(format!("{LEDGER_FILE}.torn"))).unwrap();
    assert!(quarantined.contains("half-written"), "the torn bytes are kept: {quarantined}");
}

#[test]
fn guard_records_blocks_warnings_shadow_and_redacts_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = r#"
policies:
  - name: main
    denied_actions: [drop_table]
    rules:
      - { id: ext, function_pattern: send_email, conditions: [{param: to, operator: ends_with, value: "@evil.com"}], action: warn }
  - name: trial
    mode: shadow
    denied_actions: [search]
"#;
    let set = PolicySet::compile(parse_yaml("p.yaml", "p", yaml).unwrap()).unwrap();
    let g = Guard::open(dir.path(), Arc::new(Engine::new(set)), LogOptions::default()).unwrap();
    let args = json!({"table": "users", "api_key": "sk-live-abcdefghijklmnop"});
    let req = ActionRequest::new("drop_table").args(&args).cost(2.5).agent("bot").run("r1");
    let Begun::Stop { decision, .. } = g.begin(&req, args.clone()).unwrap() else { panic!("should stop") };
    assert_eq!(decision.reason.as_str(), "DENIED_ACTION");

    let args = json!({"to": "x@evil.com", "password": "hunter2"});
    let Begun::Proceed(p) = g.begin(&ActionRequest::new("send_email").args(&args), args.clone()).unwrap() else {
        panic!()
    };
    g.finish(*p, CallOutcome::Error("smtp down".into()), None).unwrap();

    let args = json!({"q": "Bearer abcdefghijklmnopqrstuvwxyz"});
    let Begun::Proceed(p) = g.begin(&ActionRequest::new("search").args(&args), args.clone()).unwrap() else { panic!() };
    g.finish(*p, CallOutcome::Success(json!({"token": "t-123456789"})), Some(0.02)).unwrap();
    drop(g);

    let ledger = read_all(&dir.path().join(LEDGER_FILE)).unwrap();
    let outcomes: Vec<&str> = ledger.iter().map(|e| e["outcome"].as_str().unwrap()).collect();
    assert_eq!(outcomes, ["blocked", "error", "success"]);
    assert_eq!(ledger[0]["cost_usd"], 0.0, "a blocked call costs nothing");
    assert_eq!(ledger[0]["decision"]["reason"], "DENIED_ACTION");
    assert_eq!(ledger[1]["payload"]["outputs"], "smtp down");
    assert_eq!(ledger[2]["cost_usd"], 0.02);
    let interventions = read_all(&dir.path().join(INTERVENTIONS_FILE)).unwrap();
    let kinds: Vec<(String, String, bool)> = interventions
        .iter()
        .map(|i| {
            (i["type"].as_str().unwrap().into(), i["outcome"].as_str().unwrap().into(), i["shadow"].as_bool().unwrap())
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("HARD_BLOCK".into(), "BLOCKED".into(), false),
            ("WARNING".into(), "WARNED".into(), false),
            ("HARD_BLOCK".into(), "WARNED".into(), true),
        ]
    );
    assert_eq!(interventions[0]["risk_level"], "CRITICAL", "`drop` is a destructive word");
    assert_eq!(interventions[0]["cost_prevented_usd"], 2.5);
    assert_eq!(interventions[2]["policy"], "trial");
    let all = format!("{ledger:?}{interventions:?}");
    for secret in ["sk-live-abcdefghijklmnop", "hunter2", "abcdefghijklmnopqrstuvwxyz", "t-123456789"] {
        assert!(!all.contains(secret), "`{secret}` leaked into a record");
    }
    assert!(verify(&dir.path().join(LEDGER_FILE)).unwrap().ok());
    assert!(verify(&dir.path().join(INTERVENTIONS_FILE)).unwrap().ok());
}
