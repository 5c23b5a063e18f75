//! In-process cost of one `/decide` through the whole router, without the network: what the
//! server's own code costs per decision, next to `/healthz` through the same router.
//!
//! `cargo run --release -p sentinel-server --example handler_cost [CALLS=200000]`

use std::time::Instant;

use axum::body::Body;
use axum::http::Request;
use http_body_util::BodyExt;
use sentinel_server::{AppState, app, bootstrap};
use sentinel_store::Store;
use tower::ServiceExt;

const BODY: &str = r#"{"action":"search_web","cost_usd":0.001,"agent_id":"bench","session_id":"s1","run_id":"r1","args":{"query":"quarterly revenue","max_results":10}}"#;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(200_000);
    let dir = tempfile::tempdir()?;
    let store = Store::open(&format!("sqlite://{}", dir.path().join("s.db").display())).await?;
    let state = AppState::open(store, b"bench-secret-bench-secret-bench-secret".to_vec()).await?;
    let key_path = bootstrap(&state, dir.path()).await?.ok_or("no bootstrap key")?;
    let key = std::fs::read_to_string(key_path)?.trim().to_string();
    let router = app(state);
    let policy = serde_json::json!({
        "name": "bench",
        "budgets": {"session": 1_000_000.0, "run": 1_000_000.0, "actions": {"search_web": 1_000_000.0}},
        "denied_actions": (0..1000).map(|i| format!("dangerous_tool_{i}")).collect::<Vec<_>>(),
        "rate_limits": {"send_email": {"max_count": 10, "window_seconds": 60}},
        "rules": (0..20).map(|i| serde_json::json!({"id": format!("r{i}"), "action": "block", "function_pattern": "search_*",
            "conditions": [{"param": "query", "operator": "contains", "value": format!("forbidden-{i}")}]})).collect::<Vec<_>>(),
    });
    let req = |method: &str, uri: &str, body: Option<String>| {
        let b = Request::builder().method(method).uri(uri).header("authorization", format!("Bearer {key}"));
        match body {
            Some(s) => b.header("content-type", "application/json").body(Body::from(s)),
            None => b.body(Body::empty()),
        }
    };
    let r = router.clone().oneshot(req("POST", "/api/v1/policies", Some(policy.to_string()))?).await?;
    assert!(r.status().is_success(), "policy: {}", r.status());
    for (label, method, uri, body) in [
        ("healthz", "GET", "/healthz", None),
        ("users/me", "GET", "/api/v1/users/me", None),
        ("decide", "POST", "/api/v1/decide", Some(BODY)),
    ] {
        let t = Instant::now();
        for _ in 0..n {
            let r = router.clone().oneshot(req(method, uri, body.map(str::to_string))?).await?;
            let _ = r.into_body().collect().await?;
        }
        println!("{label:<10} {:.2} µs per request", t.elapsed().as_secs_f64() * 1e6 / n as f64);
    }
    Ok(())
}
