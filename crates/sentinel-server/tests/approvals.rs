//! Human approvals through the server, on SQLite and PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::time::{Duration, Instant};

use axum::http::StatusCode;
use serde_json::{Value, json};

mod common;
use common::*;

async fn setup(e: &Env, timeout: u64) -> (String, String) {
    let policy = json!({"name": "wires", "budgets": {"session": 100.0},
        "approvals": {"actions": ["wire"], "timeout_seconds": timeout, "approvers": ["alice"]}});
    let (s, p, _) = e.call("POST", "/api/v1/policies", Some(&e.admin), Some(policy)).await;
    assert_eq!(s, StatusCode::CREATED, "{p}");
    let key = |body: Value| async move {
        let (s, k, _) = e.call("POST", "/api/v1/keys", Some(&e.admin), Some(body)).await;
        assert_eq!(s, StatusCode::CREATED, "{k}");
        k["key"].as_str().unwrap().to_string()
    };
    let bot = key(json!({"name": "bot", "scope": "agent", "agent_id": "bot"})).await;
    let alice = key(json!({"name": "alice", "scope": "readonly"})).await;
    (bot, alice)
}

fn wire(amount: f64) -> Value {
    json!({"action": "wire", "cost_usd": 2.5, "run_id": "r1", "session_id": "s1",
           "args": {"amount": amount, "to": "acct-9", "api_key": "sk-live-abcdefghijklmnop"},
           "context": {"ticket": "OPS-42"}})
}

#[tokio::test]
async fn an_approval_is_bound_to_its_call_decided_once_and_used_once() {
    on_both(|e| async move {
        let (bot, alice) = setup(&e, 60).await;
        let (s, d, _) = e.call("POST", "/api/v1/decide", Some(&bot), Some(wire(500.0))).await;
        assert_eq!(s, StatusCode::OK, "{d}");
        assert_eq!(d["verdict"], "require_approval");
        assert!(d.get("reservation").is_none(), "nothing is reserved while waiting");
        let id = d["approval_request"]["id"].as_str().unwrap().to_string();

        // What the approver sees: redacted arguments, spend against the budgets, rule, context.
        let (_, a, _) = e.call("GET", &format!("/api/v1/approvals/{id}"), Some(&alice), None).await;
        assert_eq!(a["status"], "pending");
        assert_eq!(a["request"]["args"]["amount"], 500.0);
        assert_ne!(a["request"]["args"]["api_key"], "sk-live-abcdefghijklmnop", "secrets are redacted: {a}");
        assert_eq!(a["request"]["context"]["ticket"], "OPS-42");
        assert_eq!(a["request"]["spend"]["budgets"][0]["limit_usd"], 100.0);
        assert_eq!(a["request"]["approvers"][0], "alice");
        let (_, l, _) = e.call("GET", "/api/v1/approvals?status=pending", Some(&e.admin), None).await;
        assert_eq!(l["items"].as_array().unwrap().len(), 1);

        // The agent cannot approve itself, nor can a key that is not an approver.
        let (s, p, _) = e.call("POST", &format!("/api/v1/approvals/{id}/approve"), Some(&bot), Some(json!({}))).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{p}");
        let (_, ro, _) =
            e.call("POST", "/api/v1/keys", Some(&e.admin), Some(json!({"name": "mallory", "scope": "readonly"}))).await;
        let mallory = ro["key"].as_str().unwrap().to_string();
        let (s, ..) = e.call("POST", &format!("/api/v1/approvals/{id}/approve"), Some(&mallory), Some(json!({}))).await;
        assert_eq!(s, StatusCode::FORBIDDEN);
        // Using it before it is decided does not work either.
        let mut redeem = wire(500.0);
        redeem["approval_id"] = json!(id);
        let (s, p, _) = e.call("POST", "/api/v1/decide", Some(&bot), Some(redeem.clone())).await;
        assert_eq!(s, StatusCode::CONFLICT, "{p}");

        // Two approvers at once: exactly one wins.
        let (ua, ur) = (format!("/api/v1/approvals/{id}/approve"), format!("/api/v1/approvals/{id}/reject"));
        let approve = e.call("POST", &ua, Some(&alice), Some(json!({"reason": "ok for OPS-42"})));
        let reject = e.call("POST", &ur, Some(&e.admin), Some(json!({"reason": "no"})));
        let ((s1, a1, _), (s2, _, _)) = tokio::join!(approve, reject);
        let wins = [s1, s2].iter().filter(|s| **s == StatusCode::OK).count();
        assert_eq!(wins, 1, "{s1} {s2}");
        assert!([s1, s2].contains(&StatusCode::CONFLICT));
        let approved = s1 == StatusCode::OK;
        if approved {
            assert!(a1["decided_by"].as_str().unwrap().contains("alice"));
        }

        // The waiting agent gets the outcome at once.
        let t = Instant::now();
        let (_, w, _) =
            e.call("GET", &format!("/api/v1/approvals/{id}/wait?timeout_seconds=10"), Some(&bot), None).await;
        assert!(t.elapsed() < Duration::from_secs(2));
        assert_eq!(w["status"], if approved { "approved" } else { "rejected" });
        if !approved {
            let (s, p, _) = e.call("POST", "/api/v1/decide", Some(&bot), Some(redeem)).await;
            assert_eq!(s, StatusCode::CONFLICT);
            assert!(p["detail"].as_str().unwrap().contains("no"), "the approver's reason reaches the agent: {p}");
            return;
        }

        // Another call cannot use it; the same call can, once, and then it reserves.
        let mut other = wire(900.0);
        other["approval_id"] = json!(id);
        let (s, p, _) = e.call("POST", "/api/v1/decide", Some(&bot), Some(other)).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{p}");
        let (s, d, _) = e.call("POST", "/api/v1/decide", Some(&bot), Some(redeem.clone())).await;
        assert_eq!(s, StatusCode::OK, "{d}");
        assert_eq!(d["verdict"], "allow", "{d}");
        assert!(d["reservation"]["id"].is_string());
        let (s, ..) = e.call("POST", "/api/v1/decide", Some(&bot), Some(redeem)).await;
        assert_eq!(s, StatusCode::CONFLICT, "used once");

        // The decision was recorded as an intervention, with the approver.
        for _ in 0..60 {
            let (_, l, _) =
                e.call("GET", "/api/v1/interventions?outcome=APPROVED_AFTER_REVIEW", Some(&e.admin), None).await;
            if let Some(i) = l["items"].as_array().and_then(|a| a.first()) {
                assert!(i["record"]["approval"]["approver"].as_str().unwrap().contains("alice"));
                assert_eq!(i["record"]["approval"]["reason"], "ok for OPS-42");
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no APPROVED_AFTER_REVIEW intervention");
    })
    .await;
}

#[tokio::test]
async fn an_undecided_request_expires_as_a_timeout() {
    on_both(|e| async move {
        let (bot, alice) = setup(&e, 1).await;
        let (_, d, _) = e.call("POST", "/api/v1/decide", Some(&bot), Some(wire(10.0))).await;
        let id = d["approval_request"]["id"].as_str().unwrap().to_string();
        let t = Instant::now();
        let (_, w, _) =
            e.call("GET", &format!("/api/v1/approvals/{id}/wait?timeout_seconds=5"), Some(&bot), None).await;
        assert_eq!(w["status"], "expired", "{w}");
        assert!(t.elapsed() < Duration::from_secs(3), "the wait ends at expiry, not at its own timeout");
        let (s, p, _) = e.call("POST", &format!("/api/v1/approvals/{id}/approve"), Some(&alice), Some(json!({}))).await;
        assert_eq!(s, StatusCode::CONFLICT, "{p}");
        // A long-poll with nothing to report returns pending after its timeout.
        let (_, d, _) = e.call("POST", "/api/v1/decide", Some(&bot), Some(wire(11.0))).await;
        let id = d["approval_request"]["id"].as_str().unwrap().to_string();
        let (_, w, _) =
            e.call("GET", &format!("/api/v1/approvals/{id}/wait?timeout_seconds=0.2"), Some(&bot), None).await;
        assert_eq!(w["status"], "pending");
        let (s, ..) =
            e.call("GET", &format!("/api/v1/approvals/{id}/wait?timeout_seconds=600"), Some(&bot), None).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    })
    .await;
}
