//! Central decisions, halts, ingest, interventions and agents, in-process, on SQLite and PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use sentinel_core::{ActionRequest, Begun, CallOutcome, Engine, Guard, LogOptions, PolicySet};
use sentinel_server::AppState;
use sentinel_store::Store;
use serde_json::{Value, json};

mod common;
use common::*;

const POLICY: &str = r#"{
    "name": "fleet",
    "budgets": {"session": 1.0, "actions": {"pay": 0.9}},
    "denied_actions": ["rm"],
    "rate_limits": {"search": {"max_count": 3, "window_seconds": 60}}
}"#;

async fn with_policy(e: &Env) {
    let (s, body, _) =
        e.call("POST", "/api/v1/policies", Some(&e.admin), Some(serde_json::from_str(POLICY).unwrap())).await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
}

async fn decide(e: &Env, key: &str, body: Value) -> (StatusCode, Value) {
    let (s, v, ctype) = e.call("POST", "/api/v1/decide", Some(key), Some(body)).await;
    let want = if s == StatusCode::OK { "application/json" } else { "application/problem+json" };
    assert_eq!(ctype, want, "{s}: {v}");
    (s, v)
}

async fn agent_key(e: &Env, agent: &str) -> String {
    let (s, k, _) = e
        .call("POST", "/api/v1/keys", Some(&e.admin), Some(json!({"name": agent, "scope": "agent", "agent_id": agent})))
        .await;
    assert_eq!(s, StatusCode::CREATED);
    k["key"].as_str().unwrap().to_string()
}

/// Waits for the background writer to record what the decisions produced.
async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..60 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn decide_reserves_settles_and_denies_like_the_core() {
    on_both(|e| async move {
        with_policy(&e).await;
        let bot = agent_key(&e, "bot").await;
        let call =
            |action: &str, cost: f64| json!({"action": action, "cost_usd": cost, "session_id": "s1", "run_id": "r1"});

        // Budgets: two calls of 0.4 fit in 1.0 (action cap 0.9 is per action: 0.8 fits), a third does not.
        let (s, a) = decide(&e, &bot, call("pay", 0.4)).await;
        assert_eq!(s, StatusCode::OK, "{a}");
        assert_eq!(a["verdict"], "allow");
        assert_eq!(a["agent_id"], "bot");
        let ra = a["reservation"]["id"].as_str().unwrap().to_string();
        assert!(a["reservation"]["expires_at"].as_i64().unwrap() > sentinel_store::now_ms());
        let (_, b) = decide(&e, &bot, call("pay", 0.4)).await;
        assert_eq!(b["verdict"], "allow");
        let rb = b["reservation"]["id"].as_str().unwrap().to_string();
        let (_, c) = decide(&e, &bot, call("pay", 0.4)).await;
        assert_eq!(c["verdict"], "deny", "{c}");
        assert_eq!(c["reason"], "ACTION_BUDGET_EXCEEDED", "{c}");
        assert_eq!(c["intervention"], "BUDGET_EXCEEDED");
        assert!(c.get("reservation").is_none());
        assert!(c["intervention_id"].is_string());

        // Settling below the estimate gives the difference back; releasing gives it all back.
        let (s, st, _) = e
            .call("POST", "/api/v1/settle", Some(&bot), Some(json!({"reservation_id": ra, "actual_cost_usd": 0.1})))
            .await;
        assert_eq!(s, StatusCode::OK, "{st}");
        assert_eq!(st["state"], "settled");
        let (s, _, _) = e.call("POST", "/api/v1/settle", Some(&bot), Some(json!({"reservation_id": ra}))).await;
        assert_eq!(s, StatusCode::CONFLICT, "a reservation settles once");
        let (s, st, _) =
            e.call("POST", "/api/v1/settle", Some(&bot), Some(json!({"reservation_id": rb, "release": true}))).await;
        assert_eq!((s, st["state"].as_str()), (StatusCode::OK, Some("released")));
        let (s, ..) = e
            .call(
                "POST",
                "/api/v1/settle",
                Some(&bot),
                Some(json!({"reservation_id": "0196f0e0-0000-7000-8000-000000000000"})),
            )
            .await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        // Spent 0.1 of the action's 0.9: 0.8 more fits exactly (equal is allowed), then nothing.
        let (_, d) = decide(&e, &bot, call("pay", 0.8)).await;
        assert_eq!(d["verdict"], "allow", "{d}");
        let (_, d) = decide(&e, &bot, call("pay", 0.01)).await;
        assert_eq!(d["verdict"], "deny");

        // Rate limit: three in the window, then a denial with a retry hint.
        for _ in 0..3 {
            let (_, r) = decide(&e, &bot, call("search", 0.0)).await;
            assert_eq!(r["verdict"], "allow", "{r}");
        }
        let (_, r) = decide(&e, &bot, call("search", 0.0)).await;
        assert_eq!(r["reason"], "RATE_LIMITED", "{r}");
        let retry = r["retry_after_seconds"].as_f64().unwrap();
        assert!(retry > 55.0 && retry <= 60.0, "{retry}");

        // Denied list.
        let (_, r) = decide(&e, &bot, call("rm", 0.0)).await;
        assert_eq!((r["verdict"].as_str(), r["reason"].as_str()), (Some("deny"), Some("DENIED_ACTION")), "{r}");

        // The same sequence through the in-process engine gives the same verdicts.
        let engine = Engine::new(PolicySet::compile(vec![serde_json::from_str(POLICY).unwrap()]).unwrap());
        let req = |a: &'static str, c: f64| ActionRequest::new(a).agent("bot").run("r1").session("s1").cost(c);
        let r1 = engine.decide(&req("pay", 0.4)).take_reservation().unwrap();
        let r2 = engine.decide(&req("pay", 0.4)).take_reservation().unwrap();
        assert_eq!(engine.decide(&req("pay", 0.4)).reason.as_str(), "ACTION_BUDGET_EXCEEDED");
        r1.settle(sentinel_core::Usd::from_micros(100_000));
        r2.release();
        assert!(engine.decide(&req("pay", 0.8)).permits());
        assert!(!engine.decide(&req("pay", 0.01)).permits());

        // Interventions were recorded from the denials, and the agent was registered.
        let admin = e.admin.clone();
        eventually("interventions", || {
            let e = &e;
            let admin = admin.clone();
            async move {
                let (_, l, _) = e.call("GET", "/api/v1/interventions?agent_id=bot", Some(&admin), None).await;
                l["items"].as_array().is_some_and(|a| a.len() >= 4)
            }
        })
        .await;
        let (_, l, _) = e.call("GET", "/api/v1/interventions?type=RATE_LIMITED", Some(&e.admin), None).await;
        assert_eq!(l["items"].as_array().unwrap().len(), 1);
        assert_eq!(l["items"][0]["record"]["action"], "search");
        let (_, stats, _) = e.call("GET", "/api/v1/interventions/stats", Some(&e.admin), None).await;
        assert_eq!(stats["blocked"], 4, "{stats}");
        assert!((stats["cost_prevented_usd"].as_f64().unwrap() - 0.41).abs() < 1e-9, "{stats}");
        assert_eq!(stats["top_blocked_actions"][0]["name"], "pay");
        assert_eq!(stats["top_policies"][0]["name"], "fleet");
        assert_eq!(stats["by_day"].as_array().unwrap().len(), 1);
        eventually("agent registry", || {
            let e = &e;
            let admin = admin.clone();
            async move {
                let (_, a, _) = e.call("GET", "/api/v1/agents/bot", Some(&admin), None).await;
                a["decisions"].as_i64() == Some(6) && a["calls"].as_i64() == Some(0)
            }
        })
        .await;
        let (_, a, _) = e.call("GET", "/api/v1/agents/bot", Some(&e.admin), None).await;
        assert_eq!(a["runs"][0]["run_id"], "r1");
        let (_, list, _) = e.call("GET", "/api/v1/agents", Some(&e.admin), None).await;
        assert_eq!(list["agents"][0]["agent_id"], "bot");

        // Metrics count decisions by verdict.
        let (s, text, ctype) = e.call("GET", "/metrics", None, None).await;
        assert_eq!(s, StatusCode::OK);
        assert!(ctype.starts_with("text/plain"));
        let text = text.as_str().unwrap_or_default();
        for series in [
            r#"sentinel_decisions_total{verdict="deny"}"#,
            r#"sentinel_decisions_total{verdict="allow"}"#,
            "sentinel_decide_seconds_bucket",
        ] {
            assert!(text.contains(series), "{series} missing from /metrics");
        }
    })
    .await;
}

#[tokio::test]
async fn agent_keys_act_only_for_their_agent_and_halts_stop_everything() {
    on_both(|e| async move {
        with_policy(&e).await;
        let bot = agent_key(&e, "bot").await;
        let other = agent_key(&e, "other").await;
        let (s, _) = decide(&e, &bot, json!({"action": "pay", "agent_id": "other"})).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "an agent key cannot decide for another agent");
        let (_, d) = decide(&e, &bot, json!({"action": "pay", "cost_usd": 0.1})).await;
        let rid = d["reservation"]["id"].as_str().unwrap().to_string();
        let (s, ..) = e.call("POST", "/api/v1/settle", Some(&other), Some(json!({"reservation_id": rid}))).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "nor settle its reservations");
        let (s, ..) = e.call("POST", "/api/v1/halts", Some(&bot), Some(json!({"agent_id": "bot"}))).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "agents cannot halt or resume");

        // Halt the agent: every decision denies at once; resuming restores service.
        let (s, h, _) = e
            .call("POST", "/api/v1/halts", Some(&e.admin), Some(json!({"agent_id": "bot", "reason": "runaway loop"})))
            .await;
        assert_eq!(s, StatusCode::CREATED, "{h}");
        let (_, d) = decide(&e, &bot, json!({"action": "anything"})).await;
        assert_eq!((d["verdict"].as_str(), d["reason"].as_str()), (Some("deny"), Some("HALTED")), "{d}");
        assert!(d["message"].as_str().unwrap().contains("runaway loop"));
        let (_, d) = decide(&e, &other, json!({"action": "anything"})).await;
        assert_eq!(d["verdict"], "allow", "other agents keep running");
        let (_, hs, _) = e.call("GET", "/api/v1/halts", Some(&e.admin), None).await;
        assert_eq!(hs["halts"][0]["target"], "bot");
        let (s, ..) = e.call("DELETE", "/api/v1/halts?agent_id=bot", Some(&e.admin), None).await;
        assert_eq!(s, StatusCode::NO_CONTENT);
        let (s, ..) = e.call("DELETE", "/api/v1/halts?agent_id=bot", Some(&e.admin), None).await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        let (_, d) = decide(&e, &bot, json!({"action": "anything"})).await;
        assert_eq!(d["verdict"], "allow");

        // A run halt.
        e.call("POST", "/api/v1/halts", Some(&e.admin), Some(json!({"run_id": "r9"}))).await;
        let (_, d) = decide(&e, &other, json!({"action": "x", "run_id": "r9"})).await;
        assert_eq!(d["reason"], "HALTED");

        // Bad input names the field; nothing is reserved.
        for (body, field) in [
            (json!({"action": "pay", "cost": 1}), "cost"),
            (json!({"action": "pay", "cost_usd": -1}), "cost_usd"),
            (json!({"action": "pay", "args": [1]}), "args"),
            (json!({"action": ""}), "action"),
            (json!({"action": "pay", "reservation_ttl_seconds": 0}), "reservation_ttl_seconds"),
            (json!({"action": "pay", "cost_usd": "1"}), "cost_usd"),
        ] {
            let (s, p, ctype) = e.call("POST", "/api/v1/decide", Some(&e.admin), Some(body.clone())).await;
            assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{body} → {p}");
            assert_eq!(ctype, "application/problem+json");
            assert!(p["errors"][0]["path"].as_str().unwrap().contains(field), "{body} → {p}");
        }
        let (s, p, _) =
            e.call("POST", "/api/v1/halts", Some(&e.admin), Some(json!({"agent_id": "a", "run_id": "b"}))).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{p}");
        let ro = {
            let (_, k, _) = e.call("POST", "/api/v1/keys", Some(&e.admin), Some(json!({"scope": "readonly"}))).await;
            k["key"].as_str().unwrap().to_string()
        };
        let (s, _) = decide(&e, &ro, json!({"action": "pay"})).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "readonly keys cannot decide");
    })
    .await;
}

#[tokio::test]
async fn expired_reservations_give_their_budget_back() {
    on_both(|e| async move {
        with_policy(&e).await;
        let body = json!({"action": "pay", "cost_usd": 0.9, "reservation_ttl_seconds": 0.3});
        let (_, d) = decide(&e, &e.admin, body.clone()).await;
        assert_eq!(d["verdict"], "allow");
        let first = d["reservation"]["id"].as_str().unwrap().to_string();
        let (_, d) = decide(&e, &e.admin, body.clone()).await;
        assert_eq!(d["verdict"], "deny", "the first reservation still holds the budget");
        sentinel_server::central::spawn_sweeper(e.state.clone());
        let admin = e.admin.clone();
        let body = json!({"action": "pay", "cost_usd": 0.9, "reservation_ttl_seconds": 60});
        eventually("expiry", || {
            let e = &e;
            let admin = admin.clone();
            let body = body.clone();
            async move { decide(e, &admin, body).await.1["verdict"] == "allow" }
        })
        .await;
        // The expired call ran after all: settling it charges its actual cost, once, on both
        // backends (0.9 held + 0.5 owed is over the $1 session budget).
        let settle = json!({"reservation_id": first, "actual_cost_usd": 0.5});
        let (s, r, _) = e.call("POST", "/api/v1/settle", Some(&e.admin), Some(settle.clone())).await;
        assert_eq!(s, StatusCode::OK, "{r}");
        assert_eq!(
            (r["expired_before_settling"].as_bool(), r["actual_cost_usd"].as_f64()),
            (Some(true), Some(0.5)),
            "{r}"
        );
        // Another action, so only the session's budget speaks: 0.95 would fit, 1.45 does not.
        let (_, d) = decide(&e, &e.admin, json!({"action": "lookup", "cost_usd": 0.05})).await;
        assert_eq!(d["verdict"], "deny", "the late settle was charged: {d}");
        let (s, r, _) = e.call("POST", "/api/v1/settle", Some(&e.admin), Some(settle)).await;
        assert_eq!(s, StatusCode::CONFLICT, "charged once: {r}");
    })
    .await;
}

/// On SQLite the server decides in memory; a restart must rebuild the counters from the database.
#[tokio::test]
async fn sqlite_counters_survive_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let url = sqlite_file(tmp.path());
    let e = env_on(&url).await;
    with_policy(&e).await;
    let call = |c: f64| json!({"action": "pay", "cost_usd": c, "session_id": "s", "run_id": "r"});
    let (_, a) = decide(&e, &e.admin, call(0.5)).await;
    let ra = a["reservation"]["id"].as_str().unwrap().to_string();
    let (_, b) = decide(&e, &e.admin, call(0.3)).await;
    assert_eq!(b["verdict"], "allow");
    e.call("POST", "/api/v1/settle", Some(&e.admin), Some(json!({"reservation_id": ra, "actual_cost_usd": 0.4}))).await;
    for _ in 0..3 {
        decide(&e, &e.admin, json!({"action": "search"})).await;
    }
    let admin = e.admin.clone();
    e.state.store.close().await;
    drop(e);
    // The process "crashed" before folding its journal, in the middle of writing a line.
    let journals: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .flatten()
        .filter(|f| f.file_name().to_string_lossy().contains(".journal."))
        .collect();
    assert!(!journals.is_empty(), "reservations are journaled beside the database");
    use std::io::Write;
    let last = journals.iter().map(|f| f.path()).max().unwrap();
    std::fs::OpenOptions::new().append(true).open(&last).unwrap().write_all(b"{\"op\":\"reserve\",\"id\":").unwrap();

    // A new process on the same file: 0.4 settled + 0.3 still reserved = 0.7 of the action's 0.9.
    let store = Store::open(&url).await.unwrap();
    let state = AppState::open(store, b"test-secret-test-secret-test-secret".to_vec()).await.unwrap();
    let e2 = Env { state, admin, dir: tempfile::tempdir().unwrap() };
    let (_, d) = decide(&e2, &e2.admin, call(0.3)).await;
    assert_eq!(d["verdict"], "deny", "{d}");
    let (_, d) = decide(&e2, &e2.admin, call(0.2)).await;
    assert_eq!(d["verdict"], "allow", "{d}");
    let (_, d) = decide(&e2, &e2.admin, json!({"action": "search"})).await;
    assert_eq!(d["reason"], "RATE_LIMITED", "the window survived the restart: {d}");
    // The reservation still held before the restart can be settled after it.
    let (s, st, _) = e2
        .call(
            "POST",
            "/api/v1/settle",
            Some(&e2.admin),
            Some(json!({"reservation_id": b["reservation"]["id"], "release": true})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{st}");
    let (_, d) = decide(&e2, &e2.admin, call(0.3)).await;
    assert_eq!(d["verdict"], "allow", "{d}");
}

/// Each thread of this process (Linux: `/proc/self/task`) with its `nice` value.
fn threads_and_nice() -> Vec<(String, i32)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let name = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default().trim().to_string();
        let tid = t.file_name().to_str().and_then(|n| n.parse().ok()).and_then(rustix::process::Pid::from_raw);
        // A thread that ended since the directory was read has no priority any more.
        if let Some(nice) = tid.and_then(|p| rustix::process::getpriority_process(Some(p)).ok()) {
            out.push((name, nice));
        }
    }
    out
}

#[tokio::test]
async fn the_journal_is_folded_by_a_thread_below_the_request_threads_priority() {
    // Read before the server starts, so that the check below sees whether starting it (or its
    // folds) changed the priority of the thread that serves requests.
    let base = rustix::process::getpriority_process(None).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let e = env_on(&sqlite_file(tmp.path())).await;
    with_policy(&e).await;
    let (_, d) = decide(&e, &e.admin, json!({"action": "pay", "cost_usd": 0.1})).await;
    let id = d["reservation"]["id"].as_str().unwrap().to_string();
    eventually("the reservation folded into the database", || async {
        e.state.store.live_reservations().await.unwrap().iter().any(|r| r.id == id)
    })
    .await;
    let want = (base + sentinel_server::background::nice_steps()).min(19);
    assert!(want > base, "run this test not under `nice -n 19`");
    let all = threads_and_nice();
    // Other tests in this process start folders of their own (each one named before it lowers
    // itself), so this server's is one of those at the lowered priority.
    let folders: Vec<_> = all.iter().filter(|(n, _)| n == "sentinel-fold").collect();
    assert!(folders.iter().any(|(_, n)| *n == want), "a folder thread runs at nice {want}: {folders:?}");
    // The request threads (this test's runtime) keep their priority.
    assert_eq!(rustix::process::getpriority_process(None).unwrap(), base);
    // SQLite's threads were lowered by the fold's first round (they existed before it).
    let sqlite: Vec<_> = all.iter().filter(|(n, _)| n.starts_with("sqlx-sqlite")).collect();
    assert!(sqlite.iter().any(|(_, n)| *n == want), "{sqlite:?}");
}

/// Writes a real SDK home with a guard: ledger lines and interventions with their hash chains.
fn sdk_home(dir: &std::path::Path, calls: usize) -> (Vec<String>, Vec<String>) {
    let docs = vec![serde_json::from_str(r#"{"name": "local", "denied_actions": ["rm"]}"#).unwrap()];
    let engine = Arc::new(Engine::new(PolicySet::compile(docs).unwrap()));
    let guard = Guard::open(dir, engine, LogOptions::default()).unwrap();
    for i in 0..calls {
        let action = if i % 5 == 4 { "rm" } else { "search" };
        let req = ActionRequest::new(action).agent("bot").run("r1").session("s1").cost(0.01);
        match guard.begin(&req, json!({"q": i})).unwrap() {
            Begun::Proceed(p) => {
                guard.finish(*p, CallOutcome::Success(json!({"n": i})), None).unwrap();
            }
            Begun::Stop { .. } => {}
        }
    }
    drop(guard);
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap().lines().map(str::to_string).collect::<Vec<_>>();
    (read("ledger.jsonl"), read("interventions.jsonl"))
}

#[tokio::test]
async fn ledger_ingest_is_idempotent_and_finds_tampering() {
    on_both(|e| async move {
        let home = tempfile::tempdir().unwrap();
        let (ledger, interventions) = sdk_home(home.path(), 20);
        assert!(ledger.len() >= 20 && interventions.len() == 4, "{} {}", ledger.len(), interventions.len());
        let bot = agent_key(&e, "bot").await;
        let batch = |l: &[String], i: &[String]| json!({"stream": "host-1:/agent", "ledger": l, "interventions": i});

        let (s, r, _) = e.call("POST", "/api/v1/ledger", Some(&bot), Some(batch(&ledger[..10], &interventions[..2]))).await;
        assert_eq!(s, StatusCode::OK, "{r}");
        assert_eq!((r["ledger_accepted"].as_u64(), r["interventions_accepted"].as_u64()), (Some(10), Some(2)));
        // A retried batch, overlapping the next: no duplicates, no findings.
        let (_, r, _) = e.call("POST", "/api/v1/ledger", Some(&bot), Some(batch(&ledger, &interventions))).await;
        assert_eq!(r["ledger_accepted"].as_u64().unwrap() as usize, ledger.len() - 10, "{r}");
        assert_eq!(r["ledger_duplicates"], 10);
        assert_eq!(r["interventions_accepted"], 2);
        assert_eq!(r["findings"].as_array().unwrap().len(), 0, "{r}");
        let (_, r, _) = e.call("POST", "/api/v1/ledger", Some(&bot), Some(batch(&ledger, &interventions))).await;
        assert_eq!((r["ledger_accepted"].as_u64(), r["interventions_accepted"].as_u64()), (Some(0), Some(0)));
        assert_eq!(e.state.store.ledger_count(Some("host-1:/agent")).await.unwrap() as usize, ledger.len());
        let (_, st, _) = e.call("GET", "/api/v1/ledger/streams", Some(&bot), None).await;
        assert_eq!(st["streams"][0]["stream"], "host-1:/agent", "{st}");
        assert_eq!(st["streams"][0]["last_seq"].as_u64().unwrap() as usize, ledger.len());
        let stored = e.state.store.ledger_lines("host-1:/agent").await.unwrap();
        assert_eq!(stored.iter().map(|(_, _, l)| l.clone()).collect::<Vec<_>>(), ledger, "stored byte for byte");

        // Interventions from the SDK are listed, with cursor pagination.
        let (_, p1, _) = e.call("GET", "/api/v1/interventions?limit=3", Some(&e.admin), None).await;
        assert_eq!(p1["items"].as_array().unwrap().len(), 3);
        let cur = p1["next_cursor"].as_str().unwrap();
        let (_, p2, _) = e.call("GET", &format!("/api/v1/interventions?limit=3&cursor={cur}"), Some(&e.admin), None).await;
        assert_eq!(p2["items"].as_array().unwrap().len(), 1);
        assert!(p2["next_cursor"].is_null());
        let id = p2["items"][0]["id"].as_str().unwrap();
        let (s, one, _) = e.call("GET", &format!("/api/v1/interventions/{id}"), Some(&bot), None).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(one["record"]["action"], "rm");
        let (_, a, _) = e.call("GET", "/api/v1/agents/bot", Some(&e.admin), None).await;
        assert_eq!(a["calls"].as_u64().unwrap() as usize, ledger.len(), "{a}");
        assert_eq!(a["interventions"], 4);
        // Ingest shows on /metrics: counts and the batches' latency.
        let (_, text, _) = e.call("GET", "/metrics", None, None).await;
        for series in [r#"sentinel_ingest_entries_total{kind="ledger"}"#, "sentinel_ingest_batch_seconds_bucket"] {
            assert!(text.as_str().unwrap_or_default().contains(series), "{series} missing from /metrics");
        }
        // The same entries under another stream: duplicates by id, so not counted again.
        let (_, r, _) = e
            .call("POST", "/api/v1/ledger", Some(&bot), Some(json!({"stream": "host-2:/agent", "ledger": &ledger[..3], "interventions": &interventions[..1]})))
            .await;
        assert_eq!((r["ledger_accepted"].as_u64(), r["ledger_duplicates"].as_u64()), (Some(0), Some(3)), "{r}");
        assert_eq!(r["findings"].as_array().unwrap().len(), 0, "the same bytes again are no finding: {r}");
        let (_, a, _) = e.call("GET", "/api/v1/agents/bot", Some(&e.admin), None).await;
        assert_eq!((a["calls"].as_u64().unwrap() as usize, a["interventions"].as_u64()), (ledger.len(), Some(4)), "{a}");

        // Entry ids received before, re-sent with other bytes, at their positions and from another
        // stream: what came first is kept, and each is a `rewrite` finding naming the entry.
        let edit = |line: &str, from: &str, to: &str| {
            let changed = line.replacen(from, to, 1);
            assert_ne!(changed, line, "{from} not in {line}");
            changed
        };
        let (l2, i0) = (edit(&ledger[2], "\"search\"", "\"sEarch\""), edit(&interventions[0], "\"rm\"", "\"rM\""));
        for stream in ["host-1:/agent", "host-3:/agent"] {
            let (_, r, _) = e
                .call("POST", "/api/v1/ledger", Some(&bot), Some(json!({"stream": stream, "ledger": [&l2], "interventions": [&i0]})))
                .await;
            assert_eq!((r["ledger_accepted"].as_u64(), r["interventions_accepted"].as_u64()), (Some(0), Some(0)), "{r}");
            let rewrites: Vec<_> = r["findings"].as_array().unwrap().iter().filter(|f| f["kind"] == "rewrite").collect();
            assert_eq!(rewrites.len(), 2, "{stream}: {r}");
            assert_eq!(rewrites[0]["entry_id"], serde_json::from_str::<Value>(&ledger[2]).unwrap()["id"], "{r}");
            assert_eq!(rewrites[1]["entry_id"], serde_json::from_str::<Value>(&interventions[0]).unwrap()["id"], "{r}");
        }
        let stored = e.state.store.ledger_lines("host-1:/agent").await.unwrap();
        assert_eq!(stored[2].2, ledger[2], "the bytes received first are kept");
        let (_, a, _) = e.call("GET", "/api/v1/agents/bot", Some(&e.admin), None).await;
        assert_eq!((a["calls"].as_u64().unwrap() as usize, a["interventions"].as_u64()), (ledger.len(), Some(4)), "{a}");

        // Two new lines of one batch with one id: the first is stored and counted, the other is a
        // `rewrite` finding (it was counted twice and dropped without one).
        let h3 = tempfile::tempdir().unwrap();
        let (twins, _) = sdk_home(h3.path(), 2);
        let id_of = |l: &str| serde_json::from_str::<Value>(l).unwrap()["id"].as_str().unwrap().to_string();
        let twin = edit(&twins[1], &id_of(&twins[1]), &id_of(&twins[0]));
        let (_, r, _) =
            e.call("POST", "/api/v1/ledger", Some(&bot), Some(json!({"stream": "twins", "ledger": [&twins[0], &twin]}))).await;
        assert_eq!((r["ledger_accepted"].as_u64(), r["ledger_duplicates"].as_u64()), (Some(1), Some(1)), "{r}");
        let rewrites: Vec<_> = r["findings"].as_array().unwrap().iter().filter(|f| f["kind"] == "rewrite").collect();
        assert_eq!((rewrites.len(), &rewrites[0]["entry_id"]), (1, &json!(id_of(&twins[0]))), "{r}");
        let (_, a, _) = e.call("GET", "/api/v1/agents/bot", Some(&e.admin), None).await;
        assert_eq!(a["calls"].as_u64().unwrap() as usize, ledger.len() + 1, "{a}");

        // A recreated ledger sent to the same stream: its lines sit at positions already received.
        let h1 = tempfile::tempdir().unwrap();
        let (recreated, _) = sdk_home(h1.path(), 3);
        let (_, r, _) =
            e.call("POST", "/api/v1/ledger", Some(&bot), Some(json!({"stream": "host-1:/agent", "ledger": recreated}))).await;
        let f = r["findings"].as_array().unwrap();
        assert_eq!((r["ledger_accepted"].as_u64(), f.len()), (Some(0), 3), "{r}");
        assert!(f.iter().all(|x| x["kind"] == "fork"), "{r}");
        assert_eq!(e.state.store.ledger_count(Some("host-1:/agent")).await.unwrap() as usize, ledger.len());

        // Another SDK's stream with an edited line, and one with a line removed.
        let h2 = tempfile::tempdir().unwrap();
        let (mut edited, _) = sdk_home(h2.path(), 8);
        edited[3] = edited[3].replace("\"search\"", "\"sEarch\"");
        let (_, r, _) = e.call("POST", "/api/v1/ledger", Some(&bot), Some(json!({"stream": "edited", "ledger": edited}))).await;
        let f = r["findings"].as_array().unwrap();
        assert_eq!(f.len(), 1, "{r}");
        assert_eq!((f[0]["kind"].as_str(), f[0]["seq"].as_i64()), (Some("hash_mismatch"), Some(4)));
        let h3 = tempfile::tempdir().unwrap();
        let (mut removed, _) = sdk_home(h3.path(), 8);
        removed.remove(5);
        let (_, r, _) = e.call("POST", "/api/v1/ledger", Some(&bot), Some(json!({"stream": "removed", "ledger": removed}))).await;
        let f = r["findings"].as_array().unwrap();
        assert_eq!(f.len(), 1, "{r}");
        assert_eq!((f[0]["kind"].as_str(), f[0]["seq"].as_i64()), (Some("gap"), Some(7)));
        // Lines reordered within a batch: the chain breaks where the order does.
        let h4 = tempfile::tempdir().unwrap();
        let (mut swapped, _) = sdk_home(h4.path(), 8);
        swapped.swap(2, 3);
        let (_, r, _) = e.call("POST", "/api/v1/ledger", Some(&bot), Some(json!({"stream": "swapped", "ledger": swapped}))).await;
        assert!(!r["findings"].as_array().unwrap().is_empty(), "{r}");
        let (_, all, _) = e.call("GET", "/api/v1/findings", Some(&e.admin), None).await;
        assert!(all["findings"].as_array().unwrap().len() >= 2);

        // Bad input: nothing is written, and the problem names the line.
        let before = e.state.store.ledger_count(None).await.unwrap();
        let h5 = tempfile::tempdir().unwrap();
        let (ids, _) = sdk_home(h5.path(), 4);
        let mut bad: Vec<String> = ids.clone();
        bad[2] = "{\"not\": \"a ledger line\"}".into();
        let (s, p, _) = e.call("POST", "/api/v1/ledger", Some(&bot), Some(json!({"stream": "bad", "ledger": bad}))).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{p}");
        assert_eq!(p["errors"][0]["path"], "ledger[2]");
        assert_eq!(e.state.store.ledger_count(None).await.unwrap(), before);
        let other = agent_key(&e, "other").await;
        let (s, ..) = e.call("POST", "/api/v1/ledger", Some(&other), Some(json!({"stream": "x", "ledger": ids}))).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "lines of agent `bot` cannot be sent with `other`'s key");
        let (s, p, _) = e.call("POST", "/api/v1/ledger", Some(&bot), Some(json!({"stream": "x", "lines": []}))).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{p}");

        // Monitoring events.
        let h = "a".repeat(64);
        let ev = json!({"agent_id": "bot", "tool_name": "crm_search", "input_hash": h, "output_hash": h, "duration_ms": 120, "session_id": "s", "event_id": "ev-1"});
        let (s, r, _) = e.call("POST", "/api/v1/events", Some(&bot), Some(ev.clone())).await;
        assert_eq!(s, StatusCode::CREATED, "{r}");
        let (s, _, _) = e.call("POST", "/api/v1/events", Some(&bot), Some(ev)).await;
        assert_eq!(s, StatusCode::OK, "a retried event is stored once");
        let (s, p, _) = e
            .call("POST", "/api/v1/events", Some(&bot), Some(json!({"agent_id": "bot", "tool_name": "t", "input_hash": "raw text"})))
            .await;
        assert_eq!((s, p["errors"][0]["path"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("input_hash")));
        let (s, ..) = e.call("POST", "/api/v1/events", Some(&bot), Some(json!({"agent_id": "other", "tool_name": "t"}))).await;
        assert_eq!(s, StatusCode::FORBIDDEN);
        // Event ids are each agent's own: another agent's event with the same id is stored too.
        let theirs = json!({"agent_id": "other", "tool_name": "crm_search", "event_id": "ev-1"});
        let (s, r, _) = e.call("POST", "/api/v1/events", Some(&other), Some(theirs.clone())).await;
        assert_eq!((s, &r["created"]), (StatusCode::CREATED, &json!(true)), "{r}");
        let (s, r, _) = e.call("POST", "/api/v1/events", Some(&other), Some(theirs)).await;
        assert_eq!((s, &r["created"]), (StatusCode::OK, &json!(false)), "{r}");
        for agent in ["bot", "other"] {
            let (_, a, _) = e.call("GET", &format!("/api/v1/agents/{agent}"), Some(&e.admin), None).await;
            assert_eq!(a["events"], 1, "{agent}: {a}");
        }

        // A stream's chain is its sender's: another agent sending to the same stream name keeps a
        // chain of its own, and the first agent's stream is untouched (its lines sent again are
        // duplicates, not forks).
        let h4 = tempfile::tempdir().unwrap();
        let (theirs, _) = sdk_home(h4.path(), 3);
        let theirs: Vec<String> = theirs.iter().map(|l| edit(l, "\"agent_id\":\"bot\"", "\"agent_id\":\"other\"")).collect();
        let body = json!({"stream": "host-1:/agent", "ledger": &theirs});
        let (s, r, _) = e.call("POST", "/api/v1/ledger", Some(&other), Some(body)).await;
        assert_eq!((s, r["ledger_accepted"].as_u64()), (StatusCode::OK, Some(theirs.len() as u64)), "{r}");
        assert!(r["findings"].as_array().unwrap().iter().all(|f| f["kind"] == "hash_mismatch"), "{r}");
        let (_, st, _) = e.call("GET", "/api/v1/ledger/streams", Some(&e.admin), None).await;
        let named: Vec<(&str, u64)> = st["streams"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|x| x["stream"] == "host-1:/agent")
            .map(|x| (x["agent_id"].as_str().unwrap(), x["last_seq"].as_u64().unwrap()))
            .collect();
        assert_eq!(named, vec![("bot", ledger.len() as u64), ("other", theirs.len() as u64)], "{st}");
        let (_, r, _) = e.call("POST", "/api/v1/ledger", Some(&bot), Some(batch(&ledger, &[]))).await;
        assert_eq!((r["ledger_accepted"].as_u64(), r["findings"].as_array().map(Vec::len)), (Some(0), Some(0)), "{r}");
        // An admin key uploading without `agent_id` (as `default`) lines that name their agent:
        // resent, they are duplicates, not collisions with their own agent. When the uploader's
        // agent changes (the SDK is given `agent_id`), its next lines continue the chain it sent
        // under the old one instead of showing a gap; a chain that does not link up still does.
        let h5 = tempfile::tempdir().unwrap();
        let (mine, _) = sdk_home(h5.path(), 8);
        for _ in 0..2 {
            let body = json!({"stream": "admin-home", "ledger": &mine[..4]});
            let (s, r, _) = e.call("POST", "/api/v1/ledger", Some(&e.admin), Some(body)).await;
            assert_eq!((s, r["findings"].as_array().map(Vec::len)), (StatusCode::OK, Some(0)), "{r}");
        }
        let body = json!({"stream": "admin-home", "agent_id": "bot", "ledger": &mine[4..]});
        let (_, r, _) = e.call("POST", "/api/v1/ledger", Some(&e.admin), Some(body)).await;
        assert_eq!((r["ledger_accepted"].as_u64(), r["findings"].as_array().map(Vec::len)), (Some(4), Some(0)), "{r}");
        let body = json!({"stream": "admin-home", "agent_id": "other", "ledger": &theirs[1..]});
        let (_, r, _) = e.call("POST", "/api/v1/ledger", Some(&e.admin), Some(body)).await;
        assert!(r["findings"].as_array().unwrap().iter().any(|f| f["kind"] == "gap"), "{r}");
        // Findings say whose chain of the stream name it is.
        let (_, all, _) = e.call("GET", "/api/v1/findings", Some(&e.admin), None).await;
        let gaps: Vec<&Value> =
            all["findings"].as_array().unwrap().iter().filter(|f| f["stream"] == "admin-home").collect();
        assert!(!gaps.is_empty() && gaps.iter().all(|f| f["agent_id"] == "other"), "{all}");

        // Another agent's entry id, in a stream of one's own: an `id_collision`, whatever the bytes
        // (they are not compared with the other agent's line, so nothing of it is learnt).
        let borrowed = edit(&theirs[0], &id_of(&theirs[0]), &id_of(&ledger[0]));
        let (s, r, _) = e
            .call("POST", "/api/v1/ledger", Some(&other), Some(json!({"stream": "other:/agent", "ledger": [&borrowed]})))
            .await;
        assert_eq!((s, &r["ledger_accepted"]), (StatusCode::OK, &json!(0)), "{r}");
        let kinds: Vec<&str> = r["findings"].as_array().unwrap().iter().map(|f| f["kind"].as_str().unwrap()).collect();
        assert!(kinds.contains(&"id_collision") && !kinds.contains(&"rewrite"), "{r}");
        let (_, a, _) = e.call("GET", "/api/v1/agents/other", Some(&e.admin), None).await;
        assert_eq!(a["calls"].as_u64(), Some(theirs.len() as u64), "the colliding line is not counted: {a}");
    })
    .await;
}

#[tokio::test]
async fn openapi_document_lists_the_endpoints() {
    let doc = serde_json::to_value(sentinel_server::openapi_doc()).unwrap();
    // Every route the API serves (the router in `app`), with its methods.
    let routes: &[(&str, &[&str])] = &[
        ("/healthz", &["get"]),
        ("/readyz", &["get"]),
        ("/metrics", &["get"]),
        ("/api/v1/users/me", &["get"]),
        ("/api/v1/keys", &["get", "post"]),
        ("/api/v1/keys/{id}", &["delete"]),
        ("/api/v1/keys/{id}/activate", &["post"]),
        ("/api/v1/keys/{id}/deactivate", &["post"]),
        ("/api/v1/policies", &["get", "post"]),
        ("/api/v1/policies/sync", &["get"]),
        ("/api/v1/policies/{id}", &["get", "put", "delete"]),
        ("/api/v1/policies/{id}/history", &["get"]),
        ("/api/v1/policies/{id}/test-alert", &["post"]),
        ("/api/v1/decide", &["post"]),
        ("/api/v1/settle", &["post"]),
        ("/api/v1/halts", &["get", "post", "delete"]),
        ("/api/v1/ledger", &["post"]),
        ("/api/v1/ledger/streams", &["get"]),
        ("/api/v1/events", &["post"]),
        ("/api/v1/findings", &["get"]),
        ("/api/v1/interventions", &["get"]),
        ("/api/v1/interventions/stats", &["get"]),
        ("/api/v1/interventions/{id}", &["get"]),
        ("/api/v1/agents", &["get"]),
        ("/api/v1/agents/{id}", &["get"]),
        ("/api/v1/approvals", &["get"]),
        ("/api/v1/approvals/{id}", &["get"]),
        ("/api/v1/approvals/{id}/approve", &["post"]),
        ("/api/v1/approvals/{id}/reject", &["post"]),
        ("/api/v1/approvals/{id}/wait", &["get"]),
        ("/api/v1/notifications", &["get"]),
        ("/api/v1/notifications/{id}", &["get"]),
        ("/api/v1/notifications/{id}/retry", &["post"]),
        ("/api/v1/notifications/channels", &["get", "post"]),
        ("/api/v1/notifications/channels/{id}", &["get", "put", "delete"]),
        ("/api/v1/notifications/channels/{id}/test", &["post"]),
    ];
    for (p, methods) in routes {
        for m in *methods {
            assert!(doc["paths"][p][m].is_object(), "{m} {p} is not in the OpenAPI document");
        }
    }
    // And nothing the router does not serve.
    let documented: Vec<&String> = doc["paths"].as_object().unwrap().keys().collect();
    for d in documented {
        assert!(routes.iter().any(|(p, _)| p == d), "{d} is documented but not in this list");
    }
    assert!(doc["components"]["schemas"]["DecideBody"]["properties"]["cost_usd"].is_object());
}

/// A record dated far ahead of the server's clock (a wrong clock, or one made to stay on top of every
/// list) is kept with the time it claims but listed, filtered and counted at its arrival, and the
/// answer says so; a time within the allowed skew is listed as claimed.
#[tokio::test]
async fn uploads_dated_ahead_of_the_clock_are_listed_at_arrival() {
    on_both(|e| async move {
        let home = tempfile::tempdir().unwrap();
        let (_, interventions) = sdk_home(home.path(), 10);
        let bot = agent_key(&e, "bot").await;
        let redate = |line: &str, ts: &str| {
            let at = line.find("\"timestamp\":\"").unwrap() + "\"timestamp\":\"".len();
            let end = at + line[at..].find('"').unwrap();
            format!("{}{ts}{}", &line[..at], &line[end..])
        };
        let soon = (chrono::Utc::now() + chrono::Duration::minutes(2)).to_rfc3339();
        let lines = [redate(&interventions[0], "2999-01-01T00:00:00+00:00"), redate(&interventions[1], &soon)];
        let before = sentinel_store::now_ms();
        for (line, ahead) in [(&lines[0], 1), (&lines[1], 0)] {
            let body = json!({"stream": format!("s{ahead}"), "interventions": [line]});
            let (s, r, _) = e.call("POST", "/api/v1/ledger", Some(&bot), Some(body)).await;
            assert_eq!(
                (s, &r["interventions_accepted"], &r["clock_ahead"]),
                (StatusCode::OK, &json!(1), &json!(ahead)),
                "{r}"
            );
        }
        // Resent, it is a duplicate and not counted again.
        let body = json!({"stream": "s1", "interventions": [&lines[0]]});
        let (_, r, _) = e.call("POST", "/api/v1/ledger", Some(&bot), Some(body)).await;
        assert_eq!((&r["interventions_duplicates"], &r["clock_ahead"]), (&json!(1), &json!(0)), "{r}");
        let after = sentinel_store::now_ms();
        let (_, page, _) = e.call("GET", "/api/v1/interventions", Some(&e.admin), None).await;
        let items = page["items"].as_array().unwrap();
        let far = items.iter().find(|i| i["record"]["timestamp"] == "2999-01-01T00:00:00+00:00").unwrap();
        let at = far["at"].as_i64().unwrap();
        assert!((before..=after).contains(&at), "listed at {at}, arrived in {before}..{after}");
        let near = items.iter().find(|i| i["record"]["timestamp"] == json!(soon)).unwrap();
        assert!(near["at"].as_i64().unwrap() > after, "{near}");
        // Events alike, and each one dated ahead is counted on /metrics.
        let counted = async || {
            let (_, text, _) = e.call("GET", "/metrics", None, None).await;
            let text = text.as_str().unwrap_or_default().to_string();
            let line = text.lines().find(|l| l.starts_with("sentinel_ingest_clock_ahead_total ")).unwrap_or_default();
            line.rsplit(' ').next().and_then(|n| n.parse::<f64>().ok()).unwrap_or(0.0)
        };
        let was = counted().await;
        let ev = json!({"agent_id": "bot", "tool_name": "t", "timestamp": "2999-01-01T00:00:00Z"});
        let (s, r, _) = e.call("POST", "/api/v1/events", Some(&bot), Some(ev)).await;
        assert_eq!((s, &r["clock_ahead"]), (StatusCode::CREATED, &json!(true)), "{r}");
        assert!(counted().await >= was + 1.0, "the event dated ahead is not counted");
    })
    .await;
}

/// An uploaded line's amounts and ids are checked like a decision's: an amount that is negative or
/// would overflow every total over the agent, or an id with a NUL or of any length, is refused
/// with the line's field, and nothing of the batch is written.
#[tokio::test]
async fn ingest_refuses_amounts_and_ids_out_of_range() {
    on_both(|e| async move {
        let home = tempfile::tempdir().unwrap();
        let (ledger, interventions) = sdk_home(home.path(), 5);
        let bot = agent_key(&e, "bot").await;
        let before = e.state.store.row_counts().await.unwrap();
        let cost = |l: &str, v: &str| l.replacen("\"cost_usd\":0.01", &format!("\"cost_usd\":{v}"), 1);
        assert!(ledger[0].contains("\"cost_usd\":0.01"), "{}", ledger[0]);
        let long = "x".repeat(201);
        for (lines, path) in [
            (vec![ledger[0].clone(), cost(&ledger[1], "1e300")], "ledger[1].cost_usd"),
            (vec![cost(&ledger[0], "-1000")], "ledger[0].cost_usd"),
            (vec![ledger[0].replacen("\"agent_id\":\"bot\"", "\"agent_id\":\"b\\u0000t\"", 1)], "ledger[0].agent_id"),
            (vec![ledger[0].replacen("\"run_id\":\"r1\"", &format!("\"run_id\":\"{long}\""), 1)], "ledger[0].run_id"),
        ] {
            let (s, p, _) =
                e.call("POST", "/api/v1/ledger", Some(&bot), Some(json!({"stream": "s", "ledger": lines}))).await;
            assert_eq!((s, p["errors"][0]["path"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some(path)), "{p}");
        }
        // The amount replaced in place: the chain's fields must stay last.
        let line = &interventions[0];
        let at = line.find("\"cost_prevented_usd\":").unwrap() + "\"cost_prevented_usd\":".len();
        let end = at + line[at..].find(',').unwrap();
        let record = format!("{}1e300{}", &line[..at], &line[end..]);
        let (s, p, _) =
            e.call("POST", "/api/v1/ledger", Some(&bot), Some(json!({"stream": "s", "interventions": [record]}))).await;
        let want = Some("interventions[0].cost_prevented_usd");
        assert_eq!((s, p["errors"][0]["path"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, want), "{p}");
        assert_eq!(e.state.store.row_counts().await.unwrap(), before, "a refused batch wrote something");
        let (s, _, _) = e.call("GET", "/api/v1/agents", Some(&e.admin), None).await;
        assert_eq!(s, StatusCode::OK);
    })
    .await;
}
