//! `Guard`: the engine plus the ledger and interventions log, for callers that run actions.
//!
//! `begin` decides and records; `finish` settles the reservation and writes the ledger entry
//! before it returns. Inputs and outputs pass through [`crate::redact::redact`] first.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use serde_json::Value;

use crate::decision::{ActionRequest, Decision, InterventionType, Verdict};
use crate::engine::Engine;
use crate::ledger::{Appended, ChainWriter, LedgerError, LogOptions, now_rfc3339};
use crate::money::Usd;
use crate::records::{
    ApprovalRecord, CallLine, DecisionRef, Intent, InterventionOutcome, InterventionRecord, LedgerEntry, LedgerLine,
    LinePayload, Payload, PayloadRef, assess_risk,
};
use crate::redact::{Redacted, redacted, write_member};

/// The ledger's directory: `AGENT_SENTINEL_HOME`, or `.agent-sentinel` in the working directory.
pub fn default_home() -> PathBuf {
    std::env::var_os("AGENT_SENTINEL_HOME").map_or_else(|| PathBuf::from(".agent-sentinel"), PathBuf::from)
}

pub const LEDGER_FILE: &str = "ledger.jsonl";
pub const INTERVENTIONS_FILE: &str = "interventions.jsonl";

/// What the ledger shows as a call's inputs: a value, redacted when it is written, or a call's
/// arguments already serialized and redacted by [`Inputs::of_call`] (so a caller that needs the
/// values for the decision too can move them there instead of copying them).
#[derive(Debug, Clone)]
pub enum Inputs {
    Value(Value),
    /// Kept as written (shrinking it to fit would copy it).
    Call(Vec<u8>),
}

impl From<Value> for Inputs {
    fn from(v: Value) -> Self {
        Inputs::Value(v)
    }
}

impl Inputs {
    /// `{"args": [...], "kwargs": {...}}`, serialized and redacted as [`Redacted`] would write that
    /// value (keyword arguments in key order, the last of a repeated key winning).
    pub fn of_call(args: &[Value], kwargs: &mut [(String, Value)]) -> Self {
        let mut out = Vec::with_capacity(64 + 16 * (args.len() + kwargs.len()));
        out.extend_from_slice(b"{\"args\":[");
        for (i, a) in args.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            if serde_json::to_writer(&mut out, &Redacted(a)).is_err() {
                out.extend_from_slice(b"null");
            }
        }
        out.extend_from_slice(b"],\"kwargs\":{");
        kwargs.sort_by(|a, b| a.0.cmp(&b.0));
        let mut first = true;
        for (i, (k, v)) in kwargs.iter().enumerate() {
            if kwargs.get(i + 1).is_some_and(|next| next.0 == *k) {
                continue;
            }
            if !first {
                out.push(b',');
            }
            first = false;
            let at = out.len();
            if write_member(&mut out, k, v).is_err() {
                out.truncate(at);
                out.extend_from_slice(b"\"\":null");
            }
        }
        out.extend_from_slice(b"}}");
        Inputs::Call(out)
    }

    /// As a value: parsed back (already redacted) for the rarer paths that need one.
    pub fn to_value(&self) -> Cow<'_, Value> {
        match self {
            Inputs::Value(v) => Cow::Borrowed(v),
            Inputs::Call(json) => Cow::Owned(serde_json::from_slice(json).unwrap_or(Value::Null)),
        }
    }
}

/// Inputs as a line is written from them: a value to redact, or JSON already redacted.
#[derive(Clone, Copy)]
enum InputsRef<'a> {
    Value(Redacted<'a>),
    Call(&'a [u8]),
}

impl<'a> From<&'a Inputs> for InputsRef<'a> {
    fn from(i: &'a Inputs) -> Self {
        match i {
            Inputs::Value(v) => InputsRef::Value(Redacted(v)),
            Inputs::Call(json) => InputsRef::Call(json),
        }
    }
}

impl<'a> From<Redacted<'a>> for InputsRef<'a> {
    fn from(r: Redacted<'a>) -> Self {
        InputsRef::Value(r)
    }
}

/// A ledger line's payload: the inputs either way, the outputs redacted as they are written.
struct CallPayload<'a> {
    inputs: InputsRef<'a>,
    outputs: &'a Value,
}

impl LinePayload for CallPayload<'_> {
    fn write_json(&self, out: &mut Vec<u8>) -> serde_json::Result<()> {
        match self.inputs {
            InputsRef::Value(inputs) => PayloadRef { inputs, outputs: Redacted(self.outputs) }.write_json(out),
            InputsRef::Call(json) => {
                out.extend_from_slice(b"{\"inputs\":");
                out.extend_from_slice(json);
                out.extend_from_slice(b",\"outputs\":");
                serde_json::to_writer(&mut *out, &Redacted(self.outputs))?;
                out.push(b'}');
                Ok(())
            }
        }
    }
}

/// A permitted call, holding its reservation until [`Guard::finish`].
#[derive(Debug)]
pub struct Permit {
    pub decision: Decision,
    request: CallParts,
    inputs: Inputs,
    started: Instant,
    approval: Option<ApprovalRecord>,
    intervention_id: Option<String>,
}

impl Permit {
    pub fn verdict(&self) -> Verdict {
        self.decision.verdict
    }
}

/// What a permit keeps of its request until the call is recorded. Shared strings, so a caller
/// that makes the same call often (a decorated function, one agent and run) can hand the same
/// ones in every time ([`Guard::begin_parts`]) instead of copying them per call.
#[derive(Debug, Clone)]
pub struct CallParts {
    pub action: Arc<str>,
    pub agent_id: Arc<str>,
    pub run_id: Arc<str>,
    pub session_id: Arc<str>,
    pub cost: f64,
    pub tags: Arc<[String]>,
}

impl CallParts {
    /// Copies of `r`'s parts.
    pub fn of(r: &ActionRequest<'_>) -> Self {
        CallParts {
            action: Arc::from(r.action),
            agent_id: Arc::from(r.agent_id),
            run_id: Arc::from(r.run_id),
            session_id: Arc::from(r.session_id),
            cost: if r.cost_usd.is_finite() { r.cost_usd } else { 0.0 },
            tags: Arc::from(r.tags),
        }
    }
}

/// The outcome of [`Guard::begin`].
#[derive(Debug)]
#[expect(clippy::large_enum_variant, reason = "a stopped call is the rarer, colder path")]
pub enum Begun {
    /// Run the action, then call [`Guard::finish`].
    Proceed(Box<Permit>),
    /// Do not run the action. For `RequireApproval`, ask a human, then call
    /// [`Guard::begin_approved`] or [`Guard::record_rejection`].
    Stop { decision: Decision, intervention_id: Option<String>, inputs: Inputs },
}

/// How the action ended.
#[derive(Debug, Clone)]
pub enum CallOutcome {
    Success(Value),
    /// The action raised; its cost is still incurred.
    Error(String),
}

/// The two logs of one directory: `ledger.jsonl` and `interventions.jsonl`. One per directory
/// and process; several guards (with different engines) may share it.
#[derive(Debug)]
pub struct Logs {
    ledger: ChainWriter,
    interventions: ChainWriter,
    home: PathBuf,
}

impl Logs {
    /// Opens (creating if needed) both logs in `home`, recovering torn last lines.
    pub fn open(home: &Path, opts: LogOptions) -> Result<Arc<Self>, LedgerError> {
        let ledger = ChainWriter::open(&home.join(LEDGER_FILE), opts.clone())?;
        let interventions = ChainWriter::open(&home.join(INTERVENTIONS_FILE), opts)?;
        Ok(Arc::new(Logs { ledger, interventions, home: home.to_path_buf() }))
    }

    pub fn home(&self) -> &Path {
        &self.home
    }

    pub fn ledger(&self) -> &ChainWriter {
        &self.ledger
    }

    pub fn interventions(&self) -> &ChainWriter {
        &self.interventions
    }

    /// Hands every entry appended so far, in both logs, to the OS.
    pub fn flush(&self) -> Result<(), LedgerError> {
        let a = self.ledger.flush();
        let b = self.interventions.flush();
        a.and(b)
    }
}

#[derive(Debug, Clone)]
pub struct Guard {
    engine: Arc<Engine>,
    logs: Arc<Logs>,
}

impl Guard {
    /// Opens (creating if needed) `ledger.jsonl` and `interventions.jsonl` in `home`.
    pub fn open(home: &Path, engine: Arc<Engine>, opts: LogOptions) -> Result<Self, LedgerError> {
        Self::with_logs(engine, Logs::open(home, opts)?)
    }

    /// A guard over logs that are already open (shared with other guards).
    pub fn with_logs(engine: Arc<Engine>, logs: Arc<Logs>) -> Result<Self, LedgerError> {
        let g = Guard { engine, logs };
        for w in [&g.logs.ledger, &g.logs.interventions] {
            // Each torn tail is recorded once, by the first guard over these logs.
            if w.recovery().torn_bytes > 0 && w.take_recovery_note() {
                g.record_recovery(w)?;
            }
        }
        Ok(g)
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    pub fn logs(&self) -> &Arc<Logs> {
        &self.logs
    }

    pub fn home(&self) -> &Path {
        &self.logs.home
    }

    pub fn ledger(&self) -> &ChainWriter {
        &self.logs.ledger
    }

    pub fn interventions(&self) -> &ChainWriter {
        &self.logs.interventions
    }

    /// Hands every entry appended so far, in both logs, to the OS.
    pub fn flush(&self) -> Result<(), LedgerError> {
        self.logs.flush()
    }

    fn record_recovery(&self, w: &ChainWriter) -> Result<(), LedgerError> {
        let r = w.recovery();
        let entry = LedgerEntry {
            id: uuid::Uuid::now_v7().to_string(),
            timestamp: now_rfc3339(),
            action: "sentinel.recovery".into(),
            cost_usd: 0.0,
            duration_ms: 0.0,
            outcome: "recovered".into(),
            tags: vec!["sentinel".into()],
            payload: Payload {
                inputs: serde_json::json!({
                    "file": w.path().display().to_string(),
                    "torn_bytes": r.torn_bytes,
                    "quarantine": r.quarantine.as_ref().map(|q| q.display().to_string()),
                }),
                outputs: Value::Null,
            },
            agent_id: String::new(),
            run_id: String::new(),
            session_id: String::new(),
            estimated_cost_usd: 0.0,
            decision: None,
            policy_version: self.engine.policy_version().to_string(),
            approval: None,
            intervention_id: None,
        };
        self.logs.ledger.append(&entry).map(|_| ())
    }

    /// Decides `req` and records any intervention. `inputs` are what the ledger shows as the call's
    /// inputs (redacted); pass a copy of `req.args` when there is nothing better. They are kept in the
    /// permit (or handed back in `Begun::Stop`), never copied.
    /// Fails (closed) before deciding when the ledger cannot be written: a call must not run
    /// unrecorded.
    pub fn begin(&self, req: &ActionRequest<'_>, inputs: impl Into<Inputs>) -> Result<Begun, LedgerError> {
        self.begin_parts(req, inputs.into(), CallParts::of(req))
    }

    /// [`Guard::begin`] with the request's parts already shared: `parts` must describe `req`.
    pub fn begin_parts(&self, req: &ActionRequest<'_>, inputs: Inputs, parts: CallParts) -> Result<Begun, LedgerError> {
        self.logs.ledger.check()?;
        let decision = self.engine.decide(req);
        self.after_decision(req, inputs, decision, None, parts)
    }

    /// Decides a call a human approved (every check but approval runs again) and records the approval.
    pub fn begin_approved(
        &self,
        req: &ActionRequest<'_>,
        inputs: impl Into<Inputs>,
        approval: ApprovalRecord,
        escalation_id: Option<&str>,
    ) -> Result<Begun, LedgerError> {
        let inputs = inputs.into();
        self.logs.ledger.check()?;
        let decision = self.engine.decide_approved(req);
        if decision.permits() {
            let rec = self.intervention(
                req,
                &inputs.to_value(),
                &decision,
                InterventionType::ApprovalRequired,
                InterventionOutcome::ApprovedAfterReview,
                false,
                Some(approval.clone()),
                escalation_id,
            );
            self.logs.interventions.append(&rec)?;
        }
        self.after_decision(req, inputs, decision, Some(approval), CallParts::of(req))
    }

    /// Records that a human rejected (or did not answer) an escalated call. Nothing is spent.
    pub fn record_rejection(
        &self,
        req: &ActionRequest<'_>,
        inputs: &Inputs,
        decision: &Decision,
        approval: ApprovalRecord,
        escalation_id: Option<&str>,
    ) -> Result<String, LedgerError> {
        let rec = self.intervention(
            req,
            &inputs.to_value(),
            decision,
            InterventionType::ApprovalRequired,
            InterventionOutcome::RejectedAfterReview,
            false,
            Some(approval.clone()),
            escalation_id,
        );
        self.logs.interventions.append(&rec)?;
        let r = CallParts::of(req);
        self.write_line(
            &r,
            inputs.into(),
            Some(decision),
            "rejected",
            0.0,
            0.0,
            &Value::Null,
            Some(&approval),
            Some(&rec.id),
        )?;
        Ok(rec.id)
    }

    fn after_decision(
        &self,
        req: &ActionRequest<'_>,
        inputs: Inputs,
        mut decision: Decision,
        approval: Option<ApprovalRecord>,
        parts: CallParts,
    ) -> Result<Begun, LedgerError> {
        for f in &decision.shadow {
            let mut rec = self.intervention(
                req,
                &inputs.to_value(),
                &decision,
                f.intervention.unwrap_or(InterventionType::Warning),
                InterventionOutcome::Warned,
                true,
                None,
                None,
            );
            rec.policy = Some(f.policy.to_string());
            rec.rule = f.rule.as_deref().map(str::to_string);
            rec.reason = f.reason;
            rec.rationale = f.message.to_string();
            rec.limit = f.limit.clone();
            rec.cost_prevented_usd = 0.0;
            self.logs.interventions.append(&rec)?;
        }
        match decision.verdict {
            Verdict::Allow => Ok(Begun::Proceed(Box::new(Permit {
                decision,
                request: parts,
                inputs,
                started: Instant::now(),
                approval,
                intervention_id: None,
            }))),
            Verdict::Warn => {
                let rec = self.intervention(
                    req,
                    &inputs.to_value(),
                    &decision,
                    decision.intervention.unwrap_or(InterventionType::Warning),
                    InterventionOutcome::Warned,
                    false,
                    None,
                    None,
                );
                if let Err(e) = self.logs.interventions.append(&rec) {
                    if let Some(r) = decision.take_reservation() {
                        r.release();
                    }
                    return Err(e);
                }
                Ok(Begun::Proceed(Box::new(Permit {
                    decision,
                    request: parts,
                    inputs,
                    started: Instant::now(),
                    approval,
                    intervention_id: Some(rec.id),
                })))
            }
            Verdict::Deny | Verdict::RequireApproval => {
                let escalate = decision.verdict == Verdict::RequireApproval;
                let rec = self.intervention(
                    req,
                    &inputs.to_value(),
                    &decision,
                    decision.intervention.unwrap_or(InterventionType::HardBlock),
                    if escalate { InterventionOutcome::Escalated } else { InterventionOutcome::Blocked },
                    false,
                    None,
                    None,
                );
                self.logs.interventions.append(&rec)?;
                let outcome = if escalate { "escalated" } else { "blocked" };
                self.write_line(
                    &parts,
                    (&inputs).into(),
                    Some(&decision),
                    outcome,
                    0.0,
                    0.0,
                    &Value::Null,
                    None,
                    Some(&rec.id),
                )?;
                Ok(Begun::Stop { decision, intervention_id: Some(rec.id), inputs })
            }
        }
    }

    /// Settles the reservation with the actual cost (the estimate when `None`) and writes the
    /// ledger entry. Returns once the entry is chained; it reaches the OS then or within the
    /// group-commit window (see `LogOptions::handoff`).
    pub fn finish(
        &self,
        mut permit: Permit,
        outcome: CallOutcome,
        actual_cost: Option<f64>,
    ) -> Result<Appended, LedgerError> {
        let duration_ms = permit.started.elapsed().as_secs_f64() * 1000.0;
        let estimate = Usd::from_f64(permit.request.cost).unwrap_or_default();
        let actual = actual_cost.and_then(|c| Usd::from_f64(c).ok()).unwrap_or(estimate);
        if let Some(r) = permit.decision.take_reservation() {
            r.settle(actual);
        }
        let (name, outputs) = match outcome {
            CallOutcome::Success(v) => ("success", v),
            CallOutcome::Error(msg) => ("error", Value::String(msg)),
        };
        // The caller serializes (and redacts) the payload, which needs the call's values; the
        // writer thread formats the rest of the line from what the permit owned.
        let Permit { decision: d, request, inputs, approval, intervention_id, .. } = permit;
        let line = CallLine {
            at: SystemTime::now(),
            parts: request,
            cost_usd: actual.as_f64(),
            duration_ms,
            outcome: name,
            verdict: d.verdict,
            reason: d.reason,
            intervention: d.intervention,
            message: d.message,
            policy: d.policy,
            rule: d.rule,
            limit: d.limit,
            retry_after_seconds: d.retry_after_seconds,
            policy_version: d.policy_version,
            approval,
            intervention_id,
        };
        self.logs
            .ledger
            .append_call(line, |out| CallPayload { inputs: (&inputs).into(), outputs: &outputs }.write_json(out))
    }

    /// The action never ran: release its reservation and record nothing as spent.
    pub fn abandon(&self, mut permit: Permit) {
        if let Some(r) = permit.decision.take_reservation() {
            r.release();
        }
    }

    /// Writes a ledger entry directly (the SDK's `Ledger.record`).
    #[expect(clippy::too_many_arguments, reason = "mirrors the SDK's keyword arguments")]
    pub fn record(
        &self,
        action: &str,
        inputs: &Value,
        outputs: &Value,
        cost_usd: f64,
        duration_ms: f64,
        outcome: &str,
        tags: &[String],
        ids: (&str, &str, &str),
    ) -> Result<Appended, LedgerError> {
        let cost = Usd::from_f64(cost_usd).map_err(|e| LedgerError::Serialize(format!("`cost_usd`: {e}")))?;
        let r = CallParts {
            action: Arc::from(action),
            agent_id: Arc::from(ids.0),
            run_id: Arc::from(ids.1),
            session_id: Arc::from(ids.2),
            cost: cost.as_f64(),
            tags: Arc::from(tags),
        };
        let duration_ms = if duration_ms.is_finite() && duration_ms >= 0.0 { duration_ms } else { 0.0 };
        self.write_line(
            &r,
            InputsRef::Value(Redacted(inputs)),
            None,
            outcome,
            cost.as_f64(),
            duration_ms,
            outputs,
            None,
            None,
        )
    }

    /// Writes one ledger line from borrowed parts; the payload is redacted as it is serialized.
    #[expect(clippy::too_many_arguments, reason = "internal record builder")]
    fn write_line(
        &self,
        r: &CallParts,
        inputs: InputsRef<'_>,
        d: Option<&Decision>,
        outcome: &str,
        cost: f64,
        duration_ms: f64,
        outputs: &Value,
        approval: Option<&ApprovalRecord>,
        intervention_id: Option<&str>,
    ) -> Result<Appended, LedgerError> {
        // One clock reading for the id and the timestamp.
        let now = std::time::SystemTime::now();
        let since = now.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let ts = uuid::Timestamp::from_unix(uuid::NoContext, since.as_secs(), since.subsec_nanos());
        let mut idbuf = uuid::Uuid::encode_buffer();
        let id = uuid::Uuid::new_v7(ts).hyphenated().encode_lower(&mut idbuf);
        let timestamp = crate::ledger::Rfc3339::at(now);
        let version = match d {
            Some(d) => Arc::clone(&d.policy_version),
            None => self.engine.policy_version(),
        };
        self.logs.ledger.append_line(&LedgerLine {
            id,
            timestamp: timestamp.as_str(),
            action: &r.action,
            cost_usd: cost,
            duration_ms,
            outcome,
            tags: &r.tags,
            payload: CallPayload { inputs, outputs },
            agent_id: &r.agent_id,
            run_id: &r.run_id,
            session_id: &r.session_id,
            estimated_cost_usd: r.cost,
            decision: d.map(DecisionRef::from),
            policy_version: &version,
            approval,
            intervention_id,
        })
    }

    #[expect(clippy::too_many_arguments, reason = "internal record builder")]
    fn intervention(
        &self,
        req: &ActionRequest<'_>,
        inputs: &Value,
        d: &Decision,
        kind: InterventionType,
        outcome: InterventionOutcome,
        shadow: bool,
        approval: Option<ApprovalRecord>,
        related: Option<&str>,
    ) -> InterventionRecord {
        let est = if req.cost_usd.is_finite() && req.cost_usd >= 0.0 { req.cost_usd } else { 0.0 };
        let prevented = matches!(outcome, InterventionOutcome::Blocked | InterventionOutcome::RejectedAfterReview);
        InterventionRecord {
            id: uuid::Uuid::now_v7().to_string(),
            timestamp: now_rfc3339(),
            kind,
            outcome,
            risk_level: assess_risk(req.risk, kind, req.action, req.tags),
            blast_radius: req.blast_radius.map(str::to_string),
            action: req.action.to_string(),
            agent_id: req.agent_id.to_string(),
            run_id: req.run_id.to_string(),
            session_id: req.session_id.to_string(),
            estimated_cost_usd: est,
            actual_cost_usd: None,
            cost_prevented_usd: if prevented { est } else { 0.0 },
            policy: d.policy.as_deref().map(str::to_string),
            rule: d.rule.as_deref().map(str::to_string),
            reason: d.reason,
            rationale: d.message.to_string(),
            limit: d.limit.clone(),
            retry_after_seconds: d.retry_after_seconds,
            intent: Intent {
                action: req.action.to_string(),
                inputs: redacted(inputs),
                description: req.description.map(str::to_string),
                intent: req.intent.map(str::to_string),
            },
            tags: req.tags.to_vec(),
            policy_version: d.policy_version.to_string(),
            shadow,
            approval,
            related_intervention_id: related.map(str::to_string),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    /// What `Inputs::Value` of the same call writes, the reference for `Inputs::of_call`.
    fn by_value(args: &[Value], kwargs: &[(String, Value)]) -> Vec<u8> {
        let kw: serde_json::Map<String, Value> = kwargs.iter().cloned().collect();
        serde_json::to_vec(&Redacted(&json!({"args": args, "kwargs": kw}))).unwrap_or_default()
    }

    fn of_call(args: &[Value], kwargs: &[(String, Value)]) -> Vec<u8> {
        match Inputs::of_call(args, &mut kwargs.to_vec()) {
            Inputs::Call(json) => json,
            Inputs::Value(_) => Vec::new(),
        }
    }

    #[test]
    fn call_inputs_are_written_as_the_value_would_be() {
        let args = [json!("sk-live-abcdefghijklmnopqrst"), json!(1.5), json!({"password": "p", "n": [1, null]})];
        let kwargs = [
            ("zeta".to_string(), json!("a  b   c  d  e  f  g  h")),
            ("api_key".to_string(), json!({"nested": "x"})),
            ("alpha".to_string(), json!(null)),
            ("zeta".to_string(), json!("the last of a repeated key wins")),
            ("ñame".to_string(), json!("ü \u{1} \"q\"")),
        ];
        assert_eq!(
            String::from_utf8_lossy(&of_call(&args, &kwargs)),
            String::from_utf8_lossy(&by_value(&args, &kwargs))
        );
        assert_eq!(of_call(&[], &[]), b"{\"args\":[],\"kwargs\":{}}");
        let parsed = Inputs::of_call(&args, &mut kwargs.to_vec()).to_value().into_owned();
        assert_eq!(parsed["kwargs"]["api_key"]["nested"], "[REDACTED]");
    }

    fn leaf() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            "[a-zA-Z_ -]{0,24}".prop_map(Value::String),
            prop_oneof![Just("sk-live-0123456789abcdef"), Just("Bearer abcdefghijklmnop"), Just("x://u:p@h")]
                .prop_map(|s| Value::String(s.to_string())),
        ]
    }

    fn value() -> impl Strategy<Value = Value> {
        leaf().prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::vec(("[a-zA-Z_]{1,12}", inner), 0..4)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn any_call_is_written_as_its_value_would_be(
            args in prop::collection::vec(value(), 0..4),
            kwargs in prop::collection::vec((prop_oneof![Just("token".to_string()), Just("apiKey".to_string()), "[a-z_]{1,10}"], value()), 0..5),
        ) {
            prop_assert_eq!(of_call(&args, &kwargs), by_value(&args, &kwargs));
        }
    }
}
