//! Notifications against real HTTP receivers on 127.0.0.1: signed webhooks verified by the
//! receiver, Slack Block Kit, retries with one idempotency key, a restart with an undelivered
//! outbox, server-side request forgery checks, redirects, signed approval links, escalation,
//! budget thresholds and consecutive failures.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use common::{Env, env_with, on_both_with, sqlite_file};
use hmac::{KeyInit, Mac};
use parking_lot::Mutex;
use sentinel_server::notify::{NotifyConfig, forbidden_ip};
use serde_json::{Value, json};

/// What a receiver saw: one entry per request, with whether its signature checked out.
#[derive(Clone, Debug)]
struct Got {
    key: String,
    event: String,
    body: Value,
    signed_ok: Option<bool>,
}

#[derive(Default)]
struct Receiver {
    got: Mutex<Vec<Got>>,
    /// Applied once per idempotency key.
    effects: Mutex<HashSet<String>>,
    secret: Mutex<String>,
    /// Answer 503 to this many requests first.
    fail_next: Mutex<u32>,
    /// Answer 503 to the first attempt of every message (as if the answer were lost).
    fail_first_of_each: Mutex<bool>,
    /// Answer with a redirect.
    redirect: Mutex<bool>,
}

async fn receive(
    axum::extract::State(r): axum::extract::State<Arc<Receiver>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let h = |k: &str| headers.get(k).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let key = h("idempotency-key");
    let signed_ok = (!h("x-sentinel-signature").is_empty()).then(|| {
        let ts: i64 = h("x-sentinel-timestamp").parse().unwrap_or(0);
        // A receiver refuses stale timestamps (replays) and checks the MAC over "<ts>.<body>".
        let fresh = (chrono::Utc::now().timestamp() - ts).abs() < 300;
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(r.secret.lock().as_bytes()).unwrap();
        mac.update(format!("{ts}.").as_bytes());
        mac.update(&body);
        let want = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
        fresh && want == h("x-sentinel-signature")
    });
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let first_time = !r.got.lock().iter().any(|g| g.key == key);
    r.got.lock().push(Got { key: key.clone(), event: h("x-sentinel-event"), body: v, signed_ok });
    if *r.redirect.lock() {
        return (StatusCode::FOUND, [("location", "http://127.0.0.1:9/elsewhere")]).into_response();
    }
    {
        let mut n = r.fail_next.lock();
        if *n > 0 {
            *n -= 1;
            return StatusCode::SERVICE_UNAVAILABLE.into_response();
        }
    }
    if *r.fail_first_of_each.lock() && first_time {
        r.effects.lock().insert(key);
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    r.effects.lock().insert(key);
    StatusCode::OK.into_response()
}

async fn receiver() -> (Arc<Receiver>, String) {
    let r = Arc::new(Receiver::default());
    let app = axum::Router::new().route("/hook", axum::routing::post(receive)).with_state(Arc::clone(&r));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    (r, format!("http://{addr}/hook"))
}

fn local() -> NotifyConfig {
    NotifyConfig { allow: vec!["127.0.0.1/32".parse().unwrap()], ..Default::default() }
}

async fn until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn webhook(e: &Env, r: &Receiver, url: &str, events: Value) -> String {
    let (st, c, _) = e
        .call(
            "POST",
            "/api/v1/notifications/channels",
            Some(&e.admin),
            Some(json!({"name": "hooks", "kind": "webhook", "url": url, "events": events})),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{c}");
    let secret = c["config"]["secret"].as_str().unwrap().to_string();
    assert!(secret.starts_with("whsec_"), "a secret is generated and shown once: {c}");
    *r.secret.lock() = secret;
    let (_, listed, _) = e.call("GET", "/api/v1/notifications/channels", Some(&e.admin), None).await;
    assert_eq!(listed["items"][0]["config"]["secret"], "(hidden)", "never shown again");
    c["id"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn webhooks_are_signed_filtered_retried_and_critical_ones_always_sent() {
    on_both_with(local(), |e| async move {
        let dispatcher = e.state.spawn_notifications();
        let (r, url) = receiver().await;
        let ch = webhook(&e, &r, &url, json!(["test", "approval_decided"])).await;

        // Send test: delivered at once, signed, with its idempotency key, and visible in the outbox.
        let (st, m, _) =
            e.call("POST", &format!("/api/v1/notifications/channels/{ch}/test"), Some(&e.admin), None).await;
        assert_eq!(st, StatusCode::OK, "{m}");
        assert_eq!(m["status"], "delivered", "{m}");
        let got = r.got.lock()[0].clone();
        assert_eq!(got.signed_ok, Some(true), "the receiver verified the signature");
        assert_eq!(got.event, "test");
        assert_eq!(got.key, m["id"].as_str().unwrap());
        assert_eq!(got.body["idempotency_key"], m["id"]);
        assert_eq!(got.body["event_type"], "test");

        // A denied call of critical risk goes to every channel, whatever its filter; a plain
        // violation does not go to a channel that did not ask for it.
        let (st, p, _) = e
            .call(
                "POST",
                "/api/v1/policies",
                Some(&e.admin),
                Some(json!({"name": "p", "denied_actions": ["drop_db", "post_tweet"]})),
            )
            .await;
        assert_eq!(st, StatusCode::CREATED, "{p}");
        let (_, d, _) = e
            .call(
                "POST",
                "/api/v1/decide",
                Some(&e.admin),
                Some(json!({"action": "drop_db", "agent_id": "bot", "risk": "CRITICAL"})),
            )
            .await;
        assert_eq!(d["verdict"], "deny", "{d}");
        let (_, d, _) = e
            .call("POST", "/api/v1/decide", Some(&e.admin), Some(json!({"action": "post_tweet", "agent_id": "bot"})))
            .await;
        assert_eq!(d["verdict"], "deny");
        until("the critical intervention", 10, || r.got.lock().iter().any(|g| g.event == "critical_intervention"))
            .await;
        let crit = r.got.lock().iter().find(|g| g.event == "critical_intervention").cloned().unwrap();
        assert_eq!(crit.signed_ok, Some(true));
        assert_eq!(crit.body["data"]["action_name"], "drop_db");
        assert_eq!(crit.body["data"]["risk_level"], "critical");
        assert_eq!(crit.body["data"]["agent_id"], "bot");
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(!r.got.lock().iter().any(|g| g.event == "policy_violation"), "filtered out");
        let (_, list, _) = e.call("GET", "/api/v1/notifications?event=policy_violation", Some(&e.admin), None).await;
        assert_eq!(list["items"].as_array().unwrap().len(), 0);

        // A receiver that fails twice: retried with backoff, same idempotency key, then delivered.
        *r.fail_next.lock() = 2;
        let before = r.got.lock().len();
        let (_, m, _) =
            e.call("POST", &format!("/api/v1/notifications/channels/{ch}/test"), Some(&e.admin), None).await;
        assert_eq!(m["status"], "pending", "the first attempt failed and is retried: {m}");
        assert!(m["last_error"].as_str().unwrap().contains("503"), "{m}");
        let id = m["id"].as_str().unwrap().to_string();
        let mut last = Value::Null;
        let end = Instant::now() + Duration::from_secs(15);
        while Instant::now() < end {
            last = e.call("GET", &format!("/api/v1/notifications/{id}"), Some(&e.admin), None).await.1;
            if last["status"] == "delivered" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(last["status"], "delivered", "{last}");
        assert_eq!(last["attempts"], 3, "{last}");
        let tries: Vec<Got> = r.got.lock()[before..].to_vec();
        assert_eq!(tries.len(), 3);
        assert!(tries.iter().all(|g| g.key == id && g.signed_ok == Some(true)));

        // Status filters and counts.
        let (_, list, _) = e.call("GET", "/api/v1/notifications?status=delivered", Some(&e.admin), None).await;
        assert!(list["items"].as_array().unwrap().len() >= 3, "{list}");
        assert!(list["counts"]["delivered"].as_i64().unwrap() >= 3);
        let (st, _, _) = e.call("GET", "/api/v1/notifications?status=lost", Some(&e.admin), None).await;
        assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY);
        dispatcher.abort();
    })
    .await;
}

#[tokio::test]
async fn targets_are_checked_against_request_forgery_and_redirects_are_not_followed() {
    let tmp = tempfile::tempdir().unwrap();
    let e = env_with(&sqlite_file(tmp.path()), NotifyConfig::default()).await;
    for (url, why) in [
        ("http://127.0.0.1:8080/x", "loopback"),
        ("http://localhost/x", "loopback"),
        ("http://10.1.2.3/x", "private"),
        ("http://169.254.169.254/latest/meta-data", "link-local"),
        ("http://[::1]/x", "loopback"),
        ("http://[fd00:ec2::254]/x", "unique local"),
        ("http://[::ffff:192.168.0.1]/x", "private"),
        ("http://100.64.0.1/x", "shared"),
        ("ftp://example.com/x", "only http and https"),
        ("http://user:pw@example.com/x", "credentials"),
    ] {
        let (st, p, _) = e
            .call(
                "POST",
                "/api/v1/notifications/channels",
                Some(&e.admin),
                Some(json!({"name": "x", "kind": "webhook", "url": url})),
            )
            .await;
        assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{url}: {p}");
        assert_eq!(p["errors"][0]["path"], "url");
        assert!(p["detail"].as_str().unwrap().contains(why), "{url}: {p}");
    }
    assert!(forbidden_ip("93.184.216.34".parse().unwrap(), &[]).is_none(), "public addresses are fine");
    assert!(
        forbidden_ip("[64:ff9b::a00:1]".trim_matches(['[', ']']).parse().unwrap(), &[]).is_some(),
        "NAT64 of 10.0.0.1"
    );
    assert!(forbidden_ip("127.0.0.1".parse().unwrap(), &["127.0.0.1/32".parse().unwrap()]).is_none());

    // Bad channel bodies name the field.
    for (body, path) in [
        (json!({"name": "m", "kind": "email", "to": ["not-an-address"]}), "to[0]"),
        (json!({"name": "m", "kind": "email"}), "to"),
        (json!({"name": "m", "kind": "pager", "url": "https://example.com"}), "kind"),
        (json!({"name": "m", "kind": "webhook", "url": "https://example.com", "events": ["nope"]}), "events[0]"),
        (json!({"name": "m", "kind": "webhook", "url": "https://example.com", "secret": "short"}), "secret"),
        (json!({"name": "m", "kind": "webhook", "url": "https://example.com", "colour": "red"}), "colour"),
    ] {
        let (st, p, _) = e.call("POST", "/api/v1/notifications/channels", Some(&e.admin), Some(body.clone())).await;
        assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {p}");
        assert!(p["errors"][0]["path"].as_str().unwrap().contains(path), "{body}: {p}");
    }

    // Allowed network, but the target redirects: not followed, marked failed, the reason kept.
    let e = env_with(&format!("sqlite://{}", tmp.path().join("t.db").display()), local()).await;
    let (r, url) = receiver().await;
    *r.redirect.lock() = true;
    let ch = webhook(&e, &r, &url, json!([])).await;
    let (_, m, _) = e.call("POST", &format!("/api/v1/notifications/channels/{ch}/test"), Some(&e.admin), None).await;
    assert_eq!(m["status"], "failed", "{m}");
    assert!(m["last_error"].as_str().unwrap().contains("redirects are not followed"), "{m}");
    assert_eq!(r.got.lock().len(), 1, "one request, no follow-up");
    // A failed message can be queued again.
    *r.redirect.lock() = false;
    let d = e.state.spawn_notifications();
    let (st, _, _) = e
        .call("POST", &format!("/api/v1/notifications/{}/retry", m["id"].as_str().unwrap()), Some(&e.admin), None)
        .await;
    assert_eq!(st, StatusCode::OK);
    until("the retried message", 10, || r.got.lock().len() == 2).await;
    d.abort();

    // Slack: an incoming-webhook message in Block Kit, with the key facts as fields.
    let (st, c, _) = e
        .call(
            "POST",
            "/api/v1/notifications/channels",
            Some(&e.admin),
            Some(json!({"name": "slack-ops", "kind": "slack", "url": url})),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{c}");
    let (_, m, _) = e
        .call(
            "POST",
            &format!("/api/v1/notifications/channels/{}/test", c["id"].as_str().unwrap()),
            Some(&e.admin),
            None,
        )
        .await;
    assert_eq!(m["status"], "delivered", "{m}");
    let slack = r.got.lock().last().cloned().unwrap();
    assert_eq!(slack.signed_ok, None, "Slack webhooks are not signed");
    assert_eq!(slack.key, m["id"].as_str().unwrap());
    let blocks = slack.body["blocks"].as_array().unwrap();
    assert_eq!(blocks[0]["type"], "header");
    assert!(blocks[0]["text"]["text"].as_str().unwrap().contains("Test notification for channel `slack-ops`"));
    assert_eq!(blocks[1]["type"], "section");
    assert!(blocks[1]["fields"].as_array().unwrap().iter().any(|f| f["text"].as_str().unwrap().contains("*Channel:*")));
    assert!(slack.body["text"].as_str().unwrap().contains("Test notification"), "a fallback text for notifications");

    // Only admins manage channels; an agent key cannot even list them.
    let (_, k, _) = e
        .call("POST", "/api/v1/keys", Some(&e.admin), Some(json!({"name": "a", "scope": "agent", "agent_id": "bot"})))
        .await;
    let (st, _, _) = e.call("GET", "/api/v1/notifications/channels", k["key"].as_str(), None).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn an_undelivered_outbox_is_delivered_after_a_restart_and_takes_effect_once() {
    let tmp = tempfile::tempdir().unwrap();
    let db = sqlite_file(tmp.path());
    let (r, url) = receiver().await;
    let n = 40;
    {
        let e = env_with(&db, local()).await;
        let _ch = webhook(&e, &r, &url, json!([])).await;
        // The receiver is down (503) while the events happen; the server stops before it is back.
        *r.fail_next.lock() = u32::MAX;
        let d = e.state.spawn_notifications();
        let (_, _, _) = e
            .call("POST", "/api/v1/policies", Some(&e.admin), Some(json!({"name": "p", "denied_actions": ["wipe"]})))
            .await;
        for i in 0..n {
            let (_, d, _) = e
                .call(
                    "POST",
                    "/api/v1/decide",
                    Some(&e.admin),
                    Some(json!({"action": "wipe", "agent_id": format!("bot{i}"), "risk": "CRITICAL"})),
                )
                .await;
            assert_eq!(d["verdict"], "deny");
        }
        let store = e.state.store.clone();
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            let (_, list, _) = e.call("GET", "/api/v1/notifications?limit=1000", Some(&e.admin), None).await;
            let items = list["items"].as_array().unwrap();
            if items.len() == n && items.iter().all(|m| m["attempts"].as_i64().unwrap() >= 1) {
                assert!(items.iter().all(|m| m["status"] == "pending"));
                break;
            }
            assert!(Instant::now() < end, "{list}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        d.abort();
        let _ = d.await;
        store.close().await;
    }
    // Back up; and every first attempt's answer is "lost" (503 after taking effect), so each
    // message arrives at least twice with one key.
    *r.fail_next.lock() = 0;
    *r.fail_first_of_each.lock() = true;
    r.got.lock().clear();
    let store = sentinel_store::Store::open(&db).await.unwrap();
    store.release_leases().await.unwrap();
    let state = sentinel_server::AppState::open_with(store, b"test-secret-test-secret-test-secret".to_vec(), local())
        .await
        .unwrap();
    let d = state.spawn_notifications();
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let counts = state.store.message_counts().await.unwrap();
        if counts.iter().any(|(s, c)| s == "delivered" && *c == n as i64) {
            break;
        }
        assert!(Instant::now() < end, "{counts:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let got = r.got.lock().clone();
    let mut per_key: HashMap<String, usize> = HashMap::new();
    for g in &got {
        *per_key.entry(g.key.clone()).or_default() += 1;
        assert_eq!(g.signed_ok, Some(true));
    }
    assert_eq!(per_key.len(), n, "every message arrived");
    assert!(per_key.values().all(|c| *c >= 2), "each was delivered again after its lost answer");
    assert_eq!(r.effects.lock().len(), n, "and took effect once, by its idempotency key");
    d.abort();
}

/// The review link from a message's payload, split into its path.
fn link_path(m: &Value) -> String {
    let l = m["links"]["review"].as_str().unwrap();
    format!("/approve/{}", l.rsplit_once("/approve/").unwrap().1)
}

async fn page(e: &Env, method: &str, path: &str, form: Option<&str>) -> (StatusCode, String) {
    use axum::body::Body;
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let mut req = axum::http::Request::builder().method(method).uri(path);
    let body = match form {
        Some(f) => {
            req = req.header("content-type", "application/x-www-form-urlencoded");
            Body::from(f.to_string())
        }
        None => Body::empty(),
    };
    let resp = sentinel_server::app(e.state.clone()).oneshot(req.body(body).unwrap()).await.unwrap();
    let st = resp.status();
    if st == StatusCode::OK {
        assert_eq!(resp.headers()["cache-control"], "no-store");
        assert!(resp.headers()["content-security-policy"].to_str().unwrap().contains("default-src 'none'"));
    }
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (st, String::from_utf8_lossy(&bytes).into_owned())
}

#[tokio::test]
async fn approval_links_are_signed_single_use_expiring_and_a_get_never_decides() {
    on_both_with(local(), |e| async move {
        let d = e.state.spawn_notifications();
        let (r, url) = receiver().await;
        let _ch = webhook(&e, &r, &url, json!(["approval_requested", "approval_escalated", "approval_decided"])).await;
        let policy = json!({"name": "wires", "approvals": {"actions": ["wire"], "timeout_seconds": 4,
            "approvers": ["alice@example.com"], "escalation": {"after_percent": 25, "approvers": ["boss@example.com"]}}});
        let (st, p, _) = e.call("POST", "/api/v1/policies", Some(&e.admin), Some(policy)).await;
        assert_eq!(st, StatusCode::CREATED, "{p}");
        let ask = |amount: f64| {
            json!({"action": "wire", "agent_id": "bot", "run_id": "r1", "cost_usd": 1.5,
                   "args": {"amount": amount, "api_key": "sk-live-secret"}, "context": {"ticket": "T-42"}})
        };
        let (_, dec, _) = e.call("POST", "/api/v1/decide", Some(&e.admin), Some(ask(100.0))).await;
        assert_eq!(dec["verdict"], "require_approval", "{dec}");
        let aid = dec["approval_request"]["id"].as_str().unwrap().to_string();
        until("the approval request message", 10, || r.got.lock().iter().any(|g| g.event == "approval_requested")).await;
        let msg = r.got.lock().iter().find(|g| g.event == "approval_requested").unwrap().body.clone();
        assert_eq!(msg["data"]["approval_id"], aid.as_str());
        let path = link_path(&msg);
        // The approver email gets its own message and link (no SMTP here: it fails, visibly).
        let (_, list, _) = e.call("GET", "/api/v1/notifications?event=approval_requested", Some(&e.admin), None).await;
        let items = list["items"].as_array().unwrap();
        assert_eq!(items.len(), 2, "{list}");
        let email = items.iter().find(|m| m["kind"] == "email").unwrap();
        assert_eq!(email["target"], "alice@example.com");
        assert_ne!(link_path(&email["payload"]), path, "a link per recipient");

        // GET shows the call (arguments redacted, context, spend) and never decides.
        for _ in 0..2 {
            let (st, html) = page(&e, "GET", &path, None).await;
            assert_eq!(st, StatusCode::OK, "{html}");
            assert!(html.contains("wire") && html.contains("T-42") && html.contains("Approve"), "{html}");
            assert!(!html.contains("sk-live-secret"), "arguments are redacted");
        }
        let (_, a, _) = e.call("GET", &format!("/api/v1/approvals/{aid}"), Some(&e.admin), None).await;
        assert_eq!(a["status"], "pending");

        // Forged: another signature, or another id with this signature.
        let (id, sig) = path.trim_start_matches("/approve/").split_once('.').unwrap();
        let flipped = match sig.strip_prefix('0') {
            Some(rest) => format!("1{rest}"),
            None => format!("0{}", &sig[1..]),
        };
        for forged in [format!("/approve/{id}.{flipped}"), format!("/approve/{}.{sig}", "f".repeat(32)), "/approve/x".into()] {
            let (st, _) = page(&e, "POST", &forged, Some("decision=approve&confirm=yes")).await;
            assert_eq!(st, StatusCode::FORBIDDEN, "{forged}");
            let (st, _) = page(&e, "GET", &forged, None).await;
            assert_eq!(st, StatusCode::FORBIDDEN);
        }
        // Without the confirmation, nothing is decided.
        let (st, _) = page(&e, "POST", &path, Some("decision=approve")).await;
        assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY);
        let (_, a, _) = e.call("GET", &format!("/api/v1/approvals/{aid}"), Some(&e.admin), None).await;
        assert_eq!(a["status"], "pending");

        // Escalation: still undecided after 25% of 4 s, the next group is asked.
        until("the escalation", 10, || r.got.lock().iter().any(|g| g.event == "approval_escalated")).await;
        let esc = r.got.lock().iter().find(|g| g.event == "approval_escalated").unwrap().body.clone();
        assert_eq!(esc["data"]["approval_id"], aid.as_str());
        let (_, list, _) = e.call("GET", "/api/v1/notifications?event=approval_escalated", Some(&e.admin), None).await;
        assert!(list["items"].as_array().unwrap().iter().any(|m| m["target"] == "boss@example.com"), "{list}");

        // Decide through the link: once.
        let (st, html) = page(&e, "POST", &path, Some("decision=approve&confirm=yes&reason=ticket+T-42+ok")).await;
        assert_eq!(st, StatusCode::OK, "{html}");
        let (_, a, _) = e.call("GET", &format!("/api/v1/approvals/{aid}"), Some(&e.admin), None).await;
        assert_eq!(a["status"], "approved");
        assert_eq!(a["reason"], "ticket T-42 ok");
        assert!(a["decided_by"].as_str().unwrap().contains("channel `hooks` (signed link)"), "{a}");
        let (st, _) = page(&e, "POST", &path, Some("decision=reject&confirm=yes")).await;
        assert_eq!(st, StatusCode::CONFLICT, "reused");
        // The other recipient's link can no longer decide either: the request is decided.
        let (st, html) = page(&e, "POST", &link_path(&email["payload"]), Some("decision=reject&confirm=yes")).await;
        assert_eq!(st, StatusCode::CONFLICT, "{html}");
        until("the decision message", 10, || r.got.lock().iter().any(|g| g.event == "approval_decided")).await;

        // Expired: a request that timed out before its link was used.
        let (_, dec, _) = e.call("POST", "/api/v1/decide", Some(&e.admin), Some(ask(7.0))).await;
        let aid2 = dec["approval_request"]["id"].as_str().unwrap().to_string();
        until("the second request's message", 10, || {
            r.got.lock().iter().any(|g| g.event == "approval_requested" && g.body["data"]["approval_id"] == aid2.as_str())
        })
        .await;
        let msg2 = r
            .got
            .lock()
            .iter()
            .find(|g| g.event == "approval_requested" && g.body["data"]["approval_id"] == aid2.as_str())
            .unwrap()
            .body
            .clone();
        tokio::time::sleep(Duration::from_millis(4200)).await;
        let (st, _) = page(&e, "POST", &link_path(&msg2), Some("decision=approve&confirm=yes")).await;
        assert_eq!(st, StatusCode::GONE);
        let (_, a, _) = e.call("GET", &format!("/api/v1/approvals/{aid2}"), Some(&e.admin), None).await;
        assert_eq!(a["status"], "expired");
        d.abort();
    })
    .await;
}

#[tokio::test]
async fn budget_thresholds_and_consecutive_failures_alert_once() {
    let tmp = tempfile::tempdir().unwrap();
    let e = env_with(&sqlite_file(tmp.path()), local()).await;
    let d = e.state.spawn_notifications();
    let (r, url) = receiver().await;
    let _ch = webhook(&e, &r, &url, json!(["budget_threshold", "agent_failures"])).await;
    let policy = json!({"name": "spend", "budgets": {"session": 1.0},
        "alerts": {"emails": ["ops@example.com"], "threshold_percent": 50, "alert_on_failure": true}});
    let (st, p, _) = e.call("POST", "/api/v1/policies", Some(&e.admin), Some(policy)).await;
    assert_eq!(st, StatusCode::CREATED, "{p}");
    for _ in 0..4 {
        let (_, dec, _) = e
            .call(
                "POST",
                "/api/v1/decide",
                Some(&e.admin),
                Some(json!({"action": "llm", "agent_id": "bot", "session_id": "s1", "cost_usd": 0.2})),
            )
            .await;
        assert_eq!(dec["verdict"], "allow", "{dec}");
    }
    until("the threshold alert", 10, || r.got.lock().iter().any(|g| g.event == "budget_threshold")).await;
    let t = r.got.lock().iter().find(|g| g.event == "budget_threshold").unwrap().body.clone();
    assert_eq!(t["data"]["budget"], "session");
    assert!(t["data"]["spent_usd"].as_f64().unwrap() >= 0.5);
    let (_, list, _) = e.call("GET", "/api/v1/notifications?event=budget_threshold", Some(&e.admin), None).await;
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len(), 2, "the channel and the policy's alert email, once: {list}");
    let mail = items.iter().find(|m| m["kind"] == "email").unwrap();
    assert_eq!(mail["target"], "ops@example.com");
    // Its one attempt fails for good, saying why (no SMTP server is configured here).
    let path = format!("/api/v1/notifications/{}", mail["id"].as_str().unwrap());
    let mut mail = Value::Null;
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end {
        mail = e.call("GET", &path, Some(&e.admin), None).await.1;
        if mail["status"] != "pending" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(mail["status"], "failed", "{mail}");
    assert!(mail["last_error"].as_str().unwrap().contains("--smtp-url"), "no SMTP server is configured: {mail}");

    // Three failed calls in a row from an uploaded ledger: one alert.
    let home = tempfile::tempdir().unwrap();
    {
        use sentinel_core::{ActionRequest, Begun, CallOutcome, Engine, Guard, LogOptions, PolicySet};
        let engine = Arc::new(Engine::new(PolicySet::compile(vec![]).unwrap()));
        let guard = Guard::open(home.path(), engine, LogOptions::default()).unwrap();
        for i in 0..5 {
            let req = ActionRequest::new("fetch").agent("flaky").run("r").session("s");
            if let Begun::Proceed(p) = guard.begin(&req, json!({"i": i})).unwrap() {
                let out = if i == 0 { CallOutcome::Success(json!(1)) } else { CallOutcome::Error("boom".into()) };
                guard.finish(*p, out, None).unwrap();
            }
        }
    }
    let lines: Vec<String> =
        std::fs::read_to_string(home.path().join("ledger.jsonl")).unwrap().lines().map(str::to_string).collect();
    for _ in 0..2 {
        let (st, rep, _) = e
            .call("POST", "/api/v1/ledger", Some(&e.admin), Some(json!({"stream": "flaky-host", "ledger": lines})))
            .await;
        assert_eq!(st, StatusCode::OK, "{rep}");
    }
    until("the failure alert", 10, || r.got.lock().iter().any(|g| g.event == "agent_failures")).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fails: Vec<Got> = r.got.lock().iter().filter(|g| g.event == "agent_failures").cloned().collect();
    assert_eq!(fails.len(), 1, "once, though the batch was sent twice");
    assert_eq!(fails[0].body["data"]["agent_id"], "flaky");
    assert_eq!(fails[0].body["data"]["consecutive_failures"], 4, "a success, then four failures");
    d.abort();
}

#[tokio::test]
async fn a_call_over_budget_pauses_until_a_human_resumes_it_or_raises_the_limit() {
    on_both_with(local(), |e| async move {
        let policy =
            |limit: f64| json!({"name": "pausing", "budgets": {"session": limit}, "on_budget_exceeded": "pause"});
        let (st, p, _) = e.call("POST", "/api/v1/policies", Some(&e.admin), Some(policy(1.0))).await;
        assert_eq!(st, StatusCode::CREATED, "{p}");
        let pid = p["id"].as_str().unwrap().to_string();
        let call = |approval: Option<&str>| {
            let mut b = json!({"action": "llm", "agent_id": "bot", "session_id": "s", "cost_usd": 0.6});
            if let Some(a) = approval {
                b["approval_id"] = json!(a);
            }
            b
        };
        let (_, d1, _) = e.call("POST", "/api/v1/decide", Some(&e.admin), Some(call(None))).await;
        assert_eq!(d1["verdict"], "allow", "{d1}");
        // Over the budget: paused, not failed.
        let (_, d2, _) = e.call("POST", "/api/v1/decide", Some(&e.admin), Some(call(None))).await;
        assert_eq!(d2["verdict"], "require_approval", "{d2}");
        assert_eq!(d2["paused"], true);
        assert_eq!(d2["reason"], "SESSION_BUDGET_EXCEEDED");
        let a2 = d2["approval_request"]["id"].as_str().unwrap().to_string();
        let (_, row, _) = e.call("GET", &format!("/api/v1/approvals/{a2}"), Some(&e.admin), None).await;
        assert_eq!(row["request"]["kind"], "budget_pause");
        assert!(row["request"]["spend"]["session_usd"].as_f64().unwrap() >= 0.6, "{row}");
        // Not usable before a human acts.
        let (st, _, _) = e.call("POST", "/api/v1/decide", Some(&e.admin), Some(call(Some(&a2)))).await;
        assert_eq!(st, StatusCode::CONFLICT);
        // Resumed: this one call runs over the budget, once, and its cost is counted.
        let (st, _, _) = e
            .call("POST", &format!("/api/v1/approvals/{a2}/approve"), Some(&e.admin), Some(json!({"reason": "go"})))
            .await;
        assert_eq!(st, StatusCode::OK);
        let (_, d3, _) = e.call("POST", "/api/v1/decide", Some(&e.admin), Some(call(Some(&a2)))).await;
        assert_eq!(d3["verdict"], "allow", "{d3}");
        assert!(d3["reservation"]["id"].is_string());
        let (st, _, _) = e.call("POST", "/api/v1/decide", Some(&e.admin), Some(call(Some(&a2)))).await;
        assert_eq!(st, StatusCode::CONFLICT, "once");

        // Paused again; raising the limit ends the pause without anyone approving it.
        let (_, d4, _) = e.call("POST", "/api/v1/decide", Some(&e.admin), Some(call(None))).await;
        assert_eq!(d4["paused"], true, "{d4}");
        let a4 = d4["approval_request"]["id"].as_str().unwrap().to_string();
        let (st, _, _) = e.call("PUT", &format!("/api/v1/policies/{pid}"), Some(&e.admin), Some(policy(10.0))).await;
        assert_eq!(st, StatusCode::OK);
        let (_, w, _) =
            e.call("GET", &format!("/api/v1/approvals/{a4}/wait?timeout_seconds=5"), Some(&e.admin), None).await;
        assert_eq!(w["status"], "approved", "{w}");
        assert!(w["decided_by"].as_str().unwrap().starts_with("policy change"), "{w}");
        let (_, d5, _) = e.call("POST", "/api/v1/decide", Some(&e.admin), Some(call(Some(&a4)))).await;
        assert_eq!(d5["verdict"], "allow", "within the raised budget: {d5}");

        // A policy without `pause` still fails over budget.
        let (_, _, _) = e
            .call(
                "PUT",
                &format!("/api/v1/policies/{pid}"),
                Some(&e.admin),
                Some(json!({"name": "pausing", "budgets": {"session": 1.0}})),
            )
            .await;
        let (_, d6, _) = e.call("POST", "/api/v1/decide", Some(&e.admin), Some(call(None))).await;
        assert_eq!(d6["verdict"], "deny", "{d6}");
    })
    .await;
}
