//! Approval requests: created by `/decide` when a call needs a human, decided once, consumed once.

use serde::Serialize;
use serde_json::Value;
use sqlx::Row;

use crate::{Result, Store, StoreError, sql};

/// One approval request and, once decided, who decided it, when and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ApprovalRow {
    pub id: String,
    /// `pending`, `approved`, `rejected` or `expired`.
    pub status: String,
    pub agent_id: String,
    pub run_id: String,
    pub session_id: String,
    pub action: String,
    #[serde(skip)]
    pub args_digest: i64,
    pub policy_version: String,
    pub cost_usd: f64,
    pub intervention_id: Option<String>,
    /// What the approver sees: redacted arguments, rule and message, spend against each budget,
    /// approvers, and any context the application supplied.
    pub request: Value,
    pub created_at: i64,
    pub expires_at: i64,
    pub decided_at: Option<i64>,
    pub decided_by: Option<String>,
    pub reason: Option<String>,
    pub consumed_at: Option<i64>,
    /// When the next approver group is asked (none without an escalation), and when it was.
    pub escalate_at: Option<i64>,
    pub escalated_at: Option<i64>,
}

const COLUMNS: &str = "id, status, agent_id, run_id, session_id, action, args_digest, policy_version, cost_micros, \
     intervention_id, request, created_at, expires_at, decided_at, decided_by, reason, consumed_at, escalate_at, escalated_at";

fn from_row<R: Row>(r: &R) -> Result<ApprovalRow>
where
    for<'c> &'c str: sqlx::ColumnIndex<R>,
    for<'q> String: sqlx::Decode<'q, R::Database> + sqlx::Type<R::Database>,
    for<'q> i64: sqlx::Decode<'q, R::Database> + sqlx::Type<R::Database>,
    for<'q> Option<i64>: sqlx::Decode<'q, R::Database>,
    for<'q> Option<String>: sqlx::Decode<'q, R::Database>,
{
    let request: String = r.try_get("request")?;
    Ok(ApprovalRow {
        id: r.try_get("id")?,
        status: r.try_get("status")?,
        agent_id: r.try_get("agent_id")?,
        run_id: r.try_get("run_id")?,
        session_id: r.try_get("session_id")?,
        action: r.try_get("action")?,
        args_digest: r.try_get("args_digest")?,
        policy_version: r.try_get("policy_version")?,
        cost_usd: r.try_get::<i64, _>("cost_micros")? as f64 / 1e6,
        intervention_id: r.try_get("intervention_id")?,
        request: serde_json::from_str(&request).unwrap_or(Value::Null),
        created_at: r.try_get("created_at")?,
        expires_at: r.try_get("expires_at")?,
        decided_at: r.try_get("decided_at")?,
        decided_by: r.try_get("decided_by")?,
        reason: r.try_get("reason")?,
        consumed_at: r.try_get("consumed_at")?,
        escalate_at: r.try_get("escalate_at")?,
        escalated_at: r.try_get("escalated_at")?,
    })
}

/// A new request.
#[derive(Debug, Clone)]
pub struct NewApproval {
    pub id: String,
    pub agent_id: String,
    pub run_id: String,
    pub session_id: String,
    pub action: String,
    pub args_digest: i64,
    pub policy_version: String,
    pub cost_micros: i64,
    pub intervention_id: Option<String>,
    pub request: Value,
    pub expires_at: i64,
    pub escalate_at: Option<i64>,
}

impl Store {
    pub async fn create_approval(&self, a: &NewApproval) -> Result<ApprovalRow> {
        let _turn = self.turn().await;
        let now = crate::now_ms();
        let q = sql(
            self.is_pg(),
            &format!(
                "INSERT INTO approvals ({COLUMNS}) VALUES (?1, 'pending', ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, NULL, NULL, NULL, NULL, ?13, NULL)"
            ),
        );
        let request = serde_json::to_string(&a.request).unwrap_or_else(|_| "null".into());
        per_backend!(self, p => {
            sqlx::query(sqlx::AssertSqlSafe(q.clone()))
                .bind(&a.id).bind(&a.agent_id).bind(&a.run_id).bind(&a.session_id).bind(&a.action)
                .bind(a.args_digest).bind(&a.policy_version).bind(a.cost_micros).bind(&a.intervention_id)
                .bind(&request).bind(now).bind(a.expires_at).bind(a.escalate_at)
                .execute(p).await?;
        });
        drop(_turn);
        self.get_approval(&a.id).await
    }

    pub async fn get_approval(&self, id: &str) -> Result<ApprovalRow> {
        let q = sql(self.is_pg(), &format!("SELECT {COLUMNS} FROM approvals WHERE id = ?1"));
        let row = per_backend!(self, p => {
            sqlx::query(sqlx::AssertSqlSafe(q.clone())).bind(id).fetch_optional(p).await?.as_ref().map(from_row).transpose()?
        });
        row.ok_or_else(|| StoreError::NotFound(format!("approval request `{id}`")))
    }

    /// Requests, newest first; `status` filters, `agent` restricts to one agent's.
    pub async fn list_approvals(
        &self,
        status: Option<&str>,
        agent: Option<&str>,
        limit: i64,
    ) -> Result<Vec<ApprovalRow>> {
        let q = sql(
            self.is_pg(),
            &format!(
                "SELECT {COLUMNS} FROM approvals WHERE (?1 = '' OR status = ?1) AND (?2 = '' OR agent_id = ?2) \
                 ORDER BY created_at DESC, id DESC LIMIT {}",
                limit.clamp(1, 1000)
            ),
        );
        per_backend!(self, p => {
            sqlx::query(sqlx::AssertSqlSafe(q.clone()))
                .bind(status.unwrap_or(""))
                .bind(agent.unwrap_or(""))
                .fetch_all(p)
                .await?
                .iter()
                .map(from_row)
                .collect()
        })
    }

    /// Decides a pending request. Exactly one of several concurrent deciders succeeds; the others,
    /// and anyone deciding a request already decided or past its expiry, get a conflict that says why.
    pub async fn decide_approval(&self, id: &str, approve: bool, by: &str, reason: &str) -> Result<ApprovalRow> {
        let now = crate::now_ms();
        let status = if approve { "approved" } else { "rejected" };
        let q = sql(
            self.is_pg(),
            "UPDATE approvals SET status = ?1, decided_at = ?2, decided_by = ?3, reason = ?4 \
             WHERE id = ?5 AND status = 'pending' AND expires_at > ?2",
        );
        let n = {
            let _turn = self.turn().await;
            per_backend!(self, p => {
                sqlx::query(sqlx::AssertSqlSafe(q.clone()))
                    .bind(status).bind(now).bind(by).bind(reason).bind(id)
                    .execute(p).await?.rows_affected()
            })
        };
        let row = self.get_approval(id).await?;
        if n == 1 {
            return Ok(row);
        }
        if row.status == "pending" {
            // Past its expiry; the caller's expiry sweep records it as a timeout.
            return Err(StoreError::Conflict(format!("approval request `{id}` expired before it was decided")));
        }
        Err(StoreError::Conflict(format!(
            "approval request `{id}` was already {}{}",
            row.status,
            row.decided_by.as_deref().map(|b| format!(" by {b}")).unwrap_or_default()
        )))
    }

    /// Marks pending requests past their expiry; returns them.
    pub async fn expire_approvals(&self, now: i64) -> Result<Vec<ApprovalRow>> {
        let q = sql(
            self.is_pg(),
            "UPDATE approvals SET status = 'expired', decided_at = ?1, reason = 'no decision before the timeout' \
             WHERE status = 'pending' AND expires_at <= ?1 RETURNING id",
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

    /// Uses an approved request for its call, once. False if it was already used.
    pub async fn consume_approval(&self, id: &str) -> Result<bool> {
        let now = crate::now_ms();
        let q = sql(
            self.is_pg(),
            "UPDATE approvals SET consumed_at = ?1 WHERE id = ?2 AND status = 'approved' AND consumed_at IS NULL",
        );
        let _turn = self.turn().await;
        let n = per_backend!(self, p => sqlx::query(sqlx::AssertSqlSafe(q.clone())).bind(now).bind(id).execute(p).await?.rows_affected());
        Ok(n == 1)
    }
}
