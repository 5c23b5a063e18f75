//! Notification throughput: N events queued through the server's own event path, delivered by its
//! dispatcher as signed webhooks to a receiver on 127.0.0.1 that checks every signature and counts
//! distinct idempotency keys. The time is from the first event queued until the receiver has all N.
//!
//! `cargo run --release -p sentinel-server --example notify_load -- [N=10000] [DATABASE_URL]`
//! (default: a SQLite database in a temporary directory; pass `postgres://…` for PostgreSQL).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use hmac::{KeyInit, Mac};
use parking_lot::Mutex;
use sentinel_server::notify::{Event, NotifyConfig, emit};
use serde_json::json;

#[derive(Default)]
struct Sink {
    keys: Mutex<HashSet<String>>,
    bad: AtomicU64,
    requests: AtomicU64,
    secret: Mutex<String>,
}

async fn receive(
    axum::extract::State(s): axum::extract::State<Arc<Sink>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> StatusCode {
    s.requests.fetch_add(1, Ordering::Relaxed);
    let h = |k: &str| headers.get(k).and_then(|v| v.to_str().ok()).unwrap_or("");
    let ok = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(s.secret.lock().as_bytes()).is_ok_and(|mut m| {
        m.update(h("x-sentinel-timestamp").as_bytes());
        m.update(b".");
        m.update(&body);
        format!("sha256={}", hex::encode(m.finalize().into_bytes())) == h("x-sentinel-signature")
    });
    if !ok {
        s.bad.fetch_add(1, Ordering::Relaxed);
        return StatusCode::UNAUTHORIZED;
    }
    s.keys.lock().insert(h("idempotency-key").to_string());
    StatusCode::NO_CONTENT
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(1).and_then(|x| x.parse().ok()).unwrap_or(10_000);
    let dir = tempfile_dir()?;
    let url = args.get(2).cloned().unwrap_or_else(|| format!("sqlite://{}", dir.join("notify.db").display()));

    let sink = Arc::new(Sink::default());
    let app = axum::Router::new().route("/hook", axum::routing::post(receive)).with_state(Arc::clone(&sink));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let hook = format!("http://{}/hook", l.local_addr()?);
    tokio::spawn(async move {
        let _ = axum::serve(l, app).await;
    });

    let store = sentinel_store::Store::open(&url).await?;
    let cfg = NotifyConfig { allow: vec!["127.0.0.1/32".parse()?], ..Default::default() };
    let state =
        sentinel_server::AppState::open_with(store, b"bench-secret-bench-secret-bench-secret".to_vec(), cfg).await?;
    let ch = state
        .store
        .create_channel(&sentinel_store::NewChannel {
            name: format!("bench-{}", sentinel_store::new_id()),
            kind: "webhook".into(),
            config: json!({"url": hook, "secret": "whsec_bench_secret_0123456789"}),
            events: vec![],
            enabled: true,
        })
        .await?;
    *sink.secret.lock() = "whsec_bench_secret_0123456789".into();
    let _dispatcher = state.spawn_notifications();

    let started = Instant::now();
    for i in 0..n {
        let mut ev = Event::new("policy_violation", format!("bench-{}-{i}", ch.id), format!("event {i}"), "warning");
        ev.data = json!({"i": i, "agent_id": "bench", "action_name": "wipe"});
        ev.facts = vec![("Agent", "bench".into()), ("Action", "wipe".into())];
        emit(&state, ev).await.map_err(|e| e.detail)?;
    }
    let queued = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(120);
    while sink.keys.lock().len() < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let total = started.elapsed();
    let got = sink.keys.lock().len();
    println!(
        "notify_load: {got}/{n} delivered in {:.2} s ({:.0}/s); queueing took {:.2} s; {} requests, {} bad signatures; database {}",
        total.as_secs_f64(),
        got as f64 / total.as_secs_f64(),
        queued.as_secs_f64(),
        sink.requests.load(Ordering::Relaxed),
        sink.bad.load(Ordering::Relaxed),
        if url.starts_with("postgres") { "PostgreSQL" } else { "SQLite" },
    );
    let _ = std::fs::remove_dir_all(&dir);
    if got < n {
        std::process::exit(1);
    }
    Ok(())
}

fn tempfile_dir() -> std::io::Result<std::path::PathBuf> {
    let d = std::env::temp_dir().join(format!("sentinel-notify-load-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}
