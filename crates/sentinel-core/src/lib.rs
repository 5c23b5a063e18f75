//! Agent Sentinel's decision core.
//!
//! Policies are parsed and validated once ([`load`]), compiled into an indexed [`PolicySet`], and
//! every call is decided against it by [`Engine::decide`], which never fails: an internal problem
//! becomes a decision under the policy's `fail_mode`. Decisions and executions are recorded in a
//! hash-chained ledger ([`ledger`]).
//!
//! This crate knows nothing about HTTP, SQL, Python or async runtimes.

pub mod clock;
pub mod compile;
pub mod counters;
pub mod decision;
pub mod engine;
pub mod guard;
pub mod ledger;
pub mod load;
pub mod model;
pub mod money;
pub mod records;
pub mod redact;
pub mod report;

pub use clock::{Clock, ManualClock, SystemClock};
pub use compile::PolicySet;
pub use counters::{ActionSpend, Reservation};
pub use decision::{ActionRequest, Decision, InterventionType, Limit, LimitKind, ReasonCode, RiskLevel, Verdict};
pub use engine::{BudgetCheck, CounterPlan, Engine, HaltTarget, SpendSnapshot, WindowCheck};
pub use guard::{Begun, CallOutcome, CallParts, Guard, Inputs, Logs, Permit};
pub use ledger::{ChainWriter, LedgerError, LogOptions};
pub use load::PolicyError;
pub use model::PolicyDoc;
pub use money::Usd;
