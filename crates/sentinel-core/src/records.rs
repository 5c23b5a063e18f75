//! What the ledger and the interventions log hold, line by line.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::decision::{Decision, InterventionType, Limit, ReasonCode, RiskLevel, Verdict};
use crate::redact::Redacted;

/// One decided (and possibly executed) call. The SDK's fields first, then ours.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LedgerEntry {
    pub id: String,
    pub timestamp: String,
    pub action: String,
    pub cost_usd: f64,
    pub duration_ms: f64,
    /// `success`, `error`, `blocked`, `escalated`, `rejected` or `recovered`.
    pub outcome: String,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub payload: Payload,
    #[serde(default)]
    pub agent_id: String,
    #[serde(default)]
    pub run_id: String,
    #[serde(default)]
    pub session_id: String,
    /// The estimate the decision was made with (the actual cost is `cost_usd`).
    #[serde(default)]
    pub estimated_cost_usd: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<DecisionRecord>,
    #[serde(default)]
    pub policy_version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<ApprovalRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intervention_id: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Payload {
    #[serde(default)]
    pub inputs: Value,
    #[serde(default)]
    pub outputs: Value,
}

/// A ledger line as written: borrows everything, and redacts the payload while serializing.
/// Field for field the same as [`LedgerEntry`], which is how lines are read back. The payload is
/// the call's values ([`PayloadRef`]), or their JSON already written ([`RawPayload`]).
#[derive(Debug, Serialize)]
pub struct LedgerLine<'a, P = PayloadRef<'a>> {
    pub id: &'a str,
    pub timestamp: &'a str,
    pub action: &'a str,
    pub cost_usd: f64,
    pub duration_ms: f64,
    pub outcome: &'a str,
    pub tags: &'a [String],
    pub payload: P,
    pub agent_id: &'a str,
    pub run_id: &'a str,
    pub session_id: &'a str,
    pub estimated_cost_usd: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decision: Option<DecisionRef<'a>>,
    pub policy_version: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approval: Option<&'a ApprovalRecord>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub intervention_id: Option<&'a str>,
}

/// How a line's payload object (`{"inputs":…,"outputs":…}`) gets into the line.
pub trait LinePayload {
    fn write_json(&self, out: &mut Vec<u8>) -> serde_json::Result<()>;
}

impl LinePayload for PayloadRef<'_> {
    fn write_json(&self, out: &mut Vec<u8>) -> serde_json::Result<()> {
        out.extend_from_slice(b"{\"inputs\":");
        serde_json::to_writer(&mut *out, &self.inputs)?;
        out.extend_from_slice(b",\"outputs\":");
        serde_json::to_writer(&mut *out, &self.outputs)?;
        out.push(b'}');
        Ok(())
    }
}

/// A payload object already serialized (and redacted) by [`PayloadRef`].
#[derive(Debug)]
pub struct RawPayload<'a>(pub &'a [u8]);

impl LinePayload for RawPayload<'_> {
    fn write_json(&self, out: &mut Vec<u8>) -> serde_json::Result<()> {
        out.extend_from_slice(self.0);
        Ok(())
    }
}

impl<P: LinePayload> LedgerLine<'_, P> {
    /// Writes the line's JSON object, byte for byte what `serde_json` writes for it, without
    /// serde's generic machinery for the fixed fields: this runs once per guarded call, on the
    /// caller's thread. The payload still goes through [`Redacted`].
    pub fn write_json(&self, out: &mut Vec<u8>) -> serde_json::Result<()> {
        out.extend_from_slice(b"{\"id\":");
        json_str(out, self.id)?;
        out.extend_from_slice(b",\"timestamp\":");
        json_str(out, self.timestamp)?;
        out.extend_from_slice(b",\"action\":");
        json_str(out, self.action)?;
        out.extend_from_slice(b",\"cost_usd\":");
        serde_json::to_writer(&mut *out, &self.cost_usd)?;
        out.extend_from_slice(b",\"duration_ms\":");
        serde_json::to_writer(&mut *out, &self.duration_ms)?;
        out.extend_from_slice(b",\"outcome\":");
        json_str(out, self.outcome)?;
        out.extend_from_slice(b",\"tags\":[");
        for (i, t) in self.tags.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            json_str(out, t)?;
        }
        out.extend_from_slice(b"],\"payload\":");
        self.payload.write_json(out)?;
        out.extend_from_slice(b",\"agent_id\":");
        json_str(out, self.agent_id)?;
        out.extend_from_slice(b",\"run_id\":");
        json_str(out, self.run_id)?;
        out.extend_from_slice(b",\"session_id\":");
        json_str(out, self.session_id)?;
        out.extend_from_slice(b",\"estimated_cost_usd\":");
        serde_json::to_writer(&mut *out, &self.estimated_cost_usd)?;
        if let Some(d) = &self.decision {
            out.extend_from_slice(b",\"decision\":{\"verdict\":\"");
            out.extend_from_slice(d.verdict.as_str().as_bytes());
            out.extend_from_slice(b"\",\"reason\":\"");
            out.extend_from_slice(d.reason.as_str().as_bytes());
            out.push(b'"');
            if let Some(i) = d.intervention {
                out.extend_from_slice(b",\"intervention\":\"");
                out.extend_from_slice(i.as_str().as_bytes());
                out.push(b'"');
            }
            out.extend_from_slice(b",\"message\":");
            json_str(out, d.message)?;
            if let Some(p) = d.policy {
                out.extend_from_slice(b",\"policy\":");
                json_str(out, p)?;
            }
            if let Some(r) = d.rule {
                out.extend_from_slice(b",\"rule\":");
                json_str(out, r)?;
            }
            if let Some(l) = d.limit {
                out.extend_from_slice(b",\"limit\":");
                serde_json::to_writer(&mut *out, l)?;
            }
            if let Some(r) = d.retry_after_seconds {
                out.extend_from_slice(b",\"retry_after_seconds\":");
                serde_json::to_writer(&mut *out, &r)?;
            }
            out.push(b'}');
        }
        out.extend_from_slice(b",\"policy_version\":");
        json_str(out, self.policy_version)?;
        if let Some(a) = self.approval {
            out.extend_from_slice(b",\"approval\":");
            serde_json::to_writer(&mut *out, a)?;
        }
        if let Some(i) = self.intervention_id {
            out.extend_from_slice(b",\"intervention_id\":");
            json_str(out, i)?;
        }
        out.push(b'}');
        Ok(())
    }
}

/// A finished call's ledger line, owning everything but its payload, so the log's writer thread
/// can format it: the caller serializes only the payload (the part that needs the call's values
/// and redaction) and hands this over. The id is made and the timestamp formatted when the line
/// is written, from when the call finished (`at`).
#[derive(Debug)]
pub struct CallLine {
    pub at: std::time::SystemTime,
    pub parts: crate::guard::CallParts,
    pub cost_usd: f64,
    pub duration_ms: f64,
    pub outcome: &'static str,
    pub verdict: Verdict,
    pub reason: ReasonCode,
    pub intervention: Option<InterventionType>,
    pub message: std::borrow::Cow<'static, str>,
    pub policy: Option<std::sync::Arc<str>>,
    pub rule: Option<std::sync::Arc<str>>,
    pub limit: Option<Limit>,
    pub retry_after_seconds: Option<f64>,
    pub policy_version: std::sync::Arc<str>,
    pub approval: Option<ApprovalRecord>,
    pub intervention_id: Option<String>,
}

impl CallLine {
    /// The whole line's JSON object around `payload` (what [`PayloadRef`] wrote).
    pub fn write_json(&self, payload: &[u8], out: &mut Vec<u8>) -> serde_json::Result<()> {
        let since = self.at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let ts = uuid::Timestamp::from_unix(uuid::NoContext, since.as_secs(), since.subsec_nanos());
        let mut idbuf = uuid::Uuid::encode_buffer();
        let id = uuid::Uuid::new_v7(ts).hyphenated().encode_lower(&mut idbuf);
        let timestamp = crate::ledger::Rfc3339::at(self.at);
        let p = &self.parts;
        LedgerLine {
            id,
            timestamp: timestamp.as_str(),
            action: &p.action,
            cost_usd: self.cost_usd,
            duration_ms: self.duration_ms,
            outcome: self.outcome,
            tags: &p.tags,
            payload: RawPayload(payload),
            agent_id: &p.agent_id,
            run_id: &p.run_id,
            session_id: &p.session_id,
            estimated_cost_usd: p.cost,
            decision: Some(DecisionRef {
                verdict: self.verdict,
                reason: self.reason,
                intervention: self.intervention,
                message: &self.message,
                policy: self.policy.as_deref(),
                rule: self.rule.as_deref(),
                limit: self.limit.as_ref(),
                retry_after_seconds: self.retry_after_seconds,
            }),
            policy_version: &self.policy_version,
            approval: self.approval.as_ref(),
            intervention_id: self.intervention_id.as_deref(),
        }
        .write_json(out)
    }
}

/// A JSON string: copied as is when nothing in it needs escaping (the common case), else
/// escaped by `serde_json`.
fn json_str(out: &mut Vec<u8>, s: &str) -> serde_json::Result<()> {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
        Ok(())
    } else {
        serde_json::to_writer(out, s)
    }
}

#[derive(Debug, Serialize)]
pub struct PayloadRef<'a> {
    pub inputs: Redacted<'a>,
    pub outputs: Redacted<'a>,
}

/// [`DecisionRecord`], borrowed from a [`Decision`].
#[derive(Debug, Serialize)]
pub struct DecisionRef<'a> {
    pub verdict: Verdict,
    pub reason: ReasonCode,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub intervention: Option<InterventionType>,
    pub message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<&'a Limit>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_seconds: Option<f64>,
}

impl<'a> From<&'a Decision> for DecisionRef<'a> {
    fn from(d: &'a Decision) -> Self {
        DecisionRef {
            verdict: d.verdict,
            reason: d.reason,
            intervention: d.intervention,
            message: &d.message,
            policy: d.policy.as_deref(),
            rule: d.rule.as_deref(),
            limit: d.limit.as_ref(),
            retry_after_seconds: d.retry_after_seconds,
        }
    }
}

/// The parts of a [`Decision`] worth keeping.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecisionRecord {
    pub verdict: Verdict,
    pub reason: ReasonCode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intervention: Option<InterventionType>,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<Limit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_seconds: Option<f64>,
}

impl From<&Decision> for DecisionRecord {
    fn from(d: &Decision) -> Self {
        DecisionRecord {
            verdict: d.verdict,
            reason: d.reason,
            intervention: d.intervention,
            message: d.message.to_string(),
            policy: d.policy.as_deref().map(str::to_string),
            rule: d.rule.as_deref().map(str::to_string),
            limit: d.limit.clone(),
            retry_after_seconds: d.retry_after_seconds,
        }
    }
}

/// A human's decision on an escalated call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApprovalRecord {
    pub approved: bool,
    pub approver: String,
    #[serde(default)]
    pub reason: String,
    pub decided_at: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum InterventionOutcome {
    Blocked,
    Escalated,
    ApprovedAfterReview,
    RejectedAfterReview,
    Modified,
    Warned,
}

impl InterventionOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            InterventionOutcome::Blocked => "BLOCKED",
            InterventionOutcome::Escalated => "ESCALATED",
            InterventionOutcome::ApprovedAfterReview => "APPROVED_AFTER_REVIEW",
            InterventionOutcome::RejectedAfterReview => "REJECTED_AFTER_REVIEW",
            InterventionOutcome::Modified => "MODIFIED",
            InterventionOutcome::Warned => "WARNED",
        }
    }
}

/// What the agent was trying to do.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Intent {
    pub action: String,
    #[serde(default)]
    pub inputs: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intent: Option<String>,
}

/// A record of the policy engine stepping in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InterventionRecord {
    pub id: String,
    pub timestamp: String,
    #[serde(rename = "type")]
    pub kind: InterventionType,
    pub outcome: InterventionOutcome,
    pub risk_level: RiskLevel,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blast_radius: Option<String>,
    pub action: String,
    pub agent_id: String,
    pub run_id: String,
    pub session_id: String,
    pub estimated_cost_usd: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actual_cost_usd: Option<f64>,
    pub cost_prevented_usd: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    pub reason: ReasonCode,
    pub rationale: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<Limit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_seconds: Option<f64>,
    pub intent: Intent,
    #[serde(default)]
    pub tags: Vec<String>,
    pub policy_version: String,
    /// Recorded by a `mode: shadow` policy: what it would have done; the call was not stopped by it.
    #[serde(default)]
    pub shadow: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<ApprovalRecord>,
    /// For a decided approval: the escalation it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub related_intervention_id: Option<String>,
}

const DANGEROUS_WORDS: &[&str] = &[
    "delete",
    "drop",
    "destroy",
    "truncate",
    "wipe",
    "rm",
    "remove",
    "purge",
    "kill",
    "terminate",
    "shutdown",
    "format",
    "transfer",
    "wire",
    "pay",
    "payment",
    "refund",
    "withdraw",
    "send",
    "email",
    "publish",
    "deploy",
    "exec",
    "execute",
    "shell",
    "sudo",
    "grant",
    "revoke",
];

/// The risk of an intervention: the caller's own assessment when given, otherwise judged from
/// the intervention type, tags, and whole words of the action name (never substrings).
pub fn assess_risk(given: Option<RiskLevel>, kind: InterventionType, action: &str, tags: &[String]) -> RiskLevel {
    if let Some(r) = given {
        return r;
    }
    let tagged = |w: &str| tags.iter().any(|t| t.eq_ignore_ascii_case(w));
    if tagged("critical") || tagged("destructive") || tagged("dangerous") {
        return RiskLevel::Critical;
    }
    let dangerous = action
        .split(|c: char| !c.is_ascii_alphanumeric())
        .any(|w| DANGEROUS_WORDS.iter().any(|d| w.eq_ignore_ascii_case(d)));
    match kind {
        InterventionType::Halted => RiskLevel::High,
        InterventionType::HardBlock if dangerous => RiskLevel::Critical,
        InterventionType::HardBlock => RiskLevel::High,
        InterventionType::ApprovalRequired if dangerous => RiskLevel::High,
        InterventionType::ApprovalRequired | InterventionType::BudgetExceeded => RiskLevel::Medium,
        InterventionType::RateLimited | InterventionType::Downgrade | InterventionType::Warning => {
            if dangerous {
                RiskLevel::Medium
            } else {
                RiskLevel::Low
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;
    use crate::decision::LimitKind;
    use serde_json::json;

    fn both(line: &LedgerLine<'_>) -> (String, String) {
        let mut ours = Vec::new();
        line.write_json(&mut ours).unwrap();
        (String::from_utf8(ours).unwrap(), serde_json::to_string(line).unwrap())
    }

    /// The hand-written serializer writes what serde writes, for every optional part, escape and
    /// enum name, so ledgers read back the same whichever wrote them.
    #[test]
    fn ledger_lines_serialize_exactly_like_serde() {
        let inputs =
            json!({"args": ["q\n\"x\"", 1.5], "kwargs": {"api_key": "sk-abcdefghijklmnopqrstuv", "é": [true, null]}});
        let outputs = json!({"ok": f64::MAX});
        let tags = vec!["a\\b".to_string(), "ünï".to_string(), String::new()];
        let limit = Limit {
            kind: LimitKind::RateLimit,
            limit: 10.0,
            used: 10.0,
            requested: 1.0,
            window_seconds: Some(60.0),
            field: None,
        };
        let approval = ApprovalRecord {
            approved: true,
            approver: "alice\t(ops)".into(),
            reason: "ok".into(),
            decided_at: "t".into(),
        };
        let verdicts = [Verdict::Allow, Verdict::Warn, Verdict::Deny, Verdict::RequireApproval];
        let reasons = [
            ReasonCode::Allowed,
            ReasonCode::Halted,
            ReasonCode::DeniedAction,
            ReasonCode::NotAllowlisted,
            ReasonCode::RuleBlock,
            ReasonCode::RuleWarn,
            ReasonCode::RuleApproval,
            ReasonCode::DefaultBlock,
            ReasonCode::RateLimited,
            ReasonCode::LoopDetected,
            ReasonCode::ActionBudgetExceeded,
            ReasonCode::RunBudgetExceeded,
            ReasonCode::SessionBudgetExceeded,
            ReasonCode::ApprovalRequired,
            ReasonCode::ApprovalCostThreshold,
            ReasonCode::AnomalyDetected,
            ReasonCode::InvalidRequest,
            ReasonCode::InternalError,
        ];
        let kinds = [
            None,
            Some(InterventionType::HardBlock),
            Some(InterventionType::ApprovalRequired),
            Some(InterventionType::RateLimited),
            Some(InterventionType::BudgetExceeded),
            Some(InterventionType::Downgrade),
            Some(InterventionType::Warning),
            Some(InterventionType::Halted),
        ];
        let mut checked = 0;
        for (i, reason) in reasons.iter().enumerate() {
            let full = i % 2 == 0;
            let decision = DecisionRef {
                verdict: verdicts[i % verdicts.len()],
                reason: *reason,
                intervention: kinds[i % kinds.len()],
                message: if full { "limit \"reached\"\u{1}" } else { "allowed" },
                policy: full.then_some("prod/ü"),
                rule: full.then_some("r1"),
                limit: full.then_some(&limit),
                retry_after_seconds: full.then_some(12.25),
            };
            let line = LedgerLine {
                id: "0196-id",
                timestamp: "2026-12-02T18:01:02.063568Z",
                action: if full { "tool\u{7f}/x" } else { "tool" },
                cost_usd: if full { f64::NAN } else { 1e-6 },
                duration_ms: 0.008442,
                outcome: "success",
                tags: if full { &tags } else { &[] },
                payload: PayloadRef { inputs: Redacted(&inputs), outputs: Redacted(&outputs) },
                agent_id: "agent",
                run_id: "run\r",
                session_id: "",
                estimated_cost_usd: 123456789.125,
                decision: (i != 3).then_some(decision),
                policy_version: "4f53cda18c2baa0c",
                approval: full.then_some(&approval),
                intervention_id: full.then_some("iv-1"),
            };
            let (ours, serde) = both(&line);
            assert_eq!(ours, serde);
            checked += 1;
        }
        assert_eq!(checked, reasons.len());
    }

    /// A finished call's line, formatted by the writer from what the permit owned around the
    /// payload the caller wrote, is the line `LedgerLine` writes, with a fresh id and the time.
    #[test]
    fn call_lines_match_ledger_lines() {
        use std::sync::Arc;
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_micros(1_764_700_000_123_456);
        let parts = crate::guard::CallParts {
            action: Arc::from("pay"),
            agent_id: Arc::from("bot"),
            run_id: Arc::from("r\"1"),
            session_id: Arc::from("s"),
            cost: 0.25,
            tags: Arc::from(vec!["billing".to_string()]),
        };
        let inputs = json!({"args": [3], "kwargs": {"password": "hunter2"}});
        let outputs = json!({"paid": 3});
        let limit = Limit {
            kind: LimitKind::RunBudget,
            limit: 1.0,
            used: 0.5,
            requested: 0.25,
            window_seconds: None,
            field: None,
        };
        let approval =
            ApprovalRecord { approved: true, approver: "alice".into(), reason: "ok".into(), decided_at: "t".into() };
        let call = CallLine {
            at,
            parts: parts.clone(),
            cost_usd: 0.3,
            duration_ms: 1.5,
            outcome: "success",
            verdict: Verdict::Warn,
            reason: ReasonCode::RuleWarn,
            intervention: Some(InterventionType::Warning),
            message: "careful".into(),
            policy: Some(Arc::from("prod")),
            rule: Some(Arc::from("w1")),
            limit: Some(limit.clone()),
            retry_after_seconds: None,
            policy_version: Arc::from("v1"),
            approval: Some(approval.clone()),
            intervention_id: Some("iv".into()),
        };
        let payload = PayloadRef { inputs: Redacted(&inputs), outputs: Redacted(&outputs) };
        let mut raw = Vec::new();
        payload.write_json(&mut raw).unwrap();
        let mut ours = Vec::new();
        call.write_json(&raw, &mut ours).unwrap();
        let ours: Value = serde_json::from_slice(&ours).unwrap();
        let id = ours["id"].as_str().unwrap().to_string();
        let parsed = uuid::Uuid::parse_str(&id).unwrap();
        assert_eq!(parsed.get_version_num(), 7);
        let (secs, _) = parsed.get_timestamp().unwrap().to_unix();
        assert_eq!(secs, 1_764_700_000);
        let ts = crate::ledger::Rfc3339::at(at);
        let expected = LedgerLine {
            id: &id,
            timestamp: ts.as_str(),
            action: "pay",
            cost_usd: 0.3,
            duration_ms: 1.5,
            outcome: "success",
            tags: &parts.tags,
            payload,
            agent_id: "bot",
            run_id: "r\"1",
            session_id: "s",
            estimated_cost_usd: 0.25,
            decision: Some(DecisionRef {
                verdict: Verdict::Warn,
                reason: ReasonCode::RuleWarn,
                intervention: Some(InterventionType::Warning),
                message: "careful",
                policy: Some("prod"),
                rule: Some("w1"),
                limit: Some(&limit),
                retry_after_seconds: None,
            }),
            policy_version: "v1",
            approval: Some(&approval),
            intervention_id: Some("iv"),
        };
        assert_eq!(ours, serde_json::to_value(&expected).unwrap());
        assert_eq!(ours["payload"]["inputs"]["kwargs"]["password"], "[REDACTED]");
    }
}
