//! Approve from Slack or email: signed, single-use, expiring links to an approval page.
//!
//! A link is `/approve/<id>.<signature>`: a random id, stored with the request it belongs to, who
//! it was issued to and when it expires, signed with a key derived from the server secret. Opening
//! it (GET) only shows the request and asks for confirmation; nothing is decided until the form is
//! posted (POST). A forged or altered link is refused before the database is asked, an expired one
//! is refused, and a link decides at most once.

use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use sentinel_store::{ApprovalRow, LinkRow, StoreError};
use serde::Deserialize;
use serde_json::Value;
use subtle::ConstantTimeEq;

use crate::{ApiError, AppState};

/// Links never outlive this, even for a request with a longer timeout.
const MAX_LINK_MS: i64 = 7 * 24 * 3600 * 1000;

/// Creates a link to `a`'s page for `issued_to`; returns its URL.
pub async fn issue(s: &AppState, a: &ApprovalRow, issued_to: &str) -> Result<String, ApiError> {
    let mut raw = [0u8; 16];
    getrandom::fill(&mut raw).map_err(|e| ApiError::internal(format!("no randomness: {e}")))?;
    let id = hex::encode(raw);
    let now = sentinel_store::now_ms();
    s.store
        .create_link(&LinkRow {
            id: id.clone(),
            approval_id: a.id.clone(),
            issued_to: issued_to.to_string(),
            created_at: now,
            expires_at: a.expires_at.min(now.saturating_add(MAX_LINK_MS)),
            used_at: None,
        })
        .await?;
    let sig = s.notifier.sign(&id);
    Ok(format!("{}/approve/{id}.{sig}", s.notifier.public_url()))
}

enum Refusal {
    Forged,
    Unknown,
    Expired,
    Used,
}

impl Refusal {
    fn page(self) -> Response {
        let (status, title, text) = match self {
            Refusal::Forged => (
                StatusCode::FORBIDDEN,
                "This link is not valid",
                "The link was altered or was not issued by this server. Nothing was decided.",
            ),
            Refusal::Unknown => {
                (StatusCode::NOT_FOUND, "Unknown link", "This server has no such link. Nothing was decided.")
            }
            Refusal::Expired => (
                StatusCode::GONE,
                "This link has expired",
                "The request it belongs to is no longer waiting for this link. Nothing was decided.",
            ),
            Refusal::Used => (
                StatusCode::CONFLICT,
                "This link was already used",
                "Each link decides once. Nothing more was decided.",
            ),
        };
        page(status, title, &format!("<p>{}</p>", esc(text)))
    }
}

/// Checks the signature (in constant time), then the link's record.
async fn open(s: &AppState, token: &str) -> Result<LinkRow, Response> {
    let Some((id, sig)) = token.split_once('.') else { return Err(Refusal::Forged.page()) };
    let expected = s.notifier.sign(id);
    if id.len() != 32 || !bool::from(expected.as_bytes().ct_eq(sig.as_bytes())) {
        return Err(Refusal::Forged.page());
    }
    match s.store.get_link(id).await {
        Ok(l) => Ok(l),
        Err(StoreError::NotFound(_)) => Err(Refusal::Unknown.page()),
        Err(e) => Err(ApiError::from(e).into_response()),
    }
}

/// The approval page: what the call is, and a form to approve or reject it. Never decides.
pub async fn show(State(s): State<AppState>, UrlPath(token): UrlPath<String>) -> Response {
    let link = match open(&s, &token).await {
        Ok(l) => l,
        Err(r) => return r,
    };
    if let Err(e) = crate::approvals::expire_due(&s).await {
        return e.into_response();
    }
    let a = match s.store.get_approval(&link.approval_id).await {
        Ok(a) => a,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let now = sentinel_store::now_ms();
    if link.used_at.is_some() {
        return Refusal::Used.page();
    }
    if a.status != "pending" {
        return page(
            StatusCode::OK,
            "Already decided",
            &format!(
                "<p>This request is <b>{}</b>{}.</p>{}",
                esc(&a.status),
                a.decided_by.as_deref().map(|b| format!(" by {}", esc(b))).unwrap_or_default(),
                details(&a)
            ),
        );
    }
    if link.expires_at <= now {
        return Refusal::Expired.page();
    }
    let paused = crate::approvals::is_pause(&a);
    let question = if paused {
        "This call was paused because it is over budget. Resume it (it runs once, over the budget) or reject it?"
    } else {
        "Approve this call?"
    };
    let body = format!(
        "<p class=q>{}</p>{}\
         <form method=post>\
         <label>Reason (given back to the agent and recorded)<br><textarea name=reason maxlength=2000 rows=3></textarea></label>\
         <p><label><input type=checkbox name=confirm value=yes required> I have read the request above</label></p>\
         <button name=decision value=approve class=ok>{}</button> \
         <button name=decision value=reject class=no>Reject</button>\
         </form><p class=small>Signed in as: {} (this link works once).</p>",
        esc(question),
        details(&a),
        if paused { "Resume" } else { "Approve" },
        esc(&link.issued_to)
    );
    page(StatusCode::OK, &format!("Approval requested: {}", a.action), &body)
}

#[derive(Debug, Deserialize)]
pub struct DecisionForm {
    #[serde(default)]
    decision: String,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    confirm: String,
}

/// The form's answer: decides the request once, as the person the link was issued to.
pub async fn decide(
    State(s): State<AppState>,
    UrlPath(token): UrlPath<String>,
    axum::extract::Form(f): axum::extract::Form<DecisionForm>,
) -> Response {
    let link = match open(&s, &token).await {
        Ok(l) => l,
        Err(r) => return r,
    };
    let approve = match f.decision.as_str() {
        "approve" => true,
        "reject" => false,
        _ => return page(StatusCode::UNPROCESSABLE_ENTITY, "Choose approve or reject", "<p>Nothing was decided.</p>"),
    };
    if f.confirm != "yes" {
        return page(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Please confirm",
            "<p>Tick the confirmation box to decide. Nothing was decided.</p>",
        );
    }
    if f.reason.len() > 2000 {
        return page(StatusCode::UNPROCESSABLE_ENTITY, "Reason too long", "<p>At most 2000 characters.</p>");
    }
    let now = sentinel_store::now_ms();
    match s.store.use_link(&link.id, now).await {
        Ok(true) => {}
        Ok(false) if link.used_at.is_some() || link.expires_at > now => return Refusal::Used.page(),
        Ok(false) => return Refusal::Expired.page(),
        Err(e) => return ApiError::from(e).into_response(),
    }
    let by = format!("{} (signed link)", link.issued_to);
    match crate::approvals::decide_as(&s, &link.approval_id, approve, &by, &f.reason).await {
        Ok(a) => page(
            StatusCode::OK,
            if approve { "Approved" } else { "Rejected" },
            &format!("<p>Recorded: <b>{}</b> by {}.</p>{}", esc(&a.status), esc(&by), details(&a)),
        ),
        Err(e) if e.status == StatusCode::CONFLICT => {
            page(StatusCode::CONFLICT, "Not decided", &format!("<p>{}</p>", esc(&e.detail)))
        }
        Err(e) => e.into_response(),
    }
}

/// What the approver needs to see: the call, its redacted arguments, the rule, the spend against
/// each budget, and the application's context.
fn details(a: &ApprovalRow) -> String {
    let r = &a.request;
    let text = |k: &str| r.get(k).and_then(Value::as_str).map(esc).unwrap_or_else(|| "-".into());
    let pretty = |k: &str| {
        r.get(k)
            .filter(|v| !v.is_null())
            .map(|v| esc(&serde_json::to_string_pretty(v).unwrap_or_default()))
            .unwrap_or_else(|| "-".into())
    };
    let mut spend = String::new();
    for b in r.get("spend").and_then(|s| s.get("budgets")).and_then(Value::as_array).into_iter().flatten() {
        spend.push_str(&format!(
            "<tr><td>{}</td><td>${:.4} of ${:.4}</td><td>{}</td></tr>",
            esc(b.get("budget").and_then(Value::as_str).unwrap_or("")),
            b.get("spent_usd").and_then(Value::as_f64).unwrap_or(0.0),
            b.get("limit_usd").and_then(Value::as_f64).unwrap_or(0.0),
            esc(b.get("policy").and_then(Value::as_str).unwrap_or("")),
        ));
    }
    if spend.is_empty() {
        spend.push_str("<tr><td colspan=3>no budgets apply</td></tr>");
    }
    format!(
        "<table>\
         <tr><th>Agent</th><td>{}</td></tr><tr><th>Run</th><td>{}</td></tr><tr><th>Action</th><td><code>{}</code></td></tr>\
         <tr><th>Estimated cost</th><td>${:.4}</td></tr><tr><th>Why</th><td>{}</td></tr>\
         <tr><th>Policy / rule</th><td>{} / {}</td></tr><tr><th>Expires</th><td>{}</td></tr></table>\
         <h2>Arguments (redacted)</h2><pre>{}</pre>\
         <h2>Spend so far</h2><table><tr><th>Budget</th><th>Spent</th><th>Policy</th></tr>{}</table>\
         <h2>Context from the application</h2><pre>{}</pre>",
        esc(&a.agent_id),
        esc(&a.run_id),
        esc(&a.action),
        a.cost_usd,
        text("message"),
        text("policy"),
        text("rule"),
        chrono::DateTime::from_timestamp_millis(a.expires_at).map(|t| t.to_rfc3339()).unwrap_or_default(),
        pretty("args"),
        spend,
        pretty("context"),
    )
}

/// Escapes text for HTML (element content and quoted attributes).
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() && c != '\n' && c != '\t' => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

fn page(status: StatusCode, title: &str, body: &str) -> Response {
    let html = format!(
        "<!doctype html><html lang=en><head><meta charset=utf-8><meta name=viewport content=\"width=device-width\">\
         <meta name=referrer content=no-referrer><title>{t} · Agent Sentinel</title><style>\
         body{{font:15px/1.45 system-ui,sans-serif;max-width:46rem;margin:2rem auto;padding:0 1rem;color:#111}}\
         th{{text-align:left;padding-right:1rem;vertical-align:top}}td{{vertical-align:top}}\
         pre{{background:#f4f4f4;padding:.6rem;overflow:auto;white-space:pre-wrap}}textarea{{width:100%}}\
         button{{font-size:1rem;padding:.4rem 1.2rem}}.ok{{background:#1a7f37;color:#fff}}.no{{background:#b42318;color:#fff}}\
         .q{{font-weight:600}}.small{{color:#555;font-size:.85rem}}</style></head>\
         <body><h1>{t}</h1>{body}</body></html>",
        t = esc(title)
    );
    let mut r = (status, html).into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'",
        ),
    );
    r
}
