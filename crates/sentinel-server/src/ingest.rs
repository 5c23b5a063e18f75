//! Ingest (`/ledger`, `/events`) and what operators read back (`/interventions`, `/agents`).

use axum::Json;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use sentinel_core::ledger::parse_tail;
use std::borrow::Cow;

use sentinel_core::records::InterventionRecord;
use sentinel_store::{ChainPos, EventIn, InterventionFilter, InterventionIn, LedgerIn, Scope};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::central::{acting_agent, check_id};
use crate::{ApiError, ApiJson, ApiQuery, AppState, Caller, TypedJson};

/// Most lines in one ingest request.
pub const MAX_BATCH: usize = 5000;
/// Largest ingest body.
pub const INGEST_BODY_LIMIT: usize = 16 * 1024 * 1024;

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LedgerBatch {
    /// Identifies one SDK log (for example `host:/path/.agent-sentinel`); its chain is checked across batches.
    pub stream: String,
    /// The agent the stream belongs to; an `agent` key may only send its own.
    #[serde(default)]
    pub agent_id: Option<String>,
    /// Lines of `ledger.jsonl`, exactly as written (the hash covers their bytes).
    #[serde(default)]
    pub ledger: Vec<String>,
    /// Lines of `interventions.jsonl`, exactly as written.
    #[serde(default)]
    pub interventions: Vec<String>,
}

/// The fields of a ledger line the server indexes. The SDK's required fields must be present;
/// the payload is skipped without being built, since the raw line is stored as it came.
#[derive(Deserialize)]
struct LineHead<'a> {
    #[serde(borrow)]
    id: Cow<'a, str>,
    #[serde(rename = "timestamp", borrow)]
    _timestamp: Cow<'a, str>,
    #[serde(rename = "action", borrow)]
    _action: Cow<'a, str>,
    cost_usd: f64,
    #[serde(rename = "duration_ms")]
    _duration_ms: f64,
    #[serde(borrow)]
    outcome: Cow<'a, str>,
    #[serde(default, borrow)]
    agent_id: Cow<'a, str>,
    #[serde(default, borrow)]
    run_id: Cow<'a, str>,
}

fn chain_of(field: &str, i: usize, line: &str) -> Result<ChainPos, ApiError> {
    let tail = parse_tail(line.as_bytes()).ok_or_else(|| {
        ApiError::field(&format!("{field}[{i}]"), "the line does not end with the `seq`, `prev_hash` and `hash` fields")
    })?;
    Ok(ChainPos {
        seq: i64::try_from(tail.seq).map_err(|_| ApiError::field(&format!("{field}[{i}]"), "`seq` is too large"))?,
        prev: String::from_utf8_lossy(tail.prev).into_owned(),
        hash_ok: tail.hash_matches(),
        hash: String::from_utf8_lossy(tail.hash).into_owned(),
    })
}

/// A line written before the SDK knew its agent (empty or `default`) belongs to the sender's agent.
fn attribute(line_agent: &str, sender: &str) -> String {
    if line_agent.is_empty() || line_agent == sentinel_core::ActionRequest::DEFAULT_ID {
        sender.to_string()
    } else {
        line_agent.to_string()
    }
}

fn millis_of(ts: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(ts).ok().map(|t| t.timestamp_millis())
}

/// How far ahead of the server's clock an uploaded time may be: clocks of agents' machines drift.
pub const MAX_CLOCK_AHEAD_MS: i64 = 5 * 60 * 1000;

/// The time an uploaded record is listed, filtered and counted at: the time it claims, unless that
/// is more than [`MAX_CLOCK_AHEAD_MS`] ahead of the server's clock (a wrong clock, or a record made
/// to stay at the top of every newest-first list and inside every time filter); then the time it
/// arrived, and `true`. The record is still stored with the time it claims: refusing it would stop
/// the sender's uploads at that line for good, and its hash covers the claimed time.
fn listed_at(claimed: i64, now: i64) -> (i64, bool) {
    if claimed > now.saturating_add(MAX_CLOCK_AHEAD_MS) { (now, true) } else { (claimed, false) }
}

/// An amount of a line in micro-dollars: what a budget can count (finite, not negative, below the
/// core's cap), so no total over the agent's lines can overflow.
fn micros(field: &str, i: usize, name: &str, x: f64) -> Result<i64, ApiError> {
    let bad = |m: String| ApiError::field(&format!("{field}[{i}].{name}"), m);
    let usd = sentinel_core::Usd::from_f64(x).map_err(|e| bad(e.to_string()))?;
    i64::try_from(usd.micros()).map_err(|_| bad(format!("{x} is too large")))
}

/// An id a line carries (its own, its agent's, its run's): what `/decide` accepts for ids, or
/// nothing where the line may leave it out.
fn line_id(field: &str, i: usize, name: &str, v: &str, may_be_empty: bool) -> Result<(), ApiError> {
    if v.is_empty() && may_be_empty { Ok(()) } else { check_id(&format!("{field}[{i}].{name}"), v) }
}

/// Takes a batch of ledger lines and interventions from an SDK. Idempotent by entry id; the chain is
/// checked and breaks are recorded as tamper findings. Nothing is written unless every line is valid.
#[utoipa::path(post, path = "/api/v1/ledger", request_body = LedgerBatch, tag = "ingest",
    responses((status = 200, description = "Counts of accepted and duplicate lines, and any tamper findings")))]
pub async fn ingest_ledger(
    State(s): State<AppState>,
    caller: Caller,
    TypedJson(b): TypedJson<LedgerBatch>,
) -> Result<Json<Value>, ApiError> {
    let started = std::time::Instant::now();
    caller.require(&[Scope::Admin, Scope::Agent])?;
    if b.stream.is_empty() || b.stream.len() > 300 || b.stream.chars().any(char::is_control) {
        return Err(ApiError::field("stream", "must be 1 to 300 printable characters"));
    }
    if b.ledger.len() + b.interventions.len() > MAX_BATCH {
        return Err(ApiError::field(
            "ledger",
            format!("at most {MAX_BATCH} lines per batch; got {}", b.ledger.len() + b.interventions.len()),
        ));
    }
    let agent = acting_agent(&caller, b.agent_id.as_deref())?;
    let mut ledger = Vec::with_capacity(b.ledger.len());
    for (i, mut line) in b.ledger.into_iter().enumerate() {
        let keep = line.trim_end_matches(['\n', '\r']).len();
        line.truncate(keep);
        let chain = chain_of("ledger", i, &line)?;
        let e: LineHead<'_> = serde_json::from_str(&line)
            .map_err(|e| ApiError::field(&format!("ledger[{i}]"), format!("not a ledger entry: {e}")))?;
        line_id("ledger", i, "id", &e.id, false)?;
        line_id("ledger", i, "agent_id", &e.agent_id, true)?;
        line_id("ledger", i, "run_id", &e.run_id, true)?;
        let agent_id = attribute(&e.agent_id, &agent);
        caller.must_own(&format!("`ledger[{i}].agent_id`"), &agent_id)?;
        let cost_micros = micros("ledger", i, "cost_usd", e.cost_usd)?;
        let (id, run_id) = (e.id.into_owned(), e.run_id.into_owned());
        let failed = e.outcome == "error";
        ledger.push(LedgerIn { id, chain, agent_id, run_id, cost_micros, failed, line });
    }
    let mut interventions = Vec::with_capacity(b.interventions.len());
    let now = sentinel_store::now_ms();
    for (i, line) in b.interventions.iter().enumerate() {
        let line = line.trim_end_matches(['\n', '\r']);
        let chain = chain_of("interventions", i, line)?;
        let r: InterventionRecord = serde_json::from_str(line)
            .map_err(|e| ApiError::field(&format!("interventions[{i}]"), format!("not an intervention: {e}")))?;
        line_id("interventions", i, "id", &r.id, false)?;
        line_id("interventions", i, "agent_id", &r.agent_id, true)?;
        line_id("interventions", i, "run_id", &r.run_id, true)?;
        line_id("interventions", i, "session_id", &r.session_id, true)?;
        let agent_id = attribute(&r.agent_id, &agent);
        caller.must_own(&format!("`interventions[{i}].agent_id`"), &agent_id)?;
        let at = millis_of(&r.timestamp)
            .ok_or_else(|| ApiError::field(&format!("interventions[{i}].timestamp"), "must be an RFC 3339 time"))?;
        let (at, clock_ahead) = listed_at(at, now);
        interventions.push(InterventionIn {
            id: r.id.clone(),
            chain: Some(chain),
            at,
            clock_ahead,
            agent_id,
            run_id: r.run_id.clone(),
            session_id: r.session_id.clone(),
            kind: r.kind.as_str().to_string(),
            outcome: r.outcome.as_str().to_string(),
            risk_level: r.risk_level.as_str().to_string(),
            action: r.action.clone(),
            policy: r.policy.clone(),
            rule: r.rule.clone(),
            estimated_micros: micros("interventions", i, "estimated_cost_usd", r.estimated_cost_usd)?,
            prevented_micros: micros("interventions", i, "cost_prevented_usd", r.cost_prevented_usd)?,
            body: line.to_string(),
        });
    }
    // Interventions worth telling people about (critical, or a block); queued once each by id.
    let notable: Vec<InterventionIn> = interventions
        .iter()
        .filter(|i| i.outcome == "BLOCKED" || i.risk_level.eq_ignore_ascii_case("CRITICAL"))
        .cloned()
        .collect();
    let report = s.store.ingest(&b.stream, &agent, ledger, interventions).await?;
    if report.clock_ahead > 0 {
        metrics::counter!("sentinel_ingest_clock_ahead_total").increment(report.clock_ahead);
        tracing::warn!(stream = %b.stream, count = report.clock_ahead,
            "uploaded interventions are dated ahead of the server's clock; listed at their arrival");
    }
    if !notable.is_empty() || !report.findings.is_empty() || !report.failing_agents.is_empty() {
        let (s2, stream, findings, failing) =
            (s.clone(), b.stream.clone(), report.findings.clone(), report.failing_agents.clone());
        tokio::spawn(async move {
            crate::notify::interventions(&s2, &notable).await;
            crate::notify::tamper(&s2, &stream, &findings).await;
            for (agent, n) in &failing {
                crate::notify::agent_failures(&s2, agent, *n).await;
            }
        });
    }
    metrics::counter!("sentinel_ingest_entries_total", "kind" => "ledger").increment(report.ledger_accepted);
    metrics::counter!("sentinel_ingest_entries_total", "kind" => "interventions")
        .increment(report.interventions_accepted);
    metrics::counter!("sentinel_ingest_duplicates_total")
        .increment(report.ledger_duplicates + report.interventions_duplicates);
    // From the parsed body to the committed batch: checks, chain, the store's transaction.
    metrics::histogram!("sentinel_ingest_batch_seconds").record(started.elapsed().as_secs_f64());
    if !report.findings.is_empty() {
        metrics::counter!("sentinel_tamper_findings_total").increment(report.findings.len() as u64);
        for f in &report.findings {
            tracing::warn!(stream = %f.stream, seq = f.seq, kind = %f.kind, detail = %f.detail, "tamper finding");
        }
    }
    Ok(Json(serde_json::to_value(report).unwrap_or_default()))
}

/// A tool-call event, as the monitoring product sends it (inputs and outputs hashed, never raw).
#[derive(Debug, Deserialize, serde::Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EventBody {
    pub agent_id: String,
    pub tool_name: String,
    #[serde(default)]
    pub input_hash: Option<String>,
    #[serde(default)]
    pub output_hash: Option<String>,
    #[serde(default)]
    pub duration_ms: Option<f64>,
    #[serde(default)]
    pub session_id: Option<String>,
    /// Makes a retry idempotent; one is assigned when absent.
    #[serde(default)]
    pub event_id: Option<String>,
    /// RFC 3339; defaults to when it arrived.
    #[serde(default)]
    pub timestamp: Option<String>,
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub error: Option<String>,
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Ingests one monitoring event.
#[utoipa::path(post, path = "/api/v1/events", request_body = EventBody, tag = "ingest",
    responses((status = 201, description = "Stored"), (status = 200, description = "Already stored (same event_id)")))]
pub async fn ingest_event(
    State(s): State<AppState>,
    caller: Caller,
    ApiJson(b): ApiJson<EventBody>,
) -> Result<Response, ApiError> {
    caller.require(&[Scope::Admin, Scope::Agent])?;
    caller.must_own("`agent_id`", &b.agent_id)?;
    // Ids as `/decide` takes them.
    check_id("agent_id", &b.agent_id)?;
    for (f, v) in [("event_id", &b.event_id), ("session_id", &b.session_id)] {
        if let Some(v) = v {
            check_id(f, v)?;
        }
    }
    if b.tool_name.is_empty() || b.tool_name.len() > 512 {
        return Err(ApiError::field("tool_name", "must be 1 to 512 characters"));
    }
    for (f, v) in [("input_hash", &b.input_hash), ("output_hash", &b.output_hash)] {
        if let Some(h) = v
            && !is_hex64(h)
        {
            return Err(ApiError::field(f, "must be a SHA-256 hex digest (64 hex characters); never send raw content"));
        }
    }
    if let Some(d) = b.duration_ms
        && !(d.is_finite() && d >= 0.0)
    {
        return Err(ApiError::field("duration_ms", "must be a non-negative number"));
    }
    let now = sentinel_store::now_ms();
    let (at, clock_ahead) = match &b.timestamp {
        Some(t) => {
            listed_at(millis_of(t).ok_or_else(|| ApiError::field("timestamp", "must be an RFC 3339 time"))?, now)
        }
        None => (now, false),
    };
    if clock_ahead {
        metrics::counter!("sentinel_ingest_clock_ahead_total").increment(1);
        tracing::warn!(agent_id = %b.agent_id, timestamp = ?b.timestamp,
            "an event is dated ahead of the server's clock; listed at its arrival");
    }
    let id = b.event_id.clone().unwrap_or_else(sentinel_store::new_id);
    let e = EventIn {
        id: id.clone(),
        agent_id: b.agent_id.clone(),
        tool_name: b.tool_name.clone(),
        session_id: b.session_id.clone(),
        at,
        body: serde_json::to_string(&b).unwrap_or_default(),
    };
    let created = s.store.insert_event(&e).await?;
    metrics::counter!("sentinel_ingest_entries_total", "kind" => "events").increment(u64::from(created));
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(json!({"id": id, "agent_id": b.agent_id, "created": created, "clock_ahead": clock_ahead})))
        .into_response())
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct InterventionQuery {
    /// `HARD_BLOCK`, `APPROVAL_REQUIRED`, `RATE_LIMITED`, `BUDGET_EXCEEDED`, `DOWNGRADE`, `WARNING` or `HALTED`.
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    #[serde(default)]
    pub outcome: Option<String>,
    #[serde(default)]
    pub risk_level: Option<String>,
    #[serde(default)]
    pub agent_id: Option<String>,
    #[serde(default)]
    pub run_id: Option<String>,
    /// RFC 3339 or milliseconds since the epoch.
    #[serde(default)]
    pub since: Option<String>,
    #[serde(default)]
    pub until: Option<String>,
    #[serde(default)]
    pub cursor: Option<String>,
    #[serde(default)]
    pub limit: Option<i64>,
}

const TYPES: &[&str] =
    &["HARD_BLOCK", "APPROVAL_REQUIRED", "RATE_LIMITED", "BUDGET_EXCEEDED", "DOWNGRADE", "WARNING", "HALTED"];
const OUTCOMES: &[&str] =
    &["BLOCKED", "ESCALATED", "APPROVED_AFTER_REVIEW", "REJECTED_AFTER_REVIEW", "MODIFIED", "WARNED"];
const RISKS: &[&str] = &["LOW", "MEDIUM", "HIGH", "CRITICAL"];

fn one_of(field: &str, v: &Option<String>, allowed: &[&str]) -> Result<Option<String>, ApiError> {
    match v {
        None => Ok(None),
        Some(x) => {
            let up = x.to_ascii_uppercase();
            if allowed.contains(&up.as_str()) { Ok(Some(up)) } else { Err(ApiError::not_one_of(field, x, allowed)) }
        }
    }
}

fn time_param(field: &str, v: &Option<String>) -> Result<Option<i64>, ApiError> {
    match v {
        None => Ok(None),
        Some(x) => x
            .parse::<i64>()
            .ok()
            .or_else(|| millis_of(x))
            .map(Some)
            .ok_or_else(|| ApiError::field(field, "must be an RFC 3339 time or milliseconds since the epoch")),
    }
}

fn filter_of(caller: &Caller, q: &InterventionQuery) -> Result<InterventionFilter, ApiError> {
    let agent_id = caller.agent_scope(q.agent_id.as_deref())?;
    let after = match &q.cursor {
        None => None,
        Some(c) => {
            let (at, id) = c.split_once('_').ok_or_else(|| ApiError::field("cursor", "not a cursor from this API"))?;
            Some((
                at.parse::<i64>().map_err(|_| ApiError::field("cursor", "not a cursor from this API"))?,
                id.to_string(),
            ))
        }
    };
    let limit = q.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::field("limit", "must be between 1 and 500"));
    }
    Ok(InterventionFilter {
        kind: one_of("type", &q.kind, TYPES)?,
        outcome: one_of("outcome", &q.outcome, OUTCOMES)?,
        risk_level: one_of("risk_level", &q.risk_level, RISKS)?,
        agent_id,
        run_id: q.run_id.clone(),
        since: time_param("since", &q.since)?,
        until: time_param("until", &q.until)?,
        after,
        limit,
    })
}

/// Interventions, newest first, filtered, one page at a time (`next_cursor` continues).
#[utoipa::path(get, path = "/api/v1/interventions", params(InterventionQuery), tag = "interventions",
    responses((status = 200, description = "A page of interventions")))]
pub async fn list_interventions(
    State(s): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<InterventionQuery>,
) -> Result<Json<Value>, ApiError> {
    caller.require(&[Scope::Admin, Scope::Readonly, Scope::Agent])?;
    let f = filter_of(&caller, &q)?;
    let items = s.store.list_interventions(&f).await?;
    let next = (items.len() as i64 == f.limit).then(|| items.last().map(|i| format!("{}_{}", i.at, i.id))).flatten();
    Ok(Json(json!({"items": items, "next_cursor": next})))
}

/// Totals, cost prevented, high-risk blocks, top blocked actions and top policies, by day.
#[utoipa::path(get, path = "/api/v1/interventions/stats", params(InterventionQuery), tag = "interventions",
    responses((status = 200, description = "Statistics")))]
pub async fn intervention_stats(
    State(s): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<InterventionQuery>,
) -> Result<Json<Value>, ApiError> {
    caller.require(&[Scope::Admin, Scope::Readonly, Scope::Agent])?;
    if q.cursor.is_some() || q.limit.is_some() {
        return Err(ApiError::field("cursor", "statistics are not paginated"));
    }
    let f = filter_of(&caller, &q)?;
    Ok(Json(serde_json::to_value(s.store.intervention_stats(&f).await?).unwrap_or_default()))
}

#[utoipa::path(get, path = "/api/v1/interventions/{id}", tag = "interventions",
    responses((status = 200, description = "One intervention"), (status = 404)))]
pub async fn get_intervention(
    State(s): State<AppState>,
    caller: Caller,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require(&[Scope::Admin, Scope::Readonly, Scope::Agent])?;
    let i = s.store.get_intervention(&id).await?;
    if !caller.may_act_for(i.record.get("agent_id").and_then(Value::as_str).unwrap_or("")) {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "Not found", format!("intervention `{id}` does not exist")));
    }
    Ok(Json(serde_json::to_value(i).unwrap_or_default()))
}

/// Agents seen in traffic, most recent first, with totals.
#[utoipa::path(get, path = "/api/v1/agents", tag = "agents", responses((status = 200)))]
pub async fn list_agents(State(s): State<AppState>, caller: Caller) -> Result<Json<Value>, ApiError> {
    caller.require(&[Scope::Admin, Scope::Readonly])?;
    Ok(Json(json!({"agents": s.store.list_agents().await?})))
}

/// One agent: totals, last seen, recent runs, and whether it is halted.
#[utoipa::path(get, path = "/api/v1/agents/{id}", tag = "agents", responses((status = 200), (status = 404)))]
pub async fn get_agent(
    State(s): State<AppState>,
    caller: Caller,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require(&[Scope::Admin, Scope::Readonly, Scope::Agent])?;
    caller.must_own(&format!("agent `{id}`"), &id)?;
    let (agent, runs) = s.store.get_agent(&id).await?;
    let halt = s.store.list_halts().await?.into_iter().find(|h| h.kind == "agent" && h.target == id);
    let mut v = serde_json::to_value(agent).unwrap_or_default();
    if let Value::Object(m) = &mut v {
        m.insert("runs".into(), serde_json::to_value(runs).unwrap_or_default());
        m.insert("halted".into(), serde_json::to_value(halt).unwrap_or_default());
    }
    Ok(Json(v))
}

/// Every SDK stream: its agent, the last sequence number received and how many lines are stored.
/// An uploader can resume from `last_seq` after losing its own offset.
#[utoipa::path(get, path = "/api/v1/ledger/streams", tag = "ingest", responses((status = 200)))]
pub async fn list_streams(State(s): State<AppState>, caller: Caller) -> Result<Json<Value>, ApiError> {
    caller.require(&[Scope::Admin, Scope::Readonly, Scope::Agent])?;
    let mut streams = s.store.list_streams().await?;
    if let Some(own) = &caller.0.agent_id {
        streams.retain(|x| x.agent_id == *own);
    }
    Ok(Json(json!({"streams": streams})))
}

/// Tamper findings (chain breaks, edits, gaps) from ingest.
#[utoipa::path(get, path = "/api/v1/findings", tag = "ingest", responses((status = 200)))]
pub async fn list_findings(State(s): State<AppState>, caller: Caller) -> Result<Json<Value>, ApiError> {
    caller.require(&[Scope::Admin, Scope::Readonly])?;
    Ok(Json(json!({"findings": s.store.tamper_findings(None).await?})))
}
