//! The HTTP API in-process (`app(state).oneshot(...)`), on SQLite and on PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use axum::body::Body;
use axum::http::{Request, StatusCode};
use sentinel_server::app;
use serde_json::{Value, json};
use tower::ServiceExt;

mod common;
use common::*;

#[tokio::test]
async fn auth_matrix() {
    on_both(|e| async move {
        let (s, me, _) = e.call("GET", "/api/v1/users/me", Some(&e.admin), None).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(me["scope"], "admin");
        assert_eq!(me["prefix"], e.admin[..12]);

        // Missing, invalid: 401 problem+json.
        let (s, body, ctype) = e.call("GET", "/api/v1/users/me", None, None).await;
        assert_eq!((s, ctype.as_str()), (StatusCode::UNAUTHORIZED, "application/problem+json"));
        assert_eq!(body["status"], 401);
        let (s, ..) = e.call("GET", "/api/v1/users/me", Some("as_00000000000000000000000000000000"), None).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);

        // X-API-Key works too.
        let req = Request::builder().uri("/api/v1/users/me").header("x-api-key", &e.admin).body(Body::empty()).unwrap();
        assert_eq!(app(e.state.clone()).oneshot(req).await.unwrap().status(), StatusCode::OK);

        // Create readonly and agent keys; the plaintext is shown once.
        let (s, ro, _) =
            e.call("POST", "/api/v1/keys", Some(&e.admin), Some(json!({"name": "dash", "scope": "readonly"}))).await;
        assert_eq!(s, StatusCode::CREATED);
        let ro_key = ro["key"].as_str().unwrap().to_string();
        assert!(
            ro_key.starts_with("as_")
                && ro_key.len() == 35
                && ro_key[3..].chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        let (_, ag, _) = e
            .call(
                "POST",
                "/api/v1/keys",
                Some(&e.admin),
                Some(json!({"name": "bot", "scope": "agent", "agent_id": "bot-1"})),
            )
            .await;
        let ag_key = ag["key"].as_str().unwrap().to_string();

        // Wrong scope: 403.
        let (s, body, _) = e.call("POST", "/api/v1/keys", Some(&ro_key), Some(json!({"scope": "admin"}))).await;
        assert_eq!(s, StatusCode::FORBIDDEN);
        assert!(body["detail"].as_str().unwrap().contains("`readonly` key"));
        let (s, ..) = e.call("GET", "/api/v1/keys", Some(&ag_key), None).await;
        assert_eq!(s, StatusCode::FORBIDDEN);
        let (s, ..) = e.call("GET", "/api/v1/policies", Some(&ro_key), None).await;
        assert_eq!(s, StatusCode::OK);

        // The list never shows plaintext; last used is recorded (in a batch).
        let (_, list, _) = e.call("GET", "/api/v1/keys", Some(&e.admin), None).await;
        let list = list.as_array().unwrap();
        assert_eq!(list.len(), 3);
        assert!(list.iter().all(|k| k.get("key").is_none() && k["prefix"].as_str().unwrap().len() == 12));
        assert!(list.iter().any(|k| k["name"] == "dash" && k["last_used_at"].is_i64()));

        // Deactivated, then deleted: 401.
        let ro_id = ro["id"].as_str().unwrap();
        let (s, ..) = e.call("POST", &format!("/api/v1/keys/{ro_id}/deactivate"), Some(&e.admin), None).await;
        assert_eq!(s, StatusCode::OK);
        let (s, body, _) = e.call("GET", "/api/v1/users/me", Some(&ro_key), None).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        assert!(body["detail"].as_str().unwrap().contains("deactivated"));
        e.call("POST", &format!("/api/v1/keys/{ro_id}/activate"), Some(&e.admin), None).await;
        assert_eq!(e.call("GET", "/api/v1/users/me", Some(&ro_key), None).await.0, StatusCode::OK);
        let (s, ..) = e.call("DELETE", &format!("/api/v1/keys/{ro_id}"), Some(&e.admin), None).await;
        assert_eq!(s, StatusCode::NO_CONTENT);
        assert_eq!(e.call("GET", "/api/v1/users/me", Some(&ro_key), None).await.0, StatusCode::UNAUTHORIZED);
        assert_eq!(
            e.call("DELETE", &format!("/api/v1/keys/{ro_id}"), Some(&e.admin), None).await.0,
            StatusCode::NOT_FOUND
        );

        // Bad key requests name the field.
        let (s, body, _) = e.call("POST", "/api/v1/keys", Some(&e.admin), Some(json!({"scope": "agent"}))).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(body["errors"][0]["path"], "agent_id");
        let (s, body, _) = e.call("POST", "/api/v1/keys", Some(&e.admin), Some(json!({"scope": "superuser"}))).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(body["errors"][0]["path"], "scope");

        // No plaintext key anywhere in the database.
        let material = e.state.store.all_key_material().await.unwrap();
        for (_, hash) in &material {
            for k in [&e.admin, &ag_key] {
                assert!(!hash.windows(k.len()).any(|w| w == k.as_bytes()));
                assert_ne!(hash.as_slice(), k.as_bytes());
            }
            assert_eq!(hash.len(), 32, "HMAC-SHA256");
        }
        let _ = &e.dir;
    })
    .await;
}

#[tokio::test]
async fn policies_crud_validation_and_history() {
    on_both(|e| async move {
        let k = Some(e.admin.as_str());
        let policy = json!({
            "name": "Production Safety",
            "description": "Strict limits for production agents",
            "scope": "agent",
            "agent_id": "production-agent",
            "budgets": {"session": 50.0, "run": 5.0, "actions": {"call_llm": 0.5}},
            "denied_actions": ["delete_database", "drop_table"],
            "rate_limits": {"api_call": {"max_count": 100, "window_seconds": 60}},
            "approvals": {"actions": ["transfer_funds"], "cost_threshold_usd": 100.0, "timeout_seconds": 600, "approvers": ["manager@company.com"]},
            "alerts": {"emails": ["ops@company.com"], "threshold_percent": 80, "alert_on_failure": true},
            "rules": [{"id": "big", "function_pattern": "transfer_*", "conditions": [{"param": "amount", "operator": "gt", "value": 1000}], "action": "block"}]
        });
        let (s, created, _) = e.call("POST", "/api/v1/policies", k, Some(policy.clone())).await;
        assert_eq!(s, StatusCode::CREATED, "{created}");
        let id = created["id"].as_str().unwrap().to_string();
        assert_eq!(created["version"], 1);
        assert_eq!(created["alerts"]["threshold_percent"], 80);
        assert_eq!(created["budgets"]["run"], 5.0);

        let (s, body, _) = e.call("POST", "/api/v1/policies", k, Some(policy.clone())).await;
        assert_eq!(s, StatusCode::CONFLICT);
        assert!(body["detail"].as_str().unwrap().contains("Production Safety"));

        let mut v2 = policy.clone();
        v2["budgets"]["run"] = json!(2.0);
        let (s, updated, _) = e.call("PUT", &format!("/api/v1/policies/{id}?expected_version=1"), k, Some(v2.clone())).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(updated["version"], 2);
        let (s, ..) = e.call("PUT", &format!("/api/v1/policies/{id}?expected_version=1"), k, Some(v2.clone())).await;
        assert_eq!(s, StatusCode::CONFLICT, "a stale update is refused");

        let (_, h, _) = e.call("GET", &format!("/api/v1/policies/{id}/history"), k, None).await;
        let h = h.as_array().unwrap();
        assert_eq!(h.len(), 2);
        assert_eq!(h[1]["diff"], json!([{"path": "/budgets/run", "old": 5.0, "new": 2.0}]));
        assert!(h[1]["actor"].as_str().unwrap().starts_with("key:as_"));

        // Validation errors name the field; nothing is written.
        let cases = [
            (json!({"name": "x", "budjets": {}}), "budjets", "did you mean `budgets`?"),
            (json!({"name": "x", "budgets": {"run": -1}}), "budgets.run", "must not be negative"),
            (json!({"name": "x", "rate_limits": {"a": {"max_count": "many", "window_seconds": 1}}}), "rate_limits.a.max_count", ""),
            (json!({"name": "x", "rules": [{"id": "r", "function_pattern": "x", "conditions": [{"param": "p", "operator": "greater", "value": 1}], "action": "block"}]}), "rules[0].conditions[0].operator", "did you mean `gt`?"),
            (json!({"name": "x", "scope": "agent"}), "", "agent_id"),
            (json!({"name": "x", "alerts": {"threshold_percent": 150}}), "alerts.threshold_percent", "(0, 100]"),
            (json!({"name": "x", "alerts": {"emails": ["nope"]}}), "alerts.emails", "not an email"),
            (json!({"description": "no name"}), "name", "unique"),
            (json!({"name": "x".repeat(201)}), "name", "200 characters"),
            (json!({"name": "x", "denied_actions": ["ok", "y".repeat(513)]}), "denied_actions[1]", "512"),
            (json!({"name": "x", "allowed_actions": ["z".repeat(600)]}), "allowed_actions[0]", "512"),
            (json!([1, 2]), "", "object"),
        ];
        for (body, path, needle) in cases {
            let (s, err, ctype) = e.call("POST", "/api/v1/policies", k, Some(body.clone())).await;
            assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{body} -> {err}");
            assert_eq!(ctype, "application/problem+json");
            assert_eq!(err["errors"][0]["path"], path, "{body} -> {err}");
            assert!(err.to_string().contains(needle), "{body} -> {err}");
        }
        let (_, list, _) = e.call("GET", "/api/v1/policies", k, None).await;
        assert_eq!(list.as_array().unwrap().len(), 1, "rejected policies wrote nothing");

        // Malformed JSON, wrong content type, huge bodies.
        let req = Request::builder().method("POST").uri("/api/v1/policies").header("authorization", format!("Bearer {}", e.admin))
            .header("content-type", "application/json").body(Body::from("{\"name\": ")).unwrap();
        assert_eq!(app(e.state.clone()).oneshot(req).await.unwrap().status(), StatusCode::BAD_REQUEST);
        let req = Request::builder().method("POST").uri("/api/v1/policies").header("authorization", format!("Bearer {}", e.admin))
            .header("content-type", "text/plain").body(Body::from("{}")).unwrap();
        assert_eq!(app(e.state.clone()).oneshot(req).await.unwrap().status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
        let huge = format!("{{\"name\": \"big\", \"description\": \"{}\"}}", "x".repeat(2 * 1024 * 1024));
        let req = Request::builder().method("POST").uri("/api/v1/policies").header("authorization", format!("Bearer {}", e.admin))
            .header("content-type", "application/json").body(Body::from(huge)).unwrap();
        assert_eq!(app(e.state.clone()).oneshot(req).await.unwrap().status(), StatusCode::PAYLOAD_TOO_LARGE);

        let (s, ..) = e.call("DELETE", &format!("/api/v1/policies/{id}"), k, None).await;
        assert_eq!(s, StatusCode::NO_CONTENT);
        let (s, ..) = e.call("GET", &format!("/api/v1/policies/{id}"), k, None).await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        let (_, h, _) = e.call("GET", &format!("/api/v1/policies/{id}/history"), k, None).await;
        assert_eq!(h.as_array().unwrap().last().unwrap()["change"], "delete");
    })
    .await;
}

#[tokio::test]
async fn health_and_unknown_routes() {
    on_both(|e| async move {
        assert_eq!(e.call("GET", "/healthz", None, None).await.0, StatusCode::OK);
        let (s, body, _) = e.call("GET", "/readyz", None, None).await;
        assert_eq!(s, StatusCode::OK);
        assert!(body["database"].is_string());
        let (s, _, ctype) = e.call("GET", "/api/v1/nope", None, None).await;
        assert_eq!((s, ctype.as_str()), (StatusCode::NOT_FOUND, "application/problem+json"));
        let (s, _, ctype) = e.call("PATCH", "/api/v1/policies", Some(&e.admin), None).await;
        assert_eq!((s, ctype.as_str()), (StatusCode::METHOD_NOT_ALLOWED, "application/problem+json"));
    })
    .await;
}

#[tokio::test]
async fn policy_sync_returns_what_applies_with_an_etag() {
    on_both(|e| async move {
        let k = Some(e.admin.as_str());
        for body in [
            json!({"name": "global", "budgets": {"run": 5}}),
            json!({"name": "bot-1 only", "scope": "agent", "agent_id": "bot-1", "denied_actions": ["x"]}),
            json!({"name": "bot-2 only", "scope": "agent", "agent_id": "bot-2", "denied_actions": ["y"]}),
            json!({"name": "run r9", "scope": "run", "run_id": "r9", "allowed_actions": ["read"]}),
            json!({"name": "disabled", "enabled": false, "denied_actions": ["z"]}),
        ] {
            assert_eq!(e.call("POST", "/api/v1/policies", k, Some(body)).await.0, StatusCode::CREATED);
        }
        let names = |v: &Value| -> Vec<String> {
            v["policies"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap().to_string()).collect()
        };
        let (s, v, _) = e.call("GET", "/api/v1/policies/sync?agent_id=bot-1&run_id=r9", k, None).await;
        assert_eq!(s, StatusCode::OK);
        let mut got = names(&v);
        got.sort();
        assert_eq!(got, ["bot-1 only", "global", "run r9"]);

        // ETag and 304.
        let req = |tag: Option<&str>| {
            let mut r = Request::builder()
                .uri("/api/v1/policies/sync?agent_id=bot-1")
                .header("authorization", format!("Bearer {}", e.admin));
            if let Some(t) = tag {
                r = r.header("if-none-match", t);
            }
            r.body(Body::empty()).unwrap()
        };
        let first = app(e.state.clone()).oneshot(req(None)).await.unwrap();
        let tag = first.headers().get("etag").unwrap().to_str().unwrap().to_string();
        assert_eq!(app(e.state.clone()).oneshot(req(Some(&tag))).await.unwrap().status(), StatusCode::NOT_MODIFIED);
        for other in [format!("W/{tag}"), format!("\"zzz\", {tag}")] {
            assert_eq!(
                app(e.state.clone()).oneshot(req(Some(&other))).await.unwrap().status(),
                StatusCode::NOT_MODIFIED,
                "{other}"
            );
        }
        // A change to an applicable policy changes the tag.
        let (_, list, _) = e.call("GET", "/api/v1/policies", k, None).await;
        let global = list.as_array().unwrap().iter().find(|p| p["name"] == "global").unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string();
        e.call("PUT", &format!("/api/v1/policies/{global}"), k, Some(json!({"name": "global", "budgets": {"run": 4}})))
            .await;
        assert_eq!(app(e.state.clone()).oneshot(req(Some(&tag))).await.unwrap().status(), StatusCode::OK);

        // An agent key reads its own agent's policies only.
        let (_, ag, _) = e
            .call("POST", "/api/v1/keys", k, Some(json!({"name": "bot", "scope": "agent", "agent_id": "bot-2"})))
            .await;
        let ag = ag["key"].as_str().unwrap().to_string();
        let (s, v, _) = e.call("GET", "/api/v1/policies/sync", Some(&ag), None).await;
        assert_eq!(s, StatusCode::OK);
        let mut got = names(&v);
        got.sort();
        assert_eq!(got, ["bot-2 only", "global"]);
        assert_eq!(
            e.call("GET", "/api/v1/policies/sync?agent_id=bot-1", Some(&ag), None).await.0,
            StatusCode::FORBIDDEN
        );
        assert_eq!(e.call("GET", "/api/v1/policies", Some(&ag), None).await.0, StatusCode::FORBIDDEN);
    })
    .await;
}

/// Sends raw bytes; returns the status, the content type and the body as JSON (or `Null`).
async fn send_raw(e: &Env, method: &str, uri: &str, ctype: &str, body: Vec<u8>) -> (StatusCode, String, Value) {
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .header("authorization", format!("Bearer {}", e.admin))
        .header("content-type", ctype)
        // As a real client sends it: a limit must hold for a body that declares its length too.
        .header("content-length", body.len())
        .body(Body::from(body))
        .unwrap();
    let resp = app(e.state.clone()).oneshot(req).await.unwrap();
    let status = resp.status();
    let ctype = resp.headers().get("content-type").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    let bytes = http_body_util::BodyExt::collect(resp.into_body()).await.unwrap().to_bytes();
    (status, ctype, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

/// Every operation in the OpenAPI document (so a new endpoint is covered without being listed
/// here) gets malformed JSON, a body of the wrong type, an unknown field, the wrong content type
/// and a body over every limit, and every typed query parameter a value of the wrong type: each
/// is a 4xx `problem+json` that says what was wrong, and no table of the database changes.
#[tokio::test]
async fn bad_input_on_every_endpoint_is_a_problem_and_writes_nothing() {
    on_both(|e| async move {
        let k = Some(e.admin.as_str());
        let (s, policy, _) = e.call("POST", "/api/v1/policies", k, Some(json!({"name": "p"}))).await;
        assert_eq!(s, StatusCode::CREATED);
        let id = policy["id"].as_str().unwrap().to_string();
        let (s, doc, _) = e.call("GET", "/api/v1/openapi.json", None, None).await;
        assert_eq!(s, StatusCode::OK);
        let before = e.state.store.row_counts().await.unwrap();
        assert!(before.len() > 10, "{before:?}");

        let huge = format!("{{\"x\": \"{}\"}}", "x".repeat(17 << 20)).into_bytes();
        let json_type = "application/json";
        let mut failures = Vec::new();
        let mut tried = 0;
        for (path, item) in doc["paths"].as_object().unwrap() {
            // Path parameters get an id that exists where one is needed at all (the body is
            // refused before anything is looked up).
            let mut uri = path.clone();
            while let (Some(a), Some(b)) = (uri.find('{'), uri.find('}')) {
                uri.replace_range(a..=b, &id);
            }
            for (method, op) in item.as_object().unwrap() {
                let method = method.to_uppercase();
                // What is wrong, the content type, the URI, the body, and the statuses that may answer it.
                type Case<'a> = (String, &'a str, String, Vec<u8>, &'a [u16]);
                let mut cases: Vec<Case> = Vec::new();
                if op.get("requestBody").is_some() {
                    let bodies: [(&str, &str, Vec<u8>, &[u16]); 5] = [
                        ("malformed JSON", json_type, b"{\"".to_vec(), &[400]),
                        ("an array for the body", json_type, b"[1, 2]".to_vec(), &[400, 422]),
                        ("an unknown field", json_type, br#"{"zz_no_such_field": 1}"#.to_vec(), &[400, 422]),
                        ("the wrong content type", "text/plain", b"{}".to_vec(), &[415]),
                        ("a body over the limit", json_type, huge.clone(), &[413]),
                    ];
                    for (what, ctype, body, want) in bodies {
                        cases.push((what.to_string(), ctype, uri.clone(), body, want));
                    }
                }
                let params = op["parameters"].as_array().cloned().unwrap_or_default();
                for p in &params {
                    let name = p["name"].as_str().unwrap();
                    if p["in"] == "path" && !path.contains(&format!("{{{name}}}")) {
                        failures.push(format!(
                            "{method} {path}: `{name}` is documented as a path parameter, but the path has none"
                        ));
                    }
                }
                // Every API operation refuses a parameter it does not take, whether it takes
                // others or none (the probes outside `/api/v1` ignore query strings).
                if path.starts_with("/api/v1/") {
                    let sep = if uri.contains('?') { '&' } else { '?' };
                    cases.push((
                        "an unknown query parameter".into(),
                        json_type,
                        format!("{uri}{sep}zz_no_such_param=1"),
                        Vec::new(),
                        &[400, 422],
                    ));
                }
                for p in params.iter().filter(|p| p["in"] == "query") {
                    let ty = &p["schema"]["type"];
                    let typed = |t: &str| ty == t || ty.as_array().is_some_and(|a| a.iter().any(|x| x == t));
                    if typed("integer") || typed("number") || typed("boolean") {
                        let name = p["name"].as_str().unwrap();
                        let sep = if uri.contains('?') { '&' } else { '?' };
                        cases.push((
                            format!("`{name}` not of its type"),
                            json_type,
                            format!("{uri}{sep}{name}=zz"),
                            Vec::new(),
                            &[400, 422],
                        ));
                    }
                }
                for (what, ctype, uri, body, want) in cases {
                    tried += 1;
                    let (s, got_type, problem) = send_raw(&e, &method, &uri, ctype, body).await;
                    let detail = problem["detail"].as_str().unwrap_or_default();
                    if !want.contains(&s.as_u16()) || got_type != "application/problem+json" || detail.is_empty() {
                        failures.push(format!("{method} {uri} with {what}: {s} {got_type} {problem}"));
                    } else if what == "an unknown query parameter" && problem["errors"][0]["path"] != "zz_no_such_param"
                    {
                        // Refused for the parameter, not for the (empty) body.
                        failures.push(format!("{method} {uri}: the unknown parameter is not named: {problem}"));
                    }
                }
            }
        }
        assert!(
            failures.is_empty(),
            "{} of {tried} bad requests were not a 4xx problem:\n{}",
            failures.len(),
            failures.join("\n")
        );
        assert!(tried >= 60, "only {tried} bad requests: the OpenAPI document lists fewer operations than it should");
        assert_eq!(e.state.store.row_counts().await.unwrap(), before, "a refused request wrote something");
        // Without a valid key, a query string is not looked at: the answer is 401.
        let (s, ..) = e.call("GET", "/api/v1/keys?zz_no_such_param=1", None, None).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        let (s, ..) =
            e.call("GET", "/api/v1/keys?zz_no_such_param=1", Some("as_00000000000000000000000000000000"), None).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
    })
    .await;
}

/// Bodies are objects with each key once and no NUL in any string, whatever the endpoint's type
/// would accept; the last active admin key cannot be taken away; a cost out of range is refused
/// before anything is decided or written.
#[tokio::test]
async fn strict_bodies_amounts_and_the_last_admin_key() {
    on_both(|e| async move {
        let k = Some(e.admin.as_str());
        let raw = |method: &'static str, uri: &'static str, body: &'static str| {
            send_raw(&e, method, uri, "application/json", body.as_bytes().to_vec())
        };
        let before = e.state.store.row_counts().await.unwrap();
        for (method, uri, body, path) in [
            // Read by position, an array would halt agent `a` or create a key.
            ("POST", "/api/v1/halts", r#"["a"]"#, ""),
            ("POST", "/api/v1/keys", r#"["arr", "readonly", null]"#, ""),
            ("POST", "/api/v1/decide", r#"["x"]"#, ""),
            // A second key would silently replace the first.
            (
                "POST",
                "/api/v1/policies",
                r#"{"name": "d", "denied_actions": ["x"], "denied_actions": []}"#,
                "denied_actions",
            ),
            ("POST", "/api/v1/policies", r#"{"name": "d", "budgets": {"run": 1, "run": 100}}"#, "budgets.run"),
            // The rule would see one value and the tool the other.
            ("POST", "/api/v1/decide", r#"{"action": "pay", "args": {"to": "alice", "to": "mallory"}}"#, "args.to"),
            ("POST", "/api/v1/policies", r#"{"name": "a\u0000b"}"#, "name"),
            ("POST", "/api/v1/keys", r#"{"name": "n\u0000", "scope": "readonly"}"#, "name"),
            ("POST", "/api/v1/settle", r#"{"reservation_id": "r\u0000"}"#, "reservation_id"),
            ("POST", "/api/v1/settle", r#"{}"#, "reservation_id"),
            ("POST", "/api/v1/decide", r#"{"action": "x", "cost_usd": 1e13}"#, "cost_usd"),
            ("POST", "/api/v1/decide", r#"{"action": "x", "cost_usd": 1e300}"#, "cost_usd"),
        ] {
            let (s, ctype, p) = raw(method, uri, body).await;
            assert_eq!(
                (s, ctype.as_str()),
                (StatusCode::UNPROCESSABLE_ENTITY, "application/problem+json"),
                "{body}: {p}"
            );
            assert_eq!(p["errors"][0]["path"], path, "{body}: {p}");
        }
        // Ids anywhere are what `/decide` accepts: 1 to 200 characters, no control characters.
        let long = "x".repeat(201);
        for (method, uri, body, path) in [
            ("POST", "/api/v1/keys".to_string(), Some(json!({"scope": "agent", "agent_id": long})), "agent_id"),
            ("POST", "/api/v1/keys".to_string(), Some(json!({"name": "a\u{202e}b\u{7}", "scope": "readonly"})), "name"),
            (
                "POST",
                "/api/v1/events".to_string(),
                Some(json!({"agent_id": "bot", "tool_name": "t", "event_id": ""})),
                "event_id",
            ),
            (
                "POST",
                "/api/v1/events".to_string(),
                Some(json!({"agent_id": "bot", "tool_name": "t", "session_id": long})),
                "session_id",
            ),
            ("GET", format!("/api/v1/policies/sync?agent_id={long}"), None, "agent_id"),
            ("GET", "/api/v1/policies/sync?run_id=".to_string(), None, "run_id"),
        ] {
            let (s, p, _) = e.call(method, &uri, k, body).await;
            assert_eq!(
                (s, p["errors"][0]["path"].as_str()),
                (StatusCode::UNPROCESSABLE_ENTITY, Some(path)),
                "{uri}: {p}"
            );
        }
        // Lists that take no parameters refuse one rather than look filtered.
        for uri in [
            "/api/v1/agents",
            "/api/v1/agents/bot",
            "/api/v1/findings",
            "/api/v1/halts",
            "/api/v1/keys",
            "/api/v1/ledger/streams",
            "/api/v1/policies",
            "/api/v1/notifications/channels",
            "/api/v1/users/me",
        ] {
            let (s, p, ctype) = e.call("GET", &format!("{uri}?stream=st1"), k, None).await;
            assert_eq!(
                (s, ctype.as_str()),
                (StatusCode::UNPROCESSABLE_ENTITY, "application/problem+json"),
                "{uri}: {p}"
            );
            assert_eq!(p["errors"][0]["path"], "stream", "{uri}: {p}");
        }
        for uri in ["/api/v1/agents/a%00b", "/api/v1/interventions?agent_id=a%00b", "/api/v1/policies/p%00"] {
            let (s, p, ctype) = e.call("GET", uri, k, None).await;
            assert_eq!((s, ctype.as_str()), (StatusCode::BAD_REQUEST, "application/problem+json"), "{uri}: {p}");
        }
        assert_eq!(e.state.store.row_counts().await.unwrap(), before, "a refused body wrote something");
        let (s, d, _) = e.call("GET", "/api/v1/halts", k, None).await;
        assert_eq!((s, d["halts"].as_array().map(Vec::len)), (StatusCode::OK, Some(0)), "{d}");

        // The only admin key: neither deactivated nor deleted; with a second one, either can go.
        let (_, me, _) = e.call("GET", "/api/v1/users/me", k, None).await;
        let first = me["key_id"].as_str().unwrap().to_string();
        for (method, uri) in
            [("POST", format!("/api/v1/keys/{first}/deactivate")), ("DELETE", format!("/api/v1/keys/{first}"))]
        {
            let (s, p, _) = e.call(method, &uri, k, None).await;
            assert_eq!(s, StatusCode::CONFLICT, "{method} {uri}: {p}");
            assert!(p["detail"].as_str().unwrap().contains("last active admin key"), "{p}");
        }
        let (s, second, _) =
            e.call("POST", "/api/v1/keys", k, Some(json!({"name": "second admin", "scope": "admin"}))).await;
        assert_eq!(s, StatusCode::CREATED, "{second}");
        let (second_id, second_key) = (second["id"].as_str().unwrap(), second["key"].as_str().unwrap());
        assert_eq!(e.call("POST", &format!("/api/v1/keys/{first}/deactivate"), k, None).await.0, StatusCode::OK);
        assert_eq!(e.call("GET", "/api/v1/users/me", k, None).await.0, StatusCode::UNAUTHORIZED);
        let (s, p, _) = e.call("DELETE", &format!("/api/v1/keys/{second_id}"), Some(second_key), None).await;
        assert_eq!(s, StatusCode::CONFLICT, "the other admin key is inactive now: {p}");
        assert_eq!(
            e.call("POST", &format!("/api/v1/keys/{first}/activate"), Some(second_key), None).await.0,
            StatusCode::OK
        );
        assert_eq!(e.call("DELETE", &format!("/api/v1/keys/{second_id}"), k, None).await.0, StatusCode::NO_CONTENT);
    })
    .await;
}

/// A request body that never finishes: a client that stopped sending.
struct Stalled;

impl http_body::Body for Stalled {
    type Data = axum::body::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::task::Poll::Pending
    }
}

/// A request the server cannot answer in time is a 503 problem+json, not an empty 503.
#[tokio::test]
async fn a_request_past_the_timeout_is_a_problem() {
    let dir = tempfile::tempdir().unwrap();
    let e = env_on(&sqlite_file(dir.path())).await;
    let req = Request::builder()
        .method("POST")
        .uri("/api/v1/decide")
        .header("authorization", format!("Bearer {}", e.admin))
        .header("content-type", "application/json")
        .body(Body::new(Stalled))
        .unwrap();
    let app = sentinel_server::app_with_timeout(e.state.clone(), std::time::Duration::from_millis(200));
    let resp = app.oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(resp.headers()["content-type"], "application/problem+json");
    let bytes = http_body_util::BodyExt::collect(resp.into_body()).await.unwrap().to_bytes();
    let p: Value = serde_json::from_slice(&bytes).unwrap();
    assert!(p["detail"].as_str().unwrap().contains("request timeout"), "{p}");
}
