//! A simulated agent whose every tool call goes through a `Guard`: run it to see decisions being
//! made and recorded, then inspect the ledger with the `sentinel` command.
//!
//!     cargo run --release -p sentinel-core --example guarded_agent -- [POLICY.yaml] [HOME]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::path::PathBuf;
use std::sync::Arc;

use sentinel_core::guard::default_home;
use sentinel_core::ledger::LogOptions;
use sentinel_core::{ActionRequest, Begun, CallOutcome, Engine, Guard, PolicySet, load};
use serde_json::json;

fn main() {
    let mut args = std::env::args().skip(1);
    let policy = PathBuf::from(args.next().unwrap_or_else(|| "examples/production.yaml".into()));
    let home = args.next().map_or_else(default_home, PathBuf::from);
    let docs = load::load_file(&policy).unwrap_or_else(|errors| {
        for e in errors {
            eprintln!("error: {e}");
        }
        std::process::exit(1)
    });
    let engine = Arc::new(Engine::new(PolicySet::compile(docs).expect("valid policy")));
    let guard = Guard::open(&home, engine, LogOptions::default()).unwrap_or_else(|e| {
        eprintln!("error: {e}");
        std::process::exit(1)
    });
    let calls = [
        ("search_web", 0.01, json!({"query": "quarterly revenue"})),
        ("call_llm", 0.20, json!({"prompt": "summarise", "api_key": "sk-live-abcdefghijklmnop"})),
        ("call_llm", 0.20, json!({"prompt": "draft email"})),
        ("send_email", 0.0, json!({"to": "partner@example.org", "subject": "Q3"})),
        ("transfer_funds", 0.05, json!({"amount": 250, "to": "acct-42"})),
        ("transfer_funds", 0.05, json!({"amount": 25000, "to": "acct-666"})),
        ("delete_production_database", 0.0, json!({"confirm": true})),
        ("write_config", 0.0, json!({"env": "production", "key": "replicas"})),
        ("call_llm", 0.20, json!({"prompt": "one more"})),
        ("query_api", 0.02, json!({"endpoint": "/v1/orders"})),
    ];
    println!("policy {} (version {}), ledger in {}", policy.display(), guard.engine().policy_version(), home.display());
    for (action, cost, args) in calls {
        let req =
            ActionRequest::new(action).agent("trading-bot").run("run-1").session("session-1").cost(cost).args(&args);
        match guard.begin(&req, args.clone()).expect("ledger writable") {
            Begun::Proceed(permit) => {
                let verdict = permit.verdict().as_str();
                let shadow: Vec<String> = permit
                    .decision
                    .shadow
                    .iter()
                    .map(|f| format!("{} would {}", f.policy, f.verdict.as_str()))
                    .collect();
                // ... the real tool would run here ...
                guard.finish(*permit, CallOutcome::Success(json!({"ok": true})), None).expect("ledger writable");
                println!("{action:<28} {verdict:<16} {}", shadow.join("; "));
            }
            Begun::Stop { decision, .. } => {
                println!(
                    "{action:<28} {:<16} {} ({})",
                    decision.verdict.as_str(),
                    decision.message,
                    decision.reason.as_str()
                );
            }
        }
    }
    let spend = guard.engine().spend("session-1", "run-1");
    println!("spent this run: {}, this session: {}", spend.run_total, spend.session_total);
}
