//! Central decisions: `/decide`, `/settle` and `/halts`.
//!
//! Two authorities, chosen by the database:
//! - **SQLite** (one server owns the file): the core engine decides in memory; every reservation
//!   change is persisted by a group-commit writer before the caller gets its answer, and the
//!   counters are rebuilt from the database at start. A second server on the same file is refused.
//! - **PostgreSQL** (a fleet): the engine checks halts-free static rules, then the store checks and
//!   reserves against shared counters in one transaction under advisory locks, so every replica
//!   sees the same budgets, windows and halts.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use axum::Json;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use parking_lot::Mutex;
use sentinel_core::decision::RiskLevel;
use sentinel_core::records::assess_risk;
use sentinel_core::{ActionRequest, Decision, Engine, HaltTarget, LimitKind, Reservation, Usd, Verdict};
use sentinel_store::{
    BudgetSpec, CounterOp, InterventionIn, PgDecide, PgDecideOutcome, ReservationRow, Store, WindowSpec, spend_keys,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};

use crate::{ApiError, ApiJson, ApiQuery, AppState, Caller, TypedJson};
use sentinel_store::Scope;

/// Default and largest reservation lifetimes.
pub const DEFAULT_TTL_SECS: f64 = 300.0;
pub const MAX_TTL_SECS: f64 = 86_400.0;

const SHARDS: usize = 16;

/// A reservation held in memory (SQLite authority).
struct Held {
    res: Reservation,
    agent_id: String,
    expires_at: i64,
}

type Ack = oneshot::Sender<Result<(), String>>;

/// Held reservations by id, and the same ids by expiry so the sweeper only visits expired ones.
/// B-trees, not hash maps: a hash map that grows rehashes everything at once, and with many
/// reservations held that pause lands on whichever decision triggered it. Ids are time-ordered
/// (UUIDv7), so inserts go to the right edge of the tree. Keys are the ids' 128 bits, not their
/// text: with many reservations held, comparing 36-byte strings that share their time prefix
/// was most of an insert.
#[derive(Default)]
struct Shard {
    by_id: std::collections::BTreeMap<u128, Held>,
    by_expiry: std::collections::BTreeSet<(i64, u128)>,
}

impl Shard {
    fn insert(&mut self, key: u128, h: Held) {
        self.by_expiry.insert((h.expires_at, key));
        self.by_id.insert(key, h);
    }

    fn remove(&mut self, key: u128) -> Option<Held> {
        let h = self.by_id.remove(&key)?;
        self.by_expiry.remove(&(h.expires_at, key));
        Some(h)
    }

    fn take_expired(&mut self, now_ms: i64) -> Vec<(u128, Held)> {
        let mut out = Vec::new();
        while let Some((at, _)) = self.by_expiry.first()
            && *at <= now_ms
        {
            if let Some((_, key)) = self.by_expiry.pop_first()
                && let Some(h) = self.by_id.remove(&key)
            {
                out.push((key, h));
            }
        }
        out
    }
}

/// The key of a reservation id as this server writes it (a lowercase hyphenated UUID); `None`
/// for any other text, which then matches no held reservation (the text is what the database
/// holds, so another spelling of the same UUID must not match either).
fn key_of(id: &str) -> Option<u128> {
    if id.len() != uuid::fmt::Hyphenated::LENGTH || id.bytes().any(|c| c.is_ascii_uppercase()) {
        return None;
    }
    uuid::Uuid::try_parse(id).ok().map(|u| u.as_u128())
}

/// The id's text for a key (only for expiries, which have no request to take it from).
fn id_of(key: u128) -> String {
    sentinel_store::id_text(uuid::Uuid::from_u128(key))
}

/// The in-memory authority's state.
pub struct Memory {
    held: [Mutex<Shard>; SHARDS],
    persist: Persist,
    /// Held by a settle of a reservation that expired first, from reading its state until the
    /// charge is journaled: two such settles of one reservation must not both charge.
    late: tokio::sync::Mutex<()>,
}

/// Where reservation changes go before a decision is answered.
enum Persist {
    /// A database file: the journal beside it (folded into the database in the background).
    Journal(Arc<crate::journal::Journal>),
    /// An in-memory database (tests): a group-commit writer straight into it.
    Direct(mpsc::UnboundedSender<(CounterOp, Option<Ack>)>),
}

/// Who keeps the counters.
pub enum Authority {
    Memory(Box<Memory>),
    Shared,
}

/// UUIDv7's low bits are random, so they spread the shards evenly.
fn shard_of(key: u128) -> usize {
    (key as usize) % SHARDS
}

impl Memory {
    fn shard(&self, key: u128) -> &Mutex<Shard> {
        self.held.get(shard_of(key)).unwrap_or(&self.held[0])
    }

    /// Records a change; returns once it would survive this process.
    async fn persist(&self, op: CounterOp) -> Result<(), ApiError> {
        let failed = |e: String| {
            tracing::error!(error = %e, "cannot persist a reservation change");
            ApiError::unavailable("the reservation could not be recorded; nothing was reserved")
        };
        match &self.persist {
            // One line, one `write(2)` to the page cache, on this thread: a hand-off to a writer
            // thread and back costs two wake-ups per decision, more than the write itself.
            Persist::Journal(j) => j.append(op).map_err(|e| failed(format!("reservation journal: {e}"))),
            Persist::Direct(writer) => {
                let (tx, rx) = oneshot::channel();
                let stopped = || ApiError::unavailable("the reservation writer has stopped");
                writer.send((op, Some(tx))).map_err(|_| stopped())?;
                match rx.await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(failed(e)),
                    Err(_) => Err(stopped()),
                }
            }
        }
    }

    /// Records a change nobody waits for (an expiry); a failure is logged.
    fn persist_later(&self, op: CounterOp) {
        match &self.persist {
            Persist::Journal(j) => {
                if let Err(e) = j.append(op) {
                    tracing::error!(error = %e, "cannot journal an expired reservation");
                }
            }
            Persist::Direct(writer) => {
                let _ = writer.send((op, None));
            }
        }
    }
}

/// The group-commit writer for an in-memory database: everything queued while one batch is
/// written goes in the next, one SQLite transaction per batch.
fn spawn_writer(store: Store) -> mpsc::UnboundedSender<(CounterOp, Option<Ack>)> {
    let (tx, mut rx) = mpsc::unbounded_channel::<(CounterOp, Option<Ack>)>();
    tokio::spawn(async move {
        let mut ops = Vec::with_capacity(1024);
        let mut acks = Vec::with_capacity(1024);
        while let Some((op, ack)) = rx.recv().await {
            ops.push(op);
            acks.extend(ack);
            while ops.len() < 4096 {
                match rx.try_recv() {
                    Ok((op, ack)) => {
                        ops.push(op);
                        acks.extend(ack);
                    }
                    Err(_) => break,
                }
            }
            let result = store.apply_counter_ops(&ops).await.map_err(|e| e.to_string());
            for a in acks.drain(..) {
                let _ = a.send(result.clone());
            }
            ops.clear();
        }
    });
    tx
}

/// Ten times a second, writes the journaled changes into the database, on a thread of its own at
/// a lower priority than the request threads (see [`crate::background`]): small folds keep each
/// burst of database work short, and the kernel runs decisions before it. The thread ends when the
/// journal is closed (the server stopped) or dropped. Returns once the thread runs, or with why it
/// could not start.
fn spawn_folder(store: Store, journal: &Arc<crate::journal::Journal>) -> std::io::Result<()> {
    let journal = Arc::downgrade(journal);
    let (started, up) = std::sync::mpsc::sync_channel(1);
    std::thread::Builder::new().name("sentinel-fold".into()).spawn(move || {
        // Built here, so that a runtime is never dropped inside the caller's async context.
        let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                let _ = started.send(Err(e));
                return;
            }
        };
        let nice = crate::background::lower_this_thread();
        let _ = started.send(Ok(()));
        rt.block_on(async move {
            let backlog = metrics::gauge!("sentinel_journal_unfolded_changes");
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            for round in 0u64.. {
                tick.tick().await;
                let Some(j) = journal.upgrade() else { break };
                if j.is_closed() {
                    break;
                }
                backlog.set(j.fold(&store).await as f64);
                // SQLite's connection threads run the fold's statements; new ones may have been
                // opened since the last look.
                if let Some(nice) = nice
                    && round.is_multiple_of(10)
                {
                    crate::background::lower_sqlite_threads(nice);
                }
            }
        });
    })?;
    up.recv().map_err(|_| std::io::Error::other("the thread ended before it started folding"))?
}

impl Authority {
    /// Writes everything journaled so far into the database (at shutdown, and before reading a
    /// reservation back from it).
    pub async fn fold_now(&self, store: &Store) {
        if let Authority::Memory(m) = self
            && let Persist::Journal(j) = &m.persist
        {
            j.fold(store).await;
        }
    }

    /// At shutdown: folds what is left and removes the journal when all of it is in the database.
    pub async fn close(&self, store: &Store) {
        self.fold_now(store).await;
        if let Authority::Memory(m) = self
            && let Persist::Journal(j) = &m.persist
            && !j.close_if_folded().await
        {
            tracing::warn!("the reservation journal stays for the next start to fold");
        }
    }
}

/// Milliseconds and nanoseconds since the epoch, from one reading.
fn now_both() -> (i64, i64) {
    use sentinel_core::Clock;
    let ns = i64::try_from(sentinel_core::SystemClock.now_nanos()).unwrap_or(i64::MAX);
    (ns / 1_000_000, ns)
}

impl Authority {
    /// Builds the authority for the store; on SQLite, rebuilds the counters from the database.
    pub async fn open(store: &Store, engine: &Engine) -> Result<Self, sentinel_store::StoreError> {
        if store.backend() == sentinel_store::Backend::Postgres {
            return Ok(Authority::Shared);
        }
        // Fold what an earlier process journaled, so the database is the whole truth before restoring.
        let journal = match store.sqlite_path() {
            Some(db) => {
                let (j, left) = crate::journal::Journal::open(db).map_err(|e| {
                    sentinel_store::StoreError::Invalid(format!(
                        "cannot open the reservation journal beside `{}`: {e}",
                        db.display()
                    ))
                })?;
                for f in left {
                    let n = crate::journal::fold_file(store, &f).await.map_err(sentinel_store::StoreError::Invalid)?;
                    tracing::info!(file = %f.display(), changes = n, "reservation journal folded");
                }
                Some(Arc::new(j))
            }
            None => None,
        };
        let (now_ms, now_ns) = now_both();
        let expired = store.expire_stale_reservations(now_ms).await?;
        let mut restored = 0usize;
        for t in store.settled_totals().await? {
            let req = ActionRequest::new(&t.action).agent("").run(&t.run_id).session(&t.session_id);
            drop(engine.restore(&req, 0, None, micros(t.micros), t.calls));
        }
        let since = now_ns.saturating_sub(i64::try_from(engine.policies().max_window_ns()).unwrap_or(i64::MAX));
        for r in store.settled_since(since).await? {
            let req = ActionRequest::new(&r.action).agent(&r.agent_id).run(&r.run_id).session(&r.session_id);
            drop(engine.restore(&req, digest(r.args_digest), Some(nanos(r.at_ns)), Usd::ZERO, 0));
        }
        let held: [Mutex<Shard>; SHARDS] = std::array::from_fn(|_| Mutex::new(Shard::default()));
        for r in store.live_reservations().await? {
            let req = ActionRequest::new(&r.action).agent(&r.agent_id).run(&r.run_id).session(&r.session_id);
            let res = engine.restore(&req, digest(r.args_digest), Some(nanos(r.at_ns)), micros(r.cost_micros), 1);
            let Some(key) = key_of(&r.id) else {
                // Not an id this server writes: the cost stays held (failing closed) until a restart
                // after the row is fixed.
                tracing::warn!(id = %r.id, "a live reservation with an unreadable id stays held");
                continue;
            };
            if let Some(s) = held.get(shard_of(key)) {
                s.lock().insert(key, Held { res, agent_id: r.agent_id, expires_at: r.expires_at });
                restored += 1;
            }
        }
        for h in store.list_halts().await? {
            let t = if h.kind == "agent" { HaltTarget::Agent(h.target) } else { HaltTarget::Run(h.target) };
            engine.halt(t, &h.reason);
        }
        if expired > 0 || restored > 0 {
            tracing::info!(expired, restored, "reservations recovered from the database");
        }
        let persist = match journal {
            Some(j) => {
                spawn_folder(store.clone(), &j).map_err(|e| {
                    sentinel_store::StoreError::Invalid(format!(
                        "cannot start the reservation journal's folder thread: {e}"
                    ))
                })?;
                Persist::Journal(j)
            }
            None => Persist::Direct(spawn_writer(store.clone())),
        };
        Ok(Authority::Memory(Box::new(Memory { held, persist, late: tokio::sync::Mutex::new(()) })))
    }
}

fn micros(m: i64) -> Usd {
    Usd::from_micros(u64::try_from(m).unwrap_or(0))
}

fn to_micros(u: Usd) -> i64 {
    i64::try_from(u.micros()).unwrap_or(i64::MAX)
}

fn nanos(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

fn digest(d: i64) -> u64 {
    u64::from_ne_bytes(d.to_ne_bytes())
}

fn digest_i64(d: u64) -> i64 {
    i64::from_ne_bytes(d.to_ne_bytes())
}

/// The argument digest as stored.
pub fn digest_of(args: &Value) -> i64 {
    digest_i64(sentinel_core::engine::args_digest(args))
}

/// Releases expired reservations, every second, until the process ends.
pub fn spawn_sweeper(state: AppState) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let (now_ms, now_ns) = now_both();
            if let Err(e) = crate::approvals::expire_due(&state).await {
                tracing::warn!(error = %e.detail, "cannot expire approval requests");
            }
            match &*state.authority {
                Authority::Memory(m) => {
                    let mut expired = Vec::new();
                    for shard in &m.held {
                        expired.extend(shard.lock().take_expired(now_ms));
                    }
                    for (key, h) in expired {
                        h.res.release();
                        m.persist_later(CounterOp::Finish {
                            id: id_of(key),
                            state: "expired",
                            actual_micros: None,
                            at: now_ms,
                        });
                        metrics::counter!("sentinel_reservations_expired_total").increment(1);
                    }
                }
                Authority::Shared => {
                    match state.store.pg_sweep(now_ms, now_ns).await {
                        Ok(n) => metrics::counter!("sentinel_reservations_expired_total").increment(n),
                        Err(e) => tracing::warn!(error = %e, "cannot sweep expired reservations"),
                    }
                    let b = state.store.decide_batching();
                    metrics::counter!("sentinel_shared_decide_transactions_total").absolute(b.transactions);
                    metrics::counter!("sentinel_shared_decide_calls_total").absolute(b.calls);
                }
            }
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Activity: interventions and calls from decisions, buffered in memory and written every 100 ms,
// so a decision costs no database write and wakes no task.

#[derive(Default)]
pub struct Activity {
    interventions: Mutex<Vec<InterventionIn>>,
    /// agent → run → allowed decisions
    decisions: Mutex<HashMap<String, HashMap<String, i64>>>,
}

impl Activity {
    pub(crate) fn intervention(&self, i: InterventionIn) {
        self.interventions.lock().push(i);
    }

    /// Counts an allowed decision; allocates only for an agent or run not seen since the last flush.
    fn decision(&self, agent: &str, run: &str) {
        let mut g = self.decisions.lock();
        let runs = match g.get_mut(agent) {
            Some(r) => r,
            None => g.entry(agent.to_string()).or_default(),
        };
        match runs.get_mut(run) {
            Some(n) => *n += 1,
            None => {
                runs.insert(run.to_string(), 1);
            }
        }
    }

    /// Writes what was buffered; returns the interventions written (for notifications).
    pub async fn flush(&self, store: &Store) -> Vec<InterventionIn> {
        let interventions = std::mem::take(&mut *self.interventions.lock());
        let decisions = std::mem::take(&mut *self.decisions.lock());
        if let Err(e) = store.record_interventions(&interventions).await {
            tracing::error!(error = %e, count = interventions.len(), "cannot record interventions");
        }
        let tallies: Vec<(String, String, i64)> =
            decisions.into_iter().flat_map(|(a, runs)| runs.into_iter().map(move |(r, n)| (a.clone(), r, n))).collect();
        if let Err(e) = store.record_decisions(&tallies).await {
            tracing::warn!(error = %e, "cannot record agent activity");
        }
        interventions
    }
}

/// Flushes the activity buffer every 100 ms until the process ends, and tells people about the
/// interventions that need it.
pub fn spawn_activity(s: AppState) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tick.tick().await;
            let written = s.activity.flush(&s.store).await;
            if !written.is_empty() {
                crate::notify::interventions(&s, &written).await;
            }
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Handlers

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DecideBody {
    /// The action (tool or function) the agent wants to run.
    pub action: String,
    /// Defaults to the agent an `agent` key is bound to, else `default`.
    #[serde(default)]
    pub agent_id: Option<String>,
    #[serde(default)]
    pub run_id: Option<String>,
    #[serde(default)]
    pub session_id: Option<String>,
    /// Estimated cost in USD.
    #[serde(default)]
    pub cost_usd: f64,
    /// The call's arguments, a JSON object.
    #[serde(default, deserialize_with = "crate::strict_value")]
    #[schema(value_type = Object)]
    pub args: Value,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub risk: Option<RiskLevel>,
    #[serde(default)]
    pub blast_radius: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub intent: Option<String>,
    /// How long an unsettled reservation holds its budget (default 300 s, at most one day).
    #[serde(default)]
    pub reservation_ttl_seconds: Option<f64>,
    /// An approved request for exactly this call (from an earlier `require_approval`): the call
    /// is then decided without the approval step, once.
    #[serde(default)]
    pub approval_id: Option<String>,
    /// Shown to the approver if this call needs approval (redacted like the arguments).
    #[serde(default, deserialize_with = "crate::strict_value_opt")]
    #[schema(value_type = Option<Object>)]
    pub context: Option<Value>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ReservationOut {
    pub id: String,
    pub cost_usd: f64,
    /// Milliseconds since the epoch.
    pub expires_at: i64,
}

/// The agent a caller acts for: an `agent` key's own, never another's; else the one asked for or `default`.
pub fn acting_agent(caller: &Caller, asked: Option<&str>) -> Result<String, ApiError> {
    Ok(caller.agent_scope(asked)?.unwrap_or_else(|| ActionRequest::DEFAULT_ID.to_string()))
}

pub(crate) fn check_id(field: &str, v: &str) -> Result<(), ApiError> {
    if v.is_empty() || v.len() > 200 {
        return Err(ApiError::field(field, "must be 1 to 200 characters"));
    }
    if v.chars().any(char::is_control) {
        return Err(ApiError::field(field, "must not contain control characters"));
    }
    Ok(())
}

/// Decides one call and, when it is allowed, reserves its cost and rate-limit slots.
#[utoipa::path(post, path = "/api/v1/decide", request_body = DecideBody, tag = "decisions",
    responses((status = 200, description = "The decision, with a reservation when allowed")))]
pub async fn decide(
    State(s): State<AppState>,
    caller: Caller,
    TypedJson(b): TypedJson<DecideBody>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    caller.require(&[Scope::Admin, Scope::Agent])?;
    let agent = acting_agent(&caller, b.agent_id.as_deref())?;
    let run = b.run_id.clone().unwrap_or_else(|| ActionRequest::DEFAULT_ID.into());
    let session = b.session_id.clone().unwrap_or_else(|| ActionRequest::DEFAULT_ID.into());
    check_id("agent_id", &agent)?;
    check_id("run_id", &run)?;
    check_id("session_id", &session)?;
    if b.action.is_empty() || b.action.len() > 512 {
        return Err(ApiError::field("action", "must be 1 to 512 characters"));
    }
    if !matches!(b.args, Value::Object(_) | Value::Null) {
        return Err(ApiError::field("args", "must be a JSON object"));
    }
    if !(b.cost_usd.is_finite() && b.cost_usd >= 0.0) {
        return Err(ApiError::field("cost_usd", format!("must be a finite amount of at least 0, got {}", b.cost_usd)));
    }
    Usd::from_f64(b.cost_usd).map_err(|e| ApiError::field("cost_usd", e.to_string()))?;
    let ttl = b.reservation_ttl_seconds.unwrap_or(DEFAULT_TTL_SECS);
    if !(ttl.is_finite() && ttl > 0.0 && ttl <= MAX_TTL_SECS) {
        return Err(ApiError::field("reservation_ttl_seconds", format!("must be in (0, {MAX_TTL_SECS}], got {ttl}")));
    }
    let mut req = ActionRequest::new(&b.action)
        .agent(&agent)
        .run(&run)
        .session(&session)
        .cost(b.cost_usd)
        .args(&b.args)
        .tags(&b.tags);
    req.risk = b.risk;
    req.blast_radius = b.blast_radius.as_deref();
    req.description = b.description.as_deref();
    req.intent = b.intent.as_deref();

    let engine = s.engine();
    // A redeemed approval skips the approval step; a resumed pause also skips the budgets (the
    // human let this one call run over them). A pause ended by a raised limit is only approved.
    let (approved, resumed) = match &b.approval_id {
        Some(id) => {
            let a = crate::approvals::redeem(&s, &caller, id, &req).await?;
            (true, crate::approvals::is_resume(&a))
        }
        None => (false, false),
    };
    let (now_ms, now_ns) = now_both();
    let ttl_ms = (ttl * 1000.0) as i64;
    let mut reservation: Option<ReservationOut> = None;
    let mut decision = match &*s.authority {
        Authority::Memory(m) => {
            let mut d = if resumed {
                engine.decide_resumed(&req)
            } else if approved {
                engine.decide_approved(&req)
            } else {
                engine.decide(&req)
            };
            if let Some(res) = d.take_reservation() {
                let uuid = uuid::Uuid::now_v7();
                let (key, id) = (uuid.as_u128(), sentinel_store::id_text(uuid));
                let row = reservation_row(&id, &req, &d, res.cost(), now_ms, now_ns, ttl_ms);
                let expires_at = row.expires_at;
                let cost = res.cost();
                m.shard(key).lock().insert(key, Held { res, agent_id: agent.clone(), expires_at });
                if let Err(e) = m.persist(CounterOp::Reserve(row)).await {
                    if let Some(h) = m.shard(key).lock().remove(key) {
                        h.res.release();
                    }
                    return Err(e);
                }
                reservation = Some(ReservationOut { id, cost_usd: cost.as_f64(), expires_at });
            }
            d
        }
        Authority::Shared => {
            let d = if resumed {
                engine.evaluate_resumed(&req)
            } else if approved {
                engine.evaluate_approved(&req)
            } else {
                engine.evaluate(&req)
            };
            if d.verdict == Verdict::Deny {
                d
            } else {
                let set = engine.policies();
                let plan = set.counter_plan(&req).map_err(|m| ApiError::field("cost_usd", m))?;
                let keys = spend_keys(&session, &run, &b.action);
                let windows: Vec<WindowSpec> = plan
                    .windows
                    .iter()
                    .map(|w| WindowSpec { key: w.key.clone(), max: w.max, window_ns: w.window_ns })
                    .collect();
                let budgets: Vec<BudgetSpec> = plan
                    .budgets
                    .iter()
                    .filter(|_| !resumed)
                    .map(|bc| {
                        let k = match bc.kind {
                            LimitKind::ActionBudget => &keys[0],
                            LimitKind::RunBudget => &keys[1],
                            _ => &keys[2],
                        };
                        BudgetSpec { key: k.clone(), limit_micros: to_micros(bc.limit) }
                    })
                    .collect();
                let id = sentinel_store::new_id();
                let row = d.permits().then(|| reservation_row(&id, &req, &d, plan.cost, now_ms, now_ns, ttl_ms));
                let out = s
                    .store
                    .pg_decide(
                        PgDecide {
                            agent_id: &agent,
                            run_id: &run,
                            now_ns,
                            windows: &windows,
                            budgets: &budgets,
                            cost_micros: to_micros(plan.cost),
                            reserve: row.as_ref(),
                        },
                        &keys[2],
                    )
                    .await
                    .map_err(|e| {
                        tracing::error!(error = %e, "shared decision failed");
                        ApiError::unavailable("the database did not answer; nothing was reserved")
                    })?;
                match out {
                    PgDecideOutcome::Halted(h) => {
                        let t = if h.kind == "agent" { HaltTarget::Agent(h.target) } else { HaltTarget::Run(h.target) };
                        set.halt_denial(&t, &h.reason)
                    }
                    PgDecideOutcome::WindowFull { index, retry_after_ns } => match plan.windows.get(index) {
                        Some(w) => set.window_denial(&req, w, u64::from(w.max), retry_after_ns),
                        None => return Err(ApiError::internal("window index out of range".into())),
                    },
                    PgDecideOutcome::OverBudget { index, spent_micros } => match plan.budgets.get(index) {
                        Some(bc) => set.budget_denial(&req, bc, micros(spent_micros), plan.cost),
                        None => return Err(ApiError::internal("budget index out of range".into())),
                    },
                    PgDecideOutcome::Passed => {
                        if let Some(r) = &row {
                            reservation = Some(ReservationOut {
                                id: r.id.clone(),
                                cost_usd: plan.cost.as_f64(),
                                expires_at: r.expires_at,
                            });
                        }
                        d
                    }
                }
            }
        }
    };

    // `on_budget_exceeded: pause`: the call waits, like an approval, for a human to resume it or
    // raise the limit, instead of failing.
    let paused = !approved
        && decision.verdict == Verdict::Deny
        && decision.reason.is_budget()
        && decision.policy.as_deref().is_some_and(|p| engine.policies().pauses_on_budget(p));
    if paused {
        decision.verdict = Verdict::RequireApproval;
    }
    let decision_id = sentinel_store::new_id();
    let intervention_id = decision.intervention.map(|_| {
        let id = sentinel_store::new_id();
        s.activity.intervention(intervention_of(&id, &req, &decision, now_ms));
        id
    });
    if decision.permits() {
        s.activity.decision(&agent, &run);
        if b.cost_usd > 0.0 {
            s.notifier.spent(&agent, &session, &run, &b.action);
        }
    }
    let m = decide_metrics();
    let counter = match decision.verdict {
        Verdict::Allow => &m.allow,
        Verdict::Warn => &m.warn,
        Verdict::Deny => &m.deny,
        Verdict::RequireApproval => &m.require_approval,
    };
    counter.increment(1);
    m.latency.record(started.elapsed().as_secs_f64());

    let approval_request = if decision.verdict == Verdict::RequireApproval {
        let spend = spend_view(&s, &req).await;
        let cost = (b.cost_usd * 1e6).round() as i64;
        Some(
            crate::approvals::create(
                &s,
                &req,
                &decision,
                intervention_id.clone(),
                cost,
                spend,
                b.context.as_ref(),
                now_ms,
            )
            .await?,
        )
    } else {
        None
    };
    let out = DecideOut {
        approval_request: approval_request.map(|a| {
            let wait = format!("/api/v1/approvals/{}/wait", a.id);
            ApprovalRequestOut { id: a.id, status: a.status, expires_at: a.expires_at, wait }
        }),
        paused,
        decision_id,
        agent_id: agent,
        run_id: run,
        session_id: session,
        intervention_id,
        reservation,
        ..DecideOut::of(&decision)
    };
    Ok(json_answer(&out))
}

/// A JSON answer serialized into one buffer sized for a decision (`Json` grows a small one
/// through a generic writer, a measurable part of `/decide`).
fn json_answer<T: Serialize>(v: &T) -> Response {
    let mut body = Vec::with_capacity(512);
    if let Err(e) = serde_json::to_writer(&mut body, v) {
        return ApiError::internal(format!("cannot serialize the answer: {e}")).into_response();
    }
    let mut res = Response::new(axum::body::Body::from(body));
    res.headers_mut()
        .insert(axum::http::header::CONTENT_TYPE, axum::http::HeaderValue::from_static("application/json"));
    res
}

/// The `/decide` series, registered once: looking a labelled series up costs a hash and a lock.
struct DecideMetrics {
    allow: metrics::Counter,
    warn: metrics::Counter,
    deny: metrics::Counter,
    require_approval: metrics::Counter,
    latency: metrics::Histogram,
}

fn decide_metrics() -> &'static DecideMetrics {
    static M: std::sync::OnceLock<DecideMetrics> = std::sync::OnceLock::new();
    M.get_or_init(|| {
        let by = |v: Verdict| metrics::counter!("sentinel_decisions_total", "verdict" => v.as_str());
        DecideMetrics {
            allow: by(Verdict::Allow),
            warn: by(Verdict::Warn),
            deny: by(Verdict::Deny),
            require_approval: by(Verdict::RequireApproval),
            latency: metrics::histogram!("sentinel_decide_seconds"),
        }
    })
}

/// The `/decide` answer: the decision's own fields (named and ordered as `Decision` serializes
/// them; `serde(flatten)` would route every field through a generic map), then what the server adds.
#[derive(Serialize)]
struct DecideOut<'a> {
    verdict: Verdict,
    intervention: Option<sentinel_core::InterventionType>,
    reason: sentinel_core::ReasonCode,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    policy: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rule: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    limit: Option<&'a sentinel_core::Limit>,
    policy_version: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_after_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    approval: Option<&'a sentinel_core::decision::ApprovalSpec>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    shadow: &'a [sentinel_core::decision::ShadowFinding],
    #[serde(skip_serializing_if = "Option::is_none")]
    approval_request: Option<ApprovalRequestOut>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    paused: bool,
    decision_id: String,
    agent_id: String,
    run_id: String,
    session_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    intervention_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reservation: Option<ReservationOut>,
}

impl<'a> DecideOut<'a> {
    /// The decision's part of the answer; the caller fills in the rest.
    fn of(d: &'a Decision) -> Self {
        DecideOut {
            verdict: d.verdict,
            intervention: d.intervention,
            reason: d.reason,
            message: &d.message,
            policy: d.policy.as_deref(),
            rule: d.rule.as_deref(),
            limit: d.limit.as_ref(),
            policy_version: &d.policy_version,
            retry_after_seconds: d.retry_after_seconds,
            approval: d.approval.as_ref(),
            shadow: &d.shadow,
            approval_request: None,
            paused: false,
            decision_id: String::new(),
            agent_id: String::new(),
            run_id: String::new(),
            session_id: String::new(),
            intervention_id: None,
            reservation: None,
        }
    }
}

#[derive(Serialize)]
struct ApprovalRequestOut {
    id: String,
    status: String,
    expires_at: i64,
    /// Where to long-poll for the answer.
    wait: String,
}

/// One budget that applies to a call, and what has been spent against it.
pub(crate) struct BudgetSpend {
    /// `action`, `run` or `session`.
    pub label: &'static str,
    pub limit: Usd,
    pub spent: Usd,
    pub policy: Arc<str>,
}

/// What a call's session, run and action have spent, and every budget that applies to the call.
pub(crate) struct Spend {
    pub action: Usd,
    pub run: Usd,
    pub session: Usd,
    pub budgets: Vec<BudgetSpend>,
}

/// The spend against each budget that applies to the call (`None` if it cannot be read).
pub(crate) async fn spend_of(s: &AppState, req: &ActionRequest<'_>) -> Option<Spend> {
    let set = s.engine().policies();
    let plan = set.counter_plan(req).ok()?;
    let [action, run, session] = match &*s.authority {
        Authority::Memory(_) => {
            let snap = s.engine().spend(req.session_id, req.run_id);
            let action = snap.actions.iter().find(|(a, _)| a == req.action).map_or(Usd::ZERO, |(_, x)| x.spent);
            [action, snap.run_total, snap.session_total]
        }
        Authority::Shared => s.store.pg_spend(req.session_id, req.run_id, req.action).await.ok()?.map(micros),
    };
    let budgets = plan
        .budgets
        .iter()
        .map(|b| {
            let (label, spent) = match b.kind {
                LimitKind::ActionBudget => ("action", action),
                LimitKind::RunBudget => ("run", run),
                _ => ("session", session),
            };
            BudgetSpend { label, limit: b.limit, spent, policy: Arc::clone(&b.policy) }
        })
        .collect();
    Some(Spend { action, run, session, budgets })
}

/// Spend so far against each budget that applies to the call, for the approver.
async fn spend_view(s: &AppState, req: &ActionRequest<'_>) -> Value {
    let Some(sp) = spend_of(s, req).await else { return Value::Null };
    let budgets: Vec<Value> = sp
        .budgets
        .iter()
        .map(|b| {
            json!({"budget": b.label, "limit_usd": b.limit.as_f64(), "spent_usd": b.spent.as_f64(), "policy": &*b.policy})
        })
        .collect();
    json!({"action_usd": sp.action.as_f64(), "run_usd": sp.run.as_f64(), "session_usd": sp.session.as_f64(), "budgets": budgets})
}

fn reservation_row(
    id: &str,
    req: &ActionRequest<'_>,
    d: &Decision,
    cost: Usd,
    now_ms: i64,
    now_ns: i64,
    ttl_ms: i64,
) -> ReservationRow {
    ReservationRow {
        id: id.into(),
        agent_id: req.agent_id.into(),
        run_id: req.run_id.into(),
        session_id: req.session_id.into(),
        action: req.action.into(),
        args_digest: digest_i64(sentinel_core::engine::args_digest(req.args)),
        cost_micros: to_micros(cost),
        actual_micros: None,
        state: "reserved".into(),
        at_ns: now_ns,
        created_at: now_ms,
        expires_at: now_ms.saturating_add(ttl_ms),
        settled_at: None,
        policy_version: d.policy_version.to_string(),
    }
}

fn intervention_of(id: &str, req: &ActionRequest<'_>, d: &Decision, now_ms: i64) -> InterventionIn {
    let kind = d.intervention.unwrap_or(sentinel_core::InterventionType::Warning);
    let outcome = match d.verdict {
        Verdict::Deny => "BLOCKED",
        Verdict::RequireApproval => "ESCALATED",
        _ => "WARNED",
    };
    let risk = assess_risk(req.risk, kind, req.action, req.tags);
    let est = (req.cost_usd * 1e6).round() as i64;
    let prevented = if d.verdict == Verdict::Deny { est } else { 0 };
    let risk_s = risk.as_str().to_string();
    let kind_s = kind.as_str().to_string();
    let body = json!({
        "id": id,
        "timestamp": sentinel_core::ledger::now_rfc3339(),
        "type": kind_s,
        "outcome": outcome,
        "risk_level": risk_s,
        "blast_radius": req.blast_radius,
        "action": req.action,
        "agent_id": req.agent_id,
        "run_id": req.run_id,
        "session_id": req.session_id,
        "estimated_cost_usd": req.cost_usd,
        "cost_prevented_usd": prevented as f64 / 1e6,
        "policy": d.policy.as_deref(),
        "rule": d.rule.as_deref(),
        "reason": d.reason,
        "rationale": d.message,
        "limit": d.limit,
        "retry_after_seconds": d.retry_after_seconds,
        "intent": {"action": req.action, "args": sentinel_core::redact::Redacted(req.args), "description": req.description, "intent": req.intent},
        "tags": req.tags,
        "policy_version": &*d.policy_version,
        "source": "server",
    });
    InterventionIn {
        id: id.into(),
        chain: None,
        at: now_ms,
        clock_ahead: false,
        agent_id: req.agent_id.into(),
        run_id: req.run_id.into(),
        session_id: req.session_id.into(),
        kind: kind_s,
        outcome: outcome.into(),
        risk_level: risk_s,
        action: req.action.into(),
        policy: d.policy.as_deref().map(str::to_string),
        rule: d.rule.as_deref().map(str::to_string),
        estimated_micros: est,
        prevented_micros: prevented,
        body: body.to_string(),
    }
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SettleBody {
    pub reservation_id: String,
    /// What the action really cost; defaults to the reserved estimate.
    #[serde(default)]
    pub actual_cost_usd: Option<f64>,
    /// The action never ran: give back the cost and the rate-limit slot.
    #[serde(default)]
    pub release: bool,
}

/// Settles a reservation with the actual cost, or releases it.
#[utoipa::path(post, path = "/api/v1/settle", request_body = SettleBody, tag = "decisions",
    responses((status = 200, description = "The reservation's final state"), (status = 404), (status = 409)))]
pub async fn settle(
    State(s): State<AppState>,
    caller: Caller,
    TypedJson(b): TypedJson<SettleBody>,
) -> Result<Json<Value>, ApiError> {
    caller.require(&[Scope::Admin, Scope::Agent])?;
    if b.release && b.actual_cost_usd.is_some() {
        return Err(ApiError::field("release", "give either `actual_cost_usd` or `release: true`, not both"));
    }
    let actual = match b.actual_cost_usd {
        Some(c) => Some(Usd::from_f64(c).map_err(|e| ApiError::field("actual_cost_usd", e.to_string()))?),
        None => None,
    };
    let (now_ms, _) = now_both();
    let what = format!("reservation `{}`", b.reservation_id);
    let state = if b.release { "released" } else { "settled" };
    match &*s.authority {
        Authority::Memory(m) => {
            let held = match key_of(&b.reservation_id) {
                Some(key) => {
                    let mut g = m.shard(key).lock();
                    if let Some(h) = g.by_id.get(&key) {
                        caller.must_own(&what, &h.agent_id)?;
                    }
                    g.remove(key)
                }
                None => None,
            };
            let Some(h) = held else {
                // Not held: settled, released, expired, or unknown. What the journal holds may
                // not be in the database yet.
                let _late = m.late.lock().await;
                s.authority.fold_now(&s.store).await;
                let r = s.store.get_reservation(&b.reservation_id).await?;
                caller.must_own(&what, &r.agent_id)?;
                if r.state == "expired" && !b.release {
                    // Expiry gave the estimate back; the action ran after all, so its actual cost
                    // (the estimate if none is given) is owed, as on PostgreSQL.
                    let owed = actual.unwrap_or(micros(r.cost_micros));
                    let req = ActionRequest::new(&r.action).agent(&r.agent_id).run(&r.run_id).session(&r.session_id);
                    m.persist(CounterOp::Finish {
                        id: b.reservation_id.clone(),
                        state: "settled",
                        actual_micros: Some(to_micros(owed)),
                        at: now_ms,
                    })
                    .await?;
                    drop(s.engine().restore(&req, 0, None, owed, 1));
                    return Ok(Json(json!({"reservation_id": b.reservation_id, "state": state,
                        "estimated_cost_usd": r.cost_micros as f64 / 1e6, "actual_cost_usd": owed.as_f64(),
                        "expired_before_settling": true})));
                }
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "Conflict",
                    format!("reservation `{}` is already {}", b.reservation_id, r.state),
                ));
            };
            let estimate = h.res.cost();
            let actual_micros = if b.release {
                h.res.release();
                None
            } else {
                let a = actual.unwrap_or(estimate);
                h.res.settle(a);
                Some(to_micros(a))
            };
            m.persist(CounterOp::Finish { id: b.reservation_id.clone(), state, actual_micros, at: now_ms }).await?;
            Ok(Json(
                json!({"reservation_id": b.reservation_id, "state": state, "estimated_cost_usd": estimate.as_f64(),
                "actual_cost_usd": actual_micros.map(|m| m as f64 / 1e6), "expired_before_settling": false}),
            ))
        }
        Authority::Shared => {
            let r = s.store.get_reservation(&b.reservation_id).await?;
            caller.must_own(&what, &r.agent_id)?;
            let actual_micros = if b.release { None } else { Some(actual.map_or(r.cost_micros, to_micros)) };
            let before = s.store.pg_finish(&b.reservation_id, actual_micros, now_ms).await?;
            Ok(Json(json!({"reservation_id": b.reservation_id, "state": state,
                "estimated_cost_usd": before.cost_micros as f64 / 1e6,
                "actual_cost_usd": actual_micros.map(|m| m as f64 / 1e6),
                "expired_before_settling": before.state == "expired"})))
        }
    }
}

#[derive(Debug, Deserialize, utoipa::ToSchema, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct HaltBody {
    #[serde(default)]
    pub agent_id: Option<String>,
    #[serde(default)]
    pub run_id: Option<String>,
    #[serde(default)]
    pub reason: Option<String>,
}

fn halt_target(b: &HaltBody) -> Result<(&'static str, String), ApiError> {
    match (&b.agent_id, &b.run_id) {
        (Some(a), None) => {
            check_id("agent_id", a)?;
            Ok(("agent", a.clone()))
        }
        (None, Some(r)) => {
            check_id("run_id", r)?;
            Ok(("run", r.clone()))
        }
        _ => Err(ApiError::field("agent_id", "give exactly one of `agent_id` or `run_id`")),
    }
}

/// Halts an agent or a run: its decisions deny at once, on every replica.
#[utoipa::path(post, path = "/api/v1/halts", request_body = HaltBody, tag = "decisions",
    responses((status = 201, description = "Halted")))]
pub async fn create_halt(
    State(s): State<AppState>,
    caller: Caller,
    ApiJson(b): ApiJson<HaltBody>,
) -> Result<Response, ApiError> {
    caller.require(&[Scope::Admin])?;
    let (kind, target) = halt_target(&b)?;
    let reason = b.reason.clone().unwrap_or_else(|| "halted by an operator".into());
    if reason.len() > 1000 {
        return Err(ApiError::field("reason", "must be at most 1000 characters"));
    }
    let row = s.store.set_halt(kind, &target, &reason, &caller.actor()).await?;
    if let Authority::Memory(_) = &*s.authority {
        let t = if kind == "agent" { HaltTarget::Agent(target) } else { HaltTarget::Run(target) };
        s.engine().halt(t, &reason);
    }
    tracing::warn!(kind, target = %row.target, reason = %row.reason, actor = %row.actor, "halt");
    Ok((StatusCode::CREATED, Json(row)).into_response())
}

/// Lifts a halt (`?agent_id=` or `?run_id=`).
#[utoipa::path(delete, path = "/api/v1/halts", params(HaltBody), tag = "decisions",
    responses((status = 204, description = "Resumed"), (status = 404)))]
pub async fn delete_halt(
    State(s): State<AppState>,
    caller: Caller,
    ApiQuery(b): ApiQuery<HaltBody>,
) -> Result<StatusCode, ApiError> {
    caller.require(&[Scope::Admin])?;
    let (kind, target) = halt_target(&b)?;
    s.store.clear_halt(kind, &target).await?;
    if let Authority::Memory(_) = &*s.authority {
        let t = if kind == "agent" { HaltTarget::Agent(target.clone()) } else { HaltTarget::Run(target.clone()) };
        s.engine().resume(&t);
    }
    tracing::warn!(kind, %target, actor = %caller.actor(), "resume");
    Ok(StatusCode::NO_CONTENT)
}

/// Every current halt.
#[utoipa::path(get, path = "/api/v1/halts", tag = "decisions", responses((status = 200)))]
pub async fn list_halts(State(s): State<AppState>, caller: Caller) -> Result<Json<Value>, ApiError> {
    caller.require(&[Scope::Admin, Scope::Readonly, Scope::Agent])?;
    let mut halts = s.store.list_halts().await?;
    if let Some(own) = &caller.0.agent_id {
        halts.retain(|h| h.kind == "run" || h.target == *own);
    }
    Ok(Json(json!({ "halts": halts })))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;
    use sentinel_core::PolicySet;
    use sentinel_core::load::parse_yaml;

    /// The answer carries the decision's fields exactly as the decision serializes them.
    #[test]
    fn the_answer_holds_the_decision_as_it_serializes() {
        let yaml = r#"
policies:
  - name: main
    rate_limits: { search: { max_count: 1, window_seconds: 60 } }
    approvals: { actions: [pay], timeout_seconds: 60, approvers: [a@x.com] }
  - name: trial
    mode: shadow
    denied_actions: [search, pay]
"#;
        let engine = Engine::new(PolicySet::compile(parse_yaml("p.yaml", "p", yaml).unwrap()).unwrap());
        let mut decisions =
            vec![engine.decide(&ActionRequest::new("search")), engine.decide(&ActionRequest::new("search"))];
        decisions.push(engine.decide(&ActionRequest::new("pay").cost(1.0)));
        decisions.push(engine.decide(&ActionRequest::new("other")));
        assert!(decisions.iter().any(|d| d.limit.is_some() && d.retry_after_seconds.is_some()));
        assert!(decisions.iter().any(|d| d.approval.is_some()));
        assert!(decisions.iter().any(|d| !d.shadow.is_empty()));
        for d in &decisions {
            let out = DecideOut { decision_id: "d".into(), ..DecideOut::of(d) };
            let mut got = serde_json::to_value(&out).unwrap();
            let want = serde_json::to_value(d).unwrap();
            let m = got.as_object_mut().unwrap();
            for server_field in ["decision_id", "agent_id", "run_id", "session_id"] {
                m.remove(server_field);
            }
            assert_eq!(got, want);
        }
    }
}
