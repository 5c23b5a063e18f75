//! Human approvals through the server.
//!
//! `/decide` creates a request when a call needs approval, bound to the exact call: action,
//! argument digest, policy version, agent and run. Only an authenticated human decides it: an
//! admin key, or a key whose name is listed among the policy's approvers; an agent key never can.
//! A request is decided once (the database update is conditional, so of two approvers deciding at
//! once exactly one wins), expires at the policy's timeout, and is used once: the agent calls
//! `/decide` again with `approval_id`, and only the same call, under the same policy version, is
//! then decided without the approval step.

use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use sentinel_core::{ActionRequest, Decision};
use sentinel_store::{ApprovalRow, InterventionIn, NewApproval, Scope};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::{ApiError, ApiJson, ApiQuery, AppState, Caller};

/// Default wait for a decision when the policy sets no timeout.
pub const DEFAULT_TIMEOUT_SECS: u64 = 300;

/// What the approver is shown, built when the request is created.
pub fn request_view(
    req: &ActionRequest<'_>,
    d: &Decision,
    spend: Value,
    context: Option<&Value>,
) -> (Value, Vec<String>, u64) {
    let approvers = d.approval.as_ref().map(|a| a.approvers.clone()).unwrap_or_default();
    let timeout = d.approval.as_ref().and_then(|a| a.timeout_seconds).unwrap_or(DEFAULT_TIMEOUT_SECS);
    let escalation = d.approval.as_ref().and_then(|a| a.escalation.as_ref());
    let kind = if d.reason.is_budget() { PAUSE } else { "approval" };
    let view = json!({
        "kind": kind,
        "action": req.action,
        "args": sentinel_core::redact::Redacted(req.args),
        "cost_usd": req.cost_usd,
        "tags": req.tags,
        "description": req.description,
        "intent": req.intent,
        "reason": d.reason,
        "message": d.message,
        "policy": d.policy.as_deref(),
        "rule": d.rule.as_deref(),
        "limit": d.limit,
        "approvers": approvers,
        "escalation": escalation,
        "timeout_seconds": timeout,
        "spend": spend,
        "context": context.map(sentinel_core::redact::Redacted),
    });
    (view, approvers, timeout)
}

/// Creates the request for a decision that needs approval.
#[expect(clippy::too_many_arguments, reason = "the exact call a request is bound to")]
pub async fn create(
    s: &AppState,
    req: &ActionRequest<'_>,
    d: &Decision,
    intervention_id: Option<String>,
    cost_micros: i64,
    spend: Value,
    context: Option<&Value>,
    now_ms: i64,
) -> Result<ApprovalRow, ApiError> {
    let (view, _, timeout) = request_view(req, d, spend, context);
    let timeout_ms = i64::try_from(timeout.saturating_mul(1000)).unwrap_or(i64::MAX);
    let escalate_at = d
        .approval
        .as_ref()
        .and_then(|a| a.escalation.as_ref())
        .map(|e| now_ms.saturating_add((timeout_ms as f64 * e.after_percent / 100.0) as i64));
    let row = s
        .store
        .create_approval(&NewApproval {
            id: sentinel_store::new_id(),
            agent_id: req.agent_id.into(),
            run_id: req.run_id.into(),
            session_id: req.session_id.into(),
            action: req.action.into(),
            args_digest: crate::central::digest_of(req.args),
            policy_version: d.policy_version.to_string(),
            cost_micros,
            intervention_id,
            request: view,
            expires_at: now_ms.saturating_add(timeout_ms),
            escalate_at,
        })
        .await?;
    metrics::counter!("sentinel_approvals_total", "event" => "requested").increment(1);
    tracing::info!(id = %row.id, agent = %row.agent_id, action = %row.action, "approval requested");
    let (s2, r2) = (s.clone(), row.clone());
    tokio::spawn(async move { crate::notify::approval_requested(&s2, &r2).await });
    Ok(row)
}

/// Checks that an approved request covers exactly this call, and uses it up.
pub async fn redeem(s: &AppState, caller: &Caller, id: &str, req: &ActionRequest<'_>) -> Result<ApprovalRow, ApiError> {
    let a = s.store.get_approval(id).await?;
    caller.must_own(&format!("approval `{id}`"), &a.agent_id)?;
    let refused = |why: String| ApiError::new(StatusCode::CONFLICT, "Approval not usable", why);
    match a.status.as_str() {
        "approved" => {}
        "pending" => return Err(refused(format!("approval `{id}` is still pending; wait for it"))),
        other => {
            return Err(refused(format!(
                "approval `{id}` was {other}{}{}",
                a.decided_by.as_deref().map(|b| format!(" by {b}")).unwrap_or_default(),
                a.reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default()
            )));
        }
    }
    let mismatch = [
        (a.action != req.action, "action"),
        (a.args_digest != crate::central::digest_of(req.args), "arguments"),
        (a.agent_id != req.agent_id, "agent"),
        (a.run_id != req.run_id, "run"),
    ];
    if let Some((_, what)) = mismatch.iter().find(|(m, _)| *m) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "Forbidden",
            format!("approval `{id}` was given for another call: the {what} differ"),
        ));
    }
    let current = s.engine().policy_version();
    // A pause is about the budget, which a human may raise (a new policy version) to end it.
    if *current != *a.policy_version && !is_pause(&a) {
        return Err(refused(format!(
            "the policy changed since approval `{id}` was requested (version {} → {current}); ask again",
            a.policy_version
        )));
    }
    if !s.store.consume_approval(id).await? {
        return Err(refused(format!("approval `{id}` was already used for its call")));
    }
    Ok(a)
}

/// The `kind` of a request for a call paused over budget (`on_budget_exceeded: pause`).
const PAUSE: &str = "budget_pause";

/// Whether a request is a call paused over budget.
pub fn is_pause(a: &ApprovalRow) -> bool {
    a.request.get("kind").and_then(Value::as_str) == Some(PAUSE)
}

/// Who ends a pause when the budget was raised for it (as opposed to a human resuming it).
pub const LIMIT_RAISED: &str = "policy change: the budget now allows this call";

/// Whether redeeming `a` runs the call over its budgets: a pause a human resumed.
pub fn is_resume(a: &ApprovalRow) -> bool {
    is_pause(a) && a.decided_by.as_deref() != Some(LIMIT_RAISED)
}

/// Ends the pauses whose call now fits in its budgets (after a policy change raised a limit).
pub async fn resolve_pauses(s: &AppState) -> Result<(), ApiError> {
    let pending = s.store.list_approvals(Some("pending"), None, 1000).await?;
    for a in pending.iter().filter(|a| is_pause(a)) {
        let req =
            ActionRequest::new(&a.action).agent(&a.agent_id).run(&a.run_id).session(&a.session_id).cost(a.cost_usd);
        let cost = sentinel_core::Usd::from_f64(a.cost_usd).unwrap_or(sentinel_core::Usd::ZERO);
        // The same rule as the engine's: a call fits while spent + cost stays within the limit.
        let fits = crate::central::spend_of(s, &req)
            .await
            .is_some_and(|sp| sp.budgets.iter().all(|b| b.spent.saturating_add(cost) <= b.limit));
        if fits {
            match decide_as(s, &a.id, true, LIMIT_RAISED, "the budget was raised").await {
                Ok(_) | Err(ApiError { status: StatusCode::CONFLICT, .. }) => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

/// Expires undecided requests past their timeout, records each as `REJECTED_AFTER_REVIEW` (a
/// timeout), and wakes the long-polls. Every path that reads or decides requests goes through here,
/// so an expiry is recorded once, whoever notices it first.
pub async fn expire_due(s: &AppState) -> Result<(), ApiError> {
    let expired = s.store.expire_approvals(sentinel_store::now_ms()).await?;
    for a in &expired {
        record(s, a);
    }
    if !expired.is_empty() {
        s.approvals_changed.notify_waiters();
        let s2 = s.clone();
        tokio::spawn(async move {
            for a in &expired {
                crate::notify::approval_decided(&s2, a).await;
            }
        });
    }
    Ok(())
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// `pending`, `approved`, `rejected` or `expired`.
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub limit: Option<i64>,
}

/// Approval requests, newest first. An agent key sees its own agent's.
#[utoipa::path(get, path = "/api/v1/approvals", params(ListQuery), tag = "approvals", responses((status = 200)))]
pub async fn list(
    State(s): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    caller.require(&[Scope::Admin, Scope::Readonly, Scope::Agent])?;
    const STATUSES: &[&str] = &["pending", "approved", "rejected", "expired"];
    if let Some(st) = q.status.as_deref().filter(|st| !STATUSES.contains(st)) {
        return Err(ApiError::not_one_of("status", st, STATUSES));
    }
    expire_due(&s).await?;
    let items =
        s.store.list_approvals(q.status.as_deref(), caller.0.agent_id.as_deref(), q.limit.unwrap_or(100)).await?;
    Ok(Json(json!({ "items": items })))
}

fn visible(caller: &Caller, a: &ApprovalRow) -> Result<(), ApiError> {
    if caller.0.agent_id.as_ref().is_some_and(|own| *own != a.agent_id) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "Not found",
            format!("approval request `{}` does not exist", a.id),
        ));
    }
    Ok(())
}

#[utoipa::path(get, path = "/api/v1/approvals/{id}", tag = "approvals", responses((status = 200), (status = 404)))]
pub async fn get(
    State(s): State<AppState>,
    caller: Caller,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<ApprovalRow>, ApiError> {
    caller.require(&[Scope::Admin, Scope::Readonly, Scope::Agent])?;
    expire_due(&s).await?;
    let a = s.store.get_approval(&id).await?;
    visible(&caller, &a)?;
    Ok(Json(a))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DecisionBody {
    /// Why; given back to the agent (an LLM agent can adapt to it) and recorded.
    #[serde(default)]
    pub reason: Option<String>,
}

/// The identity a decision is recorded under, if this caller may decide this request.
fn approver(caller: &Caller, a: &ApprovalRow) -> Result<String, ApiError> {
    let k = &caller.0;
    let named = |list: Option<&Value>| {
        list.and_then(Value::as_array)
            .is_some_and(|l| l.iter().any(|x| x.as_str() == Some(k.name.as_str()) && !k.name.is_empty()))
    };
    // The first group, and the escalation group (which may decide from the start).
    let listed =
        named(a.request.get("approvers")) || named(a.request.get("escalation").and_then(|e| e.get("approvers")));
    match k.scope {
        Scope::Agent => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "Forbidden",
            "an agent key can never decide an approval; a human approver must",
        )),
        Scope::Admin => Ok(caller.actor()),
        Scope::Readonly if listed => Ok(caller.actor()),
        Scope::Readonly => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "Forbidden",
            format!("key `{}` is not among this request's approvers and is not an admin key", k.prefix),
        )),
    }
}

async fn decide(
    s: &AppState,
    caller: &Caller,
    id: &str,
    approve: bool,
    body: DecisionBody,
) -> Result<Json<ApprovalRow>, ApiError> {
    let reason = body.reason.unwrap_or_default();
    if reason.len() > 2000 {
        return Err(ApiError::field("reason", "must be at most 2000 characters"));
    }
    expire_due(s).await?;
    let a = s.store.get_approval(id).await?;
    let by = approver(caller, &a)?;
    Ok(Json(decide_as(s, id, approve, &by, &reason).await?))
}

/// Decides a request as `by` (already authorized): once, recorded, waiters woken, people told.
pub async fn decide_as(s: &AppState, id: &str, approve: bool, by: &str, reason: &str) -> Result<ApprovalRow, ApiError> {
    expire_due(s).await?;
    let decided = s.store.decide_approval(id, approve, by, reason).await?;
    record(s, &decided);
    s.approvals_changed.notify_waiters();
    metrics::counter!("sentinel_approvals_total", "event" => if approve { "approved" } else { "rejected" })
        .increment(1);
    tracing::info!(id, approve, by = %by, "approval decided");
    let (s2, d2) = (s.clone(), decided.clone());
    tokio::spawn(async move { crate::notify::approval_decided(&s2, &d2).await });
    Ok(decided)
}

/// The decision as an intervention (`APPROVED_AFTER_REVIEW` or `REJECTED_AFTER_REVIEW`), with who,
/// when and why, linked to the escalation it answers.
pub fn record(s: &AppState, a: &ApprovalRow) {
    let outcome = match a.status.as_str() {
        "approved" => "APPROVED_AFTER_REVIEW",
        _ => "REJECTED_AFTER_REVIEW",
    };
    let id = sentinel_store::new_id();
    let at = a.decided_at.unwrap_or_else(sentinel_store::now_ms);
    let cost = (a.cost_usd * 1e6).round() as i64;
    let body = json!({
        "id": id,
        "timestamp": sentinel_core::ledger::now_rfc3339(),
        "type": "APPROVAL_REQUIRED",
        "outcome": outcome,
        "action": a.action,
        "agent_id": a.agent_id,
        "run_id": a.run_id,
        "session_id": a.session_id,
        "estimated_cost_usd": a.cost_usd,
        "cost_prevented_usd": if outcome == "REJECTED_AFTER_REVIEW" { a.cost_usd } else { 0.0 },
        "policy": a.request.get("policy"),
        "rule": a.request.get("rule"),
        "rationale": a.request.get("message"),
        "approval": {"id": a.id, "status": a.status, "approver": a.decided_by, "reason": a.reason, "decided_at": a.decided_at},
        "related_intervention_id": a.intervention_id,
        "policy_version": a.policy_version,
        "source": "server",
    });
    s.activity.intervention(InterventionIn {
        id,
        chain: None,
        at,
        clock_ahead: false,
        agent_id: a.agent_id.clone(),
        run_id: a.run_id.clone(),
        session_id: a.session_id.clone(),
        kind: "APPROVAL_REQUIRED".into(),
        outcome: outcome.into(),
        risk_level: "MEDIUM".into(),
        action: a.action.clone(),
        policy: a.request.get("policy").and_then(Value::as_str).map(str::to_string),
        rule: a.request.get("rule").and_then(Value::as_str).map(str::to_string),
        estimated_micros: cost,
        prevented_micros: if outcome == "REJECTED_AFTER_REVIEW" { cost } else { 0 },
        body: body.to_string(),
    });
}

#[utoipa::path(post, path = "/api/v1/approvals/{id}/approve", request_body = DecisionBody, tag = "approvals",
    responses((status = 200), (status = 403), (status = 409)))]
pub async fn approve(
    State(s): State<AppState>,
    caller: Caller,
    UrlPath(id): UrlPath<String>,
    ApiJson(b): ApiJson<DecisionBody>,
) -> Result<Json<ApprovalRow>, ApiError> {
    decide(&s, &caller, &id, true, b).await
}

#[utoipa::path(post, path = "/api/v1/approvals/{id}/reject", request_body = DecisionBody, tag = "approvals",
    responses((status = 200), (status = 403), (status = 409)))]
pub async fn reject(
    State(s): State<AppState>,
    caller: Caller,
    UrlPath(id): UrlPath<String>,
    ApiJson(b): ApiJson<DecisionBody>,
) -> Result<Json<ApprovalRow>, ApiError> {
    decide(&s, &caller, &id, false, b).await
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct WaitQuery {
    /// How long to hold the request open (default 25 s, at most 60).
    #[serde(default)]
    pub timeout_seconds: Option<f64>,
}

/// Long-poll: answers as soon as the request is decided or expires, or after `timeout_seconds`
/// (at most until just before the server's request timeout) with it still pending: ask again.
/// Never busy: waits on decisions made here, and looks at the database twice a second for
/// decisions made on another replica. A stopping server answers at once.
#[utoipa::path(get, path = "/api/v1/approvals/{id}/wait", params(WaitQuery), tag = "approvals", responses((status = 200)))]
pub async fn wait(
    State(s): State<AppState>,
    caller: Caller,
    UrlPath(id): UrlPath<String>,
    ApiQuery(q): ApiQuery<WaitQuery>,
) -> Result<Json<ApprovalRow>, ApiError> {
    caller.require(&[Scope::Admin, Scope::Readonly, Scope::Agent])?;
    let t = q.timeout_seconds.unwrap_or(25.0);
    if !(t.is_finite() && (0.0..=60.0).contains(&t)) {
        return Err(ApiError::field("timeout_seconds", "must be between 0 and 60"));
    }
    // Held at most until just before the request timeout, so a long-poll never ends as a 503.
    let deadline = Instant::now() + Duration::from_secs_f64(t).min(s.long_poll_max());
    loop {
        let notified = s.approvals_changed.notified();
        let now = sentinel_store::now_ms();
        let mut a = s.store.get_approval(&id).await?;
        visible(&caller, &a)?;
        if a.status == "pending" && a.expires_at <= now {
            expire_due(&s).await?;
            a = s.store.get_approval(&id).await?;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let stopping = s.shutting_down.load(std::sync::atomic::Ordering::SeqCst);
        if a.status != "pending" || left.is_zero() || stopping {
            return Ok(Json(a));
        }
        let until_expiry = Duration::from_millis(u64::try_from(a.expires_at.saturating_sub(now)).unwrap_or(0));
        let _ = tokio::time::timeout(
            left.min(Duration::from_millis(500)).min(until_expiry.max(Duration::from_millis(1))),
            notified,
        )
        .await;
    }
}
