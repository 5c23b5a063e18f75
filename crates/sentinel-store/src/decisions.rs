//! Central decisions: reservations, spend totals, sliding windows and halts.
//!
//! Two authorities use these tables. On SQLite one server owns the file: it decides in memory and
//! persists every reservation change here in batches ([`Store::apply_counter_ops`]) before it
//! answers, and rebuilds its counters from them at start. On PostgreSQL every replica decides in one
//! transaction ([`Store::pg_decide`]) under advisory locks, so budgets and windows are shared with
//! zero overspend.

use serde::Serialize;
use sqlx::{Postgres, QueryBuilder, Row, Sqlite};

use crate::{Pool, Result, Store, StoreError, sql};

/// One reservation: what an allowed `/decide` holds until it is settled, released or expires.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct ReservationRow {
    pub id: String,
    pub agent_id: String,
    pub run_id: String,
    pub session_id: String,
    pub action: String,
    pub args_digest: i64,
    pub cost_micros: i64,
    pub actual_micros: Option<i64>,
    pub state: String,
    /// When it was decided, in nanoseconds since the epoch (the time its window slots count from).
    pub at_ns: i64,
    pub created_at: i64,
    pub expires_at: i64,
    pub settled_at: Option<i64>,
    pub policy_version: String,
}

/// A change to persist, in order.
#[derive(Debug, Clone)]
pub enum CounterOp {
    Reserve(ReservationRow),
    /// `state` is `settled`, `released` or `expired`.
    Finish {
        id: String,
        state: &'static str,
        actual_micros: Option<i64>,
        at: i64,
    },
}

/// A halted agent or run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HaltRow {
    pub kind: String,
    pub target: String,
    pub reason: String,
    pub actor: String,
    pub at: i64,
}

/// Settled spend restored at start: per session, run and action.
#[derive(Debug, Clone, PartialEq)]
pub struct SpendTotal {
    pub session_id: String,
    pub run_id: String,
    pub action: String,
    pub micros: i64,
    pub calls: i64,
}

/// The keys of the spend counters a call adds to: its session, its run and its action (both within the session).
pub fn spend_keys(session: &str, run: &str, action: &str) -> [String; 3] {
    [format!("a\u{1f}{session}\u{1f}{action}"), format!("r\u{1f}{session}\u{1f}{run}"), format!("s\u{1f}{session}")]
}

/// A stable 64-bit lock id for a counter key (FNV-1a), the same in every process.
fn lock_id(key: &str) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    i64::from_ne_bytes(h.to_ne_bytes())
}

const RESERVATION_COLUMNS: &str = "id, agent_id, run_id, session_id, action, args_digest, cost_micros, actual_micros, \
     state, at_ns, created_at, expires_at, settled_at, policy_version";

fn reservation_from<R: Row>(r: &R) -> Result<ReservationRow>
where
    for<'c> &'c str: sqlx::ColumnIndex<R>,
    for<'q> String: sqlx::Decode<'q, R::Database> + sqlx::Type<R::Database>,
    for<'q> i64: sqlx::Decode<'q, R::Database> + sqlx::Type<R::Database>,
    for<'q> Option<i64>: sqlx::Decode<'q, R::Database>,
{
    Ok(ReservationRow {
        id: r.try_get("id")?,
        agent_id: r.try_get("agent_id")?,
        run_id: r.try_get("run_id")?,
        session_id: r.try_get("session_id")?,
        action: r.try_get("action")?,
        args_digest: r.try_get("args_digest")?,
        cost_micros: r.try_get("cost_micros")?,
        actual_micros: r.try_get("actual_micros")?,
        state: r.try_get("state")?,
        at_ns: r.try_get("at_ns")?,
        created_at: r.try_get("created_at")?,
        expires_at: r.try_get("expires_at")?,
        settled_at: r.try_get("settled_at")?,
        policy_version: r.try_get("policy_version")?,
    })
}

fn halt_from<R: Row>(r: &R) -> Result<HaltRow>
where
    for<'c> &'c str: sqlx::ColumnIndex<R>,
    for<'q> String: sqlx::Decode<'q, R::Database> + sqlx::Type<R::Database>,
    for<'q> i64: sqlx::Decode<'q, R::Database> + sqlx::Type<R::Database>,
{
    Ok(HaltRow {
        kind: r.try_get("kind")?,
        target: r.try_get("target")?,
        reason: r.try_get("reason")?,
        actor: r.try_get("actor")?,
        at: r.try_get("at")?,
    })
}

/// What one window check found full.
#[derive(Debug, Clone, PartialEq)]
pub enum PgDecideOutcome {
    /// The agent (`kind` = `agent`) or run is halted.
    Halted(HaltRow),
    /// Window `index` of the request already holds `max` calls; a slot frees in `retry_after_ns`.
    WindowFull { index: usize, retry_after_ns: u64 },
    /// Budget `index` would be exceeded; `spent_micros` were already spent or reserved.
    OverBudget { index: usize, spent_micros: i64 },
    /// Every check passed; the reservation was written when one was asked for.
    Passed,
}

/// A sliding window to check: its counter key, capacity and length.
#[derive(Debug, Clone)]
pub struct WindowSpec {
    pub key: String,
    pub max: u32,
    pub window_ns: u64,
}

/// A budget to check: the spend key (one of [`spend_keys`]) and its limit.
#[derive(Debug, Clone)]
pub struct BudgetSpec {
    pub key: String,
    pub limit_micros: i64,
}

/// One `/decide` against shared counters.
#[derive(Debug, Clone)]
pub struct PgDecide<'a> {
    pub agent_id: &'a str,
    pub run_id: &'a str,
    pub now_ns: i64,
    pub windows: &'a [WindowSpec],
    pub budgets: &'a [BudgetSpec],
    /// The call's estimated cost, checked against the budgets (also when nothing is reserved).
    pub cost_micros: i64,
    /// Written (with its window slots and spend) if every check passes.
    pub reserve: Option<&'a ReservationRow>,
}

fn clamp_i64(x: u64) -> i64 {
    i64::try_from(x).unwrap_or(i64::MAX)
}

impl Store {
    // -----------------------------------------------------------------------------------------
    // Halts (both backends)

    pub async fn set_halt(&self, kind: &str, target: &str, reason: &str, actor: &str) -> Result<HaltRow> {
        let _turn = self.turn().await;
        let at = crate::now_ms();
        let q = sql(
            self.is_pg(),
            "INSERT INTO halts (kind, target, reason, actor, at) VALUES (?1, ?2, ?3, ?4, ?5) \
             ON CONFLICT (kind, target) DO UPDATE SET reason = excluded.reason, actor = excluded.actor, at = excluded.at",
        );
        per_backend!(self, p => {
            sqlx::query(sqlx::AssertSqlSafe(q)).bind(kind).bind(target).bind(reason).bind(actor).bind(at).execute(p).await.map(|_| ())?
        });
        Ok(HaltRow { kind: kind.into(), target: target.into(), reason: reason.into(), actor: actor.into(), at })
    }

    /// Lifts a halt. `NotFound` if it was not halted.
    pub async fn clear_halt(&self, kind: &str, target: &str) -> Result<()> {
        let _turn = self.turn().await;
        let q = sql(self.is_pg(), "DELETE FROM halts WHERE kind = ?1 AND target = ?2");
        let n = per_backend!(self, p => {
            sqlx::query(sqlx::AssertSqlSafe(q)).bind(kind).bind(target).execute(p).await?.rows_affected()
        });
        if n == 0 { Err(StoreError::NotFound(format!("a halt of {kind} `{target}`"))) } else { Ok(()) }
    }

    pub async fn list_halts(&self) -> Result<Vec<HaltRow>> {
        let q = "SELECT kind, target, reason, actor, at FROM halts ORDER BY at, kind, target";
        per_backend!(self, p => sqlx::query(q).fetch_all(p).await?.iter().map(halt_from).collect())
    }

    // -----------------------------------------------------------------------------------------
    // Reservations written through by the in-memory authority (SQLite), in one transaction per batch.

    pub async fn apply_counter_ops(&self, ops: &[CounterOp]) -> Result<()> {
        if ops.is_empty() {
            return Ok(());
        }
        match &self.pool {
            Pool::Sqlite(p) => {
                let _turn = self.writer.lock().await;
                let mut tx = p.begin_with("BEGIN IMMEDIATE").await?;
                let mut i = 0;
                while i < ops.len() {
                    // Consecutive inserts go in one statement.
                    let run: Vec<&ReservationRow> = ops
                        .get(i..)
                        .unwrap_or_default()
                        .iter()
                        .map_while(|o| if let CounterOp::Reserve(r) = o { Some(r) } else { None })
                        .take(500)
                        .collect();
                    if run.is_empty() {
                        if let Some(CounterOp::Finish { id, state, actual_micros, at }) = ops.get(i) {
                            sqlx::query("UPDATE reservations SET state = ?1, actual_micros = COALESCE(?2, actual_micros), settled_at = ?3 WHERE id = ?4")
                                .bind(*state).bind(*actual_micros).bind(*at).bind(id).execute(&mut *tx).await?;
                        }
                        i += 1;
                        continue;
                    }
                    i += run.len();
                    let mut qb: QueryBuilder<Sqlite> =
                        QueryBuilder::new(format!("INSERT INTO reservations ({RESERVATION_COLUMNS}) "));
                    // Bound by reference: the rows outlive the statement, so no text is copied.
                    qb.push_values(run, |mut b, r| {
                        b.push_bind(r.id.as_str())
                            .push_bind(r.agent_id.as_str())
                            .push_bind(r.run_id.as_str())
                            .push_bind(r.session_id.as_str())
                            .push_bind(r.action.as_str())
                            .push_bind(r.args_digest)
                            .push_bind(r.cost_micros)
                            .push_bind(r.actual_micros)
                            .push_bind(r.state.as_str())
                            .push_bind(r.at_ns)
                            .push_bind(r.created_at)
                            .push_bind(r.expires_at)
                            .push_bind(r.settled_at)
                            .push_bind(r.policy_version.as_str());
                    });
                    // Idempotent, so a journal folded twice (a crash between folding and deleting it) is harmless.
                    qb.push(" ON CONFLICT (id) DO NOTHING");
                    qb.build().execute(&mut *tx).await?;
                }
                tx.commit().await?;
            }
            Pool::Postgres(p) => {
                let mut tx = p.begin().await?;
                for op in ops {
                    match op {
                        CounterOp::Reserve(r) => {
                            insert_reservation_pg(&mut tx, r).await?;
                        }
                        CounterOp::Finish { id, state, actual_micros, at } => {
                            sqlx::query("UPDATE reservations SET state = $1, actual_micros = COALESCE($2, actual_micros), settled_at = $3 WHERE id = $4")
                                .bind(*state).bind(*actual_micros).bind(*at).bind(id).execute(&mut *tx).await?;
                        }
                    }
                }
                tx.commit().await?;
            }
        }
        Ok(())
    }

    /// Marks reservations that expired while no server was running; returns how many.
    pub async fn expire_stale_reservations(&self, now_ms: i64) -> Result<u64> {
        let _turn = self.turn().await;
        let q = sql(
            self.is_pg(),
            "UPDATE reservations SET state = 'expired', settled_at = ?1 WHERE state = 'reserved' AND expires_at <= ?1",
        );
        Ok(per_backend!(self, p => sqlx::query(sqlx::AssertSqlSafe(q)).bind(now_ms).execute(p).await?.rows_affected()))
    }

    /// Reservations still held (not settled, released or expired).
    pub async fn live_reservations(&self) -> Result<Vec<ReservationRow>> {
        let q = format!("SELECT {RESERVATION_COLUMNS} FROM reservations WHERE state = 'reserved' ORDER BY at_ns");
        per_backend!(self, p => sqlx::query(sqlx::AssertSqlSafe(q)).fetch_all(p).await?.iter().map(reservation_from).collect())
    }

    /// Settled reservations decided after `since_ns`: their rate-limit and loop slots may still count.
    pub async fn settled_since(&self, since_ns: i64) -> Result<Vec<ReservationRow>> {
        let q = format!(
            "SELECT {RESERVATION_COLUMNS} FROM reservations WHERE state = 'settled' AND at_ns > {since_ns} ORDER BY at_ns"
        );
        per_backend!(self, p => sqlx::query(sqlx::AssertSqlSafe(q)).fetch_all(p).await?.iter().map(reservation_from).collect())
    }

    /// Settled spend per session, run and action.
    pub async fn settled_totals(&self) -> Result<Vec<SpendTotal>> {
        let sql = "SELECT session_id, run_id, action, CAST(SUM(COALESCE(actual_micros, cost_micros)) AS BIGINT) AS micros, COUNT(*) AS calls \
                   FROM reservations WHERE state = 'settled' GROUP BY session_id, run_id, action";
        let rows: Vec<(String, String, String, i64, i64)> =
            per_backend!(self, p => sqlx::query_as(sql).fetch_all(p).await?);
        Ok(rows
            .into_iter()
            .map(|(session_id, run_id, action, micros, calls)| SpendTotal { session_id, run_id, action, micros, calls })
            .collect())
    }

    pub async fn get_reservation(&self, id: &str) -> Result<ReservationRow> {
        let q = sql(self.is_pg(), &format!("SELECT {RESERVATION_COLUMNS} FROM reservations WHERE id = ?1"));
        let found = per_backend!(self, p => {
            sqlx::query(sqlx::AssertSqlSafe(q)).bind(id).fetch_optional(p).await?.as_ref().map(reservation_from).transpose()?
        });
        found.ok_or_else(|| StoreError::NotFound(format!("reservation `{id}`")))
    }

    // -----------------------------------------------------------------------------------------
    // The PostgreSQL authority: check and reserve in one transaction.

    fn pg(&self) -> Result<&sqlx::PgPool> {
        match &self.pool {
            Pool::Postgres(p) => Ok(p),
            Pool::Sqlite(_) => Err(StoreError::Invalid("shared counters need PostgreSQL".into())),
        }
    }

    /// Checks halts, windows and budgets, in that order, and on success writes the reservation,
    /// its window slots and its spend, all under advisory locks on every counter it reads.
    ///
    /// Calls on one session are serialized by its lock, so their throughput would be one commit
    /// (a WAL flush) per call. Instead each session has a lane on this replica: the calls that
    /// arrive while one of its transactions runs wait and go together in the next one
    /// ([`Lanes`]), decided one after another inside it exactly as they would be alone.
    pub async fn pg_decide(&self, d: PgDecide<'_>, session_key: &str) -> Result<PgDecideOutcome> {
        self.pg()?;
        let call = Call::of(&d, session_key);
        let (done, answer) = tokio::sync::oneshot::channel();
        let lane = lock_id(session_key);
        match self.lanes.push(lane, Waiting { call, done }) {
            Pushed::Queued => {}
            Pushed::Idle => {
                // The guard exists before the task does: a task dropped before it first runs
                // (the runtime shutting down) still ends the lane and fails its calls.
                let guard = LaneGuard { lanes: self.lanes.clone(), lane, armed: true };
                tokio::spawn(drive_lane(self.clone(), guard));
            }
            Pushed::Full => {
                return Err(StoreError::Unavailable(format!(
                    "{MAX_QUEUED} decisions are already waiting on this session"
                )));
            }
        }
        answer.await.unwrap_or_else(|_| Err(StoreError::Unavailable("the decision's lane stopped".into())))
    }

    /// How this process's central decisions were grouped into transactions so far.
    pub fn decide_batching(&self) -> DecideBatching {
        use std::sync::atomic::Ordering::Relaxed;
        DecideBatching { transactions: self.lanes.transactions.load(Relaxed), calls: self.lanes.calls.load(Relaxed) }
    }

    /// One call in its own transaction.
    async fn pg_decide_one(&self, c: &Call) -> Result<PgDecideOutcome> {
        let pool = self.pg()?;
        let row = sqlx::query(
            "SELECT outcome, idx, amount, halt_kind, halt_target, halt_reason, halt_actor, halt_at FROM sentinel_decide(\
             $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)",
        )
        .bind(&c.locks)
        .bind(&c.agent)
        .bind(&c.run)
        .bind(c.now_ns)
        .bind(&c.win_keys)
        .bind(&c.win_max)
        .bind(&c.win_ns)
        .bind(&c.budget_keys)
        .bind(&c.budget_limits)
        .bind(c.reserve)
        .bind(&c.id)
        .bind(&c.session)
        .bind(&c.action)
        .bind(c.digest)
        .bind(c.cost)
        .bind(c.created_at)
        .bind(c.expires_at)
        .bind(&c.version)
        .fetch_one(pool)
        .await
        .map_err(|e| crate::conflict_or(e, || "this reservation id already exists".into()))?;
        outcome_of(&row)
    }

    /// Several calls on one session in one transaction, in order; one answer per call.
    async fn pg_decide_batch(&self, calls: &[&Call]) -> Result<Vec<PgDecideOutcome>> {
        let pool = self.pg()?;
        let body =
            serde_json::to_string(calls).map_err(|e| StoreError::Invalid(format!("a batch of decisions: {e}")))?;
        let rows = sqlx::query(
            "SELECT n, outcome, idx, amount, halt_kind, halt_target, halt_reason, halt_actor, halt_at \
             FROM sentinel_decide_batch($1::jsonb)",
        )
        .bind(body)
        .fetch_all(pool)
        .await?;
        if rows.len() != calls.len() {
            return Err(StoreError::Invalid(format!("{} answers to a batch of {} decisions", rows.len(), calls.len())));
        }
        let mut out = Vec::with_capacity(rows.len());
        for (i, r) in rows.iter().enumerate() {
            if usize::try_from(r.try_get::<i32, _>("n")?).ok() != Some(i) {
                return Err(StoreError::Invalid("a batch of decisions answered out of order".into()));
            }
            out.push(outcome_of(r)?);
        }
        Ok(out)
    }

    /// Settles (`actual_micros` = Some) or releases (None) a reservation on the shared counters.
    /// Returns the reservation as it was before. A reservation already settled or released is a conflict.
    pub async fn pg_finish(&self, id: &str, actual_micros: Option<i64>, now_ms: i64) -> Result<ReservationRow> {
        let pool = self.pg()?;
        let mut tx = pool.begin().await?;
        let sql = format!("SELECT {RESERVATION_COLUMNS} FROM reservations WHERE id = $1 FOR UPDATE");
        let Some(row) = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(id).fetch_optional(&mut *tx).await? else {
            return Err(StoreError::NotFound(format!("reservation `{id}`")));
        };
        let r = reservation_from(&row)?;
        // The session's counters change only under its lock, as in `sentinel_decide`: a decision
        // must not read the spend before this settle and write after it, and a batch of decisions
        // takes the session's spend rows call by call, not in one sorted order.
        let keys = spend_keys(&r.session_id, &r.run_id, &r.action);
        lock_all(&mut tx, &[lock_id(&keys[2])]).await?;
        let live = match r.state.as_str() {
            "reserved" => true,
            "expired" => false,
            other => return Err(StoreError::Conflict(format!("reservation `{id}` is already {other}"))),
        };
        match actual_micros {
            Some(actual) => {
                // An expired reservation gave its estimate back; the actual cost is still owed.
                let delta = if live { actual.saturating_sub(r.cost_micros) } else { actual };
                if delta != 0 {
                    add_spend_pg(&mut tx, &keys, &[delta; 3]).await?;
                }
                sqlx::query(
                    "UPDATE reservations SET state = 'settled', actual_micros = $1, settled_at = $2 WHERE id = $3",
                )
                .bind(actual)
                .bind(now_ms)
                .bind(id)
                .execute(&mut *tx)
                .await?;
            }
            None => {
                if live {
                    add_spend_pg(&mut tx, &keys, &[-r.cost_micros; 3]).await?;
                    sqlx::query("DELETE FROM window_events WHERE reservation_id = $1")
                        .bind(id)
                        .execute(&mut *tx)
                        .await?;
                }
                sqlx::query("UPDATE reservations SET state = 'released', settled_at = $1 WHERE id = $2")
                    .bind(now_ms)
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        tx.commit().await?;
        Ok(r)
    }

    /// Releases reservations past their expiry and drops window slots older than every window.
    /// Safe to run on several replicas at once: each reservation is claimed by one.
    pub async fn pg_sweep(&self, now_ms: i64, now_ns: i64) -> Result<u64> {
        let pool = self.pg()?;
        let mut tx = pool.begin().await?;
        let rows = sqlx::query(
            "UPDATE reservations SET state = 'expired', settled_at = $1 WHERE id IN (SELECT id FROM reservations WHERE state = 'reserved' AND expires_at <= $1 LIMIT 1000 FOR UPDATE SKIP LOCKED) RETURNING id, session_id, run_id, action, cost_micros",
        )
        .bind(now_ms)
        .fetch_all(&mut *tx)
        .await?;
        // What each counter gives back, and the sessions whose counters change: their locks are
        // taken in sorted order, as `sentinel_decide` takes them, then the rows in key order, so
        // two sweepers and the decisions never wait on each other in a cycle.
        let mut ids = Vec::with_capacity(rows.len());
        let mut deltas = std::collections::BTreeMap::<String, i64>::new();
        let mut locks = Vec::new();
        for r in &rows {
            let (id, s, run, a, c): (String, String, String, String, i64) =
                (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?, r.try_get(3)?, r.try_get(4)?);
            if c != 0 {
                let keys = spend_keys(&s, &run, &a);
                locks.push(lock_id(&keys[2]));
                for k in keys {
                    *deltas.entry(k).or_default() -= c;
                }
            }
            ids.push(id);
        }
        if !deltas.is_empty() {
            lock_all(&mut tx, &locks).await?;
            let (keys, amounts): (Vec<String>, Vec<i64>) = deltas.into_iter().unzip();
            add_spend_pg(&mut tx, &keys, &amounts).await?;
        }
        if !ids.is_empty() {
            sqlx::query("DELETE FROM window_events WHERE reservation_id = ANY($1)")
                .bind(&ids)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("DELETE FROM window_events WHERE expires_ns < $1").bind(now_ns).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(rows.len() as u64)
    }

    /// Spent-or-reserved totals for a session (and one run), from the shared counters.
    pub async fn pg_spend(&self, session: &str, run: &str, action: &str) -> Result<[i64; 3]> {
        let pool = self.pg()?;
        let keys = spend_keys(session, run, action);
        let rows =
            sqlx::query("SELECT key, micros FROM spend WHERE key = ANY($1)").bind(&keys[..]).fetch_all(pool).await?;
        let get = |k: &str| {
            rows.iter()
                .find(|r| r.try_get::<&str, _>("key").is_ok_and(|x| x == k))
                .and_then(|r| r.try_get::<i64, _>("micros").ok())
                .unwrap_or(0)
        };
        Ok([get(&keys[0]), get(&keys[1]), get(&keys[2])])
    }
}

/// A central decision's arguments, owned so it can wait in its session's lane; serialized by
/// name for `sentinel_decide_batch`.
#[derive(Debug, Serialize)]
struct Call {
    locks: Vec<i64>,
    agent: String,
    run: String,
    now_ns: i64,
    win_keys: Vec<String>,
    win_max: Vec<i64>,
    win_ns: Vec<i64>,
    budget_keys: Vec<String>,
    budget_limits: Vec<i64>,
    reserve: bool,
    id: String,
    session: String,
    action: String,
    digest: i64,
    cost: i64,
    created_at: i64,
    expires_at: i64,
    version: String,
}

impl Call {
    fn of(d: &PgDecide<'_>, session_key: &str) -> Self {
        // Every counter the call reads is locked: its windows, and its session (which holds the
        // session's, the run's and the action's spend).
        let locks = d.windows.iter().map(|w| lock_id(&w.key)).chain(std::iter::once(lock_id(session_key))).collect();
        let r = d.reserve;
        Call {
            locks,
            agent: d.agent_id.to_owned(),
            run: d.run_id.to_owned(),
            now_ns: d.now_ns,
            win_keys: d.windows.iter().map(|w| w.key.clone()).collect(),
            win_max: d.windows.iter().map(|w| i64::from(w.max)).collect(),
            win_ns: d.windows.iter().map(|w| clamp_i64(w.window_ns)).collect(),
            budget_keys: d.budgets.iter().map(|b| b.key.clone()).collect(),
            budget_limits: d.budgets.iter().map(|b| b.limit_micros).collect(),
            reserve: r.is_some(),
            id: r.map_or_else(String::new, |r| r.id.clone()),
            session: r.map_or_else(String::new, |r| r.session_id.clone()),
            action: r.map_or_else(String::new, |r| r.action.clone()),
            digest: r.map_or(0, |r| r.args_digest),
            cost: d.cost_micros,
            created_at: r.map_or(0, |r| r.created_at),
            expires_at: r.map_or(0, |r| r.expires_at),
            version: r.map_or_else(String::new, |r| r.policy_version.clone()),
        }
    }
}

fn outcome_of(row: &sqlx::postgres::PgRow) -> Result<PgDecideOutcome> {
    let outcome: &str = row.try_get("outcome")?;
    let idx = usize::try_from(row.try_get::<i32, _>("idx")?).unwrap_or(0);
    let amount: i64 = row.try_get("amount")?;
    Ok(match outcome {
        "halted" => PgDecideOutcome::Halted(HaltRow {
            kind: row.try_get::<Option<String>, _>("halt_kind")?.unwrap_or_default(),
            target: row.try_get::<Option<String>, _>("halt_target")?.unwrap_or_default(),
            reason: row.try_get::<Option<String>, _>("halt_reason")?.unwrap_or_default(),
            actor: row.try_get::<Option<String>, _>("halt_actor")?.unwrap_or_default(),
            at: row.try_get::<Option<i64>, _>("halt_at")?.unwrap_or(0),
        }),
        "window" => PgDecideOutcome::WindowFull { index: idx, retry_after_ns: u64::try_from(amount).unwrap_or(0) },
        "budget" => PgDecideOutcome::OverBudget { index: idx, spent_micros: amount },
        "passed" => PgDecideOutcome::Passed,
        other => return Err(StoreError::Invalid(format!("unknown decision outcome `{other}`"))),
    })
}

/// A call waiting in its session's lane, and where its answer goes.
struct Waiting {
    call: Call,
    done: tokio::sync::oneshot::Sender<Result<PgDecideOutcome>>,
}

/// The most calls one transaction decides: a batch holds the session's lock while it runs.
const MAX_BATCH: usize = 256;

/// The most distinct advisory locks one batch takes (the session's, its windows', and the loop
/// windows, which are per argument digest). PostgreSQL's shared lock table holds about
/// `max_locks_per_transaction` (64 by default) per connection; a batch that needs more is cut.
const MAX_BATCH_LOCKS: usize = 64;

/// The most calls that may wait on one session; more fail at once instead of queueing without
/// bound behind a slow or unavailable database.
const MAX_QUEUED: usize = 4 * MAX_BATCH;

/// What [`Lanes::push`] did with a call.
enum Pushed {
    /// The lane was idle: the caller starts its driver.
    Idle,
    Queued,
    /// The lane is full; the call was not queued.
    Full,
}

/// Per session (by its lock id), the calls waiting for the transaction running now to end. A
/// session has an entry exactly while a task drives it.
#[derive(Default)]
pub(crate) struct Lanes {
    queues: parking_lot::Mutex<std::collections::HashMap<i64, Vec<Waiting>>>,
    transactions: std::sync::atomic::AtomicU64,
    calls: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Lanes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lanes").field("sessions", &self.queues.lock().len()).finish()
    }
}

/// How the central decisions of this process were grouped: `calls` decided in `transactions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DecideBatching {
    pub transactions: u64,
    pub calls: u64,
}

impl Lanes {
    /// Queues a call.
    fn push(&self, lane: i64, w: Waiting) -> Pushed {
        let mut lanes = self.queues.lock();
        match lanes.entry(lane) {
            std::collections::hash_map::Entry::Occupied(e) if e.get().len() >= MAX_QUEUED => Pushed::Full,
            std::collections::hash_map::Entry::Occupied(mut e) => {
                e.get_mut().push(w);
                Pushed::Queued
            }
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(vec![w]);
                Pushed::Idle
            }
        }
    }

    /// The next batch, oldest first; an empty one ends the lane (atomically with the check, so a
    /// call pushed later starts a new driver).
    fn take(&self, lane: i64) -> Vec<Waiting> {
        let mut lanes = self.queues.lock();
        let Some(q) = lanes.get_mut(&lane) else { return Vec::new() };
        if q.is_empty() {
            lanes.remove(&lane);
            return Vec::new();
        }
        // As many calls as fit in MAX_BATCH and MAX_BATCH_LOCKS, and always at least one.
        let mut locks: Vec<i64> = Vec::with_capacity(MAX_BATCH_LOCKS);
        let mut n = 0;
        for w in q.iter().take(MAX_BATCH) {
            for &l in &w.call.locks {
                if !locks.contains(&l) {
                    locks.push(l);
                }
            }
            if n > 0 && locks.len() > MAX_BATCH_LOCKS {
                break;
            }
            n += 1;
        }
        if n == q.len() { std::mem::take(q) } else { q.drain(..n).collect() }
    }
}

/// Ends a lane however its driver stops: if it stopped early (its task was aborted at shutdown),
/// the calls still queued get an error when their senders drop, instead of waiting forever.
/// (A driver that ran out of calls has already ended its lane in [`Lanes::take`]; the lane may
/// belong to a new driver by then, so the guard is disarmed.)
struct LaneGuard {
    lanes: std::sync::Arc<Lanes>,
    lane: i64,
    armed: bool,
}

impl Drop for LaneGuard {
    fn drop(&mut self) {
        if self.armed {
            self.lanes.queues.lock().remove(&self.lane);
        }
    }
}

/// Whether a failed batch may owe its failure to one of its calls (a constraint, such as a
/// duplicate reservation id, or a value the database rejected) rather than to the database.
fn one_call_may_be_at_fault(e: &StoreError) -> bool {
    match e {
        // Only an error the database raised while deciding: the batch did not commit. An answer
        // that could not be read (after the commit) must not be decided again.
        StoreError::Database(sqlx::Error::Database(d)) => {
            d.code().is_some_and(|c| c.starts_with("23") || c.starts_with("22"))
        }
        _ => false,
    }
}

/// Sends a call its answer. A caller that has gone since its batch was taken (its request timed
/// out or was cancelled, and it was told so) does not keep the reservation made for it: it is
/// released, so it does not hold the budget until it expires.
fn answer(store: &Store, w: Waiting, out: Result<PgDecideOutcome>) {
    if let Err(Ok(PgDecideOutcome::Passed)) = w.done.send(out)
        && w.call.reserve
    {
        let (store, id) = (store.clone(), w.call.id);
        tokio::spawn(async move {
            if let Err(e) = store.pg_finish(&id, None, crate::now_ms()).await {
                tracing::warn!(error = %e, reservation = %id, "cannot release the reservation of a caller that has gone; it expires");
            }
        });
    }
}

/// Decides a session's queued calls, batch after batch, until none are left.
async fn drive_lane(store: Store, mut guard: LaneGuard) {
    let lane = guard.lane;
    loop {
        let mut batch = store.lanes.take(lane);
        if batch.is_empty() {
            guard.armed = false;
            return;
        }
        // A caller that has gone (its request was cancelled or timed out, and it was told so)
        // must not get a reservation it will never settle.
        batch.retain(|w| !w.done.is_closed());
        if batch.is_empty() {
            continue;
        }
        store.lanes.transactions.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        store.lanes.calls.fetch_add(batch.len() as u64, std::sync::atomic::Ordering::Relaxed);
        if batch.len() == 1 {
            one_by_one(&store, batch).await;
            continue;
        }
        let calls: Vec<&Call> = batch.iter().map(|w| &w.call).collect();
        match store.pg_decide_batch(&calls).await {
            Ok(outs) => {
                for (w, o) in batch.into_iter().zip(outs) {
                    answer(&store, w, Ok(o));
                }
            }
            // A batch is all or nothing: one bad call (a duplicate id) must not fail the others,
            // so each is tried again on its own.
            Err(e) if one_call_may_be_at_fault(&e) => {
                tracing::warn!(error = %e, calls = batch.len(), "a batch of decisions failed; deciding them one by one");
                one_by_one(&store, batch).await;
            }
            // The database could not be asked (no connection, a timeout): trying each call again
            // would keep the lane, and the calls queued behind it, waiting once per call. Every
            // call of the batch fails now; nothing was reserved.
            Err(e) => {
                tracing::error!(error = %e, calls = batch.len(), "a batch of decisions failed");
                let why = e.to_string();
                for w in batch {
                    let _ = w.done.send(Err(StoreError::Unavailable(why.clone())));
                }
            }
        }
    }
}

/// Decides each call in a transaction of its own, in order.
async fn one_by_one(store: &Store, calls: Vec<Waiting>) {
    for w in calls {
        let out = store.pg_decide_one(&w.call).await;
        answer(store, w, out);
    }
}

async fn insert_reservation_pg(tx: &mut sqlx::Transaction<'_, Postgres>, r: &ReservationRow) -> Result<()> {
    let sql = format!(
        "INSERT INTO reservations ({RESERVATION_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"
    );
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(&r.id)
        .bind(&r.agent_id)
        .bind(&r.run_id)
        .bind(&r.session_id)
        .bind(&r.action)
        .bind(r.args_digest)
        .bind(r.cost_micros)
        .bind(r.actual_micros)
        .bind(&r.state)
        .bind(r.at_ns)
        .bind(r.created_at)
        .bind(r.expires_at)
        .bind(r.settled_at)
        .bind(&r.policy_version)
        .execute(&mut **tx)
        .await
        .map_err(|e| crate::conflict_or(e, || format!("reservation `{}` already exists", r.id)))?;
    Ok(())
}

/// Adds `deltas[i]` to the spend counter `keys[i]`, rows in key order.
async fn add_spend_pg(tx: &mut sqlx::Transaction<'_, Postgres>, keys: &[String], deltas: &[i64]) -> Result<()> {
    sqlx::query(
        "INSERT INTO spend (key, micros) SELECT k, d FROM UNNEST($1::text[], $2::bigint[]) AS u(k, d) ORDER BY k \
         ON CONFLICT (key) DO UPDATE SET micros = spend.micros + EXCLUDED.micros",
    )
    .bind(keys)
    .bind(deltas)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Takes these advisory locks for the transaction, sorted and each once (`sentinel_lock_all`).
async fn lock_all(tx: &mut sqlx::Transaction<'_, Postgres>, locks: &[i64]) -> Result<()> {
    sqlx::query("SELECT sentinel_lock_all($1)").bind(locks).execute(&mut **tx).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiting(locks: Vec<i64>) -> Waiting {
        let call = Call {
            locks,
            agent: String::new(),
            run: String::new(),
            now_ns: 0,
            win_keys: Vec::new(),
            win_max: Vec::new(),
            win_ns: Vec::new(),
            budget_keys: Vec::new(),
            budget_limits: Vec::new(),
            reserve: false,
            id: String::new(),
            session: String::new(),
            action: String::new(),
            digest: 0,
            cost: 0,
            created_at: 0,
            expires_at: 0,
            version: String::new(),
        };
        Waiting { call, done: tokio::sync::oneshot::channel().0 }
    }

    /// A batch is cut at MAX_BATCH calls, and before the call that would take it past
    /// MAX_BATCH_LOCKS distinct locks; a call with more locks than that still goes, alone.
    #[test]
    fn batches_are_cut_by_calls_and_by_distinct_locks() {
        let lanes = Lanes::default();
        // The session's lock (1) is shared; each call adds one lock of its own (a loop window).
        for i in 0..100 {
            let _ = lanes.push(7, waiting(vec![1, 1000 + i]));
        }
        let sizes: Vec<usize> = std::iter::from_fn(|| Some(lanes.take(7).len()).filter(|&n| n > 0)).collect();
        assert_eq!(sizes, [63, 37], "1 shared + 63 own locks fill the first batch");
        assert!(lanes.queues.lock().is_empty(), "an empty take ends the lane");

        for _ in 0..300 {
            let _ = lanes.push(7, waiting(vec![1]));
        }
        let sizes: Vec<usize> = std::iter::from_fn(|| Some(lanes.take(7).len()).filter(|&n| n > 0)).collect();
        assert_eq!(sizes, [MAX_BATCH, 300 - MAX_BATCH]);

        let _ = lanes.push(7, waiting((0..100).collect()));
        let _ = lanes.push(7, waiting(vec![1]));
        let sizes: Vec<usize> = std::iter::from_fn(|| Some(lanes.take(7).len()).filter(|&n| n > 0)).collect();
        assert_eq!(sizes, [1, 1], "a call with 100 locks goes alone");
    }

    #[test]
    fn a_full_lane_refuses() {
        let lanes = Lanes::default();
        assert!(matches!(lanes.push(3, waiting(vec![1])), Pushed::Idle));
        for _ in 1..MAX_QUEUED {
            assert!(matches!(lanes.push(3, waiting(vec![1])), Pushed::Queued));
        }
        assert!(matches!(lanes.push(3, waiting(vec![1])), Pushed::Full));
        assert!(matches!(lanes.push(4, waiting(vec![2])), Pushed::Idle), "other sessions are not affected");
    }
}
