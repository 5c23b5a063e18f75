//! Every store operation, against both SQLite and PostgreSQL. PostgreSQL tests create their own
//! database and drop it afterwards; the admin URL is `SENTINEL_TEST_PG_URL`
//! (default `postgres://root@127.0.0.1:5432/postgres`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::future::Future;

use sentinel_store::{
    Backend, BudgetSpec, NewApiKey, PgDecide, PgDecideOutcome, ReservationRow, Scope, Store, StoreError, WindowSpec,
    diff, spend_keys,
};
use serde_json::json;
use sqlx::Connection;

fn pg_admin_url() -> String {
    std::env::var("SENTINEL_TEST_PG_URL").unwrap_or_else(|_| "postgres://root@127.0.0.1:5432/postgres".into())
}

/// Runs `body` once on a fresh SQLite file and once on a fresh PostgreSQL database.
async fn on_both<F, Fut>(body: F)
where
    F: Fn(Store) -> Fut,
    Fut: Future<Output = ()>,
{
    let dir = tempfile::tempdir().unwrap();
    let sqlite = Store::open(&format!("sqlite://{}", dir.path().join("s.db").display())).await.unwrap();
    assert_eq!(sqlite.backend(), Backend::Sqlite);
    body(sqlite.clone()).await;
    sqlite.close().await;

    let (pg, cleanup) = fresh_pg().await;
    assert_eq!(pg.backend(), Backend::Postgres);
    body(pg.clone()).await;
    pg.close().await;
    cleanup.await;
}

/// A store on a fresh PostgreSQL database, and the future that drops the database.
async fn fresh_pg() -> (Store, impl Future<Output = ()>) {
    let (pg, _, cleanup) = fresh_pg_at().await;
    (pg, cleanup)
}

/// [`fresh_pg`], with the database's URL.
async fn fresh_pg_at() -> (Store, String, impl Future<Output = ()>) {
    let admin = pg_admin_url();
    let name = format!("sentinel_test_{}", uuid::Uuid::now_v7().simple());
    let mut conn = sqlx::PgConnection::connect(&admin).await.unwrap_or_else(|e| {
        panic!("PostgreSQL is needed for these tests ({admin}): {e}; start it or set SENTINEL_TEST_PG_URL")
    });
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut conn).await.unwrap();
    let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b).to_string();
    let url = format!("{base}/{name}");
    let pg = Store::open(&url).await.unwrap();
    let cleanup = async move {
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")))
            .execute(&mut conn)
            .await
            .unwrap();
    };
    (pg, url, cleanup)
}

fn key(prefix: &str, scope: Scope, agent: Option<&str>) -> NewApiKey {
    NewApiKey {
        prefix: prefix.into(),
        hash: format!("hash-of-{prefix}").into_bytes(),
        name: format!("key {prefix}"),
        scope,
        agent_id: agent.map(str::to_string),
    }
}

#[tokio::test]
async fn api_keys_lifecycle() {
    on_both(|s| async move {
        s.ping().await.unwrap();
        let admin = s.create_key(key("as_aaaaaaaaa", Scope::Admin, None)).await.unwrap();
        let agent = s.create_key(key("as_bbbbbbbbb", Scope::Agent, Some("bot-1"))).await.unwrap();
        assert!(matches!(s.create_key(key("as_ccccccccc", Scope::Agent, None)).await, Err(StoreError::Invalid(_))));
        assert!(matches!(s.create_key(key("as_aaaaaaaaa", Scope::Readonly, None)).await, Err(StoreError::Conflict(_))));

        let found = s.key_by_hash(b"hash-of-as_bbbbbbbbb").await.unwrap().unwrap();
        assert_eq!(found, agent);
        assert!(s.key_by_hash(b"nope").await.unwrap().is_none());
        let listed = s.list_keys().await.unwrap();
        assert_eq!(listed.iter().map(|k| k.id.clone()).collect::<Vec<_>>(), [admin.id.clone(), agent.id.clone()]);

        s.set_key_active(&agent.id, false).await.unwrap();
        assert!(!s.key_by_hash(b"hash-of-as_bbbbbbbbb").await.unwrap().unwrap().active);
        s.set_key_active(&agent.id, true).await.unwrap();
        assert!(matches!(s.set_key_active("missing", true).await, Err(StoreError::NotFound(_))));

        s.touch_keys(&[(admin.id.clone(), 2_000), (agent.id.clone(), 1_000)]).await.unwrap();
        s.touch_keys(&[(admin.id.clone(), 1_500)]).await.unwrap();
        let k = s.key_by_hash(b"hash-of-as_aaaaaaaaa").await.unwrap().unwrap();
        assert_eq!(k.last_used_at, Some(2_000), "last used never moves backwards");

        s.delete_key(&agent.id).await.unwrap();
        assert!(matches!(s.delete_key(&agent.id).await, Err(StoreError::NotFound(_))));
        let material = s.all_key_material().await.unwrap();
        assert_eq!(material.len(), 1);
    })
    .await;
}

#[tokio::test]
async fn policies_are_versioned_with_actor_and_diff() {
    on_both(|s| async move {
        let body = json!({"budgets": {"run": 5.0}, "denied_actions": ["drop_table"]});
        let p = s.create_policy("prod-safety", &body, "admin:as_aaaaaaaaa").await.unwrap();
        assert_eq!(p.version, 1);
        assert!(matches!(s.create_policy("prod-safety", &body, "x").await, Err(StoreError::Conflict(m)) if m.contains("prod-safety")));

        let v2 = json!({"budgets": {"run": 2.5}, "denied_actions": ["drop_table"], "mode": "shadow"});
        let p2 = s.update_policy(&p.id, "prod-safety", &v2, "alice", Some(1)).await.unwrap();
        assert_eq!(p2.version, 2);
        assert_eq!(s.get_policy(&p.id).await.unwrap().body, v2);
        // A stale writer is refused rather than silently overwriting.
        assert!(matches!(s.update_policy(&p.id, "prod-safety", &body, "bob", Some(1)).await, Err(StoreError::Conflict(_))));
        let other = s.create_policy("dev", &json!({}), "alice").await.unwrap();
        assert!(matches!(s.update_policy(&other.id, "prod-safety", &json!({}), "alice", None).await, Err(StoreError::Conflict(_))));
        s.update_policy(&p.id, "production-safety", &v2, "carol", None).await.unwrap();

        let names: Vec<String> = s.list_policies().await.unwrap().into_iter().map(|p| p.name).collect();
        assert_eq!(names, ["dev", "production-safety"]);

        s.delete_policy(&p.id, "dave").await.unwrap();
        assert!(matches!(s.get_policy(&p.id).await, Err(StoreError::NotFound(_))));
        let h = s.policy_history(&p.id).await.unwrap();
        let summary: Vec<(i64, &str, &str)> = h.iter().map(|v| (v.version, v.change.as_str(), v.actor.as_str())).collect();
        assert_eq!(summary, [(1, "create", "admin:as_aaaaaaaaa"), (2, "update", "alice"), (3, "update", "carol"), (4, "delete", "dave")]);
        assert_eq!(h[1].diff, diff(&body, &v2));
        assert_eq!(h[2].diff[0].path, "/name");
        assert!(h[3].body.is_none());
        assert!(matches!(s.policy_history("missing").await, Err(StoreError::NotFound(_))));
    })
    .await;
}

#[test]
fn diff_lists_changed_fields_by_pointer() {
    let d = diff(
        &json!({"a": 1, "b": {"c": 2, "d": 3}, "gone": true}),
        &json!({"a": 1, "b": {"c": 5, "d": 3}, "new/x": [1]}),
    );
    let paths: Vec<&str> = d.iter().map(|c| c.path.as_str()).collect();
    assert_eq!(paths, ["/b/c", "/gone", "/new~1x"]);
    assert_eq!(d[0].old, Some(json!(2)));
    assert_eq!(d[0].new, Some(json!(5)));
    assert_eq!(d[1].new, None);
}

#[tokio::test]
async fn bad_urls_are_explained() {
    let e = Store::open("mysql://x").await.unwrap_err();
    assert!(e.to_string().contains("unsupported database URL `mysql://x`"), "{e}");
}

fn reservation(id: &str, session: &str, cost: i64, now_ns: i64) -> ReservationRow {
    ReservationRow {
        id: id.into(),
        agent_id: "a".into(),
        run_id: "r".into(),
        session_id: session.into(),
        action: "act".into(),
        args_digest: 7,
        cost_micros: cost,
        actual_micros: None,
        state: "reserved".into(),
        at_ns: now_ns,
        created_at: now_ns / 1_000_000,
        expires_at: now_ns / 1_000_000 + 60_000,
        settled_at: None,
        policy_version: "v1".into(),
    }
}

/// `n` concurrent central decisions on one session with reservation ids from `id`, against a
/// session budget and (optionally) a window: the outcomes, in call order.
async fn decide_concurrently(
    store: &Store,
    session: &str,
    n: usize,
    cost: i64,
    budget: i64,
    window: Option<u32>,
    id: impl Fn(usize) -> String,
) -> Vec<Result<PgDecideOutcome, StoreError>> {
    let tasks: Vec<_> = (0..n)
        .map(|i| tokio::spawn(decide_one(store.clone(), session.to_string(), cost, budget, window, id(i))))
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// One central decision on `session` (run `r`, action `act`) with its budget and optional window.
async fn decide_one(
    store: Store,
    session: String,
    cost: i64,
    budget: i64,
    window: Option<u32>,
    id: String,
) -> Result<PgDecideOutcome, StoreError> {
    decide_as(store, session, "act", cost, budget, window, id).await
}

/// [`decide_one`] for another action.
async fn decide_as(
    store: Store,
    session: String,
    action: &str,
    cost: i64,
    budget: i64,
    window: Option<u32>,
    id: String,
) -> Result<PgDecideOutcome, StoreError> {
    let keys = spend_keys(&session, "r", action);
    let now_ns = i64::try_from(std::time::UNIX_EPOCH.elapsed().unwrap().as_nanos()).unwrap();
    let windows: Vec<WindowSpec> = window
        .map(|max| WindowSpec { key: format!("w\u{1f}{}", keys[2]), max, window_ns: 60_000_000_000 })
        .into_iter()
        .collect();
    let budgets = [BudgetSpec { key: keys[2].clone(), limit_micros: budget }];
    let row = ReservationRow { action: action.into(), ..reservation(&id, &session, cost, now_ns) };
    store
        .pg_decide(
            PgDecide {
                agent_id: "a",
                run_id: "r",
                now_ns,
                windows: &windows,
                budgets: &budgets,
                cost_micros: cost,
                reserve: Some(&row),
            },
            &keys[2],
        )
        .await
}

/// Concurrent decisions on one session share its transactions (several calls per commit) and
/// still allow exactly what the budget and the window afford; a bad call in a batch (a duplicate
/// reservation id) fails alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_shared_decisions_are_batched_and_exact() {
    let (pg, cleanup) = fresh_pg().await;

    // 300 calls of 1,000 micro-USD against 100,000: exactly 100 pass.
    let out = decide_concurrently(&pg, "s-budget", 300, 1_000, 100_000, None, |i| format!("b-{i}")).await;
    let passed = out.iter().filter(|o| matches!(o, Ok(PgDecideOutcome::Passed))).count();
    let over = out.iter().filter(|o| matches!(o, Ok(PgDecideOutcome::OverBudget { index: 0, .. }))).count();
    assert_eq!((passed, over), (100, 200), "{out:?}");
    assert_eq!(pg.pg_spend("s-budget", "r", "act").await.unwrap()[2], 100_000);
    let b = pg.decide_batching();
    assert_eq!(b.calls, 300);
    assert!(b.transactions < b.calls, "300 concurrent calls on one session took {} transactions", b.transactions);

    // A window of 40 calls, with budget to spare: exactly 40 pass.
    let out = decide_concurrently(&pg, "s-window", 200, 1, 1_000_000, Some(40), |i| format!("w-{i}")).await;
    let passed = out.iter().filter(|o| matches!(o, Ok(PgDecideOutcome::Passed))).count();
    let full = out.iter().filter(|o| matches!(o, Ok(PgDecideOutcome::WindowFull { index: 0, .. }))).count();
    assert_eq!((passed, full), (40, 160), "{out:?}");

    // Calls 0 and 1 share an id: whichever comes second is a conflict, and only it fails.
    let out = decide_concurrently(&pg, "s-dup", 50, 10, 1_000_000, None, |i| format!("d-{}", i.max(1))).await;
    let passed = out.iter().filter(|o| matches!(o, Ok(PgDecideOutcome::Passed))).count();
    let conflicts = out.iter().filter(|o| matches!(o, Err(StoreError::Conflict(_)))).count();
    assert_eq!((passed, conflicts), (49, 1), "{out:?}");
    assert_eq!(pg.pg_spend("s-dup", "r", "act").await.unwrap()[2], 490, "the failed call spent nothing");

    pg.close().await;
    cleanup.await;
}

/// Another connection, in a transaction that holds the reservations table: a session's first
/// transaction waits until it commits, so the calls after it queue. (These tests run on the
/// current-thread runtime, so a spawned call runs up to its wait before the test goes on.)
async fn hold_reservations(url: &str) -> sqlx::PgConnection {
    let mut c = sqlx::PgConnection::connect(url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut c).await.unwrap();
    sqlx::query("LOCK TABLE reservations IN ACCESS EXCLUSIVE MODE").execute(&mut c).await.unwrap();
    c
}

/// A session's first call, in its lane's running transaction, waiting on [`hold_reservations`]:
/// the calls made next queue behind it. Returns the blocking connection and the first call.
async fn first_call_waiting(
    pg: &Store,
    url: &str,
    cost: i64,
) -> (sqlx::PgConnection, tokio::task::JoinHandle<Result<PgDecideOutcome, StoreError>>) {
    let blocker = hold_reservations(url).await;
    let first = tokio::spawn(decide_one(pg.clone(), "s".into(), cost, i64::MAX, None, "first".into()));
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    (blocker, first)
}

/// `n` calls of `cost` on session `s` (ids `q-0`…), queued behind a [`first_call_waiting`].
async fn queue_calls(
    pg: &Store,
    n: usize,
    cost: i64,
) -> Vec<tokio::task::JoinHandle<Result<PgDecideOutcome, StoreError>>> {
    let queued = (0..n)
        .map(|i| tokio::spawn(decide_one(pg.clone(), "s".into(), cost, i64::MAX, None, format!("q-{i}"))))
        .collect();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    queued
}

/// A caller that has gone before its turn (its request was cancelled or timed out) gets no
/// reservation: the calls queued behind a running transaction are checked when their batch is
/// taken.
#[tokio::test]
async fn a_cancelled_call_queued_on_a_session_reserves_nothing() {
    let (pg, url, cleanup) = fresh_pg_at().await;
    let (mut blocker, first) = first_call_waiting(&pg, &url, 10).await;
    let queued = queue_calls(&pg, 10, 10).await;
    for q in &queued[..5] {
        q.abort();
    }
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    sqlx::query("COMMIT").execute(&mut blocker).await.unwrap();

    assert!(matches!(first.await.unwrap(), Ok(PgDecideOutcome::Passed)));
    for q in queued {
        match q.await {
            Ok(out) => assert!(matches!(out, Ok(PgDecideOutcome::Passed)), "{out:?}"),
            Err(e) => assert!(e.is_cancelled()),
        }
    }
    assert_eq!(pg.pg_spend("s", "r", "act").await.unwrap()[2], 60, "the first call and the 5 that stayed");
    blocker.close().await.unwrap();
    pg.close().await;
    cleanup.await;
}

/// When the database cannot be asked, a batch's calls fail together and at once, instead of
/// each being tried again on its own (up to the pool's 10 s timeout apiece) while the calls
/// queued behind them wait.
#[tokio::test]
async fn queued_decisions_fail_together_when_the_database_is_gone() {
    let (pg, cleanup) = fresh_pg().await;
    assert!(decide_concurrently(&pg, "s", 1, 1, 1_000_000, None, |_| "warm".into()).await[0].is_ok());
    cleanup.await; // the database is dropped under the open pool
    // On the current-thread runtime all 60 calls are queued before the lane's driver first runs,
    // so they go as one batch.
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        decide_concurrently(&pg, "s", 60, 1, 1_000_000, None, |i| format!("gone-{i}")),
    )
    .await
    .expect("every call is answered");
    assert!(out.iter().all(Result::is_err), "{out:?}");
    let together = out.iter().filter(|o| matches!(o, Err(StoreError::Unavailable(_)))).count();
    assert!(together >= 59, "the queued calls failed one by one: {out:?}");
    pg.close().await;
}

/// Settles, releases and decisions on one session's counters at once, over several actions (a
/// batch takes each call's spend rows in turn, not in one sorted order): none waits on another
/// in a cycle, and the session's spend is exactly what was settled plus what is still reserved.
#[tokio::test]
async fn settles_and_batched_decisions_on_one_session_neither_deadlock_nor_drift() {
    let (pg, cleanup) = fresh_pg().await;
    let actions = ["act0", "act1", "act2", "act3"];
    let first: Vec<_> = (0..200)
        .map(|i| tokio::spawn(decide_as(pg.clone(), "s".into(), actions[i % 4], 100, i64::MAX, None, format!("f-{i}"))))
        .collect();
    for t in first {
        assert!(matches!(t.await.unwrap(), Ok(PgDecideOutcome::Passed)));
    }
    // Every first reservation is settled for 105 (even) or released (odd) while 200 more are decided.
    let mut finishing = Vec::new();
    for i in 0..200 {
        let pg = pg.clone();
        finishing.push(tokio::spawn(async move {
            let actual = (i % 2 == 0).then_some(105);
            pg.pg_finish(&format!("f-{i}"), actual, sentinel_store::now_ms()).await.map(|_| ())
        }));
    }
    let second: Vec<_> = (0..200)
        .map(|i| tokio::spawn(decide_as(pg.clone(), "s".into(), actions[i % 4], 100, i64::MAX, None, format!("g-{i}"))))
        .collect();
    for t in finishing {
        t.await.unwrap().expect("a settle or release failed");
    }
    for t in second {
        let out = t.await.unwrap();
        assert!(matches!(out, Ok(PgDecideOutcome::Passed)), "{out:?}");
    }
    let [_, run, session] = pg.pg_spend("s", "r", "act0").await.unwrap();
    assert_eq!(session, 100 * 105 + 200 * 100, "100 settled at 105, 100 released, 200 reserved at 100");
    assert_eq!(run, session);
    pg.close().await;
    cleanup.await;
}

/// A session that already has the most calls waiting refuses more at once.
#[tokio::test]
async fn a_full_session_lane_refuses_at_once() {
    let (pg, url, cleanup) = fresh_pg_at().await;
    let (mut blocker, first) = first_call_waiting(&pg, &url, 1).await;
    // 1,024 may wait behind the running transaction; the 6 after them are refused.
    let queued = queue_calls(&pg, 1030, 1).await;
    sqlx::query("COMMIT").execute(&mut blocker).await.unwrap();
    assert!(matches!(first.await.unwrap(), Ok(PgDecideOutcome::Passed)));
    let (mut passed, mut refused) = (0, 0);
    for q in queued {
        match q.await.unwrap() {
            Ok(PgDecideOutcome::Passed) => passed += 1,
            Err(StoreError::Unavailable(m)) if m.contains("already waiting") => refused += 1,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!((passed, refused), (1024, 6));
    blocker.close().await.unwrap();
    pg.close().await;
    cleanup.await;
}

/// Two replicas' sweepers at once, over reservations of several sessions and actions, while
/// decisions run: each expired reservation is given back exactly once, and nothing deadlocks.
#[tokio::test]
async fn concurrent_sweeps_give_every_reservation_back_once() {
    let (pg, cleanup) = fresh_pg().await;
    let actions = ["act0", "act1", "act2", "act3"];
    let made: Vec<_> = (0..400)
        .map(|i| {
            let session = format!("s{}", i % 10);
            tokio::spawn(decide_as(pg.clone(), session, actions[i % 4], 10, i64::MAX, None, format!("e-{i}")))
        })
        .collect();
    for t in made {
        assert!(matches!(t.await.unwrap(), Ok(PgDecideOutcome::Passed)));
    }
    // Every reservation above expires within 60 s; sweep as if two minutes had passed.
    let later_ms = sentinel_store::now_ms() + 120_000;
    let later_ns = later_ms * 1_000_000;
    let sweeps: Vec<_> = (0..2)
        .map(|_| {
            let pg = pg.clone();
            tokio::spawn(async move {
                let mut n = 0;
                for _ in 0..4 {
                    n += pg.pg_sweep(later_ms, later_ns).await.expect("a sweep failed");
                }
                n
            })
        })
        .collect();
    let during: Vec<_> = (0..100)
        .map(|i| {
            tokio::spawn(decide_as(
                pg.clone(),
                format!("s{}", i % 10),
                actions[i % 4],
                1,
                i64::MAX,
                None,
                format!("d-{i}"),
            ))
        })
        .collect();
    let mut swept = 0;
    for t in sweeps {
        swept += t.await.unwrap();
    }
    for t in during {
        assert!(matches!(t.await.unwrap(), Ok(PgDecideOutcome::Passed)));
    }
    // The calls made during the sweeps expire at the same time; one more sweep takes what is left.
    swept += pg.pg_sweep(later_ms, later_ns).await.unwrap();
    assert_eq!(swept, 500, "each expired reservation is swept once");
    for s in 0..10 {
        let spend = pg.pg_spend(&format!("s{s}"), "r", "act0").await.unwrap();
        assert_eq!(spend, [0, 0, 0], "session s{s}: everything was given back, once");
    }
    pg.close().await;
    cleanup.await;
}

/// A halt committed while calls wait in a session's lane stops every one of them decided after
/// it, though they were queued before it: each call in a batch reads the halts as it is decided.
#[tokio::test]
async fn a_halt_stops_the_calls_already_queued_on_a_session() {
    let (pg, url, cleanup) = fresh_pg_at().await;
    let (mut blocker, first) = first_call_waiting(&pg, &url, 1).await;
    let queued = queue_calls(&pg, 20, 1).await;
    pg.set_halt("agent", "a", "runaway", "ops").await.unwrap();
    sqlx::query("COMMIT").execute(&mut blocker).await.unwrap();
    // The first call had read the halts before the halt existed, and was waiting to write.
    assert!(matches!(first.await.unwrap(), Ok(PgDecideOutcome::Passed)));
    for q in queued {
        let out = q.await.unwrap();
        assert!(matches!(&out, Ok(PgDecideOutcome::Halted(h)) if h.reason == "runaway"), "{out:?}");
    }
    assert_eq!(pg.pg_spend("s", "r", "act").await.unwrap()[2], 1, "only the first call spent");
    blocker.close().await.unwrap();
    pg.close().await;
    cleanup.await;
}

/// An agent's and a run's totals saturate instead of failing the batch: a stream whose lines add
/// up past what a total can hold (here 1,100 lines of $9 billion, the most one line may carry)
/// keeps uploading, and its totals stay readable.
#[tokio::test]
async fn ingest_totals_saturate_instead_of_refusing_batches() {
    use sentinel_store::{ChainPos, InterventionFilter, InterventionIn, LedgerIn};
    on_both(|s| async move {
        const MOST: i64 = 9_000_000_000_000_000; // $9e9 in micros
        let hash = |n: i64| format!("{n:064x}");
        let lines: Vec<LedgerIn> = (1..=1110_i64)
            .map(|n| LedgerIn {
                id: format!("big-{n}"),
                chain: ChainPos { seq: n, prev: hash(n - 1), hash: hash(n), hash_ok: true },
                agent_id: "big".into(),
                run_id: "r".into(),
                cost_micros: MOST,
                failed: false,
                line: format!("{{\"n\":{n}}}"),
            })
            .collect();
        let now = sentinel_store::now_ms();
        let interventions: Vec<InterventionIn> = (1..=1110_i64)
            .map(|n| InterventionIn {
                id: format!("iv-{n}"),
                chain: Some(ChainPos { seq: n, prev: hash(n - 1), hash: hash(n), hash_ok: true }),
                at: now,
                clock_ahead: false,
                agent_id: "big".into(),
                run_id: "r".into(),
                session_id: String::new(),
                kind: "BUDGET_EXCEEDED".into(),
                outcome: "BLOCKED".into(),
                risk_level: "HIGH".into(),
                // Two actions: each group's SQL sum stays below i64, their total in Rust does not.
                action: if n % 2 == 0 { "pay" } else { "wire" }.into(),
                policy: Some("p".into()),
                rule: None,
                estimated_micros: MOST,
                prevented_micros: MOST,
                body: format!("{{\"n\":{n}}}"),
            })
            .collect();
        // One batch whose own total passes i64 (summed in Rust), then one added to a saturated
        // total (summed in SQL).
        for (l, i) in [(&lines[..1100], &interventions[..1100]), (&lines[1100..], &interventions[1100..])] {
            let r = s.ingest("big-stream", "big", l.to_vec(), i.to_vec()).await.unwrap();
            assert_eq!((r.ledger_accepted as usize, r.interventions_accepted as usize), (l.len(), i.len()));
            assert!(r.findings.is_empty(), "{:?}", r.findings);
        }
        let (agent, runs) = s.get_agent("big").await.unwrap();
        assert_eq!(agent.calls, 1110);
        let most = i64::MAX as f64 / 1e6;
        assert_eq!((agent.cost_usd, runs[0].cost_usd), (most, most), "saturated at the largest total");
        assert_eq!(s.list_agents().await.unwrap().len(), 1);
        // The stats add the same amounts up: saturated too, not an error.
        let st = s.intervention_stats(&InterventionFilter::default()).await.unwrap();
        assert_eq!((st.total, st.blocked), (1110, 1110));
        assert!(st.cost_prevented_usd >= 9.2e12, "{}", st.cost_prevented_usd);
        assert_eq!(st.top_blocked_actions[0].cost_prevented_usd, 555.0 * 9e9, "{:?}", st.top_blocked_actions);
        assert!(st.top_policies[0].cost_prevented_usd >= 9.2e12, "both actions' policy: {:?}", st.top_policies);
    })
    .await;
}
