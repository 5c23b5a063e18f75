//! Every store operation, against both SQLite and PostgreSQL. PostgreSQL tests create their own
//! database and drop it afterwards; the admin URL is `SENTINEL_TEST_PG_URL`
//! (default `postgres://root@127.0.0.1:5432/postgres`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::future::Future;

use sentinel_store::{Backend, NewApiKey, Scope, Store, StoreError, diff};
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

    let admin = pg_admin_url();
    let name = format!("sentinel_test_{}", uuid::Uuid::now_v7().simple());
    let mut conn = sqlx::PgConnection::connect(&admin).await.unwrap_or_else(|e| {
        panic!("PostgreSQL is needed for these tests ({admin}): {e}; start it or set SENTINEL_TEST_PG_URL")
    });
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut conn).await.unwrap();
    let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b).to_string();
    let pg = Store::open(&format!("{base}/{name}")).await.unwrap();
    assert_eq!(pg.backend(), Backend::Postgres);
    body(pg.clone()).await;
    pg.close().await;
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE {name} WITH (FORCE)"))).execute(&mut conn).await.unwrap();
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
