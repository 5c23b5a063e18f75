//! What `decide()` takes and what it returns.

use std::borrow::Cow;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::counters::Reservation;

static NO_ARGS: Value = Value::Null;

/// One call an agent wants to make. Borrowed, so building one costs no allocation.
#[derive(Debug, Clone, Copy)]
pub struct ActionRequest<'a> {
    pub action: &'a str,
    pub agent_id: &'a str,
    pub run_id: &'a str,
    pub session_id: &'a str,
    /// Estimated cost in USD. Negative, NaN and infinite costs are denied as invalid.
    pub cost_usd: f64,
    /// The call's arguments: a JSON object (or null for none).
    pub args: &'a Value,
    pub tags: &'a [String],
    pub risk: Option<RiskLevel>,
    pub blast_radius: Option<&'a str>,
    pub description: Option<&'a str>,
    pub intent: Option<&'a str>,
}

impl<'a> ActionRequest<'a> {
    pub const DEFAULT_ID: &'static str = "default";

    pub fn new(action: &'a str) -> Self {
        ActionRequest {
            action,
            agent_id: Self::DEFAULT_ID,
            run_id: Self::DEFAULT_ID,
            session_id: Self::DEFAULT_ID,
            cost_usd: 0.0,
            args: &NO_ARGS,
            tags: &[],
            risk: None,
            blast_radius: None,
            description: None,
            intent: None,
        }
    }

    pub fn cost(mut self, cost_usd: f64) -> Self {
        self.cost_usd = cost_usd;
        self
    }

    pub fn args(mut self, args: &'a Value) -> Self {
        self.args = args;
        self
    }

    pub fn agent(mut self, agent_id: &'a str) -> Self {
        self.agent_id = agent_id;
        self
    }

    pub fn run(mut self, run_id: &'a str) -> Self {
        self.run_id = run_id;
        self
    }

    pub fn session(mut self, session_id: &'a str) -> Self {
        self.session_id = session_id;
        self
    }

    pub fn tags(mut self, tags: &'a [String]) -> Self {
        self.tags = tags;
        self
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RiskLevel {
    Low,
    Medium,
    High,
    Critical,
}

impl RiskLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            RiskLevel::Low => "LOW",
            RiskLevel::Medium => "MEDIUM",
            RiskLevel::High => "HIGH",
            RiskLevel::Critical => "CRITICAL",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Allow,
    Warn,
    Deny,
    RequireApproval,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Warn => "warn",
            Verdict::Deny => "deny",
            Verdict::RequireApproval => "require_approval",
        }
    }

    /// May the action run now?
    pub fn permits(self) -> bool {
        matches!(self, Verdict::Allow | Verdict::Warn)
    }
}

/// The intervention types of the platform, plus `HALTED`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum InterventionType {
    HardBlock,
    ApprovalRequired,
    RateLimited,
    BudgetExceeded,
    Downgrade,
    Warning,
    Halted,
}

impl InterventionType {
    pub fn as_str(self) -> &'static str {
        match self {
            InterventionType::HardBlock => "HARD_BLOCK",
            InterventionType::ApprovalRequired => "APPROVAL_REQUIRED",
            InterventionType::RateLimited => "RATE_LIMITED",
            InterventionType::BudgetExceeded => "BUDGET_EXCEEDED",
            InterventionType::Downgrade => "DOWNGRADE",
            InterventionType::Warning => "WARNING",
            InterventionType::Halted => "HALTED",
        }
    }
}

/// Machine-readable reason for a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ReasonCode {
    Allowed,
    Halted,
    DeniedAction,
    NotAllowlisted,
    RuleBlock,
    RuleWarn,
    RuleApproval,
    DefaultBlock,
    RateLimited,
    LoopDetected,
    ActionBudgetExceeded,
    RunBudgetExceeded,
    SessionBudgetExceeded,
    ApprovalRequired,
    ApprovalCostThreshold,
    AnomalyDetected,
    InvalidRequest,
    InternalError,
}

impl ReasonCode {
    /// An action, run or session budget would be exceeded.
    pub fn is_budget(self) -> bool {
        matches!(
            self,
            ReasonCode::ActionBudgetExceeded | ReasonCode::RunBudgetExceeded | ReasonCode::SessionBudgetExceeded
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ReasonCode::Allowed => "ALLOWED",
            ReasonCode::Halted => "HALTED",
            ReasonCode::DeniedAction => "DENIED_ACTION",
            ReasonCode::NotAllowlisted => "NOT_ALLOWLISTED",
            ReasonCode::RuleBlock => "RULE_BLOCK",
            ReasonCode::RuleWarn => "RULE_WARN",
            ReasonCode::RuleApproval => "RULE_APPROVAL",
            ReasonCode::DefaultBlock => "DEFAULT_BLOCK",
            ReasonCode::RateLimited => "RATE_LIMITED",
            ReasonCode::LoopDetected => "LOOP_DETECTED",
            ReasonCode::ActionBudgetExceeded => "ACTION_BUDGET_EXCEEDED",
            ReasonCode::RunBudgetExceeded => "RUN_BUDGET_EXCEEDED",
            ReasonCode::SessionBudgetExceeded => "SESSION_BUDGET_EXCEEDED",
            ReasonCode::ApprovalRequired => "APPROVAL_REQUIRED",
            ReasonCode::ApprovalCostThreshold => "APPROVAL_COST_THRESHOLD",
            ReasonCode::AnomalyDetected => "ANOMALY_DETECTED",
            ReasonCode::InvalidRequest => "INVALID_REQUEST",
            ReasonCode::InternalError => "INTERNAL_ERROR",
        }
    }
}

/// Which limit a decision was about, with the numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitKind {
    ActionBudget,
    RunBudget,
    SessionBudget,
    RateLimit,
    Loop,
    ApprovalCostThreshold,
    Anomaly,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Limit {
    pub kind: LimitKind,
    /// The configured limit: dollars for budgets and thresholds, calls for rate limits and loops,
    /// standard deviations for anomalies.
    pub limit: f64,
    /// How much was used before this call (dollars or calls), or the observed z-score.
    pub used: f64,
    /// What this call asked for (dollars or 1 call), or the observed value.
    pub requested: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_seconds: Option<f64>,
    /// The argument an anomaly was found in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// What a shadow-mode policy would have done, had it been enforced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShadowFinding {
    pub policy: Arc<str>,
    pub verdict: Verdict,
    pub intervention: Option<InterventionType>,
    pub reason: ReasonCode,
    pub message: Cow<'static, str>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<Arc<str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<Limit>,
}

/// Who must approve, and how long to wait.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApprovalSpec {
    pub timeout_seconds: Option<u64>,
    pub approvers: Vec<String>,
    /// The next approver group and when it is asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub escalation: Option<crate::model::Escalation>,
}

/// The answer. Exactly one verdict, with its reasons.
#[derive(Debug, Serialize)]
pub struct Decision {
    pub verdict: Verdict,
    pub intervention: Option<InterventionType>,
    pub reason: ReasonCode,
    pub message: Cow<'static, str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<Arc<str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<Arc<str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<Limit>,
    pub policy_version: Arc<str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approval: Option<ApprovalSpec>,
    /// Would-be interventions of `mode: shadow` policies; recorded with outcome `WARNED`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub shadow: Vec<ShadowFinding>,
    /// Held while the action runs; settle or release it when done.
    #[serde(skip)]
    pub reservation: Option<Reservation>,
}

impl Decision {
    pub fn permits(&self) -> bool {
        self.verdict.permits()
    }

    /// Takes the reservation out, leaving the rest of the decision for the record.
    pub fn take_reservation(&mut self) -> Option<Reservation> {
        self.reservation.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn risk_names_match_their_serialized_form() {
        for r in [RiskLevel::Low, RiskLevel::Medium, RiskLevel::High, RiskLevel::Critical] {
            assert_eq!(serde_json::to_value(r).ok(), Some(Value::String(r.as_str().into())));
        }
    }
}
