//! What the CLI shows: decision explanations, ledger statistics, and policy simulations.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;

use serde::Serialize;
use serde_json::Value;

use crate::clock::ManualClock;
use crate::compile::PolicySet;
use crate::decision::{ActionRequest, Decision, LimitKind, Verdict};
use crate::engine::Engine;
use crate::ledger::{LedgerError, read_all};
use crate::model::{Mode, PolicyDoc, Scope};
use crate::money::Usd;
use crate::records::{InterventionRecord, LedgerEntry};

/// A decision and its rationale, as text a person reads.
pub fn explain(d: &Decision, set: &PolicySet, req: &ActionRequest<'_>) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "verdict:        {}", d.verdict.as_str());
    let _ = writeln!(
        s,
        "reason:         {}{}",
        d.reason.as_str(),
        d.intervention.map(|i| format!(" ({})", i.as_str())).unwrap_or_default()
    );
    let _ = writeln!(s, "message:        {}", d.message);
    if let Some(p) = &d.policy {
        let _ = writeln!(s, "policy:         {p}");
    }
    if let Some(r) = &d.rule {
        let _ = writeln!(s, "rule:           {r}");
    }
    if let Some(l) = &d.limit {
        let _ = writeln!(s, "limit:          {}", describe_limit(l));
    }
    if let Some(r) = d.retry_after_seconds {
        let _ = writeln!(s, "retry after:    {r:.3}s");
    }
    if let Some(a) = &d.approval {
        let timeout = a.timeout_seconds.map_or_else(|| "none".to_string(), |t| format!("{t}s"));
        let approvers = if a.approvers.is_empty() { "any approver".to_string() } else { a.approvers.join(", ") };
        let _ = writeln!(s, "approval:       timeout {timeout}; approvers {approvers}");
    }
    for f in &d.shadow {
        let _ = writeln!(
            s,
            "shadow:         policy `{}` would {}: {} ({})",
            f.policy,
            f.verdict.as_str(),
            f.message,
            f.reason.as_str()
        );
    }
    let applicable: Vec<String> = set
        .docs()
        .iter()
        .filter(|p| p.enabled && applies(p, req))
        .map(|p| {
            format!(
                "{} ({}, {})",
                p.name.as_deref().unwrap_or("?"),
                scope_label(p),
                if p.mode == Some(Mode::Shadow) { "shadow" } else { "enforce" }
            )
        })
        .collect();
    let _ = writeln!(
        s,
        "applicable:     {}",
        if applicable.is_empty() { "none".to_string() } else { applicable.join(", ") }
    );
    let _ = writeln!(s, "policy version: {}", d.policy_version);
    s
}

fn applies(p: &PolicyDoc, req: &ActionRequest<'_>) -> bool {
    match p.scope {
        Scope::Global => true,
        Scope::Agent => p.agent_id.as_deref() == Some(req.agent_id),
        Scope::Run => p.run_id.as_deref() == Some(req.run_id),
    }
}

fn scope_label(p: &PolicyDoc) -> String {
    match p.scope {
        Scope::Global => "global".into(),
        Scope::Agent => format!("agent `{}`", p.agent_id.as_deref().unwrap_or_default()),
        Scope::Run => format!("run `{}`", p.run_id.as_deref().unwrap_or_default()),
    }
}

fn usd(x: f64) -> String {
    Usd::from_f64(x).map(|u| u.to_string()).unwrap_or_else(|_| format!("{x}"))
}

pub fn describe_limit(l: &crate::decision::Limit) -> String {
    match l.kind {
        LimitKind::ActionBudget | LimitKind::RunBudget | LimitKind::SessionBudget => format!(
            "{}: limit {}, spent {}, this call {}",
            kind_name(l.kind),
            usd(l.limit),
            usd(l.used),
            usd(l.requested)
        ),
        LimitKind::RateLimit | LimitKind::Loop => format!(
            "{}: {} calls per {}s, {} in the current window",
            kind_name(l.kind),
            l.limit,
            l.window_seconds.unwrap_or_default(),
            l.used
        ),
        LimitKind::ApprovalCostThreshold => {
            format!("approval threshold {}, this call {}", usd(l.limit), usd(l.requested))
        }
        LimitKind::Anomaly => format!(
            "anomaly on `{}`: value {}, z-score {:.2} over threshold {}",
            l.field.as_deref().unwrap_or("?"),
            l.requested,
            l.used,
            l.limit
        ),
    }
}

fn kind_name(k: LimitKind) -> &'static str {
    match k {
        LimitKind::ActionBudget => "action budget",
        LimitKind::RunBudget => "run budget",
        LimitKind::SessionBudget => "session budget",
        LimitKind::RateLimit => "rate limit",
        LimitKind::Loop => "loop limit",
        LimitKind::ApprovalCostThreshold => "approval threshold",
        LimitKind::Anomaly => "anomaly",
    }
}

/// Totals over a ledger and its interventions log.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct LedgerStats {
    pub entries: u64,
    /// Calls that ran (`success` or `error`).
    pub calls: u64,
    pub by_outcome: BTreeMap<String, u64>,
    pub total_cost_usd: f64,
    pub by_action: BTreeMap<String, ActionStats>,
    pub interventions: u64,
    pub interventions_by_type: BTreeMap<String, u64>,
    pub interventions_by_outcome: BTreeMap<String, u64>,
    pub cost_prevented_usd: f64,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct ActionStats {
    pub calls: u64,
    pub cost_usd: f64,
    pub blocked: u64,
}

pub fn ledger_stats(ledger: &Path, interventions: Option<&Path>) -> Result<LedgerStats, LedgerError> {
    let mut st = LedgerStats::default();
    let mut total = Usd::ZERO;
    let mut per_action: BTreeMap<String, (u64, Usd, u64)> = BTreeMap::new();
    for v in read_all(ledger)? {
        st.entries += 1;
        let outcome = v.get("outcome").and_then(Value::as_str).unwrap_or("unknown").to_string();
        let action = v.get("action").and_then(Value::as_str).unwrap_or("?").to_string();
        let cost = v.get("cost_usd").and_then(Value::as_f64).and_then(|c| Usd::from_f64(c).ok()).unwrap_or_default();
        let ran = outcome == "success" || outcome == "error";
        let a = per_action.entry(action).or_default();
        if ran {
            st.calls += 1;
            total = total.saturating_add(cost);
            a.0 += 1;
            a.1 = a.1.saturating_add(cost);
        } else if outcome == "blocked" || outcome == "rejected" {
            a.2 += 1;
        }
        *st.by_outcome.entry(outcome).or_default() += 1;
    }
    st.total_cost_usd = total.as_f64();
    st.by_action = per_action
        .into_iter()
        .map(|(k, (calls, cost, blocked))| (k, ActionStats { calls, cost_usd: cost.as_f64(), blocked }))
        .collect();
    if let Some(ip) = interventions.filter(|p| p.exists()) {
        let mut prevented = Usd::ZERO;
        for v in read_all(ip)? {
            let Ok(rec) = serde_json::from_value::<InterventionRecord>(v) else {
                continue;
            };
            st.interventions += 1;
            *st.interventions_by_type.entry(rec.kind.as_str().to_string()).or_default() += 1;
            *st.interventions_by_outcome.entry(rec.outcome.as_str().to_string()).or_default() += 1;
            prevented = prevented.saturating_add(Usd::from_f64(rec.cost_prevented_usd).unwrap_or_default());
        }
        st.cost_prevented_usd = prevented.as_f64();
    }
    Ok(st)
}

/// One recorded call whose verdict would change under the candidate policy.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Change {
    pub line: u64,
    pub timestamp: String,
    pub action: String,
    pub agent_id: String,
    pub run_id: String,
    pub recorded: Verdict,
    pub simulated: Verdict,
    pub reason: String,
    pub message: String,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Simulation {
    pub policy_version: String,
    pub replayed: u64,
    pub unchanged: u64,
    /// Entries that are not calls (recoveries, manual records without a decision).
    pub skipped: u64,
    /// `recorded -> simulated` counts.
    pub transitions: BTreeMap<String, u64>,
    pub changes: Vec<Change>,
}

/// Replays a ledger's calls, in order and at their recorded times, against a candidate policy set.
/// Counters start empty and only calls the candidate allows consume budget and slots.
pub fn simulate(set: PolicySet, ledger: &Path) -> Result<Simulation, LedgerError> {
    let clock = Arc::new(ManualClock::new(0));
    let engine = Engine::with_clock(set, clock.clone());
    let mut sim = Simulation { policy_version: engine.policy_version().to_string(), ..Default::default() };
    for (i, v) in read_all(ledger)?.into_iter().enumerate() {
        let Ok(e) = serde_json::from_value::<LedgerEntry>(v) else {
            sim.skipped += 1;
            continue;
        };
        let recorded = match (&e.decision, e.outcome.as_str()) {
            (Some(d), _) => d.verdict,
            (None, "success" | "error") => Verdict::Allow,
            _ => {
                sim.skipped += 1;
                continue;
            }
        };
        // A call that was approved later appears twice: escalated, then executed. Replay the execution.
        if e.outcome == "escalated" || e.outcome == "rejected" {
            if e.outcome == "rejected" {
                sim.skipped += 1;
            } else {
                replay_one(&engine, &clock, &e, i, recorded, false, &mut sim);
            }
            continue;
        }
        replay_one(&engine, &clock, &e, i, recorded, e.approval.as_ref().is_some_and(|a| a.approved), &mut sim);
    }
    Ok(sim)
}

fn replay_one(
    engine: &Engine,
    clock: &ManualClock,
    e: &LedgerEntry,
    i: usize,
    recorded: Verdict,
    approved: bool,
    sim: &mut Simulation,
) {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(&e.timestamp) {
        clock.set_nanos(u64::try_from(t.timestamp_nanos_opt().unwrap_or(0)).unwrap_or(0));
    }
    let args = call_args(&e.payload.inputs);
    let estimate = if e.estimated_cost_usd > 0.0 { e.estimated_cost_usd } else { e.cost_usd };
    let req = ActionRequest::new(&e.action)
        .agent(&e.agent_id)
        .run(&e.run_id)
        .session(&e.session_id)
        .cost(estimate)
        .args(&args)
        .tags(&e.tags);
    let mut d = if approved { engine.decide_approved(&req) } else { engine.decide(&req) };
    if let Some(r) = d.take_reservation() {
        let ran = e.outcome == "success" || e.outcome == "error";
        r.settle(Usd::from_f64(if ran { e.cost_usd } else { estimate }).unwrap_or_default());
    }
    sim.replayed += 1;
    let key = format!("{} -> {}", recorded.as_str(), d.verdict.as_str());
    *sim.transitions.entry(key).or_default() += 1;
    if d.verdict == recorded {
        sim.unchanged += 1;
    } else {
        sim.changes.push(Change {
            line: i as u64 + 1,
            timestamp: e.timestamp.clone(),
            action: e.action.clone(),
            agent_id: e.agent_id.clone(),
            run_id: e.run_id.clone(),
            recorded,
            simulated: d.verdict,
            reason: d.reason.as_str().to_string(),
            message: d.message.to_string(),
        });
    }
}

/// The SDK records inputs as `{"args": [...], "kwargs": {...}}`; decisions see the keyword arguments.
fn call_args(inputs: &Value) -> Value {
    match inputs {
        Value::Object(m) if m.len() == 2 && m.contains_key("args") && m.contains_key("kwargs") => {
            m.get("kwargs").cloned().filter(Value::is_object).unwrap_or(Value::Null)
        }
        Value::Object(_) => inputs.clone(),
        _ => Value::Null,
    }
}
