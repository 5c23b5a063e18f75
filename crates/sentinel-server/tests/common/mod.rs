//! The in-process harness shared by the API tests: one app per backend, with a bootstrap admin key.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing, dead_code)]

use std::future::Future;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use sentinel_server::{AppState, app, bootstrap};
use sentinel_store::Store;
use serde_json::Value;
use sqlx::Connection;
use tower::ServiceExt;

pub struct Env {
    pub state: AppState,
    pub admin: String,
    pub dir: tempfile::TempDir,
}

impl Env {
    pub async fn call(
        &self,
        method: &str,
        uri: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value, String) {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(k) = key {
            req = req.header("authorization", format!("Bearer {k}"));
        }
        let req = match body {
            Some(b) => req.header("content-type", "application/json").body(Body::from(b.to_string())).unwrap(),
            None => req.body(Body::empty()).unwrap(),
        };
        let resp = app(self.state.clone()).oneshot(req).await.unwrap();
        let status = resp.status();
        let ctype = resp.headers().get("content-type").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let v = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        (status, v, ctype)
    }
}

/// The URL of a SQLite database file in `dir` (a file, unlike `sqlite::memory:`, has a journal).
pub fn sqlite_file(dir: &std::path::Path) -> String {
    format!("sqlite://{}", dir.join("s.db").display())
}

pub async fn env_on(url: &str) -> Env {
    env_with(url, sentinel_server::notify::NotifyConfig::default()).await
}

pub async fn env_with(url: &str, cfg: sentinel_server::notify::NotifyConfig) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(url).await.unwrap();
    let state = AppState::open_with(store, b"test-secret-test-secret-test-secret".to_vec(), cfg).await.unwrap();
    let path = bootstrap(&state, dir.path()).await.unwrap().expect("first start creates a key");
    let admin = std::fs::read_to_string(&path).unwrap().trim().to_string();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    assert!(bootstrap(&state, dir.path()).await.unwrap().is_none(), "only on first start");
    Env { state, admin, dir }
}

pub async fn on_both<F, Fut>(body: F)
where
    F: Fn(Env) -> Fut,
    Fut: Future<Output = ()>,
{
    on_both_with(sentinel_server::notify::NotifyConfig::default(), body).await;
}

/// A fresh PostgreSQL database for one test; dropped by [`drop_pg`].
pub async fn pg_database() -> (String, sqlx::PgConnection, String) {
    let admin =
        std::env::var("SENTINEL_TEST_PG_URL").unwrap_or_else(|_| "postgres://root@127.0.0.1:5432/postgres".into());
    let name = format!("sentinel_test_{}", uuid::Uuid::now_v7().simple());
    let mut conn =
        sqlx::PgConnection::connect(&admin).await.unwrap_or_else(|e| panic!("PostgreSQL is needed ({admin}): {e}"));
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut conn).await.unwrap();
    let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b).to_string();
    (format!("{base}/{name}"), conn, name)
}

pub async fn drop_pg(mut conn: sqlx::PgConnection, name: &str) {
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE {name} WITH (FORCE)"))).execute(&mut conn).await.unwrap();
}

pub async fn on_both_with<F, Fut>(cfg: sentinel_server::notify::NotifyConfig, body: F)
where
    F: Fn(Env) -> Fut,
    Fut: Future<Output = ()>,
{
    let tmp = tempfile::tempdir().unwrap();
    body(env_with(&format!("sqlite://{}", tmp.path().join("s.db").display()), cfg.clone()).await).await;
    let (url, conn, name) = pg_database().await;
    let env = env_with(&url, cfg).await;
    let store = env.state.store.clone();
    body(env).await;
    store.close().await;
    drop_pg(conn, &name).await;
}
