//! The policy file format: what users write in YAML (and, for rules, JSON).
//!
//! These types are the schema. `schema/policy.schema.json` is generated from them and a test
//! fails when the two drift apart. Every struct rejects unknown keys.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::money::Usd;

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

fn is_zero(p: &i32) -> bool {
    *p == 0
}

/// A policy. A file holds one policy at the top level, further policies under `policies:`, or both.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, try_from = "PolicyDocRepr")]
pub struct PolicyDoc {
    /// Unique name of the policy. Defaults to the file name for the top-level policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Who the policy applies to.
    #[serde(default)]
    pub scope: Scope,
    /// The agent this policy applies to when `scope: agent`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
    /// The run this policy applies to when `scope: run`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    /// Disabled policies are loaded and validated but never applied.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub enabled: bool,
    /// `enforce` (default) blocks; `shadow` only records what it would have done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    /// What an internal failure decides: `secure` (default, deny) or `safe` (allow and warn).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fail_mode: Option<FailMode>,
    /// SDK compatibility: `strict_mode: false` means `fail_mode: safe`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict_mode: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budgets: Option<Budgets>,
    /// Actions that are always denied (exact, case-sensitive names).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub denied_actions: Vec<String>,
    /// When present and non-empty, only these actions are allowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_actions: Option<Vec<String>>,
    /// Per-action limits: at most `max_count` calls in any window of `window_seconds`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rate_limits: BTreeMap<String, RateLimit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approvals: Option<Approvals>,
    /// What a call over one of this policy's budgets does: `fail` (default) or `pause` (with a
    /// server: wait, like an approval, for a human to resume it or raise the limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_budget_exceeded: Option<OnBudgetExceeded>,
    /// Conditional rules on the action name and its arguments.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<Rule>,
    /// What happens when no rule matches: `allow` (default), `warn`, `require_approval` or `block`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_action: Option<RuleAction>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anomaly: Option<Anomaly>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loops: Option<Loops>,
    /// Further policies in the same file. They cannot nest.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<PolicyDoc>,
}

impl Default for PolicyDoc {
    fn default() -> Self {
        PolicyDoc {
            name: None,
            description: None,
            scope: Scope::Global,
            agent_id: None,
            run_id: None,
            enabled: true,
            mode: None,
            fail_mode: None,
            strict_mode: None,
            budgets: None,
            denied_actions: Vec::new(),
            allowed_actions: None,
            rate_limits: BTreeMap::new(),
            approvals: None,
            on_budget_exceeded: None,
            rules: Vec::new(),
            default_action: None,
            anomaly: None,
            loops: None,
            policies: Vec::new(),
        }
    }
}

impl PolicyDoc {
    /// True when the document sets anything that affects decisions (as opposed to only listing `policies`).
    pub fn has_body(&self) -> bool {
        self.mode.is_some()
            || self.fail_mode.is_some()
            || self.strict_mode.is_some()
            || self.budgets.is_some()
            || !self.denied_actions.is_empty()
            || self.allowed_actions.is_some()
            || !self.rate_limits.is_empty()
            || self.approvals.is_some()
            || self.on_budget_exceeded.is_some()
            || !self.rules.is_empty()
            || self.default_action.is_some()
            || self.anomaly.is_some()
            || self.loops.is_some()
    }

    /// The effective fail mode of this policy alone.
    pub fn effective_fail_mode(&self) -> FailMode {
        match (self.fail_mode, self.strict_mode) {
            (Some(m), _) => m,
            (None, Some(false)) => FailMode::Safe,
            _ => FailMode::Secure,
        }
    }
}

/// The same fields as [`PolicyDoc`], checked for consistency before they become one.
/// An Agent Sentinel policy. A file holds one policy at the top level, further policies under `policies:`, or both.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "Agent Sentinel policy file")]
struct PolicyDocRepr {
    /// Unique name of the policy. Defaults to the file name for the top-level policy.
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    description: Option<String>,
    /// Who the policy applies to.
    #[serde(default)]
    scope: Scope,
    /// The agent this policy applies to when `scope: agent`.
    #[serde(default)]
    agent_id: Option<String>,
    /// The run this policy applies to when `scope: run`.
    #[serde(default)]
    run_id: Option<String>,
    /// Disabled policies are loaded and validated but never applied.
    #[serde(default = "yes")]
    enabled: bool,
    /// `enforce` (default) blocks; `shadow` only records what it would have done.
    #[serde(default)]
    mode: Option<Mode>,
    /// What an internal failure decides: `secure` (default, deny) or `safe` (allow and warn).
    #[serde(default)]
    fail_mode: Option<FailMode>,
    /// SDK compatibility: `strict_mode: false` means `fail_mode: safe`.
    #[serde(default)]
    strict_mode: Option<bool>,
    #[serde(default)]
    budgets: Option<Budgets>,
    /// Actions that are always denied (exact, case-sensitive names).
    #[serde(default)]
    denied_actions: Vec<String>,
    /// When present and non-empty, only these actions are allowed.
    #[serde(default)]
    allowed_actions: Option<Vec<String>>,
    /// Per-action limits: at most `max_count` calls in any window of `window_seconds`.
    #[serde(default)]
    rate_limits: BTreeMap<String, RateLimit>,
    #[serde(default)]
    approvals: Option<Approvals>,
    /// What a call over one of this policy's budgets does: `fail` (default) or `pause` (with a
    /// server: wait, like an approval, for a human to resume it or raise the limit).
    #[serde(default)]
    on_budget_exceeded: Option<OnBudgetExceeded>,
    /// Conditional rules on the action name and its arguments.
    #[serde(default)]
    rules: Vec<Rule>,
    /// What happens when no rule matches: `allow` (default), `warn`, `require_approval` or `block`.
    #[serde(default)]
    default_action: Option<RuleAction>,
    #[serde(default)]
    anomaly: Option<Anomaly>,
    #[serde(default)]
    loops: Option<Loops>,
    /// Further policies in the same file. They cannot nest.
    #[serde(default)]
    policies: Vec<PolicyDoc>,
}

impl TryFrom<PolicyDocRepr> for PolicyDoc {
    type Error = String;

    fn try_from(r: PolicyDocRepr) -> Result<Self, String> {
        match r.scope {
            Scope::Global => {
                if r.agent_id.is_some() || r.run_id.is_some() {
                    return Err("a `scope: global` policy must not set `agent_id` or `run_id`; use `scope: agent` or `scope: run`".into());
                }
            }
            Scope::Agent => {
                if r.agent_id.as_deref().is_none_or(str::is_empty) {
                    return Err("`scope: agent` needs a non-empty `agent_id`".into());
                }
                if r.run_id.is_some() {
                    return Err("a `scope: agent` policy must not set `run_id`".into());
                }
            }
            Scope::Run => {
                if r.run_id.as_deref().is_none_or(str::is_empty) {
                    return Err("`scope: run` needs a non-empty `run_id`".into());
                }
                if r.agent_id.is_some() {
                    return Err("a `scope: run` policy must not set `agent_id`".into());
                }
            }
        }
        if let (Some(fm), Some(strict)) = (r.fail_mode, r.strict_mode)
            && ((fm == FailMode::Safe) == strict)
        {
            return Err(format!(
                "`strict_mode: {strict}` contradicts `fail_mode: {}`; set only `fail_mode`",
                fm.as_str()
            ));
        }
        if r.policies.iter().any(|p| !p.policies.is_empty()) {
            return Err("`policies` cannot nest: list every policy at the top level".into());
        }
        for name in &r.denied_actions {
            check_action_name(name, "denied_actions")?;
        }
        for name in r.allowed_actions.iter().flatten() {
            check_action_name(name, "allowed_actions")?;
        }
        for name in r.rate_limits.keys() {
            check_action_name(name, "rate_limits")?;
        }
        let mut ids = std::collections::HashSet::new();
        for rule in &r.rules {
            if !ids.insert(rule.id.as_str()) {
                return Err(format!("duplicate rule id `{}`", rule.id));
            }
        }
        Ok(PolicyDoc {
            name: r.name,
            description: r.description,
            scope: r.scope,
            agent_id: r.agent_id,
            run_id: r.run_id,
            enabled: r.enabled,
            mode: r.mode,
            fail_mode: r.fail_mode,
            strict_mode: r.strict_mode,
            budgets: r.budgets,
            denied_actions: r.denied_actions,
            allowed_actions: r.allowed_actions,
            rate_limits: r.rate_limits,
            approvals: r.approvals,
            on_budget_exceeded: r.on_budget_exceeded,
            rules: r.rules,
            default_action: r.default_action,
            anomaly: r.anomaly,
            loops: r.loops,
            policies: r.policies,
        })
    }
}

fn check_action_name(name: &str, list: &str) -> Result<(), String> {
    if name.trim().is_empty() {
        return Err(format!("`{list}` contains an empty action name"));
    }
    if name.trim() != name {
        return Err(format!("action name `{name}` in `{list}` has leading or trailing spaces"));
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    #[default]
    Global,
    Agent,
    Run,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Global => "global",
            Scope::Agent => "agent",
            Scope::Run => "run",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    #[default]
    Enforce,
    Shadow,
}

/// What a call over a budget does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnBudgetExceeded {
    /// Deny the call (`BudgetExceededError`).
    #[default]
    Fail,
    /// With a server as the authority: hold the call, like an approval, until a human resumes it
    /// (it then runs once, over the budget) or raises the limit; a local engine fails as with `fail`.
    Pause,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum FailMode {
    /// Deny when the decision itself fails.
    #[default]
    Secure,
    /// Allow when the decision itself fails, and record a WARNING intervention.
    Safe,
}

impl FailMode {
    pub fn as_str(self) -> &'static str {
        match self {
            FailMode::Secure => "secure",
            FailMode::Safe => "safe",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Budgets {
    /// Limit for the whole session, in USD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<Usd>,
    /// Limit for each run, in USD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<Usd>,
    /// Cumulative limit per action over the session, in USD. `0` blocks any call that costs anything.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub actions: BTreeMap<String, Usd>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, try_from = "RateLimitRepr")]
pub struct RateLimit {
    /// Most calls allowed in any window.
    pub max_count: u32,
    /// Window length in seconds (fractions allowed).
    pub window_seconds: f64,
    /// Whose calls are counted together: `agent` (default), `run`, `session` or `global`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per: Option<CounterScope>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct RateLimitRepr {
    /// Most calls allowed in any window.
    max_count: u32,
    /// Window length in seconds (fractions allowed).
    window_seconds: f64,
    /// Whose calls are counted together: `agent` (default), `run`, `session` or `global`.
    #[serde(default)]
    per: Option<CounterScope>,
}

impl TryFrom<RateLimitRepr> for RateLimit {
    type Error = String;
    fn try_from(r: RateLimitRepr) -> Result<Self, String> {
        if r.max_count == 0 {
            return Err("`max_count` must be at least 1; to block an action, list it in `denied_actions`".into());
        }
        check_window(r.window_seconds)?;
        Ok(RateLimit { max_count: r.max_count, window_seconds: r.window_seconds, per: r.per })
    }
}

fn check_window(w: f64) -> Result<(), String> {
    if !w.is_finite() || w <= 0.0 {
        return Err(format!("`window_seconds` must be a positive number of seconds, got `{w}`"));
    }
    if w > 366.0 * 86_400.0 {
        return Err(format!("`window_seconds` must be at most a year (31622400), got `{w}`"));
    }
    Ok(())
}

/// Whose calls a counter groups together.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CounterScope {
    #[default]
    Agent,
    Run,
    Session,
    Global,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Approvals {
    /// Actions that always need a human decision.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub actions: Vec<String>,
    /// Calls whose estimated cost is above this need a human decision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_threshold_usd: Option<Usd>,
    /// How long to wait for a decision; no decision in time means rejected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u64>,
    /// Who may decide (emails or identities).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub approvers: Vec<String>,
    /// The next approver group: notified, and allowed to decide, when a request is still
    /// undecided after `after_percent` of its timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub escalation: Option<Escalation>,
}

/// Who is asked next when the first approvers have not decided in time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Escalation {
    /// The share of the timeout after which the group is notified, in (0, 100). Default 50.
    #[serde(default = "half")]
    pub after_percent: f64,
    /// Emails or identities, as in `approvers`.
    pub approvers: Vec<String>,
}

fn half() -> f64 {
    50.0
}

/// A conditional rule: a glob on the action name, and conditions on its arguments (all must hold).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, try_from = "RuleRepr")]
pub struct Rule {
    pub id: String,
    /// A display name (the rules decorator's files carry one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Glob on the action name: `*`, `?`, `[abc]`, `{a,b}`.
    pub function_pattern: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    pub action: RuleAction,
    /// Higher runs first; equal priorities keep file order.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub priority: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub enabled: bool,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct RuleRepr {
    id: String,
    /// A display name (the rules decorator's files carry one).
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    description: Option<String>,
    /// Glob on the action name: `*`, `?`, `[abc]`, `{a,b}`.
    function_pattern: String,
    #[serde(default)]
    conditions: Vec<Condition>,
    action: RuleAction,
    /// Higher runs first; equal priorities keep file order.
    #[serde(default)]
    priority: i32,
    #[serde(default)]
    message: Option<String>,
    #[serde(default = "yes")]
    enabled: bool,
}

impl TryFrom<RuleRepr> for Rule {
    type Error = String;
    fn try_from(r: RuleRepr) -> Result<Self, String> {
        if r.id.trim().is_empty() {
            return Err("rule `id` must not be empty".into());
        }
        if r.function_pattern.is_empty() {
            return Err(format!("rule `{}` has an empty `function_pattern`; use `*` to match every action", r.id));
        }
        globset::Glob::new(&r.function_pattern).map_err(|e| {
            format!("rule `{}`: invalid glob `{}` in `function_pattern`: {}", r.id, r.function_pattern, e.kind())
        })?;
        Ok(Rule {
            id: r.id,
            name: r.name,
            description: r.description,
            function_pattern: r.function_pattern,
            conditions: r.conditions,
            action: r.action,
            priority: r.priority,
            message: r.message,
            enabled: r.enabled,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RuleAction {
    Allow,
    Warn,
    RequireApproval,
    Block,
}

impl RuleAction {
    pub fn as_str(self) -> &'static str {
        match self {
            RuleAction::Allow => "allow",
            RuleAction::Warn => "warn",
            RuleAction::RequireApproval => "require_approval",
            RuleAction::Block => "block",
        }
    }
}

/// A test on one argument of the call. `param` may be a dotted path into nested objects.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, try_from = "ConditionRepr")]
pub struct Condition {
    pub param: String,
    pub operator: Operator,
    pub value: serde_json::Value,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct ConditionRepr {
    param: String,
    operator: Operator,
    value: serde_json::Value,
}

impl TryFrom<ConditionRepr> for Condition {
    type Error = String;
    fn try_from(r: ConditionRepr) -> Result<Self, String> {
        use serde_json::Value;
        if r.param.is_empty() || r.param.split('.').any(str::is_empty) {
            return Err(format!("condition `param` `{}` is not a valid argument name or dotted path", r.param));
        }
        let op = r.operator;
        let ok = match op {
            Operator::Gt | Operator::Gte | Operator::Lt | Operator::Lte => r.value.is_number(),
            Operator::In | Operator::NotIn => r.value.is_array(),
            Operator::StartsWith | Operator::EndsWith | Operator::Matches => r.value.is_string(),
            Operator::Eq | Operator::Ne | Operator::Contains | Operator::NotContains => !r.value.is_null(),
        };
        if !ok {
            let expected = match op {
                Operator::Gt | Operator::Gte | Operator::Lt | Operator::Lte => "a number",
                Operator::In | Operator::NotIn => "a list",
                Operator::StartsWith | Operator::EndsWith => "a string",
                Operator::Matches => "a regular expression string",
                _ => "a value (not null)",
            };
            return Err(format!(
                "operator `{}` on `{}` needs {expected} as `value`, got `{}`",
                op.as_str(),
                r.param,
                r.value
            ));
        }
        if let (Operator::Matches, Value::String(pattern)) = (op, &r.value) {
            regex::Regex::new(pattern).map_err(|e| {
                let text = e.to_string();
                let last = text.lines().last().unwrap_or_default().trim();
                let detail = last.strip_prefix("error: ").unwrap_or(last).to_string();
                format!("invalid regex `{pattern}` for `{}`: {detail}", r.param)
            })?;
        }
        if let Value::Number(n) = &r.value
            && n.as_f64().is_none_or(|f| !f.is_finite())
        {
            return Err(format!("condition on `{}` has a value that is not a finite number", r.param));
        }
        Ok(Condition { param: r.param, operator: r.operator, value: r.value })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Operator {
    Eq,
    Ne,
    Gt,
    Gte,
    Lt,
    Lte,
    In,
    NotIn,
    Contains,
    NotContains,
    StartsWith,
    EndsWith,
    Matches,
}

impl Operator {
    pub fn as_str(self) -> &'static str {
        match self {
            Operator::Eq => "eq",
            Operator::Ne => "ne",
            Operator::Gt => "gt",
            Operator::Gte => "gte",
            Operator::Lt => "lt",
            Operator::Lte => "lte",
            Operator::In => "in",
            Operator::NotIn => "not_in",
            Operator::Contains => "contains",
            Operator::NotContains => "not_contains",
            Operator::StartsWith => "starts_with",
            Operator::EndsWith => "ends_with",
            Operator::Matches => "matches",
        }
    }
}

/// Statistical outlier detection over each action's cost and numeric arguments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, try_from = "AnomalyRepr")]
pub struct Anomaly {
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub enabled: bool,
    /// A value is an outlier when it is more than this many standard deviations from the mean.
    pub z_threshold: f64,
    /// No verdict until an action and argument have this many samples.
    pub min_samples: u32,
    /// ... and when it differs from the mean by more than this absolute amount.
    pub min_deviation: f64,
    /// `warn` (default) or `block`.
    pub action: AnomalyAction,
    /// Only these numeric arguments (plus `cost_usd`); all top-level numeric arguments when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fields: Option<Vec<String>>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct AnomalyRepr {
    #[serde(default = "yes")]
    enabled: bool,
    /// A value is an outlier when it is more than this many standard deviations from the mean.
    #[serde(default)]
    z_threshold: Option<f64>,
    /// No verdict until an action and argument have this many samples.
    #[serde(default)]
    min_samples: Option<u32>,
    /// ... and when it differs from the mean by more than this absolute amount.
    #[serde(default)]
    min_deviation: Option<f64>,
    /// `warn` (default) or `block`.
    #[serde(default)]
    action: Option<AnomalyAction>,
    /// Only these numeric arguments (plus `cost_usd`); all top-level numeric arguments when absent.
    #[serde(default)]
    fields: Option<Vec<String>>,
}

impl TryFrom<AnomalyRepr> for Anomaly {
    type Error = String;
    fn try_from(r: AnomalyRepr) -> Result<Self, String> {
        let z = r.z_threshold.unwrap_or(3.0);
        if !z.is_finite() || z <= 0.0 {
            return Err(format!("`z_threshold` must be a positive number, got `{z}`"));
        }
        let dev = r.min_deviation.unwrap_or(1.0);
        if !dev.is_finite() || dev < 0.0 {
            return Err(format!("`min_deviation` must be a non-negative number, got `{dev}`"));
        }
        let min_samples = r.min_samples.unwrap_or(20);
        if min_samples < 2 {
            return Err("`min_samples` must be at least 2".into());
        }
        Ok(Anomaly {
            enabled: r.enabled,
            z_threshold: z,
            min_samples,
            min_deviation: dev,
            action: r.action.unwrap_or_default(),
            fields: r.fields,
        })
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AnomalyAction {
    #[default]
    Warn,
    Block,
}

/// Loop detection: the same action with the same arguments more than `max_repeats` times within
/// `window_seconds` (per run) is denied with `LOOP_DETECTED`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, try_from = "LoopsRepr")]
pub struct Loops {
    pub max_repeats: u32,
    pub window_seconds: f64,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct LoopsRepr {
    max_repeats: u32,
    window_seconds: f64,
}

impl TryFrom<LoopsRepr> for Loops {
    type Error = String;
    fn try_from(r: LoopsRepr) -> Result<Self, String> {
        if r.max_repeats == 0 {
            return Err("`max_repeats` must be at least 1".into());
        }
        check_window(r.window_seconds)?;
        Ok(Loops { max_repeats: r.max_repeats, window_seconds: r.window_seconds })
    }
}

/// The rules-and-approvals decorator's `rules.json` format.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RulesFile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_action: Option<RuleAction>,
    #[serde(default)]
    pub rules: Vec<Rule>,
}
