//! Notification channels, the delivery outbox, single-use approval links and once-only alert marks.
//!
//! The outbox is the source of truth for delivery: a message is a row before anything is sent, a
//! dispatcher claims due rows for a lease (so two replicas never send the same row at once, and a
//! crashed sender's rows come back when the lease ends), and only an answer from the target moves
//! a row to `delivered`. The row id is the idempotency key every delivery carries.

use serde::Serialize;
use serde_json::Value;
use sqlx::Row;

use crate::{ApprovalRow, Result, Store, StoreError, sql};

/// A configured channel.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChannelRow {
    pub id: String,
    pub name: String,
    /// `email`, `slack` or `webhook`.
    pub kind: String,
    /// `{"to": [...]}`, `{"url": ...}` or `{"url": ..., "secret": ...}`.
    pub config: Value,
    /// Event types sent to this channel; empty means every event.
    pub events: Vec<String>,
    pub enabled: bool,
    pub created_at: i64,
    pub updated_at: i64,
}

/// A channel to create or replace.
#[derive(Debug, Clone)]
pub struct NewChannel {
    pub name: String,
    pub kind: String,
    pub config: Value,
    pub events: Vec<String>,
    pub enabled: bool,
}

/// A message to deliver.
#[derive(Debug, Clone)]
pub struct NewMessage {
    /// The idempotency key: derived from what the message is about, so recording the same event
    /// twice queues it once.
    pub id: String,
    pub event: String,
    pub kind: String,
    pub channel_id: Option<String>,
    /// An email address list (comma-separated) or a URL.
    pub target: String,
    pub payload: Value,
}

/// A message and where its delivery stands.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MessageRow {
    pub id: String,
    pub event: String,
    pub kind: String,
    pub channel_id: Option<String>,
    pub target: String,
    pub payload: Value,
    /// `pending`, `delivered` or `failed` (no more retries).
    pub status: String,
    pub attempts: i64,
    pub next_attempt_at: i64,
    pub last_error: Option<String>,
    pub created_at: i64,
    pub delivered_at: Option<i64>,
}

/// What became of one delivery attempt.
#[derive(Debug, Clone)]
pub enum Attempt {
    Delivered,
    /// Try again at this time (ms).
    Retry {
        error: String,
        at: i64,
    },
    /// Give up.
    Failed {
        error: String,
    },
}

/// A single-use link to an approval page.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LinkRow {
    pub id: String,
    pub approval_id: String,
    pub issued_to: String,
    pub created_at: i64,
    pub expires_at: i64,
    pub used_at: Option<i64>,
}

const CHANNEL_COLUMNS: &str = "id, name, kind, config, events, enabled, created_at, updated_at";
const MESSAGE_COLUMNS: &str = "id, event, kind, channel_id, target, payload, status, attempts, next_attempt_at, last_error, created_at, delivered_at";

fn json_of(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or(Value::Null)
}

fn channel_from<R: Row>(r: &R) -> Result<ChannelRow>
where
    for<'c> &'c str: sqlx::ColumnIndex<R>,
    for<'q> String: sqlx::Decode<'q, R::Database> + sqlx::Type<R::Database>,
    for<'q> i64: sqlx::Decode<'q, R::Database> + sqlx::Type<R::Database>,
{
    let config: String = r.try_get("config")?;
    let events: String = r.try_get("events")?;
    Ok(ChannelRow {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        kind: r.try_get("kind")?,
        config: json_of(&config),
        events: serde_json::from_str(&events).unwrap_or_default(),
        enabled: r.try_get::<i64, _>("enabled")? != 0,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
    })
}

fn message_from<R: Row>(r: &R) -> Result<MessageRow>
where
    for<'c> &'c str: sqlx::ColumnIndex<R>,
    for<'q> String: sqlx::Decode<'q, R::Database> + sqlx::Type<R::Database>,
    for<'q> i64: sqlx::Decode<'q, R::Database> + sqlx::Type<R::Database>,
    for<'q> Option<i64>: sqlx::Decode<'q, R::Database>,
    for<'q> Option<String>: sqlx::Decode<'q, R::Database>,
{
    let payload: String = r.try_get("payload")?;
    Ok(MessageRow {
        id: r.try_get("id")?,
        event: r.try_get("event")?,
        kind: r.try_get("kind")?,
        channel_id: r.try_get("channel_id")?,
        target: r.try_get("target")?,
        payload: json_of(&payload),
        status: r.try_get("status")?,
        attempts: r.try_get("attempts")?,
        next_attempt_at: r.try_get("next_attempt_at")?,
        last_error: r.try_get("last_error")?,
        created_at: r.try_get("created_at")?,
        delivered_at: r.try_get("delivered_at")?,
    })
}

fn link_from<R: Row>(r: &R) -> Result<LinkRow>
where
    for<'c> &'c str: sqlx::ColumnIndex<R>,
    for<'q> String: sqlx::Decode<'q, R::Database> + sqlx::Type<R::Database>,
    for<'q> i64: sqlx::Decode<'q, R::Database> + sqlx::Type<R::Database>,
    for<'q> Option<i64>: sqlx::Decode<'q, R::Database>,
{
    Ok(LinkRow {
        id: r.try_get("id")?,
        approval_id: r.try_get("approval_id")?,
        issued_to: r.try_get("issued_to")?,
        created_at: r.try_get("created_at")?,
        expires_at: r.try_get("expires_at")?,
        used_at: r.try_get("used_at")?,
    })
}

fn text(v: &impl Serialize) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

impl Store {
    // -----------------------------------------------------------------------------------------
    // Channels

    pub async fn create_channel(&self, c: &NewChannel) -> Result<ChannelRow> {
        let id = crate::new_id();
        let now = crate::now_ms();
        let q = sql(
            self.is_pg(),
            &format!("INSERT INTO channels ({CHANNEL_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7)"),
        );
        {
            let _turn = self.turn().await;
            let r = per_backend!(self, p => {
                sqlx::query(sqlx::AssertSqlSafe(q.clone()))
                    .bind(&id).bind(&c.name).bind(&c.kind).bind(text(&c.config)).bind(text(&c.events))
                    .bind(i64::from(c.enabled)).bind(now)
                    .execute(p).await.map(|_| ())
            });
            r.map_err(|e| crate::conflict_or(e, || format!("a channel named `{}` already exists", c.name)))?;
        }
        self.get_channel(&id).await
    }

    pub async fn get_channel(&self, id: &str) -> Result<ChannelRow> {
        let q = sql(self.is_pg(), &format!("SELECT {CHANNEL_COLUMNS} FROM channels WHERE id = ?1"));
        let row = per_backend!(self, p => {
            sqlx::query(sqlx::AssertSqlSafe(q.clone())).bind(id).fetch_optional(p).await?.as_ref().map(channel_from).transpose()?
        });
        row.ok_or_else(|| StoreError::NotFound(format!("channel `{id}`")))
    }

    pub async fn list_channels(&self) -> Result<Vec<ChannelRow>> {
        let q = format!("SELECT {CHANNEL_COLUMNS} FROM channels ORDER BY name");
        per_backend!(self, p => {
            sqlx::query(sqlx::AssertSqlSafe(q.clone())).fetch_all(p).await?.iter().map(channel_from).collect()
        })
    }

    pub async fn update_channel(&self, id: &str, c: &NewChannel) -> Result<ChannelRow> {
        let now = crate::now_ms();
        let q = sql(
            self.is_pg(),
            "UPDATE channels SET name = ?1, kind = ?2, config = ?3, events = ?4, enabled = ?5, updated_at = ?6 WHERE id = ?7",
        );
        let n = {
            let _turn = self.turn().await;
            let r = per_backend!(self, p => {
                sqlx::query(sqlx::AssertSqlSafe(q.clone()))
                    .bind(&c.name).bind(&c.kind).bind(text(&c.config)).bind(text(&c.events))
                    .bind(i64::from(c.enabled)).bind(now).bind(id)
                    .execute(p).await.map(|r| r.rows_affected())
            });
            r.map_err(|e| crate::conflict_or(e, || format!("a channel named `{}` already exists", c.name)))?
        };
        if n == 0 {
            return Err(StoreError::NotFound(format!("channel `{id}`")));
        }
        self.get_channel(id).await
    }

    pub async fn delete_channel(&self, id: &str) -> Result<()> {
        let q = sql(self.is_pg(), "DELETE FROM channels WHERE id = ?1");
        let _turn = self.turn().await;
        let n = per_backend!(self, p => sqlx::query(sqlx::AssertSqlSafe(q.clone())).bind(id).execute(p).await?.rows_affected());
        if n == 0 {
            return Err(StoreError::NotFound(format!("channel `{id}`")));
        }
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // Outbox

    /// Queues messages; a message whose id is already queued (the same event for the same
    /// target) is not queued again. Returns how many were new.
    pub async fn enqueue(&self, msgs: &[NewMessage]) -> Result<u64> {
        let now = crate::now_ms();
        let pg = self.is_pg();
        let mut added = 0;
        for chunk in msgs.chunks(400) {
            let mut q = String::from(
                "INSERT INTO outbox (id, event, kind, channel_id, target, payload, status, attempts, next_attempt_at, created_at) VALUES ",
            );
            for i in 0..chunk.len() {
                let b = i * 7;
                if i > 0 {
                    q.push_str(", ");
                }
                q.push_str(&format!(
                    "(?{}, ?{}, ?{}, ?{}, ?{}, ?{}, 'pending', 0, ?{}, ?{})",
                    b + 1,
                    b + 2,
                    b + 3,
                    b + 4,
                    b + 5,
                    b + 6,
                    b + 7,
                    b + 7
                ));
            }
            q.push_str(" ON CONFLICT (id) DO NOTHING");
            let q = sql(pg, &q);
            let _turn = self.turn().await;
            added += per_backend!(self, p => {
                let mut query = sqlx::query(sqlx::AssertSqlSafe(q.clone()));
                for m in chunk {
                    query = query.bind(&m.id).bind(&m.event).bind(&m.kind).bind(&m.channel_id).bind(&m.target)
                        .bind(text(&m.payload)).bind(now);
                }
                query.execute(p).await?.rows_affected()
            });
        }
        Ok(added)
    }

    /// Claims up to `limit` due messages for `lease_ms`: nobody else sends them until the lease
    /// ends or this sender records the attempt.
    pub async fn claim_due(&self, now: i64, limit: i64, lease_ms: i64) -> Result<Vec<MessageRow>> {
        let lock = if self.is_pg() { " FOR UPDATE SKIP LOCKED" } else { "" };
        let q = sql(
            self.is_pg(),
            &format!(
                "UPDATE outbox SET claimed_until = ?1 WHERE id IN (SELECT id FROM outbox \
                 WHERE status = 'pending' AND next_attempt_at <= ?2 AND claimed_until <= ?2 \
                 ORDER BY next_attempt_at LIMIT {}{lock}) RETURNING {MESSAGE_COLUMNS}",
                limit.clamp(1, 5000)
            ),
        );
        let _turn = self.turn().await;
        per_backend!(self, p => {
            sqlx::query(sqlx::AssertSqlSafe(q.clone()))
                .bind(now.saturating_add(lease_ms)).bind(now)
                .fetch_all(p).await?.iter().map(message_from).collect()
        })
    }

    /// Ends every lease (a single server restarting on its own database: nobody else holds them).
    pub async fn release_leases(&self) -> Result<()> {
        let _turn = self.turn().await;
        per_backend!(self, p => {
            sqlx::query("UPDATE outbox SET claimed_until = 0 WHERE status = 'pending' AND claimed_until > 0").execute(p).await?;
        });
        Ok(())
    }

    /// Claims one message (for a "send test" that reports its result); `None` if it is not due or
    /// another sender has it.
    pub async fn claim_one(&self, id: &str, now: i64, lease_ms: i64) -> Result<Option<MessageRow>> {
        let q = sql(
            self.is_pg(),
            &format!(
                "UPDATE outbox SET claimed_until = ?1 WHERE id = ?2 AND status = 'pending' AND claimed_until <= ?3 \
                 RETURNING {MESSAGE_COLUMNS}"
            ),
        );
        let _turn = self.turn().await;
        per_backend!(self, p => {
            sqlx::query(sqlx::AssertSqlSafe(q.clone()))
                .bind(now.saturating_add(lease_ms)).bind(id).bind(now)
                .fetch_optional(p).await?.as_ref().map(message_from).transpose()
        })
    }

    /// Records the attempts made on claimed messages, in one transaction.
    pub async fn record_attempts(&self, done: &[(String, Attempt)]) -> Result<()> {
        if done.is_empty() {
            return Ok(());
        }
        let now = crate::now_ms();
        let pg = self.is_pg();
        let delivered: Vec<&str> =
            done.iter().filter(|(_, a)| matches!(a, Attempt::Delivered)).map(|(id, _)| id.as_str()).collect();
        let mut ok_sql = String::from(
            "UPDATE outbox SET status = 'delivered', delivered_at = ?1, attempts = attempts + 1, last_error = NULL, \
             claimed_until = 0 WHERE id IN (",
        );
        for i in 0..delivered.len() {
            if i > 0 {
                ok_sql.push_str(", ");
            }
            ok_sql.push_str(&format!("?{}", i + 2));
        }
        ok_sql.push(')');
        let ok_sql = sql(pg, &ok_sql);
        let retry_sql = sql(
            pg,
            "UPDATE outbox SET status = ?1, attempts = attempts + 1, last_error = ?2, next_attempt_at = ?3, \
             claimed_until = 0 WHERE id = ?4",
        );
        macro_rules! run {
            ($tx:ident) => {{
                if !delivered.is_empty() {
                    let mut q = sqlx::query(sqlx::AssertSqlSafe(ok_sql.clone())).bind(now);
                    for id in &delivered {
                        q = q.bind(*id);
                    }
                    q.execute(&mut *$tx).await?;
                }
                for (id, a) in done {
                    let (status, error, at) = match a {
                        Attempt::Delivered => continue,
                        Attempt::Retry { error, at } => ("pending", error, *at),
                        Attempt::Failed { error } => ("failed", error, now),
                    };
                    sqlx::query(sqlx::AssertSqlSafe(retry_sql.clone()))
                        .bind(status)
                        .bind(error)
                        .bind(at)
                        .bind(id)
                        .execute(&mut *$tx)
                        .await?;
                }
                $tx.commit().await?;
            }};
        }
        match &self.pool {
            crate::Pool::Sqlite(p) => {
                let _turn = self.writer.lock().await;
                let mut tx = p.begin_with("BEGIN IMMEDIATE").await?;
                run!(tx);
            }
            crate::Pool::Postgres(p) => {
                let mut tx = p.begin().await?;
                run!(tx);
            }
        }
        Ok(())
    }

    /// Messages, newest first, filtered by status and channel; `before` is the id of the last one
    /// of the previous page.
    pub async fn list_messages(
        &self,
        status: Option<&str>,
        channel_id: Option<&str>,
        event: Option<&str>,
        before: Option<&str>,
        limit: i64,
    ) -> Result<Vec<MessageRow>> {
        let q = sql(
            self.is_pg(),
            &format!(
                "SELECT {MESSAGE_COLUMNS} FROM outbox WHERE (?1 = '' OR status = ?1) AND (?2 = '' OR channel_id = ?2) \
                 AND (?3 = '' OR event = ?3) \
                 AND (?4 = '' OR (created_at, id) < (SELECT created_at, id FROM outbox WHERE id = ?4)) \
                 ORDER BY created_at DESC, id DESC LIMIT {}",
                limit.clamp(1, 1000)
            ),
        );
        per_backend!(self, p => {
            sqlx::query(sqlx::AssertSqlSafe(q.clone()))
                .bind(status.unwrap_or("")).bind(channel_id.unwrap_or("")).bind(event.unwrap_or("")).bind(before.unwrap_or(""))
                .fetch_all(p).await?.iter().map(message_from).collect()
        })
    }

    pub async fn get_message(&self, id: &str) -> Result<MessageRow> {
        let q = sql(self.is_pg(), &format!("SELECT {MESSAGE_COLUMNS} FROM outbox WHERE id = ?1"));
        let row = per_backend!(self, p => {
            sqlx::query(sqlx::AssertSqlSafe(q.clone())).bind(id).fetch_optional(p).await?.as_ref().map(message_from).transpose()?
        });
        row.ok_or_else(|| StoreError::NotFound(format!("notification `{id}`")))
    }

    /// Counts of messages by status.
    pub async fn message_counts(&self) -> Result<Vec<(String, i64)>> {
        let q = "SELECT status, COUNT(*) AS n FROM outbox GROUP BY status ORDER BY status";
        per_backend!(self, p => {
            let rows = sqlx::query(q).fetch_all(p).await?;
            rows.iter().map(|r| Ok((r.try_get("status")?, r.try_get("n")?))).collect()
        })
    }

    /// Puts a failed (or pending) message back in the queue, due now.
    pub async fn retry_message(&self, id: &str) -> Result<MessageRow> {
        let q = sql(
            self.is_pg(),
            "UPDATE outbox SET status = 'pending', next_attempt_at = ?1, claimed_until = 0 WHERE id = ?2 AND status <> 'delivered'",
        );
        let n = {
            let _turn = self.turn().await;
            per_backend!(self, p => sqlx::query(sqlx::AssertSqlSafe(q.clone())).bind(crate::now_ms()).bind(id).execute(p).await?.rows_affected())
        };
        let row = self.get_message(id).await?;
        if n == 0 {
            return Err(StoreError::Conflict(format!("notification `{id}` was already delivered")));
        }
        Ok(row)
    }

    // -----------------------------------------------------------------------------------------
    // Approval links

    pub async fn create_link(&self, l: &LinkRow) -> Result<()> {
        let q = sql(
            self.is_pg(),
            "INSERT INTO approval_links (id, approval_id, issued_to, created_at, expires_at, used_at) VALUES (?1, ?2, ?3, ?4, ?5, NULL)",
        );
        let _turn = self.turn().await;
        per_backend!(self, p => {
            sqlx::query(sqlx::AssertSqlSafe(q.clone()))
                .bind(&l.id).bind(&l.approval_id).bind(&l.issued_to).bind(l.created_at).bind(l.expires_at)
                .execute(p).await?;
        });
        Ok(())
    }

    pub async fn get_link(&self, id: &str) -> Result<LinkRow> {
        let q = sql(
            self.is_pg(),
            "SELECT id, approval_id, issued_to, created_at, expires_at, used_at FROM approval_links WHERE id = ?1",
        );
        let row = per_backend!(self, p => {
            sqlx::query(sqlx::AssertSqlSafe(q.clone())).bind(id).fetch_optional(p).await?.as_ref().map(link_from).transpose()?
        });
        row.ok_or_else(|| StoreError::NotFound(format!("approval link `{id}`")))
    }

    /// Uses a link once: false if it was already used or has expired.
    pub async fn use_link(&self, id: &str, now: i64) -> Result<bool> {
        let q = sql(
            self.is_pg(),
            "UPDATE approval_links SET used_at = ?1 WHERE id = ?2 AND used_at IS NULL AND expires_at > ?1",
        );
        let _turn = self.turn().await;
        let n = per_backend!(self, p => sqlx::query(sqlx::AssertSqlSafe(q.clone())).bind(now).bind(id).execute(p).await?.rows_affected());
        Ok(n == 1)
    }

    // -----------------------------------------------------------------------------------------
    // Once-only alerts and escalation

    /// Records that the alert `key` was raised; true only the first time, on any replica.
    pub async fn mark_once(&self, key: &str) -> Result<bool> {
        let q = sql(self.is_pg(), "INSERT INTO alert_marks (key, at) VALUES (?1, ?2) ON CONFLICT (key) DO NOTHING");
        let _turn = self.turn().await;
        let n = per_backend!(self, p => sqlx::query(sqlx::AssertSqlSafe(q.clone())).bind(key).bind(crate::now_ms()).execute(p).await?.rows_affected());
        Ok(n == 1)
    }

    /// Pending requests past their escalation time that were not escalated yet; each is returned
    /// once, on one replica.
    pub async fn escalate_due(&self, now: i64) -> Result<Vec<ApprovalRow>> {
        let q = sql(
            self.is_pg(),
            "UPDATE approvals SET escalated_at = ?1 WHERE status = 'pending' AND escalated_at IS NULL \
             AND escalate_at IS NOT NULL AND escalate_at <= ?1 AND expires_at > ?1 RETURNING id",
        );
        let ids: Vec<String> = {
            let _turn = self.turn().await;
            per_backend!(self, p => sqlx::query_scalar(sqlx::AssertSqlSafe(q.clone())).bind(now).fetch_all(p).await?)
        };
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            out.push(self.get_approval(&id).await?);
        }
        Ok(out)
    }
}
