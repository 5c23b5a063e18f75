//! A sequence of calls, derived from the fuzz input, decided against one fixed policy that uses
//! every feature: lists, rules with every operator, rate limits, loops, budgets, approvals,
//! anomaly detection, shadow mode and agent/run scopes.
//!
//! `decide` must never panic (libfuzzer-sys's panic hook aborts even on panics the engine
//! catches itself), must never answer `INTERNAL_ERROR`, and must hold a reservation exactly
//! when it permits the call. Every reservation is settled, released or dropped.
#![no_main]

use std::sync::{Arc, OnceLock};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use sentinel_core::load::parse_yaml;
use sentinel_core::{ActionRequest, Engine, HaltTarget, ManualClock, PolicySet, ReasonCode, Reservation, Usd};
use serde_json::Value;

const POLICY: &str = r#"
policies:
  - name: global
    scope: global
    fail_mode: secure
    budgets:
      session: 8.0
      run: 5.0
      actions:
        call_llm: 1.5
        free_action: 0
    denied_actions: [drop_table, rm_rf_root, "delete production"]
    rate_limits:
      api_call: { max_count: 3, window_seconds: 1 }
      search_web: { max_count: 2, window_seconds: 0.5, per: run }
      send_email: { max_count: 2, window_seconds: 60, per: session }
      ping: { max_count: 1, window_seconds: 0.25, per: global }
    loops:
      max_repeats: 3
      window_seconds: 2
    approvals:
      actions: [modify_production_config]
      cost_threshold_usd: 2.0
      timeout_seconds: 600
      approvers: [manager@company.com]
    anomaly:
      z_threshold: 2.0
      min_samples: 3
      min_deviation: 1.0
      action: block
    rules:
      - { id: r-eq, function_pattern: "op_*", conditions: [{ param: mode, operator: eq, value: "prod" }], action: block }
      - { id: r-ne, function_pattern: "op_*", conditions: [{ param: region, operator: ne, value: "eu" }], action: warn }
      - { id: r-gt, function_pattern: "transfer_*", conditions: [{ param: amount, operator: gt, value: 1000 }], action: require_approval, priority: 5 }
      - { id: r-gte, function_pattern: "transfer_*", conditions: [{ param: amount, operator: gte, value: 100000 }], action: block, priority: 10 }
      - { id: r-lt, function_pattern: "transfer_*", conditions: [{ param: amount, operator: lt, value: 0 }], action: block }
      - { id: r-lte, function_pattern: "refund", conditions: [{ param: amount, operator: lte, value: -1.5 }], action: warn }
      - { id: r-in, function_pattern: "deploy", conditions: [{ param: env, operator: in, value: [prod, "production", 1, true] }], action: require_approval }
      - { id: r-not-in, function_pattern: "deploy", conditions: [{ param: env, operator: not_in, value: [dev, staging, prod, production] }], action: block }
      - { id: r-contains, function_pattern: "send_email", conditions: [{ param: to, operator: not_contains, value: "@company.com" }], action: warn }
      - { id: r-contains-list, function_pattern: "tag_*", conditions: [{ param: tags, operator: contains, value: "secret" }], action: block }
      - { id: r-starts, function_pattern: "{read,write}_file", conditions: [{ param: path, operator: starts_with, value: "/etc/" }], action: block }
      - { id: r-ends, function_pattern: "*_file", conditions: [{ param: path, operator: ends_with, value: ".pem" }], action: require_approval }
      - { id: r-matches, function_pattern: "run_sql", conditions: [{ param: query, operator: matches, value: "(?i)\\b(drop|truncate)\\b" }], action: block }
      - id: r-nested
        function_pattern: "[a-z]*_nested"
        conditions:
          - { param: a.b.c, operator: gte, value: 3 }
          - { param: a.kind, operator: eq, value: { x: [1, 2] } }
        action: block
        message: nested condition hit
      - { id: r-allow, function_pattern: "safe_*", action: allow, priority: 100 }
      - { id: r-disabled, function_pattern: "*", action: block, enabled: false }

  - name: trading
    scope: agent
    agent_id: trading-bot
    allowed_actions: [call_llm, transfer_funds, api_call, search_web, ping, safe_read]
    default_action: warn
    budgets:
      run: 2.0

  - name: run-approvals
    scope: run
    run_id: run-7
    default_action: require_approval
    rules:
      - { id: run-block, function_pattern: "write_*", action: block }

  - name: locked-run
    scope: run
    run_id: locked
    default_action: block
    rules:
      - { id: locked-read, function_pattern: "read_*", action: allow }

  - name: shadow-allowlist
    scope: global
    mode: shadow
    allowed_actions: [call_llm, api_call]
    rate_limits:
      call_llm: { max_count: 2, window_seconds: 5 }
    budgets:
      session: 1.0
    rules:
      - { id: shadow-block, function_pattern: "*", conditions: [{ param: amount, operator: gt, value: 10 }], action: block }

  - name: safe-fail
    scope: agent
    agent_id: lenient
    strict_mode: false
    denied_actions: [forbidden]
    loops:
      max_repeats: 1
      window_seconds: 0.1
"#;

const ACTIONS: &[&str] = &[
    "call_llm",
    "free_action",
    "drop_table",
    "delete production",
    "api_call",
    "search_web",
    "send_email",
    "ping",
    "modify_production_config",
    "op_deploy",
    "transfer_funds",
    "refund",
    "deploy",
    "tag_resource",
    "read_file",
    "write_file",
    "run_sql",
    "x_nested",
    "safe_read",
    "forbidden",
    "",
];

const IDS: &[&str] = &["default", "trading-bot", "lenient", "run-7", "locked", "s1", ""];

struct Fixture {
    engine: Engine,
    clock: Arc<ManualClock>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let docs = match parse_yaml("decide.yaml", "decide", POLICY) {
            Ok(d) => d,
            Err(e) => panic!("the fixed fuzz policy does not parse: {e:?}"),
        };
        let set = match PolicySet::compile(docs) {
            Ok(s) => s,
            Err(e) => panic!("the fixed fuzz policy does not compile: {e:?}"),
        };
        let clock = Arc::new(ManualClock::new(1_700_000_000_000_000_000));
        let engine = Engine::with_clock(set, clock.clone());
        Fixture { engine, clock }
    })
}

#[derive(Arbitrary, Debug)]
enum Name<'a> {
    Known(u8),
    Free(&'a str),
}

impl<'a> Name<'a> {
    fn get(&self, list: &'static [&'static str]) -> &'a str {
        match self {
            Name::Known(i) => list.get(usize::from(*i) % list.len()).copied().unwrap_or(""),
            Name::Free(s) => s,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Cost {
    Raw(f64),
    Cents(u16),
    Nan,
    NegZero,
    Negative,
    Infinite,
    Huge,
}

impl Cost {
    fn get(&self) -> f64 {
        match self {
            Cost::Raw(f) => *f,
            Cost::Cents(c) => f64::from(*c) / 100.0,
            Cost::Nan => f64::NAN,
            Cost::NegZero => -0.0,
            Cost::Negative => -1.0,
            Cost::Infinite => f64::INFINITY,
            Cost::Huge => 1e300,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Args<'a> {
    None,
    /// Parsed as JSON when valid, otherwise passed as a JSON string (which `decide` must reject).
    Json(&'a str),
    Amount(f64),
    Fields(Vec<(Name<'a>, i64)>),
}

const PARAMS: &[&str] = &["amount", "mode", "region", "env", "to", "tags", "path", "query", "a", "cost_usd"];

impl Args<'_> {
    fn value(&self) -> Value {
        match self {
            Args::None => Value::Null,
            Args::Json(s) => serde_json::from_str(s).unwrap_or_else(|_| Value::String((*s).to_string())),
            Args::Amount(f) => serde_json::json!({ "amount": f }),
            Args::Fields(fs) => {
                let mut m = serde_json::Map::new();
                for (k, v) in fs {
                    m.insert(k.get(PARAMS).to_string(), Value::from(*v));
                }
                Value::Object(m)
            }
        }
    }
}

#[derive(Arbitrary, Debug)]
enum After {
    Release,
    Settle(Cost),
    /// Dropping keeps the estimated cost.
    Drop,
    /// Held until the end of the input, then released.
    Hold,
}

#[derive(Arbitrary, Debug)]
enum Kind {
    Decide,
    Approved,
    Evaluate,
}

#[derive(Arbitrary, Debug)]
struct Call<'a> {
    kind: Kind,
    action: Name<'a>,
    agent: Name<'a>,
    run: Name<'a>,
    session: Name<'a>,
    cost: Cost,
    args: Args<'a>,
    tags: Vec<String>,
    after: After,
    advance_ms: u16,
}

#[derive(Arbitrary, Debug)]
enum Op<'a> {
    Call(Call<'a>),
    Halt { run: bool, id: u8 },
    Resume { run: bool, id: u8 },
    ResetRun { session: Name<'a>, run: Name<'a> },
}

fn target(run: bool, id: u8) -> HaltTarget {
    let id = IDS.get(usize::from(id) % IDS.len()).copied().unwrap_or("").to_string();
    if run { HaltTarget::Run(id) } else { HaltTarget::Agent(id) }
}

fn call(f: &Fixture, c: &Call<'_>, held: &mut Vec<Reservation>) {
    f.clock.advance_secs(f64::from(c.advance_ms) / 1000.0);
    let args = c.args.value();
    let req = ActionRequest::new(c.action.get(ACTIONS))
        .agent(c.agent.get(IDS))
        .run(c.run.get(IDS))
        .session(c.session.get(IDS))
        .cost(c.cost.get())
        .args(&args)
        .tags(&c.tags);
    let mut d = match c.kind {
        Kind::Decide => f.engine.decide(&req),
        Kind::Approved => f.engine.decide_approved(&req),
        Kind::Evaluate => {
            let d = f.engine.evaluate(&req);
            assert!(d.reservation.is_none(), "evaluate reserved: {d:?}");
            d
        }
    };
    assert_ne!(d.reason, ReasonCode::InternalError, "internal error: {d:?}");
    let _ = serde_json::to_string(&d);
    let reservation = d.take_reservation();
    if !matches!(c.kind, Kind::Evaluate) {
        assert_eq!(reservation.is_some(), d.permits(), "reservation does not match verdict: {d:?}");
    }
    let Some(r) = reservation else { return };
    match &c.after {
        After::Release => r.release(),
        After::Settle(cost) => match Usd::from_f64(cost.get()) {
            Ok(actual) => r.settle(actual),
            Err(_) => r.release(),
        },
        After::Drop => drop(r),
        After::Hold => held.push(r),
    }
}

fuzz_target!(|ops: Vec<Op<'_>>| {
    let f = fixture();
    f.engine.reset_counters();
    for run in [false, true] {
        for id in 0..IDS.len() {
            f.engine.resume(&target(run, u8::try_from(id).unwrap_or(0)));
        }
    }
    let mut held = Vec::new();
    for op in ops.iter().take(64) {
        match op {
            Op::Call(c) => call(f, c, &mut held),
            Op::Halt { run, id } => f.engine.halt(target(*run, *id), "fuzz"),
            Op::Resume { run, id } => f.engine.resume(&target(*run, *id)),
            Op::ResetRun { session, run } => f.engine.reset_run(session.get(IDS), run.get(IDS)),
        }
    }
    let _ = f.engine.spend("default", "default");
    for r in held {
        r.release();
    }
});
