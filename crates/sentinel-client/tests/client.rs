//! The Rust client against a real server over HTTP on 127.0.0.1 (SQLite in a temp dir).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sentinel_client::{BackgroundSync, Client, DecideRequest, SyncConfig};
use sentinel_core::{ActionRequest, Begun, CallOutcome, Engine, Guard, LogOptions, PolicySet};
use serde_json::json;

struct Server {
    addr: SocketAddr,
    key: String,
    state: sentinel_server::AppState,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

async fn serve() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let store = sentinel_store::Store::open(&format!("sqlite://{}", dir.path().join("s.db").display())).await.unwrap();
    let state =
        sentinel_server::AppState::open(store, b"client-test-secret-client-test-secret".to_vec()).await.unwrap();
    let path = sentinel_server::bootstrap(&state, dir.path()).await.unwrap().unwrap();
    let key = std::fs::read_to_string(path).unwrap().trim().to_string();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = sentinel_server::app(state.clone());
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    Server { addr, key, state, task, _dir: dir }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decides_settles_and_observes_halts() {
    let s = serve().await;
    let c = Client::new(&format!("http://{}", s.addr), &s.key).unwrap();
    s.state.store.create_policy("p", &json!({"name": "p", "budgets": {"session": 1.0}}), "test").await.unwrap();
    s.state.reload_policies().await.unwrap();
    let req = |cost: f64| DecideRequest {
        action: "pay".into(),
        agent_id: Some("bot".into()),
        session_id: Some("s".into()),
        cost_usd: cost,
        ..Default::default()
    };
    let d = c.decide(&req(0.6)).await.unwrap();
    assert!(d.permits(), "{d:?}");
    let r = d.reservation.unwrap();
    let d2 = c.decide(&req(0.6)).await.unwrap();
    assert!(!d2.permits());
    assert_eq!(d2.reason, "SESSION_BUDGET_EXCEEDED");
    c.release(&r.id).await.unwrap();
    assert!(c.decide(&req(0.6)).await.unwrap().permits());
    let again = c.release(&r.id).await.unwrap_err();
    assert!(!again.retryable() && again.to_string().contains("409"), "{again}");

    c.halt_agent("bot", "stop now").await.unwrap();
    let d = c.decide(&req(0.0)).await.unwrap();
    assert_eq!(d.reason, "HALTED");

    // A dead server is an error that says where, and is worth retrying.
    let dead = Client::new("http://127.0.0.1:9", &s.key).unwrap();
    let e = dead.decide(&req(0.0)).await.unwrap_err();
    assert!(e.retryable() && e.to_string().contains("127.0.0.1:9"), "{e}");
    assert!(Client::new("ftp://x", "k").is_err());
    s.task.abort();
}

fn write_home(dir: &std::path::Path, calls: usize) {
    let docs = vec![serde_json::from_str(r#"{"name": "local", "denied_actions": ["rm"]}"#).unwrap()];
    let engine = Arc::new(Engine::new(PolicySet::compile(docs).unwrap()));
    let guard = Guard::open(dir, engine, LogOptions::default()).unwrap();
    for i in 0..calls {
        let action = if i % 4 == 3 { "rm" } else { "search" };
        let req = ActionRequest::new(action).agent("bot").run("r").session("s").cost(0.01);
        if let Begun::Proceed(p) = guard.begin(&req, json!({"i": i})).unwrap() {
            guard.finish(*p, CallOutcome::Success(json!(null)), None).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_sync_uploads_incrementally_and_survives_a_down_server() {
    let s = serve().await;
    let home = tempfile::tempdir().unwrap();
    write_home(home.path(), 40);
    let mut cfg = SyncConfig::new(&format!("http://{}", s.addr), &s.key, home.path());
    cfg.stream = Some("rust-agent".into());
    cfg.agent_id = Some("bot".into());
    cfg.batch_size = 7;
    cfg.flush_interval = Duration::from_secs(3600);
    let sync = tokio::task::spawn_blocking(move || BackgroundSync::start(cfg).unwrap()).await.unwrap();
    let (sync, n) = tokio::task::spawn_blocking(move || {
        let n = sync.flush_now().unwrap();
        (sync, n)
    })
    .await
    .unwrap();
    let lines = std::fs::read_to_string(home.path().join("ledger.jsonl")).unwrap().lines().count();
    let ivs = std::fs::read_to_string(home.path().join("interventions.jsonl")).unwrap().lines().count();
    assert_eq!(n as usize, lines + ivs);
    assert_eq!(s.state.store.ledger_count(Some("rust-agent")).await.unwrap() as usize, lines);
    // Uploaded as the configured agent's (the key is an admin key), not as `default`'s.
    let streams = s.state.store.list_streams().await.unwrap();
    assert!(streams.iter().all(|x| x.agent_id == "bot") && !streams.is_empty(), "{streams:?}");
    // Nothing new: nothing sent. More calls: only those.
    let (sync, n) = tokio::task::spawn_blocking(move || {
        let n = sync.flush_now().unwrap();
        (sync, n)
    })
    .await
    .unwrap();
    assert_eq!(n, 0);
    write_home(home.path(), 8);
    let n = tokio::task::spawn_blocking(move || sync.stop().unwrap()).await.unwrap();
    assert_eq!(n, 8 + 2, "six calls and two denials more");
    assert!(s.state.store.tamper_findings(Some("rust-agent")).await.unwrap().is_empty());

    // A server that is down: the flush fails, the agent is not affected, the position stays.
    let mut cfg = SyncConfig::new("http://127.0.0.1:9", &s.key, home.path());
    cfg.max_retries = 1;
    cfg.stream = Some("rust-agent-2".into());
    let r = tokio::task::spawn_blocking(move || {
        let sync = BackgroundSync::start(cfg).unwrap();
        let r = sync.flush_now();
        drop(sync);
        r
    })
    .await
    .unwrap();
    assert!(r.is_err_and(|e| e.retryable()));
    s.task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decide_and_wait_waits_for_a_human_and_redeems_once() {
    let s = serve().await;
    let c = Client::new(&format!("http://{}", s.addr), &s.key).unwrap();
    c.post_json(
        "/api/v1/policies",
        &json!({"name": "wires", "approvals": {"actions": ["wire"], "timeout_seconds": 30}}),
    )
    .await
    .unwrap();
    let wire = DecideRequest {
        action: "wire".into(),
        agent_id: Some("bot".into()),
        cost_usd: 1.0,
        args: json!({"amount": 5}),
        context: Some(json!({"ticket": "T-1"})),
        ..Default::default()
    };
    // A human approves from elsewhere while the client waits (long-poll, no busy polling).
    let human = |verdict: &'static str, reason: &'static str| {
        let c = c.clone();
        tokio::spawn(async move {
            for _ in 0..200 {
                let list = c.get_json("/api/v1/approvals?status=pending").await.unwrap();
                if let Some(id) = list["items"][0]["id"].as_str() {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    c.post_json(&format!("/api/v1/approvals/{id}/{verdict}"), &json!({"reason": reason}))
                        .await
                        .unwrap();
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            panic!("no pending request appeared");
        })
    };
    let h = human("approve", "fine");
    let d = c.decide_and_wait(&wire).await.unwrap();
    h.await.unwrap();
    assert_eq!(d.verdict, "allow", "{d:?}");
    assert!(d.reservation.is_some());

    let h = human("reject", "use the cheaper vendor");
    let e = c.decide_and_wait(&wire).await.unwrap_err();
    h.await.unwrap();
    match e {
        sentinel_client::ClientError::ApprovalRejected { reason, by, .. } => {
            assert_eq!(reason, "use the cheaper vendor");
            assert!(by.contains("bootstrap admin"), "{by}");
        }
        other => panic!("{other}"),
    }
    // A call that needs no approval is answered at once.
    let d = c.decide_and_wait(&DecideRequest { action: "search".into(), ..Default::default() }).await.unwrap();
    assert_eq!(d.verdict, "allow");
    s.task.abort();
}
