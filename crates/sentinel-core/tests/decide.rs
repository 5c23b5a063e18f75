#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
//! Data-driven decision tests: each case is a policy and a script of calls; the snapshot shows
//! what an operator would see for every call, so a change in behaviour shows up as a diff.

use std::fmt::Write as _;
use std::sync::Arc;

use sentinel_core::load::parse_yaml;
use sentinel_core::{ActionRequest, Engine, HaltTarget, ManualClock, PolicySet, Usd, report};
use serde_json::{Value, json};

/// One step of a script.
enum Step {
    Call(Call),
    Halt(HaltTarget),
    Resume(HaltTarget),
    ResetRun(&'static str),
    Advance(f64),
    /// Settle the previous allowed call with a different actual cost.
    Explain(Call),
}

#[derive(Clone)]
struct Call {
    action: &'static str,
    cost: f64,
    args: Value,
    agent: &'static str,
    run: &'static str,
    session: &'static str,
    approved: bool,
    release: bool,
    actual: Option<f64>,
}

fn call(action: &'static str) -> Call {
    Call {
        action,
        cost: 0.0,
        args: Value::Null,
        agent: "agent-1",
        run: "run-1",
        session: "session-1",
        approved: false,
        release: false,
        actual: None,
    }
}

impl Call {
    fn cost(mut self, c: f64) -> Self {
        self.cost = c;
        self
    }
    fn args(mut self, a: Value) -> Self {
        self.args = a;
        self
    }
    fn agent(mut self, a: &'static str) -> Self {
        self.agent = a;
        self
    }
    fn run(mut self, r: &'static str) -> Self {
        self.run = r;
        self
    }
    fn approved(mut self) -> Self {
        self.approved = true;
        self
    }
    fn release(mut self) -> Self {
        self.release = true;
        self
    }
    fn actual(mut self, a: f64) -> Self {
        self.actual = Some(a);
        self
    }
    fn step(self) -> Step {
        Step::Call(self)
    }
}

fn engine(yaml: &str) -> (Engine, Arc<ManualClock>) {
    let docs = parse_yaml("case.yaml", "case", yaml).unwrap_or_else(|e| panic!("{}", e[0]));
    let set = PolicySet::compile(docs).unwrap_or_else(|e| panic!("{}", e[0]));
    let clock = Arc::new(ManualClock::new(1_700_000_000_000_000_000));
    (Engine::with_clock(set, clock.clone()), clock)
}

/// Runs a script and renders one line per step.
fn run(yaml: &str, steps: Vec<Step>) -> String {
    let (engine, clock) = engine(yaml);
    let mut out = String::new();
    for step in steps {
        match step {
            Step::Call(c) => {
                let req = ActionRequest::new(c.action)
                    .cost(c.cost)
                    .args(&c.args)
                    .agent(c.agent)
                    .run(c.run)
                    .session(c.session);
                let mut d = if c.approved { engine.decide_approved(&req) } else { engine.decide(&req) };
                let mut line = format!("{} ${} -> {} {}", c.action, c.cost, d.verdict.as_str(), d.reason.as_str());
                if let Some(p) = &d.policy {
                    let _ = write!(line, " [{p}");
                    if let Some(r) = &d.rule {
                        let _ = write!(line, "/{r}");
                    }
                    line.push(']');
                }
                if d.reason.as_str() != "ALLOWED" {
                    let _ = write!(line, ": {}", d.message);
                }
                if let Some(r) = d.retry_after_seconds {
                    let _ = write!(line, " (retry_after={r:.3})");
                }
                for f in &d.shadow {
                    let _ = write!(
                        line,
                        "\n    shadow {} would {} {}: {}",
                        f.policy,
                        f.verdict.as_str(),
                        f.reason.as_str(),
                        f.message
                    );
                }
                if let Some(r) = d.take_reservation() {
                    if c.release {
                        r.release();
                        line.push_str(" (released)");
                    } else {
                        r.settle(Usd::from_f64(c.actual.unwrap_or(c.cost)).unwrap());
                    }
                }
                let s = engine.spend(c.session, c.run);
                let _ = writeln!(out, "{line}  | session={} run={}", s.session_total, s.run_total);
            }
            Step::Explain(c) => {
                let req = ActionRequest::new(c.action)
                    .cost(c.cost)
                    .args(&c.args)
                    .agent(c.agent)
                    .run(c.run)
                    .session(c.session);
                let d = engine.evaluate(&req);
                let set = engine.policies();
                let _ = writeln!(out, "explain {}:", c.action);
                for l in report::explain(&d, &set, &req).lines() {
                    let _ = writeln!(out, "    {l}");
                }
            }
            Step::Halt(t) => {
                let _ = writeln!(out, "halt {t:?}");
                engine.halt(t, "operator pressed the kill switch");
            }
            Step::Resume(t) => {
                let _ = writeln!(out, "resume {t:?}");
                engine.resume(&t);
            }
            Step::ResetRun(r) => {
                let _ = writeln!(out, "reset run {r}");
                engine.reset_run("session-1", r);
            }
            Step::Advance(s) => {
                let _ = writeln!(out, "advance {s}s");
                clock.advance_secs(s);
            }
        }
    }
    out
}

macro_rules! case {
    ($name:ident, $yaml:expr, [$($step:expr),* $(,)?]) => {
        #[test]
        fn $name() {
            let out = run($yaml, vec![$($step),*]);
            insta::assert_snapshot!(stringify!($name), out);
        }
    };
}

case!(
    step1_halts_deny_before_anything_else,
    "denied_actions: [other]\n",
    [
        call("search").step(),
        Step::Halt(HaltTarget::Agent("agent-1".into())),
        call("search").step(),
        call("search").agent("agent-2").step(),
        Step::Resume(HaltTarget::Agent("agent-1".into())),
        Step::Halt(HaltTarget::Run("run-1".into())),
        call("search").step(),
        call("search").run("run-2").step(),
    ]
);

case!(
    step2_deny_and_allow_lists,
    "denied_actions: [delete_database, send_money]\nallowed_actions: [search, read_file, send_money]\n",
    [
        call("search").step(),
        call("delete_database").step(),
        call("send_money").step(),
        call("write_file").step(),
        call("Search").step(),
    ]
);

case!(
    step2_empty_allowlist_means_no_allowlist,
    "allowed_actions: []\ndenied_actions: [x]\n",
    [call("anything").step(), call("x").step()]
);

const RULES: &str = r#"
rules:
  - id: allow-internal-refund
    function_pattern: refund_*
    conditions:
      - { param: customer.tier, operator: eq, value: internal }
    action: allow
  - id: big-refund
    function_pattern: refund_*
    conditions:
      - { param: amount, operator: gte, value: 500 }
    action: block
    message: Refunds of $500 or more are blocked
  - id: big-transfer
    function_pattern: "transfer_*"
    conditions:
      - { param: amount, operator: gt, value: 100 }
    action: require_approval
    message: Transfers over $100 require approval
  - id: external-mail
    function_pattern: send_email
    conditions:
      - { param: to, operator: not_contains, value: "@corp.com" }
    action: warn
  - id: no-deletes
    function_pattern: "delete_*"
    action: block
  - id: urgent-first
    function_pattern: "delete_*"
    priority: 10
    conditions:
      - { param: reason, operator: matches, value: "^(gdpr|legal)-[0-9]+$" }
    action: require_approval
    message: Legal deletions need sign-off
"#;

case!(
    step3_rules_block_approve_warn_allow_and_priority,
    RULES,
    [
        call("refund_order").args(json!({"amount": 900})).step(),
        call("refund_order").args(json!({"amount": 900, "customer": {"tier": "internal"}})).step(),
        call("refund_order").args(json!({"amount": 20})).step(),
        call("transfer_funds").args(json!({"amount": 5000})).step(),
        call("transfer_funds").args(json!({"amount": 50})).step(),
        call("transfer_funds").args(json!({"amount": "250"})).step(),
        call("send_email").args(json!({"to": "x@evil.com"})).step(),
        call("send_email").args(json!({"to": "boss@corp.com"})).step(),
        call("delete_user").args(json!({"reason": "gdpr-42"})).step(),
        call("delete_user").args(json!({"reason": "cleanup"})).step(),
    ]
);

case!(
    step3_missing_argument_never_opens_a_door,
    RULES,
    [
        // No `amount`: the restricting rules count their condition as met.
        call("refund_order").args(json!({})).step(),
        call("transfer_funds").args(json!({"to": "acct"})).step(),
        // A mistyped argument counts as missing too.
        call("transfer_funds").args(json!({"amount": "lots"})).step(),
        // No `customer.tier`: the allow rule does not fire, so the block still applies.
        call("refund_order").args(json!({"amount": 900, "customer": {}})).step(),
        // `to` missing: not_contains cannot be shown false, so the warning stands.
        call("send_email").step(),
    ]
);

case!(
    step3_every_operator,
    r#"
rules:
  - { id: eq, function_pattern: op_eq, conditions: [{param: v, operator: eq, value: 1}], action: block }
  - { id: ne, function_pattern: op_ne, conditions: [{param: v, operator: ne, value: "a"}], action: block }
  - { id: gt, function_pattern: op_gt, conditions: [{param: v, operator: gt, value: 10}], action: block }
  - { id: gte, function_pattern: op_gte, conditions: [{param: v, operator: gte, value: 10}], action: block }
  - { id: lt, function_pattern: op_lt, conditions: [{param: v, operator: lt, value: 10}], action: block }
  - { id: lte, function_pattern: op_lte, conditions: [{param: v, operator: lte, value: 10}], action: block }
  - { id: in, function_pattern: op_in, conditions: [{param: v, operator: in, value: [us, eu]}], action: block }
  - { id: not_in, function_pattern: op_not_in, conditions: [{param: v, operator: not_in, value: [us, eu]}], action: block }
  - { id: contains, function_pattern: op_contains, conditions: [{param: v, operator: contains, value: "DROP"}], action: block }
  - { id: contains_list, function_pattern: op_contains_list, conditions: [{param: v, operator: contains, value: admin}], action: block }
  - { id: not_contains, function_pattern: op_not_contains, conditions: [{param: v, operator: not_contains, value: "@corp.com"}], action: block }
  - { id: starts_with, function_pattern: op_starts_with, conditions: [{param: v, operator: starts_with, value: "/etc"}], action: block }
  - { id: ends_with, function_pattern: op_ends_with, conditions: [{param: v, operator: ends_with, value: ".pem"}], action: block }
  - { id: matches, function_pattern: op_matches, conditions: [{param: v, operator: matches, value: "^rm\\s+-rf"}], action: block }
"#,
    [
        call("op_eq").args(json!({"v": 1.0})).step(),
        call("op_eq").args(json!({"v": 2})).step(),
        call("op_ne").args(json!({"v": "b"})).step(),
        call("op_ne").args(json!({"v": "a"})).step(),
        call("op_gt").args(json!({"v": 11})).step(),
        call("op_gt").args(json!({"v": 10})).step(),
        call("op_gte").args(json!({"v": 10})).step(),
        call("op_lt").args(json!({"v": 9.5})).step(),
        call("op_lte").args(json!({"v": 10.5})).step(),
        call("op_in").args(json!({"v": "eu"})).step(),
        call("op_in").args(json!({"v": "apac"})).step(),
        call("op_not_in").args(json!({"v": "apac"})).step(),
        call("op_contains").args(json!({"v": "x; DROP TABLE users"})).step(),
        call("op_contains_list").args(json!({"v": ["user", "admin"]})).step(),
        call("op_not_contains").args(json!({"v": "a@corp.com"})).step(),
        call("op_starts_with").args(json!({"v": "/etc/passwd"})).step(),
        call("op_ends_with").args(json!({"v": "key.pem"})).step(),
        call("op_matches").args(json!({"v": "rm  -rf /"})).step(),
        call("op_matches").args(json!({"v": "ls -la"})).step(),
    ]
);

case!(
    step3_default_action_block_and_disabled_rules,
    r#"
default_action: block
rules:
  - { id: reads, function_pattern: "read_*", action: allow }
  - { id: off, function_pattern: "write_*", action: allow, enabled: false }
"#,
    [call("read_file").step(), call("write_file").step(), call("other").step()]
);

case!(
    step4_rate_limit_is_an_exact_sliding_window,
    "rate_limits:\n  search: { max_count: 3, window_seconds: 10 }\n",
    [
        call("search").step(),
        Step::Advance(4.0),
        call("search").step(),
        call("search").step(),
        call("search").step(),
        Step::Advance(5.9),
        call("search").step(),
        Step::Advance(0.1),
        // The first call is now exactly 10 s old: outside the window.
        call("search").step(),
        call("search").step(),
        call("other").step(),
        // Another agent has its own window.
        call("search").agent("agent-2").step(),
    ]
);

case!(
    step4_released_calls_give_back_their_slot_and_denied_calls_take_none,
    "rate_limits:\n  search: { max_count: 2, window_seconds: 60 }\nbudgets:\n  run: 0.10\n",
    [
        call("search").cost(0.05).release().step(),
        call("search").cost(0.05).step(),
        // Denied by the budget: consumes no rate-limit slot.
        call("search").cost(0.50).step(),
        call("search").cost(0.05).step(),
        call("search").cost(0.0).step(),
    ]
);

case!(
    step4_rate_limit_per_run_and_global,
    "rate_limits:\n  a: { max_count: 1, window_seconds: 60, per: run }\n  b: { max_count: 1, window_seconds: 60, per: global }\n",
    [
        call("a").step(),
        call("a").run("run-2").step(),
        call("a").step(),
        call("b").step(),
        call("b").agent("agent-2").run("run-9").step(),
    ]
);

case!(
    step4_loop_detection,
    "loops:\n  max_repeats: 3\n  window_seconds: 30\n",
    [
        call("fetch").args(json!({"url": "https://a"})).step(),
        call("fetch").args(json!({"url": "https://a"})).step(),
        call("fetch").args(json!({"url": "https://a"})).step(),
        call("fetch").args(json!({"url": "https://a"})).step(),
        call("fetch").args(json!({"url": "https://b"})).step(),
        call("fetch").args(json!({"url": "https://a"})).run("run-2").step(),
        Step::Advance(31.0),
        call("fetch").args(json!({"url": "https://a"})).step(),
    ]
);

case!(
    step5_budgets_action_run_session,
    "budgets:\n  session: 1.00\n  run: 0.50\n  actions:\n    llm: 0.30\n    free_only: 0\n",
    [
        call("llm").cost(0.20).step(),
        call("llm").cost(0.10).step(),
        call("llm").cost(0.01).step(),
        call("search").cost(0.20).step(),
        call("search").cost(0.01).step(),
        call("free_only").cost(0.0).step(),
        call("free_only").cost(0.000001).step(),
        Step::ResetRun("run-1"),
        call("search").cost(0.40).step(),
        call("search").cost(0.20).run("run-2").step(),
        call("search").cost(0.01).run("run-3").step(),
    ]
);

case!(
    step5_hundred_cents_fill_a_dollar_exactly,
    "budgets:\n  run: 1.00\n",
    [call("c").cost(0.99).step(), call("c").cost(0.01).step(), call("c").cost(0.000001).step(),]
);

case!(
    step5_settle_with_actual_cost,
    "budgets:\n  run: 1.00\n",
    [
        call("c").cost(0.50).actual(0.90).step(),
        call("c").cost(0.20).step(),
        call("c").cost(0.10).actual(0.0).step(),
        call("c").cost(0.10).step(),
    ]
);

case!(
    step6_approvals,
    r#"
approvals:
  actions: [transfer_funds]
  cost_threshold_usd: 100
  timeout_seconds: 600
  approvers: [manager@company.com]
"#,
    [
        call("transfer_funds").step(),
        call("transfer_funds").approved().step(),
        call("buy_gpu").cost(100.0).step(),
        call("buy_gpu").cost(100.01).step(),
        Step::Explain(call("transfer_funds")),
    ]
);

case!(
    step6_budget_denies_before_approval_is_asked,
    "budgets:\n  run: 1\napprovals:\n  actions: [pay]\n",
    [call("pay").cost(5.0).step(), call("pay").cost(0.5).step()]
);

case!(
    step7_anomaly_learns_then_blocks_outliers,
    "anomaly:\n  z_threshold: 3\n  min_samples: 5\n  min_deviation: 1\n  action: block\n",
    [
        call("transfer").args(json!({"amount": 50})).step(),
        call("transfer").args(json!({"amount": 60})).step(),
        call("transfer").args(json!({"amount": 70})).step(),
        call("transfer").args(json!({"amount": 80})).step(),
        call("transfer").args(json!({"amount": 90})).step(),
        call("transfer").args(json!({"amount": 5000})).step(),
        call("transfer").args(json!({"amount": 75})).step(),
        // Outliers are kept out of the baseline, so the next one is caught too.
        call("transfer").args(json!({"amount": 5000})).step(),
        // Each action has its own baseline.
        call("refund").args(json!({"amount": 5000})).step(),
    ]
);

case!(
    step7_no_verdict_before_min_samples,
    "anomaly:\n  min_samples: 5\n  action: block\n",
    [
        call("transfer").args(json!({"amount": 50})).step(),
        call("transfer").args(json!({"amount": 60})).step(),
        call("transfer").args(json!({"amount": 70})).step(),
        call("transfer").args(json!({"amount": 80})).step(),
        call("transfer").args(json!({"amount": 5000})).step(),
    ]
);

case!(
    step7_anomaly_tolerates_a_zero_variance_baseline,
    "anomaly:\n  min_samples: 3\n  min_deviation: 5\n",
    [
        call("poll").args(json!({"n": 10})).step(),
        call("poll").args(json!({"n": 10})).step(),
        call("poll").args(json!({"n": 10})).step(),
        call("poll").args(json!({"n": 12})).step(),
        call("poll").args(json!({"n": 40})).step(),
    ]
);

const MERGE: &str = r#"
policies:
  - name: global-a
    budgets: { run: 10 }
    denied_actions: [drop_table]
    allowed_actions: [search, read, write, pay]
    rate_limits:
      search: { max_count: 5, window_seconds: 60 }
    approvals: { cost_threshold_usd: 50, timeout_seconds: 900, approvers: [a@x.com] }
  - name: global-b
    budgets: { run: 8 }
    rate_limits:
      search: { max_count: 2, window_seconds: 60 }
  - name: trading
    scope: agent
    agent_id: trading-bot
    budgets: { run: 5 }
    denied_actions: [write]
    allowed_actions: [search, read, pay]
    approvals: { cost_threshold_usd: 3, timeout_seconds: 60, approvers: [b@x.com] }
  - name: run-42
    scope: run
    run_id: run-42
    allowed_actions: [read]
  - name: disabled
    enabled: false
    denied_actions: [search]
  - name: other-agent
    scope: agent
    agent_id: someone-else
    denied_actions: [search]
"#;

case!(
    merge_most_restrictive_wins,
    MERGE,
    [
        // Budgets take the minimum: 8 for everyone, 5 for the trading bot.
        call("read").cost(8.0).step(),
        call("read").cost(5.01).agent("trading-bot").run("run-7").step(),
        // Denied lists union; allowlists intersect.
        call("write").step(),
        call("write").agent("trading-bot").step(),
        call("drop_table").agent("trading-bot").step(),
        call("search").run("run-42").step(),
        call("read").run("run-42").step(),
        // Every rate limit applies: global-b's 2 per minute is the tighter.
        call("search").run("run-x").step(),
        call("search").run("run-x").step(),
        call("search").run("run-x").step(),
        // Approval thresholds take the minimum and approvers union.
        Step::Explain(call("pay").cost(4.0).agent("trading-bot").run("run-8")),
        Step::Explain(call("pay").cost(4.0).run("run-8")),
    ]
);

case!(
    shadow_mode_records_but_never_blocks,
    r#"
policies:
  - name: live
    budgets: { run: 100 }
  - name: trial
    mode: shadow
    denied_actions: [send_email]
    budgets: { run: 1 }
    rate_limits:
      search: { max_count: 1, window_seconds: 60 }
"#,
    [call("send_email").step(), call("search").cost(0.5).step(), call("search").cost(0.7).step(), call("read").step(),]
);

case!(
    invalid_requests_are_denied_with_a_reason,
    "budgets:\n  run: 1\n",
    [
        call("x").cost(f64::NAN).step(),
        call("x").cost(-1.0).step(),
        call("x").cost(f64::INFINITY).step(),
        call("").step(),
        call("x").args(json!([1, 2])).step(),
    ]
);

case!(
    explanations,
    MERGE,
    [
        Step::Explain(call("drop_table")),
        Step::Explain(call("read").cost(9.0)),
        Step::Explain(call("write").agent("trading-bot")),
    ]
);
