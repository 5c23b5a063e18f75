//! Agent Sentinel vs Cedar on the same two decisions, in the same run.
//!
//! (a) `deny_list_10k`: 10,000 denied action names; one denied name and one allowed name.
//!     Sentinel: one global policy with `denied_actions: [action_00000, ..., action_09999]`.
//!     Cedar, two forms: `cedar_10k_forbids` (10,000 `forbid(principal, action == Action::"action_NNNNN", resource);`
//!     plus `permit(principal, action, resource);`) and `cedar_action_in` (one
//!     `forbid(principal, action in [Action::"action_00000", ...], resource);` plus the permit).
//! (b) `arg_condition`: block `transfer_funds` when `amount > 1000`; amount 5000 (denied) and 50 (allowed).
//!     Sentinel: a rule with `function_pattern: transfer_funds` and condition `amount gt 1000`.
//!     Cedar: `forbid(principal, action == Action::"transfer_funds", resource) when { context.amount > 1000 };`
//!     plus the permit, with `amount` in the request context.
//!
//! Sentinel is measured with `Engine::evaluate` (no reservation: like Cedar, a pure function of the
//! request) and with `Engine::decide` followed by an immediate `release()` of the reservation.
//! Each measured call builds its request: Sentinel its `ActionRequest` (and, in (b), the JSON
//! arguments object); Cedar its action `EntityUid`, `Context` and `Request`. Policy sets,
//! the `Authorizer`, `Entities` and the principal/resource ids (cloned per call) are built once.
//!
//! After criterion's own report, a summary re-times every case with `Instant` (median of batch
//! means) and prints the cedar/sentinel ratios.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::hint::black_box;
use std::str::FromStr;
use std::time::{Duration, Instant};

use cedar_policy::{
    Authorizer, Context, Decision as CedarDecision, Entities, EntityId, EntityTypeName, EntityUid,
    PolicySet as CedarPolicySet, Request, RestrictedExpression,
};
use criterion::Criterion;
use sentinel_core::load::parse_yaml;
use sentinel_core::{ActionRequest, Engine, PolicySet, Verdict};

const N_DENIED: usize = 10_000;
const DENIED_NAME: &str = "action_05000";
const ALLOWED_NAME: &str = "read_file";
const AGENT: &str = "agent-1";

fn denied_names() -> Vec<String> {
    (0..N_DENIED).map(|i| format!("action_{i:05}")).collect()
}

fn sentinel_engine(yaml: &str) -> Engine {
    let docs = parse_yaml("bench.yaml", "bench", yaml).expect("policy parses");
    Engine::new(PolicySet::compile(docs).expect("policy compiles"))
}

fn sentinel_deny_list() -> Engine {
    let mut yaml = String::from("name: deny-list\ndenied_actions:\n");
    for n in denied_names() {
        yaml.push_str("  - ");
        yaml.push_str(&n);
        yaml.push('\n');
    }
    sentinel_engine(&yaml)
}

fn sentinel_arg_condition() -> Engine {
    sentinel_engine(
        "name: transfers\n\
         rules:\n\
         \x20 - id: large-transfer\n\
         \x20   function_pattern: transfer_funds\n\
         \x20   conditions:\n\
         \x20     - { param: amount, operator: gt, value: 1000 }\n\
         \x20   action: block\n",
    )
}

const PERMIT_ALL: &str = "permit(principal, action, resource);\n";

fn cedar_10k_forbids() -> CedarPolicySet {
    let mut src = String::with_capacity(N_DENIED * 64);
    for n in denied_names() {
        src.push_str(&format!("forbid(principal, action == Action::\"{n}\", resource);\n"));
    }
    src.push_str(PERMIT_ALL);
    CedarPolicySet::from_str(&src).expect("cedar policies parse")
}

fn cedar_action_in() -> CedarPolicySet {
    let list: Vec<String> = denied_names().iter().map(|n| format!("Action::\"{n}\"")).collect();
    let src = format!("forbid(principal, action in [{}], resource);\n{PERMIT_ALL}", list.join(", "));
    CedarPolicySet::from_str(&src).expect("cedar policies parse")
}

fn cedar_arg_condition() -> CedarPolicySet {
    let src = format!(
        "forbid(principal, action == Action::\"transfer_funds\", resource) when {{ context.amount > 1000 }};\n{PERMIT_ALL}"
    );
    CedarPolicySet::from_str(&src).expect("cedar policies parse")
}

/// What every Cedar call shares, built once.
struct CedarFixture {
    authorizer: Authorizer,
    entities: Entities,
    principal: EntityUid,
    resource: EntityUid,
    action_type: EntityTypeName,
}

impl CedarFixture {
    fn new() -> Self {
        CedarFixture {
            authorizer: Authorizer::new(),
            entities: Entities::empty(),
            principal: EntityUid::from_str(&format!("Agent::\"{AGENT}\"")).unwrap(),
            resource: EntityUid::from_str("Tool::\"default\"").unwrap(),
            action_type: EntityTypeName::from_str("Action").unwrap(),
        }
    }

    /// Builds the request (action id, context, request) and decides it. True when denied.
    fn denied(&self, policies: &CedarPolicySet, action: &str, amount: Option<i64>) -> bool {
        let action = EntityUid::from_type_name_and_id(self.action_type.clone(), EntityId::new(action));
        let context = match amount {
            Some(a) => Context::from_pairs([("amount".to_string(), RestrictedExpression::new_long(a))]).unwrap(),
            None => Context::empty(),
        };
        let request = Request::new(self.principal.clone(), action, self.resource.clone(), context, None).unwrap();
        self.authorizer.is_authorized(&request, policies, &self.entities).decision() == CedarDecision::Deny
    }
}

fn sentinel_evaluate(engine: &Engine, action: &str, amount: Option<i64>) -> bool {
    let args = match amount {
        Some(a) => serde_json::json!({ "amount": a }),
        None => serde_json::Value::Null,
    };
    let req = ActionRequest::new(action).agent(AGENT).args(&args);
    engine.evaluate(&req).verdict == Verdict::Deny
}

fn sentinel_decide(engine: &Engine, action: &str, amount: Option<i64>) -> bool {
    let args = match amount {
        Some(a) => serde_json::json!({ "amount": a }),
        None => serde_json::Value::Null,
    };
    let req = ActionRequest::new(action).agent(AGENT).args(&args);
    let mut d = engine.decide(&req);
    if let Some(r) = d.take_reservation() {
        r.release();
    }
    d.verdict == Verdict::Deny
}

/// One measured case: `group/input/engine`, and a call that answers "denied?".
struct Case<'a> {
    group: &'static str,
    input: &'static str,
    engine: &'static str,
    expect_denied: bool,
    call: Box<dyn Fn() -> bool + 'a>,
}

impl Case<'_> {
    fn name(&self) -> String {
        format!("{}/{}/{}", self.group, self.input, self.engine)
    }
}

struct Fixtures {
    s_deny: Engine,
    s_arg: Engine,
    c_10k: CedarPolicySet,
    c_in: CedarPolicySet,
    c_arg: CedarPolicySet,
    cedar: CedarFixture,
}

fn timed<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let v = f();
    println!("setup: {what:<44} {:>9.1} ms", t.elapsed().as_secs_f64() * 1e3);
    v
}

fn fixtures() -> Fixtures {
    Fixtures {
        s_deny: timed("sentinel 10k denied_actions (parse+compile)", sentinel_deny_list),
        s_arg: timed("sentinel arg-condition rule (parse+compile)", sentinel_arg_condition),
        c_10k: timed("cedar 10k forbid policies (parse)", cedar_10k_forbids),
        c_in: timed("cedar 1 forbid `action in [10k]` (parse)", cedar_action_in),
        c_arg: timed("cedar arg-condition forbid (parse)", cedar_arg_condition),
        cedar: CedarFixture::new(),
    }
}

fn cases(f: &Fixtures) -> Vec<Case<'_>> {
    let mut v: Vec<Case<'_>> = Vec::new();
    let inputs_a: [(&'static str, &'static str, bool); 2] =
        [("denied", DENIED_NAME, true), ("allowed", ALLOWED_NAME, false)];
    for (input, name, expect_denied) in inputs_a {
        let g = "deny_list_10k";
        v.push(Case {
            group: g,
            input,
            engine: "sentinel_evaluate",
            expect_denied,
            call: Box::new(move || sentinel_evaluate(&f.s_deny, black_box(name), None)),
        });
        v.push(Case {
            group: g,
            input,
            engine: "sentinel_decide",
            expect_denied,
            call: Box::new(move || sentinel_decide(&f.s_deny, black_box(name), None)),
        });
        v.push(Case {
            group: g,
            input,
            engine: "cedar_10k_forbids",
            expect_denied,
            call: Box::new(move || f.cedar.denied(&f.c_10k, black_box(name), None)),
        });
        v.push(Case {
            group: g,
            input,
            engine: "cedar_action_in",
            expect_denied,
            call: Box::new(move || f.cedar.denied(&f.c_in, black_box(name), None)),
        });
    }
    let inputs_b: [(&'static str, i64, bool); 2] = [("amount_5000", 5000, true), ("amount_50", 50, false)];
    for (input, amount, expect_denied) in inputs_b {
        let g = "arg_condition";
        v.push(Case {
            group: g,
            input,
            engine: "sentinel_evaluate",
            expect_denied,
            call: Box::new(move || sentinel_evaluate(&f.s_arg, black_box("transfer_funds"), Some(black_box(amount)))),
        });
        v.push(Case {
            group: g,
            input,
            engine: "sentinel_decide",
            expect_denied,
            call: Box::new(move || sentinel_decide(&f.s_arg, black_box("transfer_funds"), Some(black_box(amount)))),
        });
        v.push(Case {
            group: g,
            input,
            engine: "cedar",
            expect_denied,
            call: Box::new(move || f.cedar.denied(&f.c_arg, black_box("transfer_funds"), Some(black_box(amount)))),
        });
    }
    v
}

/// Median over batches of the mean time per call, in nanoseconds.
fn median_ns(call: &dyn Fn() -> bool, quick: bool) -> f64 {
    let (warm, batch_target, batches) = if quick {
        (Duration::from_millis(1), Duration::from_micros(200), 3)
    } else {
        (Duration::from_millis(300), Duration::from_millis(15), 21)
    };
    let start = Instant::now();
    let mut calls: u64 = 0;
    while start.elapsed() < warm || calls == 0 {
        black_box(call());
        calls += 1;
    }
    let per_call = start.elapsed().as_secs_f64() / calls as f64;
    let n = ((batch_target.as_secs_f64() / per_call) as u64).max(1);
    let mut means: Vec<f64> = (0..batches)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..n {
                black_box(call());
            }
            t.elapsed().as_secs_f64() * 1e9 / n as f64
        })
        .collect();
    means.sort_by(f64::total_cmp);
    means[means.len() / 2]
}

fn summary(cases: &[Case<'_>], quick: bool) {
    let medians: Vec<f64> = cases.iter().map(|c| median_ns(&*c.call, quick)).collect();
    let find = |group: &str, input: &str, engine: &str| {
        cases
            .iter()
            .zip(&medians)
            .find(|(c, _)| c.group == group && c.input == input && c.engine == engine)
            .map(|(_, m)| *m)
    };
    println!();
    println!("== summary: median ns per decision (Instant, median of batch means) ==");
    println!("{:<44} {:>12} {:>22} {:>22}", "name", "median_ns", "ratio cedar/s_evaluate", "ratio cedar/s_decide");
    for (c, m) in cases.iter().zip(&medians) {
        let (r_eval, r_dec) = if c.engine.starts_with("cedar") {
            let e = find(c.group, c.input, "sentinel_evaluate").map_or(f64::NAN, |s| m / s);
            let d = find(c.group, c.input, "sentinel_decide").map_or(f64::NAN, |s| m / s);
            (format!("{e:.1}x"), format!("{d:.1}x"))
        } else {
            ("-".to_string(), "-".to_string())
        };
        println!("{:<44} {:>12.1} {:>22} {:>22}", c.name(), m, r_eval, r_dec);
    }
    println!();
    for c in cases.iter().filter(|c| c.engine.starts_with("cedar")) {
        let m = find(c.group, c.input, c.engine).unwrap_or(f64::NAN);
        let e = find(c.group, c.input, "sentinel_evaluate").unwrap_or(f64::NAN);
        let d = find(c.group, c.input, "sentinel_decide").unwrap_or(f64::NAN);
        println!(
            "RATIO {:<40} cedar/sentinel_evaluate = {:>9.1}x   cedar/sentinel_decide = {:>9.1}x",
            c.name(),
            m / e,
            m / d
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let listing = args.iter().any(|a| a == "--list");
    let quick = args.iter().any(|a| a == "--test");

    let f = fixtures();
    let cases = cases(&f);

    // Both engines must give the expected answer, or the comparison means nothing.
    for c in &cases {
        assert_eq!((c.call)(), c.expect_denied, "{} answered the wrong verdict", c.name());
    }

    let mut criterion = Criterion::default()
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
        .sample_size(30)
        .configure_from_args();
    for group in ["deny_list_10k", "arg_condition"] {
        let mut g = criterion.benchmark_group(group);
        for c in cases.iter().filter(|c| c.group == group) {
            g.bench_function(format!("{}/{}", c.input, c.engine), |b| b.iter(|| black_box((c.call)())));
        }
        g.finish();
    }
    criterion.final_summary();

    if !listing {
        summary(&cases, quick);
    }
}
