//! Persistence for the server: one [`Store`] over SQLite (the embedded default) or PostgreSQL
//! (several servers, one database), chosen by URL. SQL is written per backend where the dialects
//! differ; migrations are embedded per backend and applied by [`Store::open`].
//!
//! Timestamps are milliseconds since the Unix epoch and ids are UUIDv7 strings on both backends.

use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, postgres::PgRow, sqlite::SqliteRow};

/// Runs the same code against whichever pool the store has (the expression is compiled once per
/// backend, so row types and binds are checked for both).
macro_rules! per_backend {
    ($self:ident, $p:ident => $body:expr) => {
        match &$self.pool {
            $crate::Pool::Sqlite($p) => $body,
            $crate::Pool::Postgres($p) => $body,
        }
    };
}

/// SQL written with `?N` placeholders, in the backend's syntax (`$N` for PostgreSQL).
pub(crate) fn sql(pg: bool, text: &str) -> String {
    if pg { text.replace('?', "$") } else { text.to_string() }
}

pub mod approvals;
pub mod decisions;
pub mod ingest;
pub mod notify;

pub use approvals::{ApprovalRow, NewApproval};
pub use notify::{Attempt, ChannelRow, LinkRow, MessageRow, NewChannel, NewMessage};

pub use decisions::{
    BudgetSpec, CounterOp, DecideBatching, HaltRow, PgDecide, PgDecideOutcome, ReservationRow, SpendTotal, WindowSpec,
    spend_keys,
};
pub use ingest::{
    AgentRow, ChainPos, EventIn, IngestReport, InterventionFilter, InterventionIn, InterventionStats, LedgerIn, RunRow,
    StoredIntervention, TamperFinding,
};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The database could not be asked (a connection or pool failure reported to several callers).
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    #[error("cannot apply migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// Which database a store talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Sqlite,
    Postgres,
}

#[derive(Debug, Clone)]
pub(crate) enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// The server's database.
#[derive(Debug, Clone)]
pub struct Store {
    pub(crate) pool: Pool,
    /// The database file, for SQLite on disk.
    sqlite_path: Option<std::path::PathBuf>,
    /// SQLite has one writer at a time. Busy writers would otherwise wait in SQLite's busy handler,
    /// which sleeps; taking turns here keeps batch writes fair and their latency flat.
    pub(crate) writer: std::sync::Arc<tokio::sync::Mutex<()>>,
    /// PostgreSQL: the central decisions waiting for their session's transaction.
    pub(crate) lanes: std::sync::Arc<decisions::Lanes>,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)).unwrap_or(0)
}

/// A new time-ordered id (UUIDv7), as lowercase hyphenated text.
pub fn new_id() -> String {
    id_text(uuid::Uuid::now_v7())
}

/// An id's text, encoded on the stack and allocated once at its exact size (`to_string` goes
/// through the formatter and grows its buffer; `/decide` makes two or three ids per call).
pub fn id_text(id: uuid::Uuid) -> String {
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    id.hyphenated().encode_lower(&mut buf).to_owned()
}

/// A unique-constraint violation becomes a conflict the caller can explain; anything else stays a database error.
pub(crate) fn conflict_or(e: sqlx::Error, what: impl FnOnce() -> String) -> StoreError {
    match &e {
        sqlx::Error::Database(d) if d.is_unique_violation() => StoreError::Conflict(what()),
        _ => StoreError::Database(e),
    }
}

impl Store {
    /// Connects (`sqlite://path`, `sqlite::memory:`, or `postgres://…`) and applies the embedded migrations.
    pub async fn open(url: &str) -> Result<Self> {
        let sqlite_path = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
            .map(|p| p.split('?').next().unwrap_or(p))
            .filter(|p| !p.is_empty() && !p.starts_with(":memory:"))
            .map(std::path::PathBuf::from);
        let pool = if url.starts_with("sqlite:") {
            let opts = SqliteConnectOptions::from_str(url)?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                .busy_timeout(Duration::from_secs(5))
                .foreign_keys(true)
                // A bigger page cache for batch writes, and no checkpoint inside a committing
                // transaction (it would stall every caller waiting on that commit):
                // `spawn_checkpointer` checkpoints in the background instead.
                .pragma("cache_size", "-65536")
                .pragma("wal_autocheckpoint", "0");
            let pool = SqlitePoolOptions::new().max_connections(8).connect_with(opts).await?;
            sqlx::migrate!("migrations/sqlite").run(&pool).await?;
            Pool::Sqlite(pool)
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            let pool =
                PgPoolOptions::new().max_connections(16).acquire_timeout(Duration::from_secs(10)).connect(url).await?;
            sqlx::migrate!("migrations/postgres").run(&pool).await?;
            Pool::Postgres(pool)
        } else {
            return Err(StoreError::Invalid(format!(
                "unsupported database URL `{url}`; use sqlite://PATH or postgres://USER@HOST/DB"
            )));
        };
        Ok(Store { pool, sqlite_path, writer: Default::default(), lanes: Default::default() })
    }

    /// On SQLite, copies the write-ahead log into the database four times a second on its own connection
    /// (a passive checkpoint never blocks writers). Ends when the store is closed.
    pub fn spawn_checkpointer(&self) {
        let Pool::Sqlite(p) = &self.pool else { return };
        let p = p.clone();
        let writer = std::sync::Arc::clone(&self.writer);
        tokio::spawn(async move {
            // Often, so each checkpoint copies little and never stalls the machine for long.
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tick.tick().await;
                if p.is_closed() {
                    break;
                }
                match sqlx::query_as::<_, (i64, i64, i64)>("PRAGMA wal_checkpoint(PASSIVE)").fetch_one(&p).await {
                    // Under constant writes a passive checkpoint never finishes, so the log would
                    // only grow: past 64 MiB, take the writers' turn and restart it from its start (most frames
                    // are already copied, so this is short).
                    Ok((_, log, _)) if log > 16_384 => {
                        let _turn = writer.lock().await;
                        if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(RESTART)").execute(&p).await {
                            eprintln!("sentinel: WAL checkpoint failed: {e}");
                        }
                    }
                    Ok(_) => {}
                    Err(_) if p.is_closed() => break,
                    Err(e) => eprintln!("sentinel: WAL checkpoint failed: {e}"),
                }
            }
        });
    }

    pub(crate) fn is_pg(&self) -> bool {
        matches!(self.pool, Pool::Postgres(_))
    }

    /// On SQLite, waits for this process's turn to write (see `writer`); on PostgreSQL, nothing.
    pub(crate) async fn turn(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        match self.pool {
            Pool::Sqlite(_) => Some(self.writer.lock().await),
            Pool::Postgres(_) => None,
        }
    }

    /// The SQLite database file, when the store is one.
    pub fn sqlite_path(&self) -> Option<&std::path::Path> {
        self.sqlite_path.as_deref()
    }

    pub fn backend(&self) -> Backend {
        match self.pool {
            Pool::Sqlite(_) => Backend::Sqlite,
            Pool::Postgres(_) => Backend::Postgres,
        }
    }

    /// A cheap round trip, for readiness checks.
    pub async fn ping(&self) -> Result<()> {
        match &self.pool {
            Pool::Sqlite(p) => sqlx::query("SELECT 1").execute(p).await.map(|_| ())?,
            Pool::Postgres(p) => sqlx::query("SELECT 1").execute(p).await.map(|_| ())?,
        }
        Ok(())
    }

    /// Every table of the schema with its row count, by name (diagnostics, and the tests' proof
    /// that a refused request wrote nothing).
    pub async fn row_counts(&self) -> Result<Vec<(String, i64)>> {
        let tables = if self.is_pg() {
            "SELECT table_name::text FROM information_schema.tables WHERE table_schema = current_schema() \
             AND table_type = 'BASE TABLE' ORDER BY table_name"
        } else {
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name"
        };
        let names: Vec<String> = per_backend!(self, p => sqlx::query_scalar(tables).fetch_all(p).await?);
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            // The names come from the catalogue, quoted as identifiers.
            let q = format!("SELECT COUNT(*) FROM \"{}\"", name.replace('"', "\"\""));
            let n: i64 = per_backend!(self, p => sqlx::query_scalar(sqlx::AssertSqlSafe(q)).fetch_one(p).await?);
            out.push((name, n));
        }
        Ok(out)
    }

    pub async fn close(&self) {
        match &self.pool {
            Pool::Sqlite(p) => p.close().await,
            Pool::Postgres(p) => p.close().await,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// API keys

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Admin,
    Agent,
    Readonly,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Admin => "admin",
            Scope::Agent => "agent",
            Scope::Readonly => "readonly",
        }
    }

    fn parse(s: &str) -> Result<Self> {
        match s {
            "admin" => Ok(Scope::Admin),
            "agent" => Ok(Scope::Agent),
            "readonly" => Ok(Scope::Readonly),
            other => Err(StoreError::Invalid(format!("unknown key scope `{other}` in the database"))),
        }
    }
}

/// A stored key. The plaintext is never stored: only its keyed hash and a display prefix.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ApiKey {
    pub id: String,
    pub prefix: String,
    pub name: String,
    pub scope: Scope,
    pub agent_id: Option<String>,
    pub active: bool,
    pub created_at: i64,
    pub last_used_at: Option<i64>,
}

/// A key to store; `hash` is the HMAC of the plaintext under the server secret.
#[derive(Debug, Clone)]
pub struct NewApiKey {
    pub prefix: String,
    pub hash: Vec<u8>,
    pub name: String,
    pub scope: Scope,
    pub agent_id: Option<String>,
}

fn key_from_sqlite(r: &SqliteRow) -> Result<ApiKey> {
    Ok(ApiKey {
        id: r.try_get("id")?,
        prefix: r.try_get("prefix")?,
        name: r.try_get("name")?,
        scope: Scope::parse(r.try_get::<&str, _>("scope")?)?,
        agent_id: r.try_get("agent_id")?,
        active: r.try_get::<i64, _>("active")? != 0,
        created_at: r.try_get("created_at")?,
        last_used_at: r.try_get("last_used_at")?,
    })
}

fn key_from_pg(r: &PgRow) -> Result<ApiKey> {
    Ok(ApiKey {
        id: r.try_get("id")?,
        prefix: r.try_get("prefix")?,
        name: r.try_get("name")?,
        scope: Scope::parse(r.try_get::<&str, _>("scope")?)?,
        agent_id: r.try_get("agent_id")?,
        active: r.try_get("active")?,
        created_at: r.try_get("created_at")?,
        last_used_at: r.try_get("last_used_at")?,
    })
}

impl Store {
    pub async fn create_key(&self, k: NewApiKey) -> Result<ApiKey> {
        let _turn = self.turn().await;
        if (k.scope == Scope::Agent) != k.agent_id.is_some() {
            return Err(StoreError::Invalid("`agent_id` is required for agent keys and only for them".into()));
        }
        let id = new_id();
        let now = now_ms();
        let res = match &self.pool {
            Pool::Sqlite(p) => sqlx::query(
                "INSERT INTO api_keys (id, prefix, key_hash, name, scope, agent_id, active, created_at) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, 1, ?7)",
            )
            .bind(&id)
            .bind(&k.prefix)
            .bind(&k.hash)
            .bind(&k.name)
            .bind(k.scope.as_str())
            .bind(&k.agent_id)
            .bind(now)
            .execute(p)
            .await
            .map(|_| ()),
            Pool::Postgres(p) => sqlx::query(
                "INSERT INTO api_keys (id, prefix, key_hash, name, scope, agent_id, active, created_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, TRUE, $7)",
            )
            .bind(&id)
            .bind(&k.prefix)
            .bind(&k.hash)
            .bind(&k.name)
            .bind(k.scope.as_str())
            .bind(&k.agent_id)
            .bind(now)
            .execute(p)
            .await
            .map(|_| ()),
        };
        res.map_err(|e| conflict_or(e, || "a key with this hash already exists".into()))?;
        Ok(ApiKey {
            id,
            prefix: k.prefix,
            name: k.name,
            scope: k.scope,
            agent_id: k.agent_id,
            active: true,
            created_at: now,
            last_used_at: None,
        })
    }

    /// The key with this hash, active or not (the caller decides what an inactive key means).
    pub async fn key_by_hash(&self, hash: &[u8]) -> Result<Option<ApiKey>> {
        match &self.pool {
            Pool::Sqlite(p) => {
                let row = sqlx::query("SELECT id, prefix, name, scope, agent_id, active, created_at, last_used_at FROM api_keys WHERE key_hash = ?1")
                    .bind(hash)
                    .fetch_optional(p)
                    .await?;
                row.as_ref().map(key_from_sqlite).transpose()
            }
            Pool::Postgres(p) => {
                let row = sqlx::query("SELECT id, prefix, name, scope, agent_id, active, created_at, last_used_at FROM api_keys WHERE key_hash = $1")
                    .bind(hash)
                    .fetch_optional(p)
                    .await?;
                row.as_ref().map(key_from_pg).transpose()
            }
        }
    }

    pub async fn list_keys(&self) -> Result<Vec<ApiKey>> {
        match &self.pool {
            Pool::Sqlite(p) => {
                let rows = sqlx::query("SELECT id, prefix, name, scope, agent_id, active, created_at, last_used_at FROM api_keys ORDER BY created_at, id")
                    .fetch_all(p)
                    .await?;
                rows.iter().map(key_from_sqlite).collect()
            }
            Pool::Postgres(p) => {
                let rows = sqlx::query("SELECT id, prefix, name, scope, agent_id, active, created_at, last_used_at FROM api_keys ORDER BY created_at, id")
                    .fetch_all(p)
                    .await?;
                rows.iter().map(key_from_pg).collect()
            }
        }
    }

    /// Activates or deactivates a key. Errors with `NotFound` for an unknown id, and with
    /// `Conflict` for the last active admin key: without it nobody could manage keys again.
    pub async fn set_key_active(&self, id: &str, active: bool) -> Result<()> {
        let statement = if active {
            "UPDATE api_keys SET active = TRUE WHERE id = ?1"
        } else {
            "UPDATE api_keys SET active = FALSE WHERE id = ?1"
        };
        self.guarded_key_change(id, statement, !active).await
    }

    /// Deletes a key; like [`Store::set_key_active`], never the last active admin key.
    pub async fn delete_key(&self, id: &str) -> Result<()> {
        self.guarded_key_change(id, "DELETE FROM api_keys WHERE id = ?1", true).await
    }

    /// Runs `statement` (on the key `?1`), guarded when it takes a key away: it changes nothing
    /// if the key is the last active admin key. Changes to keys are serialized (SQLite's writer
    /// turn; an advisory lock on PostgreSQL), so two admins removing each other cannot both succeed.
    /// (SQLite reads TRUE, FALSE and NOT on its INTEGER `active` column as 1, 0 and `= 0`.)
    async fn guarded_key_change(&self, id: &str, statement: &str, takes_away: bool) -> Result<()> {
        const OTHERS: &str = " AND (scope <> 'admin' OR NOT active OR EXISTS (SELECT 1 FROM api_keys o \
            WHERE o.scope = 'admin' AND o.active AND o.id <> ?1))";
        let q = sql(self.is_pg(), &if takes_away { format!("{statement}{OTHERS}") } else { statement.to_string() });
        let _turn = self.turn().await;
        let n = match &self.pool {
            Pool::Sqlite(p) => sqlx::query(sqlx::AssertSqlSafe(q)).bind(id).execute(p).await?.rows_affected(),
            Pool::Postgres(p) => {
                let mut tx = p.begin().await?;
                sqlx::query("SELECT pg_advisory_xact_lock(7305792154126213441)").execute(&mut *tx).await?;
                let n = sqlx::query(sqlx::AssertSqlSafe(q)).bind(id).execute(&mut *tx).await?.rows_affected();
                tx.commit().await?;
                n
            }
        };
        if n > 0 {
            return Ok(());
        }
        let exists = sql(self.is_pg(), "SELECT 1 FROM api_keys WHERE id = ?1");
        let exists = per_backend!(self, p => sqlx::query(sqlx::AssertSqlSafe(exists)).bind(id).fetch_optional(p).await?.is_some());
        if exists {
            Err(StoreError::Conflict(format!(
                "key `{id}` is the last active admin key; create or activate another admin key first"
            )))
        } else {
            Err(StoreError::NotFound(format!("key `{id}`")))
        }
    }

    /// Records "last used" for many keys in one transaction, so authentication costs no write per request.
    /// A time never moves backwards.
    pub async fn touch_keys(&self, used: &[(String, i64)]) -> Result<()> {
        if used.is_empty() {
            return Ok(());
        }
        let _turn = self.turn().await;
        match &self.pool {
            Pool::Sqlite(p) => {
                let mut tx = p.begin_with("BEGIN IMMEDIATE").await?;
                for (id, at) in used {
                    sqlx::query("UPDATE api_keys SET last_used_at = MAX(COALESCE(last_used_at, 0), ?1) WHERE id = ?2")
                        .bind(at)
                        .bind(id)
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
            }
            Pool::Postgres(p) => {
                let ids: Vec<&str> = used.iter().map(|(id, _)| id.as_str()).collect();
                let ats: Vec<i64> = used.iter().map(|(_, at)| *at).collect();
                sqlx::query(
                    "UPDATE api_keys k SET last_used_at = GREATEST(COALESCE(k.last_used_at, 0), u.at) \
                     FROM UNNEST($1::text[], $2::bigint[]) AS u(id, at) WHERE k.id = u.id",
                )
                .bind(&ids)
                .bind(&ats)
                .execute(p)
                .await?;
            }
        }
        Ok(())
    }

    /// Raw hashes as stored, for tests that prove no plaintext is kept.
    pub async fn all_key_material(&self) -> Result<Vec<(String, Vec<u8>)>> {
        match &self.pool {
            Pool::Sqlite(p) => {
                let rows = sqlx::query("SELECT prefix, key_hash FROM api_keys").fetch_all(p).await?;
                rows.iter().map(|r| Ok((r.try_get("prefix")?, r.try_get("key_hash")?))).collect()
            }
            Pool::Postgres(p) => {
                let rows = sqlx::query("SELECT prefix, key_hash FROM api_keys").fetch_all(p).await?;
                rows.iter().map(|r| Ok((r.try_get("prefix")?, r.try_get("key_hash")?))).collect()
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Policies, versioned

/// A stored policy: its unique name, current version and body (the policy document as JSON).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StoredPolicy {
    pub id: String,
    pub name: String,
    pub version: i64,
    pub body: Value,
    pub created_at: i64,
    pub updated_at: i64,
    pub updated_by: String,
}

/// One entry of a policy's history.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PolicyVersion {
    pub policy_id: String,
    pub version: i64,
    pub name: String,
    pub change: String,
    pub body: Option<Value>,
    pub diff: Vec<Change>,
    pub actor: String,
    pub at: i64,
}

/// One changed field between two versions of a policy body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    /// JSON pointer to the field, e.g. `/budgets/run`.
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new: Option<Value>,
}

/// The fields that differ between two JSON values, by JSON pointer (objects recurse; anything else is compared whole).
pub fn diff(old: &Value, new: &Value) -> Vec<Change> {
    fn walk(path: &str, old: Option<&Value>, new: Option<&Value>, out: &mut Vec<Change>) {
        match (old, new) {
            (Some(Value::Object(a)), Some(Value::Object(b))) => {
                let mut keys: Vec<&String> = a.keys().chain(b.keys().filter(|k| !a.contains_key(*k))).collect();
                keys.sort();
                for k in keys {
                    let p = format!("{path}/{}", k.replace('~', "~0").replace('/', "~1"));
                    walk(&p, a.get(k), b.get(k), out);
                }
            }
            (a, b) if a == b => {}
            (a, b) => out.push(Change {
                path: if path.is_empty() { "/".into() } else { path.into() },
                old: a.cloned(),
                new: b.cloned(),
            }),
        }
    }
    let mut out = Vec::new();
    walk("", Some(old), Some(new), &mut out);
    out
}

fn parse_body(text: &str) -> Result<Value> {
    serde_json::from_str(text).map_err(|e| StoreError::Invalid(format!("a stored policy body is not valid JSON: {e}")))
}

fn to_text(v: &Value) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

fn policy_from_sqlite(r: &SqliteRow) -> Result<StoredPolicy> {
    Ok(StoredPolicy {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        version: r.try_get("version")?,
        body: parse_body(r.try_get("body")?)?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
        updated_by: r.try_get("updated_by")?,
    })
}

fn policy_from_pg(r: &PgRow) -> Result<StoredPolicy> {
    Ok(StoredPolicy {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        version: r.try_get("version")?,
        body: parse_body(r.try_get("body")?)?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
        updated_by: r.try_get("updated_by")?,
    })
}

#[expect(clippy::too_many_arguments, reason = "one column each, shared by both backends")]
fn version_from_row(
    policy_id: String,
    version: i64,
    name: String,
    change: String,
    body: Option<String>,
    diff: String,
    actor: String,
    at: i64,
) -> Result<PolicyVersion> {
    Ok(PolicyVersion {
        policy_id,
        version,
        name,
        change,
        body: body.as_deref().map(parse_body).transpose()?,
        diff: serde_json::from_str(&diff)
            .map_err(|e| StoreError::Invalid(format!("a stored diff is not valid JSON: {e}")))?,
        actor,
        at,
    })
}

impl Store {
    /// Creates a policy (version 1). A duplicate name is a conflict.
    pub async fn create_policy(&self, name: &str, body: &Value, actor: &str) -> Result<StoredPolicy> {
        let _turn = self.turn().await;
        let id = new_id();
        let now = now_ms();
        let d = to_text(&serde_json::to_value(diff(&Value::Null, body)).unwrap_or(Value::Null));
        let text = to_text(body);
        let dup = || format!("a policy named `{name}` already exists");
        match &self.pool {
            Pool::Sqlite(p) => {
                let mut tx = p.begin_with("BEGIN IMMEDIATE").await?;
                sqlx::query("INSERT INTO policies (id, name, version, body, created_at, updated_at, updated_by) VALUES (?1, ?2, 1, ?3, ?4, ?4, ?5)")
                    .bind(&id).bind(name).bind(&text).bind(now).bind(actor)
                    .execute(&mut *tx).await.map_err(|e| conflict_or(e, dup))?;
                sqlx::query("INSERT INTO policy_versions (policy_id, version, name, change, body, diff, actor, at) VALUES (?1, 1, ?2, 'create', ?3, ?4, ?5, ?6)")
                    .bind(&id).bind(name).bind(&text).bind(&d).bind(actor).bind(now)
                    .execute(&mut *tx).await?;
                tx.commit().await?;
            }
            Pool::Postgres(p) => {
                let mut tx = p.begin().await?;
                sqlx::query("INSERT INTO policies (id, name, version, body, created_at, updated_at, updated_by) VALUES ($1, $2, 1, $3, $4, $4, $5)")
                    .bind(&id).bind(name).bind(&text).bind(now).bind(actor)
                    .execute(&mut *tx).await.map_err(|e| conflict_or(e, dup))?;
                sqlx::query("INSERT INTO policy_versions (policy_id, version, name, change, body, diff, actor, at) VALUES ($1, 1, $2, 'create', $3, $4, $5, $6)")
                    .bind(&id).bind(name).bind(&text).bind(&d).bind(actor).bind(now)
                    .execute(&mut *tx).await?;
                tx.commit().await?;
            }
        }
        Ok(StoredPolicy {
            id,
            name: name.into(),
            version: 1,
            body: body.clone(),
            created_at: now,
            updated_at: now,
            updated_by: actor.into(),
        })
    }

    pub async fn get_policy(&self, id: &str) -> Result<StoredPolicy> {
        let found = match &self.pool {
            Pool::Sqlite(p) => {
                let sql =
                    "SELECT id, name, version, body, created_at, updated_at, updated_by FROM policies WHERE id = ?1";
                sqlx::query(sql).bind(id).fetch_optional(p).await?.as_ref().map(policy_from_sqlite).transpose()?
            }
            Pool::Postgres(p) => {
                let sql =
                    "SELECT id, name, version, body, created_at, updated_at, updated_by FROM policies WHERE id = $1";
                sqlx::query(sql).bind(id).fetch_optional(p).await?.as_ref().map(policy_from_pg).transpose()?
            }
        };
        found.ok_or_else(|| StoreError::NotFound(format!("policy `{id}`")))
    }

    pub async fn list_policies(&self) -> Result<Vec<StoredPolicy>> {
        match &self.pool {
            Pool::Sqlite(p) => {
                let rows = sqlx::query(
                    "SELECT id, name, version, body, created_at, updated_at, updated_by FROM policies ORDER BY name",
                )
                .fetch_all(p)
                .await?;
                rows.iter().map(policy_from_sqlite).collect()
            }
            Pool::Postgres(p) => {
                let rows = sqlx::query(
                    "SELECT id, name, version, body, created_at, updated_at, updated_by FROM policies ORDER BY name",
                )
                .fetch_all(p)
                .await?;
                rows.iter().map(policy_from_pg).collect()
            }
        }
    }

    /// Replaces a policy's name and body as a new version. With `expected_version`, a concurrent
    /// change in between is a conflict (optimistic locking) instead of a lost update.
    pub async fn update_policy(
        &self,
        id: &str,
        name: &str,
        body: &Value,
        actor: &str,
        expected_version: Option<i64>,
    ) -> Result<StoredPolicy> {
        let now = now_ms();
        let text = to_text(body);
        let dup = || format!("a policy named `{name}` already exists");
        let _turn = self.turn().await;
        let current = self.get_policy(id).await?;
        if let Some(v) = expected_version
            && v != current.version
        {
            return Err(StoreError::Conflict(format!(
                "policy `{}` is at version {}, not {v}; reload it and apply your change again",
                current.name, current.version
            )));
        }
        let mut d = diff(&current.body, body);
        if current.name != name {
            d.insert(
                0,
                Change {
                    path: "/name".into(),
                    old: Some(Value::String(current.name.clone())),
                    new: Some(Value::String(name.into())),
                },
            );
        }
        let d = to_text(&serde_json::to_value(&d).unwrap_or(Value::Null));
        let next = current.version + 1;
        let stale =
            || StoreError::Conflict(format!("policy `{}` changed while it was being updated; try again", current.name));
        match &self.pool {
            Pool::Sqlite(p) => {
                let mut tx = p.begin_with("BEGIN IMMEDIATE").await?;
                let n = sqlx::query("UPDATE policies SET name = ?1, body = ?2, version = ?3, updated_at = ?4, updated_by = ?5 WHERE id = ?6 AND version = ?7")
                    .bind(name).bind(&text).bind(next).bind(now).bind(actor).bind(id).bind(current.version)
                    .execute(&mut *tx).await.map_err(|e| conflict_or(e, dup))?.rows_affected();
                if n == 0 {
                    return Err(stale());
                }
                sqlx::query("INSERT INTO policy_versions (policy_id, version, name, change, body, diff, actor, at) VALUES (?1, ?2, ?3, 'update', ?4, ?5, ?6, ?7)")
                    .bind(id).bind(next).bind(name).bind(&text).bind(&d).bind(actor).bind(now)
                    .execute(&mut *tx).await?;
                tx.commit().await?;
            }
            Pool::Postgres(p) => {
                let mut tx = p.begin().await?;
                let n = sqlx::query("UPDATE policies SET name = $1, body = $2, version = $3, updated_at = $4, updated_by = $5 WHERE id = $6 AND version = $7")
                    .bind(name).bind(&text).bind(next).bind(now).bind(actor).bind(id).bind(current.version)
                    .execute(&mut *tx).await.map_err(|e| conflict_or(e, dup))?.rows_affected();
                if n == 0 {
                    return Err(stale());
                }
                sqlx::query("INSERT INTO policy_versions (policy_id, version, name, change, body, diff, actor, at) VALUES ($1, $2, $3, 'update', $4, $5, $6, $7)")
                    .bind(id).bind(next).bind(name).bind(&text).bind(&d).bind(actor).bind(now)
                    .execute(&mut *tx).await?;
                tx.commit().await?;
            }
        }
        Ok(StoredPolicy {
            id: id.into(),
            name: name.into(),
            version: next,
            body: body.clone(),
            created_at: current.created_at,
            updated_at: now,
            updated_by: actor.into(),
        })
    }

    /// Deletes a policy; its history is kept, ending with a `delete` entry.
    pub async fn delete_policy(&self, id: &str, actor: &str) -> Result<()> {
        let _turn = self.turn().await;
        let current = self.get_policy(id).await?;
        let now = now_ms();
        let next = current.version + 1;
        let d = to_text(&serde_json::to_value(diff(&current.body, &Value::Null)).unwrap_or(Value::Null));
        match &self.pool {
            Pool::Sqlite(p) => {
                let mut tx = p.begin_with("BEGIN IMMEDIATE").await?;
                let n = sqlx::query("DELETE FROM policies WHERE id = ?1 AND version = ?2")
                    .bind(id)
                    .bind(current.version)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                if n == 0 {
                    return Err(StoreError::Conflict(format!(
                        "policy `{}` changed while it was being deleted; try again",
                        current.name
                    )));
                }
                sqlx::query("INSERT INTO policy_versions (policy_id, version, name, change, body, diff, actor, at) VALUES (?1, ?2, ?3, 'delete', NULL, ?4, ?5, ?6)")
                    .bind(id).bind(next).bind(&current.name).bind(&d).bind(actor).bind(now)
                    .execute(&mut *tx).await?;
                tx.commit().await?;
            }
            Pool::Postgres(p) => {
                let mut tx = p.begin().await?;
                let n = sqlx::query("DELETE FROM policies WHERE id = $1 AND version = $2")
                    .bind(id)
                    .bind(current.version)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                if n == 0 {
                    return Err(StoreError::Conflict(format!(
                        "policy `{}` changed while it was being deleted; try again",
                        current.name
                    )));
                }
                sqlx::query("INSERT INTO policy_versions (policy_id, version, name, change, body, diff, actor, at) VALUES ($1, $2, $3, 'delete', NULL, $4, $5, $6)")
                    .bind(id).bind(next).bind(&current.name).bind(&d).bind(actor).bind(now)
                    .execute(&mut *tx).await?;
                tx.commit().await?;
            }
        }
        Ok(())
    }

    /// Every version of a policy, oldest first (also after it was deleted).
    pub async fn policy_history(&self, id: &str) -> Result<Vec<PolicyVersion>> {
        let rows: Vec<PolicyVersion> = match &self.pool {
            Pool::Sqlite(p) => {
                let rows = sqlx::query("SELECT policy_id, version, name, change, body, diff, actor, at FROM policy_versions WHERE policy_id = ?1 ORDER BY version")
                    .bind(id).fetch_all(p).await?;
                rows.iter()
                    .map(|r| {
                        version_from_row(
                            r.try_get("policy_id")?,
                            r.try_get("version")?,
                            r.try_get("name")?,
                            r.try_get("change")?,
                            r.try_get("body")?,
                            r.try_get("diff")?,
                            r.try_get("actor")?,
                            r.try_get("at")?,
                        )
                    })
                    .collect::<Result<_>>()?
            }
            Pool::Postgres(p) => {
                let rows = sqlx::query("SELECT policy_id, version, name, change, body, diff, actor, at FROM policy_versions WHERE policy_id = $1 ORDER BY version")
                    .bind(id).fetch_all(p).await?;
                rows.iter()
                    .map(|r| {
                        version_from_row(
                            r.try_get("policy_id")?,
                            r.try_get("version")?,
                            r.try_get("name")?,
                            r.try_get("change")?,
                            r.try_get("body")?,
                            r.try_get("diff")?,
                            r.try_get("actor")?,
                            r.try_get("at")?,
                        )
                    })
                    .collect::<Result<_>>()?
            }
        };
        if rows.is_empty() {
            return Err(StoreError::NotFound(format!("policy `{id}`")));
        }
        Ok(rows)
    }
}

impl Store {
    /// Changes whenever any policy is created, updated or deleted (here or on another server).
    pub async fn policy_mark(&self) -> Result<(i64, i64)> {
        let sql = "SELECT COUNT(*) AS n, COALESCE(MAX(at), 0) AS at FROM policy_versions";
        let (n, at): (i64, i64) = per_backend!(self, p => sqlx::query_as(sql).fetch_one(p).await?);
        Ok((n, at))
    }
}

impl Store {
    /// Records `value` under `key` on first use and returns what the database holds, so replicas
    /// can check that they agree (for example, on the key-hashing secret).
    pub async fn agree_meta(&self, key: &str, value: &str) -> Result<String> {
        let _turn = self.turn().await;
        let insert =
            sql(self.is_pg(), "INSERT INTO server_meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO NOTHING");
        let select = sql(self.is_pg(), "SELECT value FROM server_meta WHERE key = ?1");
        Ok(per_backend!(self, p => {
            sqlx::query(sqlx::AssertSqlSafe(insert)).bind(key).bind(value).execute(p).await?;
            sqlx::query_scalar(sqlx::AssertSqlSafe(select)).bind(key).fetch_one(p).await?
        }))
    }
}
