//! Ingest from SDKs (ledger lines and interventions, by stream, with chain checks), monitoring
//! events, the agents and runs seen in traffic, and the intervention queries operators read.

use std::collections::HashMap;

use serde::Serialize;
use serde_json::Value;
use sqlx::{Postgres, QueryBuilder, Row, Sqlite};

use crate::{Pool, Result, Store, StoreError};

/// Where a line sits in its stream's hash chain, and whether its own bytes match its hash.
#[derive(Debug, Clone)]
pub struct ChainPos {
    pub seq: i64,
    pub prev: String,
    pub hash: String,
    pub hash_ok: bool,
}

/// A ledger line to store: the raw line, with what the registry tallies from it.
#[derive(Debug, Clone)]
pub struct LedgerIn {
    pub id: String,
    pub chain: ChainPos,
    pub agent_id: String,
    pub run_id: String,
    pub cost_micros: i64,
    /// The call ended in an error (for the consecutive-failures alert).
    pub failed: bool,
    pub line: String,
}

/// An intervention to store (from an SDK's log, or made by the server itself without a chain).
#[derive(Debug, Clone)]
pub struct InterventionIn {
    pub id: String,
    pub chain: Option<ChainPos>,
    pub at: i64,
    /// `at` is the arrival time, since the time the record claims is too far ahead of the clock.
    pub clock_ahead: bool,
    pub agent_id: String,
    pub run_id: String,
    pub session_id: String,
    pub kind: String,
    pub outcome: String,
    pub risk_level: String,
    pub action: String,
    pub policy: Option<String>,
    pub rule: Option<String>,
    pub estimated_micros: i64,
    pub prevented_micros: i64,
    pub body: String,
}

/// A break in a stream's chain.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TamperFinding {
    pub id: String,
    pub stream: String,
    /// The agent whose chain of `stream` it is (each sender keeps its own).
    pub agent_id: String,
    pub seq: i64,
    pub entry_id: Option<String>,
    /// `hash_mismatch` (the line was edited), `chain_break` (lines removed, reordered or edited
    /// before it), `gap` (sequence numbers skipped: lines never arrived), `fork` (a different line
    /// at a position already received), `rewrite` (an entry id received before, now with other
    /// bytes), or `id_collision` (an entry id another agent's line already has; its bytes are not
    /// compared, so no agent learns anything of another's lines).
    pub kind: String,
    pub detail: String,
    pub at: i64,
}

/// What one ingest call did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct IngestReport {
    pub ledger_accepted: u64,
    pub ledger_duplicates: u64,
    pub interventions_accepted: u64,
    pub interventions_duplicates: u64,
    pub findings: Vec<TamperFinding>,
    /// Interventions stored by this call that were dated too far ahead of the server's clock
    /// ([`InterventionIn::clock_ahead`]): each is listed at the time it arrived instead (its
    /// stored line keeps the time it claims). A resent one is not counted again.
    pub clock_ahead: u64,
    /// Agents whose run of consecutive failed calls reached [`FAILURE_STREAK`] with this batch.
    #[serde(skip)]
    pub failing_agents: Vec<(String, i64)>,
}

/// Consecutive failed calls that make an agent worth an alert.
pub const FAILURE_STREAK: i64 = 3;

/// Per agent, in line order: whether a success reset the streak, and the failures after the last success.
fn streaks(lines: &[&LedgerIn]) -> Vec<(String, bool, i64)> {
    let mut out: Vec<(String, bool, i64)> = Vec::new();
    for l in lines {
        let i = match out.iter().position(|(a, _, _)| *a == l.agent_id) {
            Some(i) => i,
            None => {
                out.push((l.agent_id.clone(), false, 0));
                out.len() - 1
            }
        };
        if let Some(e) = out.get_mut(i) {
            if l.failed {
                e.2 += 1;
            } else {
                e.1 = true;
                e.2 = 0;
            }
        }
    }
    out
}

#[derive(Debug, Clone)]
struct StreamState {
    last_seq: i64,
    last_hash: String,
}

/// Where one batch's findings for one stream (a ledger's, or its interventions') go: the stream,
/// whose chain of it it is, and when.
struct Findings<'a> {
    stream: &'a str,
    agent: &'a str,
    now: i64,
    out: &'a mut Vec<TamperFinding>,
}

impl Findings<'_> {
    fn push(&mut self, kind: &str, id: &str, seq: i64, detail: String) {
        self.out.push(TamperFinding {
            id: crate::new_id(),
            stream: self.stream.into(),
            agent_id: self.agent.into(),
            seq,
            entry_id: Some(id.into()),
            kind: kind.into(),
            detail,
            at: self.now,
        });
    }

    fn fork(&mut self, id: &str, seq: i64) {
        self.push("fork", id, seq, format!(
            "a different line `{id}` arrived for position {seq}, which was already received: the log was rewritten or recreated; it was not stored"
        ));
    }

    /// An entry id that was received before arrived again with other bytes. What was stored first
    /// is kept.
    fn rewrite(&mut self, id: &str, seq: i64) {
        self.push("rewrite", id, seq, format!(
            "line `{id}` (position {seq}) was received before with other bytes: it was edited after it was sent; the line received first was kept"
        ));
    }

    /// A line whose id was stored before: the same line again (no finding), the same agent's line
    /// with other bytes (`rewrite`), or another agent's (`id_collision`, bytes not compared).
    fn against_stored(&mut self, stored: &(String, String), bytes: &str, owner: &str, id: &str, seq: i64) {
        let (first, whose) = stored;
        if whose != owner {
            self.push(
                "id_collision",
                id,
                seq,
                format!("line `{id}` (position {seq}) has the id of another agent's line: it was not stored"),
            );
        } else if first != bytes {
            self.rewrite(id, seq);
        }
    }
}

/// Walks lines in order against a stream's state: which are new, and what is broken.
fn check_chain<'a>(
    state: &mut Option<StreamState>,
    items: impl Iterator<Item = (&'a str, &'a ChainPos)>,
    found: &mut Findings<'_>,
) -> Vec<bool> {
    let mut fresh = Vec::new();
    for (id, c) in items {
        let known = state.is_some();
        let (expected_seq, expected_prev) = match state.as_ref() {
            Some(s) => (s.last_seq + 1, s.last_hash.clone()),
            None => (1, GENESIS.to_string()),
        };
        let expected_prev = expected_prev.as_str();
        if known && c.seq < expected_seq {
            fresh.push(false);
            continue;
        }
        if !c.hash_ok {
            found.push(
                "hash_mismatch",
                id,
                c.seq,
                format!("line {} does not match its own hash: it was edited", c.seq),
            );
        }
        if c.seq > expected_seq {
            found.push(
                "gap",
                id,
                c.seq,
                format!("lines {expected_seq}..{} never arrived; the stream continues at {}", c.seq - 1, c.seq),
            );
        } else if c.prev != expected_prev {
            found.push(
                "chain_break",
                id,
                c.seq,
                format!(
                    "line {} links to {}…, but the line before it hashes to {}…: lines were removed, reordered or edited",
                    c.seq,
                    c.prev.get(..12).unwrap_or(&c.prev),
                    expected_prev.get(..12).unwrap_or(expected_prev)
                ),
            );
        }
        *state = Some(StreamState { last_seq: c.seq, last_hash: c.hash.clone() });
        fresh.push(true);
    }
    fresh
}

/// A batch's line as the id checks read it: id, bytes, position, whose.
type LineKey<'a> = (&'a str, &'a str, i64, &'a str);

fn ledger_key(l: &LedgerIn) -> LineKey<'_> {
    (l.id.as_str(), l.line.as_str(), l.chain.seq, l.agent_id.as_str())
}

fn intervention_key(i: &InterventionIn) -> LineKey<'_> {
    (i.id.as_str(), i.body.as_str(), i.chain.as_ref().map_or(0, |c| c.seq), i.agent_id.as_str())
}

/// Lines at positions already received: a fork when their id was never stored, else judged
/// [`Findings::against_stored`]. None of them is stored.
fn judge_old<'a, T>(lines: &[&'a T], key: fn(&'a T) -> LineKey<'a>, known: &Stored, found: &mut Findings<'_>) {
    for &l in lines {
        let (id, bytes, seq, owner) = key(l);
        match known.get(id) {
            None => found.fork(id, seq),
            Some(before) => found.against_stored(before, bytes, owner, id, seq),
        }
    }
}

/// Of a batch's new lines, those that will be stored: not received before (else judged
/// [`Findings::against_stored`]), and the first of the batch's lines with their id (a later one is
/// a duplicate, or a `rewrite` finding when its bytes differ).
fn first_copies<'a, T>(
    lines: &[&'a T],
    key: fn(&'a T) -> LineKey<'a>,
    stored: &Stored,
    found: &mut Findings<'_>,
) -> Vec<&'a T> {
    let mut seen: HashMap<&'a str, &'a str> = HashMap::with_capacity(lines.len());
    let mut out = Vec::with_capacity(lines.len());
    for &l in lines {
        let (id, bytes, seq, owner) = key(l);
        if let Some(before) = stored.get(id) {
            found.against_stored(before, bytes, owner, id, seq);
        } else if let Some(first) = seen.get(id) {
            if *first != bytes {
                found.rewrite(id, seq);
            }
        } else {
            seen.insert(id, bytes);
            out.push(l);
        }
    }
    out
}

const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Per-agent and per-run totals from one batch.
#[derive(Default)]
struct Tally {
    agents: std::collections::BTreeMap<String, [i64; 5]>, // calls, cost, interventions, blocked, last_seen
    runs: std::collections::BTreeMap<(String, String), [i64; 3]>, // calls, cost, last_seen
}

impl Tally {
    fn call(&mut self, agent: &str, run: &str, cost: i64, at: i64) {
        let a = self.agents.entry(agent.into()).or_default();
        // Sums saturate: a total can only be as wrong as the lines it adds up, never an error that
        // would refuse the batch (and every batch after it) for good.
        a[0] += 1;
        a[1] = a[1].saturating_add(cost);
        a[4] = a[4].max(at);
        let r = self.runs.entry((agent.into(), run.into())).or_default();
        r[0] += 1;
        r[1] = r[1].saturating_add(cost);
        r[2] = r[2].max(at);
    }
    fn intervention(&mut self, agent: &str, run: &str, blocked: bool, at: i64) {
        let a = self.agents.entry(agent.into()).or_default();
        a[2] += 1;
        a[3] += i64::from(blocked);
        a[4] = a[4].max(at);
        let r = self.runs.entry((agent.into(), run.into())).or_default();
        r[2] = r[2].max(at);
    }
}

/// Filters for listing interventions. Times are milliseconds since the epoch.
#[derive(Debug, Clone, Default)]
pub struct InterventionFilter {
    pub kind: Option<String>,
    pub outcome: Option<String>,
    pub risk_level: Option<String>,
    pub agent_id: Option<String>,
    pub run_id: Option<String>,
    pub since: Option<i64>,
    pub until: Option<i64>,
    /// Continue after this `(at, id)`, newest first.
    pub after: Option<(i64, String)>,
    pub limit: i64,
}

/// A stored intervention: its columns and the record as sent.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StoredIntervention {
    pub id: String,
    pub at: i64,
    pub source: String,
    pub record: Value,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Ranked {
    pub name: String,
    pub count: i64,
    pub cost_prevented_usd: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DayStats {
    /// `YYYY-MM-DD` (UTC).
    pub day: String,
    pub interventions: i64,
    pub blocked: i64,
    pub high_risk_blocks: i64,
    pub cost_prevented_usd: f64,
    pub top_blocked_actions: Vec<Ranked>,
    pub top_policies: Vec<Ranked>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InterventionStats {
    pub total: i64,
    pub blocked: i64,
    pub high_risk_blocks: i64,
    pub cost_prevented_usd: f64,
    pub top_blocked_actions: Vec<Ranked>,
    pub top_policies: Vec<Ranked>,
    pub by_day: Vec<DayStats>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AgentRow {
    pub agent_id: String,
    pub first_seen: i64,
    pub last_seen: i64,
    pub calls: i64,
    pub cost_usd: f64,
    pub decisions: i64,
    pub interventions: i64,
    pub blocked: i64,
    pub events: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunRow {
    pub run_id: String,
    pub first_seen: i64,
    pub last_seen: i64,
    pub calls: i64,
    pub cost_usd: f64,
    pub decisions: i64,
}

/// One SDK stream as the server has it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StreamRow {
    pub stream: String,
    pub agent_id: String,
    pub last_seq: i64,
    pub entries: i64,
    pub updated_at: i64,
}

/// A monitoring event (the posture product's shape).
#[derive(Debug, Clone)]
pub struct EventIn {
    pub id: String,
    pub agent_id: String,
    pub tool_name: String,
    pub session_id: Option<String>,
    pub at: i64,
    pub body: String,
}

fn usd(micros: i64) -> f64 {
    micros as f64 / 1_000_000.0
}

/// `YYYY-MM-DD` of a time in milliseconds (UTC).
pub fn day_of(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).map(|t| t.format("%Y-%m-%d").to_string()).unwrap_or_default()
}

/// A bind value for dynamically built queries.
#[derive(Debug, Clone)]
enum Bind {
    Text(String),
    Int(i64),
}

/// Renders `WHERE` clauses with `{}` placeholders into the backend's syntax.
fn render(clauses: &[(String, Vec<Bind>)], pg: bool, first: usize) -> (String, Vec<Bind>) {
    let mut sql = String::new();
    let mut binds = Vec::new();
    for (i, (c, b)) in clauses.iter().enumerate() {
        sql.push_str(if i == 0 { " WHERE " } else { " AND " });
        let mut rest = c.as_str();
        let mut bi = b.iter();
        while let Some(pos) = rest.find("{}") {
            sql.push_str(rest.get(..pos).unwrap_or_default());
            let n = first + binds.len();
            sql.push_str(&if pg { format!("${n}") } else { format!("?{n}") });
            if let Some(v) = bi.next() {
                binds.push(v.clone());
            }
            rest = rest.get(pos + 2..).unwrap_or_default();
        }
        sql.push_str(rest);
    }
    (sql, binds)
}

fn filter_clauses(f: &InterventionFilter) -> Vec<(String, Vec<Bind>)> {
    let mut c = Vec::new();
    let text = |s: &Option<String>| s.clone().map(Bind::Text);
    for (col, v) in [
        ("type", text(&f.kind)),
        ("outcome", text(&f.outcome)),
        ("risk_level", text(&f.risk_level)),
        ("agent_id", text(&f.agent_id)),
        ("run_id", text(&f.run_id)),
    ] {
        if let Some(v) = v {
            c.push((format!("{col} = {{}}"), vec![v]));
        }
    }
    if let Some(s) = f.since {
        c.push(("at >= {}".into(), vec![Bind::Int(s)]));
    }
    if let Some(u) = f.until {
        c.push(("at < {}".into(), vec![Bind::Int(u)]));
    }
    c
}

macro_rules! bind_all {
    ($q:expr, $binds:expr) => {{
        let mut q = $q;
        for b in $binds {
            q = match b {
                Bind::Text(s) => q.bind(s.clone()),
                Bind::Int(i) => q.bind(*i),
            };
        }
        q
    }};
}

impl Store {
    /// Stores a batch from one SDK stream in one transaction: new lines only (by id and sequence),
    /// chain checked against what the stream sent before, findings recorded, agents and runs tallied.
    /// A different line at a position already received (a rewritten or recreated log) is not
    /// stored; it is recorded as a `fork` finding. An entry id received before with other bytes
    /// (at its position, or from another stream) keeps what came first and is a `rewrite` finding.
    pub async fn ingest(
        &self,
        stream: &str,
        agent_id: &str,
        ledger: Vec<LedgerIn>,
        interventions: Vec<InterventionIn>,
    ) -> Result<IngestReport> {
        let now = crate::now_ms();
        let istream = format!("{stream}#interventions");
        let mut report = IngestReport::default();
        let (n_ledger, n_interventions) = (ledger.len() as u64, interventions.len() as u64);
        let streak_sql = crate::sql(
            self.is_pg(),
            "UPDATE agents SET failure_streak = CASE WHEN ?1 = 1 THEN ?2 ELSE failure_streak + ?2 END \
             WHERE agent_id = ?3 RETURNING failure_streak",
        );
        let continued_sql = crate::sql(self.is_pg(), CONTINUED_SQL);
        // A new chain that links to the head of another agent's chain of the stream name starts
        // from that head (see [`CONTINUED_SQL`]).
        macro_rules! continued {
            ($tx:ident, $stream:expr, $first:expr) => {
                match $first.filter(|c: &&ChainPos| c.seq > 1) {
                    None => None,
                    Some(c) => sqlx::query_as::<_, (i64, String)>(sqlx::AssertSqlSafe(continued_sql.clone()))
                        .bind($stream)
                        .bind(agent_id)
                        .bind(c.seq - 1)
                        .bind(&c.prev)
                        .fetch_optional(&mut *$tx)
                        .await?
                        .map(|(last_seq, last_hash)| StreamState { last_seq, last_hash }),
                }
            };
        }
        macro_rules! body {
            ($tx:ident, $load:ident, $save:ident, $insert_l:ident, $insert_i:ident, $exists:ident, $finding_sql:literal, $tally:ident) => {{
                let mut tally = Tally::default();
                let mut findings = Vec::new();
                let mut st = $load(&mut $tx, stream, agent_id, now).await?;
                let had = st.is_some();
                if st.is_none() {
                    st = continued!($tx, stream, ledger.first().map(|l| &l.chain));
                }
                let mut found = Findings { stream, agent: agent_id, now, out: &mut findings };
                let fresh = check_chain(&mut st, ledger.iter().map(|l| (l.id.as_str(), &l.chain)), &mut found);
                let old: Vec<&LedgerIn> = ledger.iter().zip(&fresh).filter(|(_, f)| !**f).map(|(l, _)| l).collect();
                let old_ids: Vec<&str> = old.iter().map(|l| l.id.as_str()).collect();
                let known = $exists(&mut $tx, "ledger_entries", &old_ids).await?;
                judge_old(&old, ledger_key, &known, &mut found);
                let new: Vec<LedgerIn> = ledger.into_iter().zip(fresh).filter(|(_, f)| *f).map(|(l, _)| l).collect();
                // New in this stream, but an entry id received before (in another stream): not
                // stored again, so not counted again either. (Asked before the insert: its
                // `RETURNING` made ingest slower than this look-up, 80,000-91,000 lines/s against
                // 112,000-115,000 on SQLite.)
                let ids: Vec<&str> = new.iter().map(|l| l.id.as_str()).collect();
                let stored = $exists(&mut $tx, "ledger_entries", &ids).await?;
                let refs: Vec<&LedgerIn> = new.iter().collect();
                let counted = first_copies(&refs, ledger_key, &stored, &mut found);
                for l in &counted {
                    tally.call(&l.agent_id, &l.run_id, l.cost_micros, now);
                }
                let streaks = streaks(&counted);
                let inserted = $insert_l(&mut $tx, stream, new, now).await?;
                report.ledger_accepted = inserted;
                report.ledger_duplicates = n_ledger - inserted;
                if let Some(s) = &st {
                    $save(&mut $tx, stream, agent_id, s, inserted, now, had).await?;
                }
                let mut ist = $load(&mut $tx, &istream, agent_id, now).await?;
                let ihad = ist.is_some();
                if ist.is_none() {
                    ist = continued!($tx, &istream, interventions.iter().find_map(|i| i.chain.as_ref()));
                }
                let mut found = Findings { stream: &istream, agent: agent_id, now, out: &mut findings };
                let chained: Vec<(&str, &ChainPos)> =
                    interventions.iter().filter_map(|i| Some((i.id.as_str(), i.chain.as_ref()?))).collect();
                let ifresh = check_chain(&mut ist, chained.into_iter(), &mut found);
                let mut fi = ifresh.into_iter();
                let mut inew = Vec::new();
                let mut iold = Vec::new();
                for i in &interventions {
                    if i.chain.is_none() || fi.next().unwrap_or(false) { inew.push(i) } else { iold.push(i) }
                }
                let iold_ids: Vec<&str> = iold.iter().map(|i| i.id.as_str()).collect();
                let iknown = $exists(&mut $tx, "interventions", &iold_ids).await?;
                judge_old(&iold, intervention_key, &iknown, &mut found);
                let inew_ids: Vec<&str> = inew.iter().map(|i| i.id.as_str()).collect();
                let istored = $exists(&mut $tx, "interventions", &inew_ids).await?;
                let icounted = first_copies(&inew, intervention_key, &istored, &mut found);
                for i in &icounted {
                    tally.intervention(&i.agent_id, &i.run_id, i.outcome == "BLOCKED", now);
                }
                report.clock_ahead = icounted.iter().filter(|i| i.clock_ahead).count() as u64;
                let iins = $insert_i(&mut $tx, &inew, "sdk").await?;
                report.interventions_accepted = iins;
                report.interventions_duplicates = n_interventions - iins;
                if let Some(s) = &ist {
                    $save(&mut $tx, &istream, agent_id, s, iins, now, ihad).await?;
                }
                for f in &findings {
                    sqlx::query($finding_sql)
                        .bind(&f.id)
                        .bind(&f.stream)
                        .bind(&f.agent_id)
                        .bind(f.seq)
                        .bind(&f.entry_id)
                        .bind(&f.kind)
                        .bind(&f.detail)
                        .bind(f.at)
                        .execute(&mut *$tx)
                        .await?;
                }
                $tally(&mut $tx, &tally, now).await?;
                for (agent, reset, trailing) in &streaks {
                    let streak: Option<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(streak_sql.clone()))
                        .bind(i64::from(*reset))
                        .bind(*trailing)
                        .bind(agent)
                        .fetch_optional(&mut *$tx)
                        .await?;
                    let before = if *reset { 0 } else { streak.unwrap_or(0) - trailing };
                    if let Some(n) = streak
                        && n >= FAILURE_STREAK
                        && before < FAILURE_STREAK
                    {
                        report.failing_agents.push((agent.clone(), n));
                    }
                }
                $tx.commit().await?;
                report.findings = findings;
            }};
        }
        match &self.pool {
            Pool::Sqlite(p) => {
                let _turn = self.writer.lock().await;
                let mut tx = p.begin_with("BEGIN IMMEDIATE").await?;
                body!(
                    tx,
                    load_stream_sqlite,
                    save_stream_sqlite,
                    insert_ledger_sqlite,
                    insert_interventions_sqlite,
                    existing_sqlite,
                    "INSERT INTO tamper_findings (id, stream, agent_id, seq, entry_id, kind, detail, at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                    apply_tally_sqlite
                );
            }
            Pool::Postgres(p) => {
                let mut tx = p.begin().await?;
                body!(
                    tx,
                    load_stream_pg,
                    save_stream_pg,
                    insert_ledger_pg,
                    insert_interventions_pg,
                    existing_pg,
                    "INSERT INTO tamper_findings (id, stream, agent_id, seq, entry_id, kind, detail, at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                    apply_tally_pg
                );
            }
        }
        Ok(report)
    }

    /// Records interventions the server made itself (its own decisions), and tallies their agents.
    pub async fn record_interventions(&self, items: &[InterventionIn]) -> Result<()> {
        if items.is_empty() {
            return Ok(());
        }
        let now = crate::now_ms();
        let mut tally = Tally::default();
        for i in items {
            tally.intervention(&i.agent_id, &i.run_id, i.outcome == "BLOCKED", i.at);
        }
        let refs: Vec<&InterventionIn> = items.iter().collect();
        match &self.pool {
            Pool::Sqlite(p) => {
                let _turn = self.writer.lock().await;
                let mut tx = p.begin_with("BEGIN IMMEDIATE").await?;
                insert_interventions_sqlite(&mut tx, &refs, "server").await?;
                apply_tally_sqlite(&mut tx, &tally, now).await?;
                tx.commit().await?;
            }
            Pool::Postgres(p) => {
                let mut tx = p.begin().await?;
                insert_interventions_pg(&mut tx, &refs, "server").await?;
                apply_tally_pg(&mut tx, &tally, now).await?;
                tx.commit().await?;
            }
        }
        Ok(())
    }

    /// Counts decisions made by `/decide` in the agents registry: (agent, run, decisions). Calls
    /// and their cost come from the uploaded ledgers, so a call decided here and uploaded later is
    /// not counted twice.
    pub async fn record_decisions(&self, decided: &[(String, String, i64)]) -> Result<()> {
        if decided.is_empty() {
            return Ok(());
        }
        let now = crate::now_ms();
        let pg = matches!(self.pool, Pool::Postgres(_));
        let (greatest, excluded) = if pg { ("GREATEST", "EXCLUDED") } else { ("MAX", "excluded") };
        let agent_sql = format!(
            "INSERT INTO agents (agent_id, first_seen, last_seen, decisions) VALUES ({}) ON CONFLICT (agent_id) DO UPDATE \
             SET decisions = agents.decisions + {excluded}.decisions, last_seen = {greatest}(agents.last_seen, {excluded}.last_seen)",
            if pg { "$1, $2, $2, $3" } else { "?1, ?2, ?2, ?3" }
        );
        let run_sql = format!(
            "INSERT INTO runs (agent_id, run_id, first_seen, last_seen, decisions) VALUES ({}) ON CONFLICT (agent_id, run_id) DO UPDATE \
             SET decisions = runs.decisions + {excluded}.decisions, last_seen = {greatest}(runs.last_seen, {excluded}.last_seen)",
            if pg { "$1, $2, $3, $3, $4" } else { "?1, ?2, ?3, ?3, ?4" }
        );
        let mut per_agent: std::collections::BTreeMap<&str, i64> = std::collections::BTreeMap::new();
        for (a, _, n) in decided {
            *per_agent.entry(a.as_str()).or_default() += n;
        }
        macro_rules! run {
            ($tx:ident) => {{
                for (a, n) in &per_agent {
                    sqlx::query(sqlx::AssertSqlSafe(agent_sql.clone()))
                        .bind(*a)
                        .bind(now)
                        .bind(*n)
                        .execute(&mut *$tx)
                        .await?;
                }
                for (a, r, n) in decided {
                    sqlx::query(sqlx::AssertSqlSafe(run_sql.clone()))
                        .bind(a)
                        .bind(r)
                        .bind(now)
                        .bind(*n)
                        .execute(&mut *$tx)
                        .await?;
                }
                $tx.commit().await?;
            }};
        }
        match &self.pool {
            Pool::Sqlite(p) => {
                let _turn = self.writer.lock().await;
                let mut tx = p.begin_with("BEGIN IMMEDIATE").await?;
                run!(tx);
            }
            Pool::Postgres(p) => {
                let mut tx = p.begin().await?;
                run!(tx);
            }
        }
        Ok(())
    }

    pub async fn tamper_findings(&self, stream: Option<&str>) -> Result<Vec<TamperFinding>> {
        let base = "SELECT id, stream, agent_id, seq, entry_id, kind, detail, at FROM tamper_findings";
        macro_rules! rows {
            ($p:expr, $ph:literal) => {{
                let rows = match stream {
                    Some(s) => {
                        sqlx::query(concat!(
                            "SELECT id, stream, agent_id, seq, entry_id, kind, detail, at FROM tamper_findings WHERE stream = ",
                            $ph,
                            " OR stream = ",
                            $ph,
                            " || '#interventions' ORDER BY at, seq"
                        ))
                        .bind(s)
                        .fetch_all($p)
                        .await?
                    }
                    None => sqlx::query(sqlx::AssertSqlSafe(format!("{base} ORDER BY at, seq"))).fetch_all($p).await?,
                };
                rows.iter()
                    .map(|r| {
                        Ok(TamperFinding {
                            id: r.try_get("id")?,
                            stream: r.try_get("stream")?,
                            agent_id: r.try_get("agent_id")?,
                            seq: r.try_get("seq")?,
                            entry_id: r.try_get("entry_id")?,
                            kind: r.try_get("kind")?,
                            detail: r.try_get("detail")?,
                            at: r.try_get("at")?,
                        })
                    })
                    .collect::<Result<Vec<_>>>()
            }};
        }
        match &self.pool {
            Pool::Sqlite(p) => rows!(p, "?1"),
            Pool::Postgres(p) => rows!(p, "$1"),
        }
    }

    /// Every stream and where its chain stands: (stream, agent, last seq, entries, updated at).
    pub async fn list_streams(&self) -> Result<Vec<StreamRow>> {
        let sql = "SELECT stream, agent_id, last_seq, entries, updated_at FROM streams ORDER BY stream, agent_id";
        macro_rules! q {
            ($p:expr) => {
                sqlx::query(sql)
                    .fetch_all($p)
                    .await?
                    .iter()
                    .map(|r| {
                        Ok(StreamRow {
                            stream: r.try_get("stream")?,
                            agent_id: r.try_get("agent_id")?,
                            last_seq: r.try_get("last_seq")?,
                            entries: r.try_get("entries")?,
                            updated_at: r.try_get("updated_at")?,
                        })
                    })
                    .collect()
            };
        }
        match &self.pool {
            Pool::Sqlite(p) => q!(p),
            Pool::Postgres(p) => q!(p),
        }
    }

    /// Counts stored ledger lines (for a stream, or all).
    pub async fn ledger_count(&self, stream: Option<&str>) -> Result<i64> {
        Ok(match (&self.pool, stream) {
            (Pool::Sqlite(p), Some(s)) => {
                sqlx::query_scalar("SELECT COUNT(*) FROM ledger_entries WHERE stream = ?1").bind(s).fetch_one(p).await?
            }
            (Pool::Sqlite(p), None) => sqlx::query_scalar("SELECT COUNT(*) FROM ledger_entries").fetch_one(p).await?,
            (Pool::Postgres(p), Some(s)) => {
                sqlx::query_scalar("SELECT COUNT(*) FROM ledger_entries WHERE stream = $1").bind(s).fetch_one(p).await?
            }
            (Pool::Postgres(p), None) => sqlx::query_scalar("SELECT COUNT(*) FROM ledger_entries").fetch_one(p).await?,
        })
    }

    /// Stored ledger lines of a stream, in sequence order (the raw lines as the SDK wrote them).
    pub async fn ledger_lines(&self, stream: &str) -> Result<Vec<(i64, String, String)>> {
        macro_rules! q {
            ($p:expr, $sql:literal) => {{
                sqlx::query($sql)
                    .bind(stream)
                    .fetch_all($p)
                    .await?
                    .iter()
                    .map(|r| Ok((r.try_get("seq")?, r.try_get("id")?, r.try_get("line")?)))
                    .collect()
            }};
        }
        match &self.pool {
            Pool::Sqlite(p) => q!(p, "SELECT seq, id, line FROM ledger_entries WHERE stream = ?1 ORDER BY seq"),
            Pool::Postgres(p) => q!(p, "SELECT seq, id, line FROM ledger_entries WHERE stream = $1 ORDER BY seq"),
        }
    }

    pub async fn list_interventions(&self, f: &InterventionFilter) -> Result<Vec<StoredIntervention>> {
        let mut clauses = filter_clauses(f);
        if let Some((at, id)) = &f.after {
            clauses.push((
                "(at < {} OR (at = {} AND id < {}))".into(),
                vec![Bind::Int(*at), Bind::Int(*at), Bind::Text(id.clone())],
            ));
        }
        let limit = f.limit.clamp(1, 1000);
        macro_rules! run {
            ($p:expr, $pg:expr) => {{
                let (w, binds) = render(&clauses, $pg, 1);
                let sql = format!(
                    "SELECT id, at, source, body FROM interventions{w} ORDER BY at DESC, id DESC LIMIT {limit}"
                );
                let q = bind_all!(sqlx::query(sqlx::AssertSqlSafe(sql)), &binds);
                q.fetch_all($p)
                    .await?
                    .iter()
                    .map(|r| {
                        let body: String = r.try_get("body")?;
                        Ok(StoredIntervention {
                            id: r.try_get("id")?,
                            at: r.try_get("at")?,
                            source: r.try_get("source")?,
                            record: serde_json::from_str(&body).unwrap_or(Value::String(body)),
                        })
                    })
                    .collect()
            }};
        }
        match &self.pool {
            Pool::Sqlite(p) => run!(p, false),
            Pool::Postgres(p) => run!(p, true),
        }
    }

    pub async fn get_intervention(&self, id: &str) -> Result<StoredIntervention> {
        macro_rules! one {
            ($p:expr, $sql:literal) => {{
                let row = sqlx::query($sql).bind(id).fetch_optional($p).await?;
                match row {
                    Some(r) => {
                        let body: String = r.try_get("body")?;
                        Ok(StoredIntervention {
                            id: r.try_get("id")?,
                            at: r.try_get("at")?,
                            source: r.try_get("source")?,
                            record: serde_json::from_str(&body).unwrap_or(Value::String(body)),
                        })
                    }
                    None => Err(StoreError::NotFound(format!("intervention `{id}`"))),
                }
            }};
        }
        match &self.pool {
            Pool::Sqlite(p) => one!(p, "SELECT id, at, source, body FROM interventions WHERE id = ?1"),
            Pool::Postgres(p) => one!(p, "SELECT id, at, source, body FROM interventions WHERE id = $1"),
        }
    }

    /// Totals, high-risk blocks, top blocked actions and top policies, overall and by day (UTC).
    pub async fn intervention_stats(&self, f: &InterventionFilter) -> Result<InterventionStats> {
        let clauses = filter_clauses(f);
        // (day, type, outcome, risk, action, policy) → count, prevented; aggregated here from one grouped query.
        macro_rules! grouped {
            ($p:expr, $pg:expr) => {{
                let (w, binds) = render(&clauses, $pg, 1);
                // Saturating, as the agents' totals do: an integer SUM past i64 fails the query
                // (SQLite) or its cast (PostgreSQL), which would break the stats for good. SQLite's
                // TOTAL is a float sum, exact up to 2^53 micro-dollars (about $9 billion).
                let sum = if $pg {
                    "CAST(LEAST(SUM(prevented_micros), 9223372036854775807) AS BIGINT)"
                } else {
                    "CAST(MIN(TOTAL(prevented_micros), 9223372036854775807.0) AS INTEGER)"
                };
                let sql = format!(
                    "SELECT (at / 86400000) AS day, outcome, risk_level, action, COALESCE(policy, '') AS policy, \
                     COUNT(*) AS n, {sum} AS prevented FROM interventions{w} \
                     GROUP BY (at / 86400000), outcome, risk_level, action, COALESCE(policy, '')"
                );
                let q = bind_all!(sqlx::query(sqlx::AssertSqlSafe(sql)), &binds);
                q.fetch_all($p)
                    .await?
                    .iter()
                    .map(|r| {
                        Ok((
                            r.try_get::<i64, _>("day")?,
                            r.try_get::<String, _>("outcome")?,
                            r.try_get::<String, _>("risk_level")?,
                            r.try_get::<String, _>("action")?,
                            r.try_get::<String, _>("policy")?,
                            r.try_get::<i64, _>("n")?,
                            r.try_get::<Option<i64>, _>("prevented")?.unwrap_or(0),
                        ))
                    })
                    .collect::<Result<Vec<_>>>()?
            }};
        }
        let rows = match &self.pool {
            Pool::Sqlite(p) => grouped!(p, false),
            Pool::Postgres(p) => grouped!(p, true),
        };
        type Row7 = (i64, String, String, String, String, i64, i64);
        fn summarize(rows: &[&Row7]) -> (i64, i64, i64, i64, Vec<Ranked>, Vec<Ranked>) {
            use std::collections::BTreeMap;
            let (mut total, mut blocked, mut high, mut prevented) = (0, 0, 0, 0);
            let mut actions: BTreeMap<&str, (i64, i64)> = BTreeMap::new();
            let mut policies: BTreeMap<&str, (i64, i64)> = BTreeMap::new();
            for (_, outcome, risk, action, policy, n, p) in rows {
                total += n;
                prevented = i64::saturating_add(prevented, *p);
                if outcome == "BLOCKED" {
                    blocked += n;
                    if risk == "HIGH" || risk == "CRITICAL" {
                        high += n;
                    }
                    let a = actions.entry(action.as_str()).or_default();
                    a.0 += n;
                    a.1 = a.1.saturating_add(*p);
                }
                if !policy.is_empty() {
                    let e = policies.entry(policy.as_str()).or_default();
                    e.0 += n;
                    e.1 = e.1.saturating_add(*p);
                }
            }
            let rank = |m: BTreeMap<&str, (i64, i64)>| {
                let mut v: Vec<Ranked> = m
                    .into_iter()
                    .map(|(k, (n, p))| Ranked { name: k.into(), count: n, cost_prevented_usd: usd(p) })
                    .collect();
                v.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.name.cmp(&b.name)));
                v.truncate(10);
                v
            };
            (total, blocked, high, prevented, rank(actions), rank(policies))
        }
        let all: Vec<&Row7> = rows.iter().collect();
        let (total, blocked, high, prevented, top_a, top_p) = summarize(&all);
        let mut days: Vec<i64> = rows.iter().map(|r| r.0).collect();
        days.sort_unstable();
        days.dedup();
        let by_day = days
            .into_iter()
            .rev()
            .map(|d| {
                let these: Vec<&Row7> = rows.iter().filter(|r| r.0 == d).collect();
                let (t, b, h, p, a, pol) = summarize(&these);
                DayStats {
                    day: day_of(d * 86_400_000),
                    interventions: t,
                    blocked: b,
                    high_risk_blocks: h,
                    cost_prevented_usd: usd(p),
                    top_blocked_actions: a,
                    top_policies: pol,
                }
            })
            .collect();
        Ok(InterventionStats {
            total,
            blocked,
            high_risk_blocks: high,
            cost_prevented_usd: usd(prevented),
            top_blocked_actions: top_a,
            top_policies: top_p,
            by_day,
        })
    }

    pub async fn list_agents(&self) -> Result<Vec<AgentRow>> {
        let sql = "SELECT agent_id, first_seen, last_seen, calls, cost_micros, decisions, interventions, blocked, events FROM agents ORDER BY last_seen DESC, agent_id";
        macro_rules! q {
            ($p:expr) => {
                sqlx::query(sql).fetch_all($p).await?.iter().map(agent_from).collect()
            };
        }
        match &self.pool {
            Pool::Sqlite(p) => q!(p),
            Pool::Postgres(p) => q!(p),
        }
    }

    /// One agent with its most recent runs.
    pub async fn get_agent(&self, agent_id: &str) -> Result<(AgentRow, Vec<RunRow>)> {
        macro_rules! q {
            ($p:expr, $a:literal, $r:literal) => {{
                let a = sqlx::query($a).bind(agent_id).fetch_optional($p).await?;
                let Some(a) = a else {
                    return Err(StoreError::NotFound(format!("agent `{agent_id}`")));
                };
                let runs = sqlx::query($r)
                    .bind(agent_id)
                    .fetch_all($p)
                    .await?
                    .iter()
                    .map(|r| {
                        Ok(RunRow {
                            run_id: r.try_get("run_id")?,
                            first_seen: r.try_get("first_seen")?,
                            last_seen: r.try_get("last_seen")?,
                            calls: r.try_get("calls")?,
                            cost_usd: usd(r.try_get("cost_micros")?),
                            decisions: r.try_get("decisions")?,
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok((agent_from(&a)?, runs))
            }};
        }
        match &self.pool {
            Pool::Sqlite(p) => q!(
                p,
                "SELECT agent_id, first_seen, last_seen, calls, cost_micros, decisions, interventions, blocked, events FROM agents WHERE agent_id = ?1",
                "SELECT run_id, first_seen, last_seen, calls, cost_micros, decisions FROM runs WHERE agent_id = ?1 ORDER BY last_seen DESC, run_id LIMIT 100"
            ),
            Pool::Postgres(p) => q!(
                p,
                "SELECT agent_id, first_seen, last_seen, calls, cost_micros, decisions, interventions, blocked, events FROM agents WHERE agent_id = $1",
                "SELECT run_id, first_seen, last_seen, calls, cost_micros, decisions FROM runs WHERE agent_id = $1 ORDER BY last_seen DESC, run_id LIMIT 100"
            ),
        }
    }

    pub async fn insert_event(&self, e: &EventIn) -> Result<bool> {
        let now = crate::now_ms();
        macro_rules! q {
            ($p:expr, $ins:literal, $up:literal) => {{
                let _turn = if matches!(self.pool, Pool::Sqlite(_)) { Some(self.writer.lock().await) } else { None };
                let mut tx = $p.begin().await?;
                let n = sqlx::query($ins)
                    .bind(&e.id)
                    .bind(&e.agent_id)
                    .bind(&e.tool_name)
                    .bind(&e.session_id)
                    .bind(e.at)
                    .bind(&e.body)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                if n > 0 {
                    sqlx::query($up).bind(&e.agent_id).bind(now).execute(&mut *tx).await?;
                }
                tx.commit().await?;
                Ok(n > 0)
            }};
        }
        match &self.pool {
            Pool::Sqlite(p) => q!(
                p,
                "INSERT INTO events (id, agent_id, tool_name, session_id, at, body) VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (agent_id, id) DO NOTHING",
                "INSERT INTO agents (agent_id, first_seen, last_seen, events) VALUES (?1, ?2, ?2, 1) ON CONFLICT (agent_id) DO UPDATE SET events = agents.events + 1, last_seen = MAX(agents.last_seen, excluded.last_seen)"
            ),
            Pool::Postgres(p) => q!(
                p,
                "INSERT INTO events (id, agent_id, tool_name, session_id, at, body) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (agent_id, id) DO NOTHING",
                "INSERT INTO agents (agent_id, first_seen, last_seen, events) VALUES ($1, $2, $2, 1) ON CONFLICT (agent_id) DO UPDATE SET events = agents.events + 1, last_seen = GREATEST(agents.last_seen, EXCLUDED.last_seen)"
            ),
        }
    }
}

fn agent_from<R: Row>(r: &R) -> Result<AgentRow>
where
    for<'c> &'c str: sqlx::ColumnIndex<R>,
    for<'q> String: sqlx::Decode<'q, R::Database> + sqlx::Type<R::Database>,
    for<'q> i64: sqlx::Decode<'q, R::Database> + sqlx::Type<R::Database>,
{
    Ok(AgentRow {
        agent_id: r.try_get("agent_id")?,
        first_seen: r.try_get("first_seen")?,
        last_seen: r.try_get("last_seen")?,
        calls: r.try_get("calls")?,
        cost_usd: usd(r.try_get("cost_micros")?),
        decisions: r.try_get("decisions")?,
        interventions: r.try_get("interventions")?,
        blocked: r.try_get("blocked")?,
        events: r.try_get("events")?,
    })
}

/// Entry ids already stored, with the bytes stored for each.
/// Entry ids already stored: the bytes stored for each, and whose they are (a ledger line's
/// stream's agent, an intervention's agent).
type Stored = HashMap<String, (String, String)>;

/// What to select from one of the two ingest tables for [`Stored`]: the id, what was received
/// and whose it is, and from where.
fn stored_select(table: &str) -> &'static str {
    if table == "interventions" {
        "SELECT id, body AS bytes, agent_id AS owner FROM interventions"
    } else {
        "SELECT id, line AS bytes, agent_id AS owner FROM ledger_entries"
    }
}

// ---- SQLite helpers

/// Which of `ids` are already stored in `table` (one of the two ingest tables), with the bytes
/// stored for each (`line` or `body`).
async fn existing_sqlite(tx: &mut sqlx::Transaction<'_, Sqlite>, table: &'static str, ids: &[&str]) -> Result<Stored> {
    let mut found = Stored::new();
    for chunk in ids.chunks(500) {
        let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(format!("{} WHERE id IN (", stored_select(table)));
        let mut sep = qb.separated(", ");
        for id in chunk {
            sep.push_bind(*id);
        }
        qb.push(")");
        for r in qb.build().fetch_all(&mut **tx).await? {
            found.insert(r.try_get("id")?, (r.try_get("bytes")?, r.try_get("owner")?));
        }
    }
    Ok(found)
}

/// A stream name's chain that another agent's uploads continue, hash-linked: an uploader whose
/// agent changed (an SDK given its `agent_id`, a key bound to an agent) resumes at the line after
/// the last one it sent, under a chain that has none. Starting from the other chain's head, the
/// continuation is checked as any batch is, instead of reporting the lines before it as a gap.
const CONTINUED_SQL: &str = "SELECT last_seq, last_hash FROM streams WHERE stream = ?1 AND agent_id <> ?2 \
     AND last_seq = ?3 AND last_hash = ?4 LIMIT 1";

async fn load_stream_sqlite(
    tx: &mut sqlx::Transaction<'_, Sqlite>,
    stream: &str,
    agent: &str,
    _now: i64,
) -> Result<Option<StreamState>> {
    let row = sqlx::query("SELECT last_seq, last_hash FROM streams WHERE agent_id = ?1 AND stream = ?2")
        .bind(agent)
        .bind(stream)
        .fetch_optional(&mut **tx)
        .await?;
    row.map(|r| Ok(StreamState { last_seq: r.try_get("last_seq")?, last_hash: r.try_get("last_hash")? })).transpose()
}

async fn save_stream_sqlite(
    tx: &mut sqlx::Transaction<'_, Sqlite>,
    stream: &str,
    agent: &str,
    s: &StreamState,
    added: u64,
    now: i64,
    existed: bool,
) -> Result<()> {
    let added = i64::try_from(added).unwrap_or(i64::MAX);
    if existed {
        sqlx::query("UPDATE streams SET last_seq = ?1, last_hash = ?2, entries = entries + ?3, updated_at = ?4 WHERE stream = ?5 AND agent_id = ?6")
            .bind(s.last_seq).bind(&s.last_hash).bind(added).bind(now).bind(stream).bind(agent).execute(&mut **tx).await?;
    } else {
        sqlx::query("INSERT INTO streams (stream, agent_id, last_seq, last_hash, entries, updated_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)")
            .bind(stream).bind(agent).bind(s.last_seq).bind(&s.last_hash).bind(added).bind(now).execute(&mut **tx).await?;
    }
    Ok(())
}

async fn insert_ledger_sqlite(
    tx: &mut sqlx::Transaction<'_, Sqlite>,
    stream: &str,
    rows: Vec<LedgerIn>,
    now: i64,
) -> Result<u64> {
    let mut n = 0;
    let mut rows = rows.into_iter().peekable();
    while rows.peek().is_some() {
        let chunk: Vec<LedgerIn> = rows.by_ref().take(500).collect();
        let mut qb: QueryBuilder<Sqlite> =
            QueryBuilder::new("INSERT INTO ledger_entries (id, stream, seq, received_at, line, agent_id) ");
        qb.push_values(chunk, |mut b, l| {
            b.push_bind(l.id)
                .push_bind(stream)
                .push_bind(l.chain.seq)
                .push_bind(now)
                .push_bind(l.line)
                .push_bind(l.agent_id);
        });
        qb.push(" ON CONFLICT (id) DO NOTHING");
        n += qb.build().execute(&mut **tx).await?.rows_affected();
    }
    Ok(n)
}

async fn insert_interventions_sqlite(
    tx: &mut sqlx::Transaction<'_, Sqlite>,
    rows: &[&InterventionIn],
    source: &str,
) -> Result<u64> {
    let mut n = 0;
    for chunk in rows.chunks(500) {
        let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(
            "INSERT INTO interventions (id, at, agent_id, run_id, session_id, type, outcome, risk_level, action, policy, rule, estimated_micros, prevented_micros, source, body) ",
        );
        qb.push_values(chunk, |mut b, i| {
            b.push_bind(i.id.as_str())
                .push_bind(i.at)
                .push_bind(i.agent_id.as_str())
                .push_bind(i.run_id.as_str())
                .push_bind(i.session_id.as_str())
                .push_bind(i.kind.as_str())
                .push_bind(i.outcome.as_str())
                .push_bind(i.risk_level.as_str())
                .push_bind(i.action.as_str())
                .push_bind(i.policy.as_deref())
                .push_bind(i.rule.as_deref())
                .push_bind(i.estimated_micros)
                .push_bind(i.prevented_micros)
                .push_bind(source)
                .push_bind(i.body.as_str());
        });
        qb.push(" ON CONFLICT (id) DO NOTHING");
        n += qb.build().execute(&mut **tx).await?.rows_affected();
    }
    Ok(n)
}

async fn apply_tally_sqlite(tx: &mut sqlx::Transaction<'_, Sqlite>, t: &Tally, now: i64) -> Result<()> {
    for (agent, [calls, cost, iv, blocked, seen]) in &t.agents {
        let seen = if *seen == 0 { now } else { *seen };
        sqlx::query(
            "INSERT INTO agents (agent_id, first_seen, last_seen, calls, cost_micros, interventions, blocked) VALUES (?1, ?2, ?2, ?3, ?4, ?5, ?6) \
             ON CONFLICT (agent_id) DO UPDATE SET last_seen = MAX(agents.last_seen, excluded.last_seen), calls = agents.calls + excluded.calls, \
             cost_micros = CASE WHEN agents.cost_micros > 9223372036854775807 - excluded.cost_micros THEN 9223372036854775807 ELSE agents.cost_micros + excluded.cost_micros END, interventions = agents.interventions + excluded.interventions, blocked = agents.blocked + excluded.blocked",
        )
        .bind(agent).bind(seen).bind(calls).bind(cost).bind(iv).bind(blocked).execute(&mut **tx).await?;
    }
    for ((agent, run), [calls, cost, seen]) in &t.runs {
        let seen = if *seen == 0 { now } else { *seen };
        sqlx::query(
            "INSERT INTO runs (agent_id, run_id, first_seen, last_seen, calls, cost_micros) VALUES (?1, ?2, ?3, ?3, ?4, ?5) \
             ON CONFLICT (agent_id, run_id) DO UPDATE SET last_seen = MAX(runs.last_seen, excluded.last_seen), calls = runs.calls + excluded.calls, cost_micros = CASE WHEN runs.cost_micros > 9223372036854775807 - excluded.cost_micros THEN 9223372036854775807 ELSE runs.cost_micros + excluded.cost_micros END",
        )
        .bind(agent).bind(run).bind(seen).bind(calls).bind(cost).execute(&mut **tx).await?;
    }
    Ok(())
}

// ---- PostgreSQL helpers

async fn existing_pg(tx: &mut sqlx::Transaction<'_, Postgres>, table: &'static str, ids: &[&str]) -> Result<Stored> {
    if ids.is_empty() {
        return Ok(Default::default());
    }
    let sql = format!("{} WHERE id = ANY($1)", stored_select(table));
    let rows: Vec<(String, String, String)> =
        sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(ids).fetch_all(&mut **tx).await?;
    Ok(rows.into_iter().map(|(id, bytes, owner)| (id, (bytes, owner))).collect())
}

async fn load_stream_pg(
    tx: &mut sqlx::Transaction<'_, Postgres>,
    stream: &str,
    agent: &str,
    now: i64,
) -> Result<Option<StreamState>> {
    // Create-then-lock, so two replicas ingesting one stream take turns instead of racing.
    sqlx::query("INSERT INTO streams (stream, agent_id, last_seq, last_hash, entries, updated_at) VALUES ($1, $2, 0, '', 0, $3) ON CONFLICT (agent_id, stream) DO NOTHING")
        .bind(stream).bind(agent).bind(now).execute(&mut **tx).await?;
    let r = sqlx::query("SELECT last_seq, last_hash FROM streams WHERE stream = $1 AND agent_id = $2 FOR UPDATE")
        .bind(stream)
        .bind(agent)
        .fetch_one(&mut **tx)
        .await?;
    let s = StreamState { last_seq: r.try_get("last_seq")?, last_hash: r.try_get("last_hash")? };
    Ok(if s.last_seq == 0 && s.last_hash.is_empty() { None } else { Some(s) })
}

async fn save_stream_pg(
    tx: &mut sqlx::Transaction<'_, Postgres>,
    stream: &str,
    agent: &str,
    s: &StreamState,
    added: u64,
    now: i64,
    _existed: bool,
) -> Result<()> {
    sqlx::query(
        "UPDATE streams SET last_seq = $1, last_hash = $2, entries = entries + $3, updated_at = $4 WHERE stream = $5 AND agent_id = $6",
    )
    .bind(s.last_seq)
    .bind(&s.last_hash)
    .bind(i64::try_from(added).unwrap_or(i64::MAX))
    .bind(now)
    .bind(stream)
    .bind(agent)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn insert_ledger_pg(
    tx: &mut sqlx::Transaction<'_, Postgres>,
    stream: &str,
    rows: Vec<LedgerIn>,
    now: i64,
) -> Result<u64> {
    if rows.is_empty() {
        return Ok(0);
    }
    let seqs: Vec<i64> = rows.iter().map(|l| l.chain.seq).collect();
    let agents: Vec<String> = rows.iter().map(|l| l.agent_id.clone()).collect();
    let (ids, lines): (Vec<String>, Vec<String>) = rows.into_iter().map(|l| (l.id, l.line)).unzip();
    let n = sqlx::query(
        "INSERT INTO ledger_entries (id, stream, seq, received_at, line, agent_id) \
         SELECT id, $2, seq, $3, line, agent_id FROM UNNEST($1::text[], $4::bigint[], $5::text[], $6::text[]) AS u(id, seq, line, agent_id) \
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(&ids)
    .bind(stream)
    .bind(now)
    .bind(&seqs)
    .bind(&lines)
    .bind(&agents)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    Ok(n)
}

async fn insert_interventions_pg(
    tx: &mut sqlx::Transaction<'_, Postgres>,
    rows: &[&InterventionIn],
    source: &str,
) -> Result<u64> {
    if rows.is_empty() {
        return Ok(0);
    }
    let col = |f: fn(&InterventionIn) -> String| rows.iter().map(|l| f(l)).collect::<Vec<String>>();
    let opt = |f: fn(&InterventionIn) -> Option<String>| rows.iter().map(|l| f(l)).collect::<Vec<Option<String>>>();
    let int = |f: fn(&InterventionIn) -> i64| rows.iter().map(|l| f(l)).collect::<Vec<i64>>();
    let n = sqlx::query(
        "INSERT INTO interventions (id, at, agent_id, run_id, session_id, type, outcome, risk_level, action, policy, rule, estimated_micros, prevented_micros, source, body) \
         SELECT id, at, agent_id, run_id, session_id, type, outcome, risk_level, action, policy, rule, est, prev, $15, body \
         FROM UNNEST($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[], $9::text[], $10::text[], $11::text[], $12::bigint[], $13::bigint[], $14::text[]) \
         AS u(id, at, agent_id, run_id, session_id, type, outcome, risk_level, action, policy, rule, est, prev, body) ON CONFLICT (id) DO NOTHING",
    )
    .bind(col(|i| i.id.clone()))
    .bind(int(|i| i.at))
    .bind(col(|i| i.agent_id.clone()))
    .bind(col(|i| i.run_id.clone()))
    .bind(col(|i| i.session_id.clone()))
    .bind(col(|i| i.kind.clone()))
    .bind(col(|i| i.outcome.clone()))
    .bind(col(|i| i.risk_level.clone()))
    .bind(col(|i| i.action.clone()))
    .bind(opt(|i| i.policy.clone()))
    .bind(opt(|i| i.rule.clone()))
    .bind(int(|i| i.estimated_micros))
    .bind(int(|i| i.prevented_micros))
    .bind(col(|i| i.body.clone()))
    .bind(source)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    Ok(n)
}

async fn apply_tally_pg(tx: &mut sqlx::Transaction<'_, Postgres>, t: &Tally, now: i64) -> Result<()> {
    for (agent, [calls, cost, iv, blocked, seen]) in &t.agents {
        let seen = if *seen == 0 { now } else { *seen };
        sqlx::query(
            "INSERT INTO agents (agent_id, first_seen, last_seen, calls, cost_micros, interventions, blocked) VALUES ($1, $2, $2, $3, $4, $5, $6) \
             ON CONFLICT (agent_id) DO UPDATE SET last_seen = GREATEST(agents.last_seen, EXCLUDED.last_seen), calls = agents.calls + EXCLUDED.calls, \
             cost_micros = CASE WHEN agents.cost_micros > 9223372036854775807 - EXCLUDED.cost_micros THEN 9223372036854775807 ELSE agents.cost_micros + EXCLUDED.cost_micros END, interventions = agents.interventions + EXCLUDED.interventions, blocked = agents.blocked + EXCLUDED.blocked",
        )
        .bind(agent).bind(seen).bind(calls).bind(cost).bind(iv).bind(blocked).execute(&mut **tx).await?;
    }
    for ((agent, run), [calls, cost, seen]) in &t.runs {
        let seen = if *seen == 0 { now } else { *seen };
        sqlx::query(
            "INSERT INTO runs (agent_id, run_id, first_seen, last_seen, calls, cost_micros) VALUES ($1, $2, $3, $3, $4, $5) \
             ON CONFLICT (agent_id, run_id) DO UPDATE SET last_seen = GREATEST(runs.last_seen, EXCLUDED.last_seen), calls = runs.calls + EXCLUDED.calls, cost_micros = CASE WHEN runs.cost_micros > 9223372036854775807 - EXCLUDED.cost_micros THEN 9223372036854775807 ELSE runs.cost_micros + EXCLUDED.cost_micros END",
        )
        .bind(agent).bind(run).bind(seen).bind(calls).bind(cost).execute(&mut **tx).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_are_civil_dates() {
        assert_eq!(day_of(0), "1970-01-01");
        assert_eq!(day_of(1_700_000_000_000), "2023-11-14");
        assert_eq!(day_of(951_782_400_000), "2000-02-29");
    }

    fn pos(seq: i64, prev: &str, hash: &str) -> ChainPos {
        ChainPos { seq, prev: prev.into(), hash: hash.into(), hash_ok: true }
    }

    #[test]
    fn chain_checks_find_breaks_gaps_and_duplicates() {
        let mut st = None;
        let mut f = Vec::new();
        let a = pos(1, GENESIS, "a");
        let b = pos(2, "a", "b");
        let fresh = check_chain(
            &mut st,
            [("1", &a), ("2", &b)].into_iter(),
            &mut Findings { stream: "s", agent: "a", now: 0, out: &mut f },
        );
        assert_eq!(fresh, vec![true, true]);
        assert!(f.is_empty());
        // A retry of the same lines is all duplicates.
        let fresh = check_chain(
            &mut st,
            [("1", &a), ("2", &b)].into_iter(),
            &mut Findings { stream: "s", agent: "a", now: 0, out: &mut f },
        );
        assert_eq!(fresh, vec![false, false]);
        let c = pos(3, "x", "c");
        let e = pos(5, "d", "e");
        let fresh = check_chain(
            &mut st,
            [("3", &c), ("5", &e)].into_iter(),
            &mut Findings { stream: "s", agent: "a", now: 0, out: &mut f },
        );
        assert_eq!(fresh, vec![true, true]);
        assert_eq!(f.iter().map(|x| x.kind.as_str()).collect::<Vec<_>>(), vec!["chain_break", "gap"]);
    }
}
