//! Notifications: events fanned out to channels (email over SMTP, Slack incoming webhooks, signed
//! generic webhooks) through a persistent outbox, delivered at least once with retries.
//!
//! An event becomes one outbox row per target before anything is sent. The row id is derived from
//! what the event is about and the target, so recording the same event twice queues it once, and
//! the id travels with every delivery (`Idempotency-Key`, the payload's `idempotency_key`, the
//! email's `Message-ID`) so a receiver can make a repeated delivery take effect once. A dispatcher
//! on every replica claims due rows for a lease, sends them, and records each attempt: delivered,
//! retried later with exponential backoff and jitter, or failed for good.
//!
//! Webhook targets are checked against server-side request forgery: a URL whose host is, or
//! resolves to, a private, loopback, link-local, shared, multicast or metadata address is refused
//! unless an allowlisted network contains it, and redirects are never followed.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use hmac::{KeyInit, Mac};
use ipnet::IpNet;
use parking_lot::Mutex;
use sentinel_store::{ApprovalRow, Attempt, ChannelRow, MessageRow, NewChannel, NewMessage, Scope};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::Digest;

use crate::{ApiError, ApiJson, ApiQuery, AppState, Caller};

/// Every event type, as it appears in `event_type` and in a channel's `events`.
pub const EVENTS: &[&str] = &[
    "critical_intervention",
    "budget_threshold",
    "budget_exceeded",
    "approval_requested",
    "approval_escalated",
    "approval_decided",
    "policy_violation",
    "agent_failures",
    "tamper_detected",
    "test",
];

/// How the server sends notifications.
#[derive(Debug, Clone)]
pub struct NotifyConfig {
    /// `smtp://host:port` (plain; `?tls=required` for STARTTLS), `smtps://…` (TLS), with optional
    /// `user:password@`. Without it, email messages fail with a message that says so.
    pub smtp_url: Option<String>,
    pub smtp_from: String,
    /// Networks webhook targets may be in although they are private or loopback (tests use 127.0.0.1/32).
    pub allow: Vec<IpNet>,
    /// The address people open approval links at (default: the listening address).
    pub public_url: Option<String>,
    /// Attempts before a message is marked failed.
    pub max_attempts: u32,
    /// How many deliveries are in flight at once.
    pub concurrency: usize,
}

impl Default for NotifyConfig {
    fn default() -> Self {
        NotifyConfig {
            smtp_url: None,
            smtp_from: "Agent Sentinel <sentinel@localhost>".into(),
            allow: Vec::new(),
            public_url: None,
            max_attempts: 12,
            concurrency: 64,
        }
    }
}

type Smtp = lettre::AsyncSmtpTransport<lettre::Tokio1Executor>;

/// Shared by every request and the dispatcher.
pub struct Notifier {
    pub cfg: NotifyConfig,
    http: reqwest::Client,
    smtp: Option<Smtp>,
    from: Option<lettre::message::Mailbox>,
    wake: tokio::sync::Notify,
    /// The channels, read at most once a second (changes made here apply at once).
    channels: Mutex<Option<(Instant, Arc<Vec<ChannelRow>>)>>,
    /// Signs approval links; derived from the server secret.
    link_key: Vec<u8>,
    public_url: Mutex<String>,
    /// Sessions with new spend since the last threshold check: (agent, session, run, action).
    /// Keyed by a hash of the four, so a session already noted costs a decision no allocation.
    touched: Mutex<std::collections::HashMap<u64, (String, String, String, String)>>,
    /// Whether any policy has an alert threshold (so decisions skip the bookkeeping otherwise).
    pub(crate) thresholds_on: std::sync::atomic::AtomicBool,
}

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("invalid SMTP URL: {0}")]
    Smtp(String),
    #[error("invalid sender address `{0}`")]
    From(String),
    #[error("cannot build the HTTP client: {0}")]
    Http(String),
}

impl Notifier {
    pub fn new(cfg: NotifyConfig, secret: &[u8]) -> Result<Self, NotifyError> {
        let http = reqwest::Client::builder()
            .dns_resolver(Arc::new(GuardedResolver { allow: Arc::new(cfg.allow.clone()) }))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(10))
            .pool_max_idle_per_host(cfg.concurrency)
            .user_agent(concat!("agent-sentinel/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| NotifyError::Http(e.to_string()))?;
        let smtp = match &cfg.smtp_url {
            Some(url) => Some(
                Smtp::from_url(url)
                    .map_err(|e| NotifyError::Smtp(format!("`{}`: {e}", redact_url(url))))?
                    .timeout(Some(Duration::from_secs(10)))
                    .build(),
            ),
            None => None,
        };
        let from = if smtp.is_some() {
            Some(cfg.smtp_from.parse().map_err(|_| NotifyError::From(cfg.smtp_from.clone()))?)
        } else {
            None
        };
        let link_key = hmac_bytes(secret, b"approval-links");
        Ok(Notifier {
            http,
            smtp,
            from,
            wake: tokio::sync::Notify::new(),
            channels: Mutex::new(None),
            link_key,
            public_url: Mutex::new(cfg.public_url.clone().unwrap_or_else(|| "http://127.0.0.1:8080".into())),
            touched: Mutex::new(std::collections::HashMap::new()),
            thresholds_on: std::sync::atomic::AtomicBool::new(false),
            cfg,
        })
    }

    /// Where approval links point when no public URL was configured: the address the server listens on.
    pub fn set_listen_url(&self, url: String) {
        if self.cfg.public_url.is_none() {
            *self.public_url.lock() = url;
        }
    }

    pub fn public_url(&self) -> String {
        self.public_url.lock().trim_end_matches('/').to_string()
    }

    fn forget_channels(&self) {
        *self.channels.lock() = None;
    }

    async fn channels(&self, store: &sentinel_store::Store) -> Result<Arc<Vec<ChannelRow>>, ApiError> {
        if let Some((at, c)) = &*self.channels.lock()
            && at.elapsed() < Duration::from_secs(1)
        {
            return Ok(Arc::clone(c));
        }
        let c = Arc::new(store.list_channels().await?);
        *self.channels.lock() = Some((Instant::now(), Arc::clone(&c)));
        Ok(c)
    }

    /// Remembers a session with new spend, for the threshold check (only when a policy has a threshold).
    pub(crate) fn spent(&self, agent: &str, session: &str, run: &str, action: &str) {
        if !self.thresholds_on.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (agent, session, run, action).hash(&mut h);
        // A 64-bit collision would only postpone one check to that session's next spend.
        let mut t = self.touched.lock();
        if t.len() < 100_000 {
            t.entry(h.finish()).or_insert_with(|| (agent.into(), session.into(), run.into(), action.into()));
        }
    }

    pub(crate) fn sign(&self, data: &str) -> String {
        hex::encode(hmac_bytes(&self.link_key, data.as_bytes()))
    }
}

fn hmac_bytes(key: &[u8], data: &[u8]) -> Vec<u8> {
    match <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(key) {
        Ok(mut m) => {
            m.update(data);
            m.finalize().into_bytes().to_vec()
        }
        Err(_) => Vec::new(),
    }
}

/// `sha256=<hex>` over `<timestamp>.<body>` with the webhook's secret: what a receiver recomputes.
pub fn webhook_signature(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let mut data = Vec::with_capacity(body.len() + 12);
    data.extend_from_slice(timestamp.to_string().as_bytes());
    data.push(b'.');
    data.extend_from_slice(body);
    format!("sha256={}", hex::encode(hmac_bytes(secret.as_bytes(), &data)))
}

fn redact_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            u.to_string()
        }
        Err(_) => "(unparseable)".into(),
    }
}

// ---------------------------------------------------------------------------------------------
// Server-side request forgery

/// Why an address may not be a webhook target, or `None` if it may.
pub fn forbidden_ip(ip: IpAddr, allow: &[IpNet]) -> Option<&'static str> {
    if allow.iter().any(|n| n.contains(&ip)) {
        return None;
    }
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return forbidden_ip(IpAddr::V4(v4), allow);
            }
            forbidden_v6(v6)
        }
    }
}

fn forbidden_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let o = ip.octets();
    if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_private() {
        Some("private")
    } else if ip.is_link_local() {
        Some("link-local (cloud metadata lives here)")
    } else if o[0] == 100 && (64..128).contains(&o[1]) {
        Some("shared (carrier-grade NAT)")
    } else if ip.is_unspecified() || o[0] == 0 {
        Some("unspecified")
    } else if ip.is_multicast() || ip.is_broadcast() || o[0] >= 240 {
        Some("multicast or reserved")
    } else if o[0] == 192 && o[1] == 0 && o[2] == 0 {
        Some("IETF protocol assignment")
    } else {
        None
    }
}

fn forbidden_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let s = ip.segments();
    if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_unspecified() {
        Some("unspecified")
    } else if s[0] & 0xfe00 == 0xfc00 {
        Some("unique local (private; cloud metadata lives here too)")
    } else if s[0] & 0xffc0 == 0xfe80 || s[0] & 0xffc0 == 0xfec0 {
        Some("link-local")
    } else if ip.is_multicast() {
        Some("multicast")
    } else if s[0] == 0x64 && s[1] == 0xff9b {
        // NAT64: the IPv4 address inside decides.
        let v4 = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
        forbidden_v4(v4)
    } else if s[0] == 0x2001 && s[1] == 0x0db8 {
        Some("documentation")
    } else {
        None
    }
}

/// Checks a webhook URL: http or https, a host, and (for a literal address) an address that may be a target.
pub fn check_url(url: &str, allow: &[IpNet]) -> Result<reqwest::Url, String> {
    let u = reqwest::Url::parse(url).map_err(|e| format!("`{url}` is not a URL: {e}"))?;
    if !matches!(u.scheme(), "http" | "https") {
        return Err(format!("`{url}`: only http and https targets are allowed"));
    }
    if !u.username().is_empty() || u.password().is_some() {
        return Err(format!("`{url}`: credentials in the URL are not allowed; use the channel's secret"));
    }
    let ip = match u.host() {
        Some(url::Host::Ipv4(ip)) => Some(IpAddr::V4(ip)),
        Some(url::Host::Ipv6(ip)) => Some(IpAddr::V6(ip)),
        Some(url::Host::Domain(d)) if d.eq_ignore_ascii_case("localhost") || d.ends_with(".localhost") => {
            Some(IpAddr::V4(Ipv4Addr::LOCALHOST))
        }
        Some(url::Host::Domain(_)) => None,
        None => return Err(format!("`{url}` has no host")),
    };
    if let Some(ip) = ip
        && let Some(why) = forbidden_ip(ip, allow)
    {
        return Err(format!(
            "`{url}` points at {ip}, a {why} address; webhook targets must be public unless the server allows the network (--notify-allow)"
        ));
    }
    Ok(u)
}

/// Every address a name resolves to is one a webhook may not reach: retrying will not help.
#[derive(Debug)]
struct Refused(String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

/// Resolves names and drops every address a webhook may not reach, so a public name that
/// resolves to a private address is refused at connect time too.
struct GuardedResolver {
    allow: Arc<Vec<IpNet>>,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow = Arc::clone(&self.allow);
        let host = name.as_str().to_string();
        Box::pin(async move {
            let found: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut refused = None;
            let ok: Vec<SocketAddr> = found
                .into_iter()
                .filter(|a| match forbidden_ip(a.ip(), &allow) {
                    None => true,
                    Some(why) => {
                        refused = Some(format!("`{host}` resolves to {}, a {why} address", a.ip()));
                        false
                    }
                })
                .collect();
            if ok.is_empty() {
                let why = refused.unwrap_or_else(|| format!("`{host}` has no address"));
                return Err(Box::new(Refused(why)) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(ok.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Events

/// Something worth telling people about.
#[derive(Debug, Clone)]
pub struct Event {
    pub kind: &'static str,
    /// What the event is about (an intervention id, an approval id and stage, …): with the
    /// target, it makes the idempotency key.
    pub key: String,
    pub title: String,
    /// `critical`, `warning` or `info`.
    pub severity: &'static str,
    /// The platform's webhook payload `data`.
    pub data: Value,
    /// Label and value pairs for people (email lines, Slack fields).
    pub facts: Vec<(&'static str, String)>,
    /// Addresses from policies' alert settings.
    pub emails: Vec<String>,
    /// For approval requests: the request (every message carries its own signed link) and the
    /// approvers who are email addresses.
    pub approval: Option<ApprovalRow>,
    pub approver_emails: Vec<String>,
    pub reach: Reach,
}

/// Which channels an event goes to. Its `emails` and approvers get it too, unless it is aimed at
/// one channel.
#[derive(Debug, Clone, PartialEq)]
pub enum Reach {
    /// Enabled channels whose event filter takes it.
    Subscribed,
    /// Every enabled channel whatever its filter (critical interventions).
    Always,
    /// Only this channel (a "send test").
    Channel(String),
    /// No channel, only the event's addresses (a policy's test alert).
    Addresses,
}

impl Event {
    pub fn new(kind: &'static str, key: impl Into<String>, title: impl Into<String>, severity: &'static str) -> Self {
        Event {
            kind,
            key: key.into(),
            title: title.into(),
            severity,
            data: Value::Null,
            facts: Vec::new(),
            emails: Vec::new(),
            approval: None,
            approver_emails: Vec::new(),
            reach: Reach::Subscribed,
        }
    }
}

fn idempotency_key(kind: &str, key: &str, target: &str) -> String {
    let mut h = sha2::Sha256::new();
    for part in [kind, key, target] {
        h.update(part.as_bytes());
        h.update([0x1f]);
    }
    let digest = h.finalize();
    format!("ntf_{}", hex::encode(digest.get(..16).unwrap_or_default()))
}

fn is_email(s: &str) -> bool {
    let s = s.trim();
    s.len() <= 254
        && s.split_once('@').is_some_and(|(u, d)| !u.is_empty() && (d.contains('.') || d == "localhost"))
        && !s.chars().any(|c| c.is_whitespace() || c.is_control() || c == ',' || c == '<' || c == '>')
}

/// Queues an event for every channel and address it goes to; returns the ids (idempotency keys)
/// of its messages, whether they were new or already queued.
pub async fn emit(s: &AppState, ev: Event) -> Result<Vec<String>, ApiError> {
    let n = &s.notifier;
    let channels = n.channels(&s.store).await?;
    let mut msgs = Vec::new();
    let wanted = |c: &ChannelRow| match &ev.reach {
        Reach::Channel(id) => c.id == *id,
        Reach::Addresses => false,
        Reach::Always => c.enabled,
        Reach::Subscribed => c.enabled && (c.events.is_empty() || c.events.iter().any(|e| e == ev.kind)),
    };
    for c in channels.iter().filter(|c| wanted(c)) {
        let target = match c.kind.as_str() {
            "email" => c
                .config
                .get("to")
                .and_then(Value::as_array)
                .map(|l| l.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(","))
                .unwrap_or_default(),
            _ => c.config.get("url").and_then(Value::as_str).unwrap_or_default().to_string(),
        };
        let link = match &ev.approval {
            Some(a) => Some(crate::links::issue(s, a, &format!("channel `{}`", c.name)).await?),
            None => None,
        };
        msgs.push(message(&ev, &c.kind, Some(c.id.clone()), &format!("channel:{}", c.id), target, link));
    }
    if !matches!(ev.reach, Reach::Channel(_)) {
        let mut seen = HashSet::new();
        for addr in ev.emails.iter().filter(|a| seen.insert(a.to_ascii_lowercase())) {
            msgs.push(message(&ev, "email", None, &format!("email:{addr}"), addr.clone(), None));
        }
        for addr in ev.approver_emails.iter().filter(|a| is_email(a)) {
            let Some(a) = &ev.approval else { break };
            let link = crate::links::issue(s, a, addr).await?;
            // An approver also listed in the alert emails gets the message once, with their link.
            msgs.retain(|m| !(m.channel_id.is_none() && m.target.eq_ignore_ascii_case(addr)));
            msgs.push(message(&ev, "email", None, &format!("approver:{addr}"), addr.clone(), Some(link)));
        }
    }
    if msgs.is_empty() {
        return Ok(Vec::new());
    }
    let added = s.store.enqueue(&msgs).await?;
    metrics::counter!("sentinel_notifications_queued_total", "event" => ev.kind).increment(added);
    n.wake.notify_one();
    Ok(msgs.into_iter().map(|m| m.id).collect())
}

/// Queues an event; a failure to queue is logged (the event itself already happened).
async fn emit_logged(s: &AppState, ev: Event) {
    let (kind, key) = (ev.kind, ev.key.clone());
    if let Err(e) = emit(s, ev).await {
        tracing::warn!(error = %e.detail, event = kind, about = %key, "cannot queue a notification");
    }
}

fn message(
    ev: &Event,
    kind: &str,
    channel_id: Option<String>,
    who: &str,
    target: String,
    link: Option<String>,
) -> NewMessage {
    let id = idempotency_key(ev.kind, &ev.key, who);
    let facts: Vec<Value> = ev.facts.iter().map(|(k, v)| json!([k, v])).collect();
    let mut links = serde_json::Map::new();
    if let Some(l) = link {
        links.insert("review".into(), Value::String(l));
    }
    let payload = json!({
        "event_type": ev.kind,
        "timestamp": sentinel_core::ledger::now_rfc3339(),
        "idempotency_key": id,
        "title": ev.title,
        "severity": ev.severity,
        "data": ev.data,
        "facts": facts,
        "links": links,
    });
    NewMessage { id, event: ev.kind.to_string(), kind: kind.to_string(), channel_id, target, payload }
}

// ---------------------------------------------------------------------------------------------
// Events from what happens

/// The alert settings of the enabled policies, by policy name, and which policies apply to an agent.
#[derive(Debug, Clone, Default)]
pub struct PolicyAlerts {
    pub by_policy: std::collections::HashMap<String, (crate::Alerts, Option<String>)>,
}

impl PolicyAlerts {
    fn emails_of(&self, policy: Option<&str>, want: impl Fn(&crate::Alerts) -> bool) -> Vec<String> {
        policy
            .and_then(|p| self.by_policy.get(p))
            .filter(|(a, _)| want(a))
            .map(|(a, _)| a.emails.clone())
            .unwrap_or_default()
    }
}

/// Events for new interventions: critical ones to every channel, budget denials, and policy
/// violations (with the policy's alert emails when it asks for them).
pub async fn interventions(s: &AppState, items: &[sentinel_store::InterventionIn]) {
    for i in items {
        let critical = i.risk_level.eq_ignore_ascii_case("CRITICAL");
        let blocked = i.outcome == "BLOCKED";
        let kind = if critical {
            "critical_intervention"
        } else if i.kind == "BUDGET_EXCEEDED" && blocked {
            "budget_exceeded"
        } else if blocked {
            "policy_violation"
        } else {
            continue;
        };
        let emails = s.alerts.read().emails_of(i.policy.as_deref(), |a| critical || a.alert_on_failure);
        let body: Value = serde_json::from_str(&i.body).unwrap_or(Value::Null);
        let reason = body.get("rationale").or_else(|| body.get("reason")).and_then(Value::as_str).unwrap_or("");
        let title = match kind {
            "critical_intervention" => format!("Critical intervention: `{}` by agent `{}`", i.action, i.agent_id),
            "budget_exceeded" => format!("Budget exceeded: `{}` by agent `{}`", i.action, i.agent_id),
            _ => format!("Policy violation blocked: `{}` by agent `{}`", i.action, i.agent_id),
        };
        let mut ev = Event::new(kind, &i.id, title, if critical { "critical" } else { "warning" });
        if critical {
            ev.reach = Reach::Always;
        }
        ev.emails = emails;
        ev.data = json!({
            "intervention_id": i.id,
            "type": i.kind.to_ascii_lowercase(),
            "outcome": i.outcome,
            "action_name": i.action,
            "risk_level": i.risk_level.to_ascii_lowercase(),
            "agent_id": i.agent_id,
            "run_id": i.run_id,
            "policy": i.policy,
            "rule": i.rule,
            "reason": reason,
            "cost_prevented_usd": i.prevented_micros as f64 / 1e6,
        });
        ev.facts = vec![
            ("Agent", i.agent_id.clone()),
            ("Action", i.action.clone()),
            ("Status", i.outcome.clone()),
            ("Risk", i.risk_level.clone()),
            ("Intervention", i.kind.clone()),
            ("Policy", i.policy.clone().unwrap_or_else(|| "-".into())),
            ("Reason", reason.to_string()),
            ("Time", chrono::DateTime::from_timestamp_millis(i.at).map(|t| t.to_rfc3339()).unwrap_or_default()),
        ];
        emit_logged(s, ev).await;
    }
}

/// An event for tamper findings from one upload.
pub async fn tamper(s: &AppState, stream: &str, findings: &[sentinel_store::TamperFinding]) {
    let Some(first) = findings.first() else { return };
    let agent = &first.agent_id;
    let mut ev = Event::new(
        "tamper_detected",
        &first.id,
        format!("Tamper detected in stream `{stream}` of agent `{agent}`: {} finding(s)", findings.len()),
        "critical",
    );
    ev.data = json!({"stream": stream, "agent_id": agent, "findings": findings});
    ev.facts = vec![
        ("Stream", stream.to_string()),
        ("Agent", agent.to_string()),
        ("Findings", findings.len().to_string()),
        ("First", format!("{} at seq {}: {}", first.kind, first.seq, first.detail)),
    ];
    emit_logged(s, ev).await;
}

/// An event for an agent whose calls failed several times in a row.
pub async fn agent_failures(s: &AppState, agent: &str, streak: i64) {
    let emails: Vec<String> = s
        .alerts
        .read()
        .by_policy
        .values()
        .filter(|(a, scope_agent)| a.alert_on_failure && scope_agent.as_deref().is_none_or(|x| x == agent))
        .flat_map(|(a, _)| a.emails.clone())
        .collect();
    let mut ev = Event::new(
        "agent_failures",
        format!("{agent}:{}", sentinel_store::now_ms() / 60_000),
        format!("Agent `{agent}` failed {streak} times in a row"),
        "warning",
    );
    ev.emails = emails;
    ev.data = json!({"agent_id": agent, "consecutive_failures": streak});
    ev.facts = vec![("Agent", agent.to_string()), ("Consecutive failures", streak.to_string())];
    emit_logged(s, ev).await;
}

fn approval_facts(a: &ApprovalRow) -> Vec<(&'static str, String)> {
    let r = &a.request;
    let text = |k: &str| r.get(k).and_then(Value::as_str).unwrap_or("-").to_string();
    vec![
        ("Agent", a.agent_id.clone()),
        ("Run", a.run_id.clone()),
        ("Action", a.action.clone()),
        ("Cost", format!("${:.4}", a.cost_usd)),
        ("Why", text("message")),
        ("Policy", text("policy")),
        ("Expires", chrono::DateTime::from_timestamp_millis(a.expires_at).map(|t| t.to_rfc3339()).unwrap_or_default()),
    ]
}

fn approval_data(a: &ApprovalRow) -> Value {
    json!({
        "approval_id": a.id,
        "status": a.status,
        "agent_id": a.agent_id,
        "run_id": a.run_id,
        "action_name": a.action,
        "cost_usd": a.cost_usd,
        "expires_at": a.expires_at,
        "request": a.request,
        "decided_by": a.decided_by,
        "reason": a.reason,
    })
}

fn identities(a: &ApprovalRow, key: &str) -> Vec<String> {
    let list = match key {
        "escalation" => a.request.get("escalation").and_then(|e| e.get("approvers")),
        _ => a.request.get("approvers"),
    };
    list.and_then(Value::as_array)
        .map(|l| l.iter().filter_map(Value::as_str).map(str::to_string).collect())
        .unwrap_or_default()
}

/// An event about an approval request, with its data and facts.
fn approval_event(a: &ApprovalRow, kind: &'static str, key: String, title: String, severity: &'static str) -> Event {
    let mut ev = Event::new(kind, key, title, severity);
    ev.data = approval_data(a);
    ev.facts = approval_facts(a);
    ev
}

/// A new approval request: its approvers (email addresses each get their own link) and channels.
pub async fn approval_requested(s: &AppState, a: &ApprovalRow) {
    let title = if crate::approvals::is_pause(a) {
        format!("Paused over budget: agent `{}` waits to run `{}`", a.agent_id, a.action)
    } else {
        format!("Approval requested: agent `{}` wants to run `{}`", a.agent_id, a.action)
    };
    let mut ev = approval_event(a, "approval_requested", a.id.clone(), title, "warning");
    ev.approver_emails = identities(a, "approvers");
    ev.approval = Some(a.clone());
    emit_logged(s, ev).await;
}

/// A request still undecided after its share of the timeout: the next approver group is asked.
pub async fn approval_escalated(s: &AppState, a: &ApprovalRow) {
    let title = format!("Escalated: agent `{}` still waits for approval to run `{}`", a.agent_id, a.action);
    let mut ev = approval_event(a, "approval_escalated", a.id.clone(), title, "critical");
    ev.approver_emails = identities(a, "escalation");
    ev.approval = Some(a.clone());
    emit_logged(s, ev).await;
}

/// A decision (or expiry) on a request.
pub async fn approval_decided(s: &AppState, a: &ApprovalRow) {
    let title = format!("Approval {}: `{}` for agent `{}`", a.status, a.action, a.agent_id);
    let mut ev = approval_event(a, "approval_decided", format!("{}:{}", a.id, a.status), title, "info");
    ev.facts.push(("Decision", a.status.clone()));
    ev.facts.push(("By", a.decided_by.clone().unwrap_or_else(|| "-".into())));
    ev.facts.push(("Reason", a.reason.clone().unwrap_or_default()));
    emit_logged(s, ev).await;
}

/// Checks the sessions that spent since the last check against every budget whose policy has an
/// alert threshold; each threshold is announced once per budget and scope.
async fn check_thresholds(s: &AppState) {
    let touched: Vec<_> = std::mem::take(&mut *s.notifier.touched.lock()).into_values().collect();
    if touched.is_empty() {
        return;
    }
    for (agent, session, run, action) in touched {
        let req = sentinel_core::ActionRequest::new(&action).agent(&agent).run(&run).session(&session);
        let Some(spend) = crate::central::spend_of(s, &req).await else { continue };
        for b in &spend.budgets {
            let (kind, policy) = (b.label, &*b.policy);
            let (limit, spent) = (b.limit.as_f64(), b.spent.as_f64());
            let Some((pct, emails)) =
                s.alerts.read().by_policy.get(policy).and_then(|(a, _)| Some((a.threshold_percent?, a.emails.clone())))
            else {
                continue;
            };
            if limit <= 0.0 || spent < limit * pct / 100.0 {
                continue;
            }
            let scope = match kind {
                "session" => session.clone(),
                "run" => format!("{session}/{run}"),
                _ => format!("{session}/{action}"),
            };
            let key = format!("threshold\u{1f}{policy}\u{1f}{kind}\u{1f}{scope}\u{1f}{pct}");
            match s.store.mark_once(&key).await {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot record a budget alert");
                    continue;
                }
            }
            let mut ev = Event::new(
                "budget_threshold",
                key.clone(),
                format!(
                    "Budget at {:.0}%: {kind} budget of policy `{policy}` for agent `{agent}`",
                    100.0 * spent / limit
                ),
                "warning",
            );
            ev.emails = emails;
            ev.data = json!({"policy": policy, "budget": kind, "scope": scope, "agent_id": agent, "run_id": run,
                "session_id": session, "limit_usd": limit, "spent_usd": spent, "threshold_percent": pct});
            ev.facts = vec![
                ("Agent", agent.clone()),
                ("Budget", format!("{kind} ({scope})")),
                ("Spent", format!("${spent:.4} of ${limit:.4}")),
                ("Threshold", format!("{pct}%")),
                ("Policy", policy.to_string()),
            ];
            emit_logged(s, ev).await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Delivery

fn backoff(attempt: i64) -> Duration {
    let base = Duration::from_secs(1).saturating_mul(1 << attempt.clamp(0, 12) as u32).min(Duration::from_secs(3600));
    let mut b = [0u8; 2];
    let _ = getrandom::fill(&mut b);
    // 50–100% of the base: spreads out retries that failed together.
    base.mul_f64(0.5 + f64::from(u16::from_le_bytes(b)) / f64::from(u16::MAX) / 2.0)
}

enum Outcome {
    Ok,
    /// Worth trying again (network errors, timeouts, 408, 429, 5xx).
    Transient(String),
    /// Will not get better by retrying (4xx, a redirect, a refused address, no SMTP server).
    Permanent(String),
}

async fn deliver(s: &AppState, m: &MessageRow) -> Outcome {
    match m.kind.as_str() {
        "webhook" => {
            let secret = match &m.channel_id {
                Some(id) => match webhook_secret(s, id).await {
                    Ok(sec) => sec,
                    Err(out) => return out,
                },
                None => String::new(),
            };
            let body = serde_json::to_vec(&m.payload).unwrap_or_default();
            post(s, m, body, Some(&secret)).await
        }
        "slack" => post(s, m, serde_json::to_vec(&slack_blocks(&m.payload)).unwrap_or_default(), None).await,
        "email" => send_email(s, m).await,
        other => Outcome::Permanent(format!("unknown channel kind `{other}`")),
    }
}

/// A webhook channel's signing secret, from the channel list read at most once a second (not one
/// database read per message); a channel missing from it (created on another replica) is read directly.
async fn webhook_secret(s: &AppState, id: &str) -> Result<String, Outcome> {
    let secret = |c: &ChannelRow| c.config.get("secret").and_then(Value::as_str).unwrap_or_default().to_string();
    if let Ok(all) = s.notifier.channels(&s.store).await
        && let Some(c) = all.iter().find(|c| c.id == id)
    {
        return Ok(secret(c));
    }
    match s.store.get_channel(id).await {
        Ok(c) => Ok(secret(&c)),
        Err(sentinel_store::StoreError::NotFound(_)) => Err(Outcome::Permanent("the channel was deleted".into())),
        Err(e) => Err(Outcome::Transient(e.to_string())),
    }
}

async fn post(s: &AppState, m: &MessageRow, body: Vec<u8>, secret: Option<&str>) -> Outcome {
    let n = &s.notifier;
    let url = match check_url(&m.target, &n.cfg.allow) {
        Ok(u) => u,
        Err(e) => return Outcome::Permanent(e),
    };
    let ts = chrono::Utc::now().timestamp();
    let mut req = n
        .http
        .post(url)
        .header("content-type", "application/json")
        .header("idempotency-key", &m.id)
        .header("x-sentinel-event", &m.event)
        .header("x-sentinel-delivery", &m.id)
        .header("x-sentinel-timestamp", ts.to_string());
    if let Some(secret) = secret {
        req = req.header("x-sentinel-signature", webhook_signature(secret, ts, &body));
    }
    match req.body(body).send().await {
        Ok(r) => {
            let st = r.status();
            if st.is_success() {
                Outcome::Ok
            } else if st.is_redirection() {
                Outcome::Permanent(format!("the target answered {st}; redirects are not followed"))
            } else if st == StatusCode::REQUEST_TIMEOUT || st == StatusCode::TOO_MANY_REQUESTS || st.is_server_error() {
                Outcome::Transient(format!("the target answered {st}"))
            } else {
                Outcome::Permanent(format!("the target answered {st}"))
            }
        }
        Err(e) => send_failure(&e),
    }
}

/// A failed request, with its whole chain of causes: permanent if the resolver refused the target.
fn send_failure(e: &reqwest::Error) -> Outcome {
    let mut msg = e.to_string();
    let mut refused = false;
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        msg = format!("{msg}: {inner}");
        refused |= inner.downcast_ref::<Refused>().is_some();
        src = inner.source();
    }
    if refused { Outcome::Permanent(msg) } else { Outcome::Transient(msg) }
}

/// A Slack Block Kit message: a header, the key facts as fields, and the review link as a button.
pub fn slack_blocks(p: &Value) -> Value {
    let title = p.get("title").and_then(Value::as_str).unwrap_or("Agent Sentinel");
    let icon = match p.get("severity").and_then(Value::as_str) {
        Some("critical") => "🚨",
        Some("warning") => "⚠️",
        _ => "ℹ️",
    };
    let fields: Vec<Value> = p
        .get("facts")
        .and_then(Value::as_array)
        .map(|f| {
            f.iter()
                .take(10)
                .filter_map(|kv| {
                    let k = kv.get(0)?.as_str()?;
                    let v = kv.get(1)?.as_str()?;
                    Some(json!({"type": "mrkdwn", "text": format!("*{}:*\n{}", slack_escape(k), slack_escape(v))}))
                })
                .collect()
        })
        .unwrap_or_default();
    let header = format!("{icon} {title}");
    let header: String = header.chars().take(150).collect();
    let mut blocks = vec![
        json!({"type": "header", "text": {"type": "plain_text", "text": header, "emoji": true}}),
        json!({"type": "section", "fields": fields}),
    ];
    if let Some(link) = p.get("links").and_then(|l| l.get("review")).and_then(Value::as_str) {
        blocks.push(json!({"type": "actions", "elements": [{"type": "button", "style": "primary",
            "text": {"type": "plain_text", "text": "Review and decide"}, "url": link}]}));
    }
    blocks.push(json!({"type": "context", "elements": [{"type": "mrkdwn",
        "text": format!("{} · idempotency key `{}`", p.get("event_type").and_then(Value::as_str).unwrap_or(""),
            p.get("idempotency_key").and_then(Value::as_str).unwrap_or(""))}]}));
    json!({"text": format!("{icon} {title}"), "blocks": blocks})
}

fn slack_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// The plain-text body of an email.
pub fn email_text(p: &Value) -> String {
    let mut out = String::new();
    out.push_str(p.get("title").and_then(Value::as_str).unwrap_or(""));
    out.push_str("\n\n");
    for kv in p.get("facts").and_then(Value::as_array).into_iter().flatten() {
        if let (Some(k), Some(v)) = (kv.get(0).and_then(Value::as_str), kv.get(1).and_then(Value::as_str)) {
            out.push_str(&format!("{k}: {v}\n"));
        }
    }
    if let Some(link) = p.get("links").and_then(|l| l.get("review")).and_then(Value::as_str) {
        out.push_str(&format!("\nReview and decide (this link works once and expires with the request):\n{link}\n"));
    }
    out.push_str(&format!(
        "\n--\nAgent Sentinel · {} · idempotency key {}\n",
        p.get("event_type").and_then(Value::as_str).unwrap_or(""),
        p.get("idempotency_key").and_then(Value::as_str).unwrap_or("")
    ));
    out
}

async fn send_email(s: &AppState, m: &MessageRow) -> Outcome {
    use lettre::AsyncTransport;
    let n = &s.notifier;
    let (Some(smtp), Some(from)) = (&n.smtp, &n.from) else {
        return Outcome::Permanent("no SMTP server is configured; start the server with --smtp-url".into());
    };
    let title = m.payload.get("title").and_then(Value::as_str).unwrap_or("notification");
    let mut b = lettre::Message::builder()
        .from(from.clone())
        .subject(format!("[Agent Sentinel] {title}"))
        .message_id(Some(format!("<{}@agent-sentinel>", m.id)))
        .header(lettre::message::header::ContentType::TEXT_PLAIN);
    let mut any = false;
    for addr in m.target.split(',').map(str::trim).filter(|a| !a.is_empty()) {
        match addr.parse::<lettre::message::Mailbox>() {
            Ok(mb) => {
                b = b.to(mb);
                any = true;
            }
            Err(e) => return Outcome::Permanent(format!("`{addr}` is not an email address: {e}")),
        }
    }
    if !any {
        return Outcome::Permanent("no recipients".into());
    }
    let email = match b.body(email_text(&m.payload)) {
        Ok(e) => e,
        Err(e) => return Outcome::Permanent(format!("cannot build the email: {e}")),
    };
    match smtp.send(email).await {
        Ok(_) => Outcome::Ok,
        Err(e) if e.is_permanent() => Outcome::Permanent(format!("the SMTP server refused the message: {e}")),
        Err(e) => Outcome::Transient(format!("SMTP: {e}")),
    }
}

/// Sends a batch of claimed messages, at most `concurrency` at once, and records every attempt.
async fn deliver_batch(s: &AppState, rows: Vec<MessageRow>) {
    let sem = Arc::new(tokio::sync::Semaphore::new(s.notifier.cfg.concurrency.max(1)));
    let mut set = tokio::task::JoinSet::new();
    for m in rows {
        let s = s.clone();
        let sem = Arc::clone(&sem);
        set.spawn(async move {
            let _permit = sem.acquire().await;
            let out = deliver(&s, &m).await;
            (m, out)
        });
    }
    let mut done = Vec::new();
    while let Some(r) = set.join_next().await {
        let Ok((m, out)) = r else { continue };
        let attempt = m.attempts + 1;
        let a = match out {
            Outcome::Ok => {
                metrics::counter!("sentinel_notifications_total", "result" => "delivered").increment(1);
                Attempt::Delivered
            }
            Outcome::Transient(error) if attempt < i64::from(s.notifier.cfg.max_attempts) => {
                metrics::counter!("sentinel_notifications_total", "result" => "retry").increment(1);
                tracing::info!(id = %m.id, attempt, %error, "delivery failed; will retry");
                let at = sentinel_store::now_ms()
                    .saturating_add(i64::try_from(backoff(attempt - 1).as_millis()).unwrap_or(i64::MAX));
                Attempt::Retry { error, at }
            }
            Outcome::Transient(error) | Outcome::Permanent(error) => {
                metrics::counter!("sentinel_notifications_total", "result" => "failed").increment(1);
                tracing::warn!(id = %m.id, attempt, %error, "delivery failed for good");
                Attempt::Failed { error }
            }
        };
        done.push((m.id, a));
    }
    if let Err(e) = s.store.record_attempts(&done).await {
        tracing::error!(error = %e, "cannot record deliveries; they will be sent again when their lease ends");
    }
}

/// The most messages claimed at once.
const CLAIM_BATCH: usize = 500;

/// How long a claimed message is reserved for the sender that claimed it.
const LEASE_MS: i64 = 30_000;

/// Delivers the outbox, escalates approvals and checks budget thresholds until the server stops.
pub fn spawn_dispatcher(s: AppState) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut last_housekeeping = Instant::now() - Duration::from_secs(1);
        loop {
            if s.shutting_down.load(std::sync::atomic::Ordering::SeqCst) {
                break;
            }
            if last_housekeeping.elapsed() >= Duration::from_millis(250) {
                last_housekeeping = Instant::now();
                housekeeping(&s).await;
            }
            let now = sentinel_store::now_ms();
            match s.store.claim_due(now, CLAIM_BATCH as i64, LEASE_MS).await {
                Ok(rows) if !rows.is_empty() => {
                    let partial = rows.len() < CLAIM_BATCH;
                    deliver_batch(&s, rows).await;
                    if partial {
                        // Let the queue fill a little: fewer, larger claim and record transactions
                        // leave the database's writer to the events being queued.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    continue;
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "cannot read the outbox"),
            }
            let _ = tokio::time::timeout(Duration::from_millis(250), s.notifier.wake.notified()).await;
        }
    })
}

async fn housekeeping(s: &AppState) {
    match s.store.escalate_due(sentinel_store::now_ms()).await {
        Ok(due) => {
            for a in &due {
                tracing::info!(id = %a.id, "approval escalated");
                approval_escalated(s, a).await;
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot check approvals for escalation"),
    }
    check_thresholds(s).await;
}

// ---------------------------------------------------------------------------------------------
// API: channels, send test, delivery status

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChannelBody {
    pub name: String,
    /// `email`, `slack` or `webhook`.
    pub kind: String,
    /// Email: the recipients.
    #[serde(default)]
    pub to: Vec<String>,
    /// Slack or webhook: where to POST.
    #[serde(default)]
    pub url: Option<String>,
    /// Webhook: the signing secret (at least 16 characters); generated when absent.
    #[serde(default)]
    pub secret: Option<String>,
    /// Event types to send; empty (the default) sends every event. Critical interventions are always sent.
    #[serde(default)]
    pub events: Vec<String>,
    #[serde(default = "yes")]
    pub enabled: bool,
}

fn yes() -> bool {
    true
}

fn validate_channel(s: &AppState, b: ChannelBody) -> Result<NewChannel, ApiError> {
    let name = b.name.trim().to_string();
    if name.is_empty() || name.len() > 100 || name.chars().any(char::is_control) {
        return Err(ApiError::field("name", "must be 1 to 100 printable characters"));
    }
    for (i, e) in b.events.iter().enumerate() {
        if !EVENTS.contains(&e.as_str()) {
            return Err(ApiError::not_one_of(&format!("events[{i}]"), e, EVENTS));
        }
    }
    let config = match b.kind.as_str() {
        "email" => {
            if b.url.is_some() || b.secret.is_some() {
                return Err(ApiError::field("url", "an email channel has recipients (`to`), not a URL or secret"));
            }
            if b.to.is_empty() {
                return Err(ApiError::field("to", "an email channel needs at least one recipient"));
            }
            for (i, a) in b.to.iter().enumerate() {
                if !is_email(a) || a.parse::<lettre::message::Mailbox>().is_err() {
                    return Err(ApiError::field(&format!("to[{i}]"), format!("`{a}` is not an email address")));
                }
            }
            json!({"to": b.to})
        }
        "slack" | "webhook" => {
            if !b.to.is_empty() {
                return Err(ApiError::field("to", format!("a {} channel has a `url`, not recipients", b.kind)));
            }
            let Some(url) = &b.url else { return Err(ApiError::field("url", "is required")) };
            check_url(url, &s.notifier.cfg.allow).map_err(|e| ApiError::field("url", e))?;
            if b.kind == "slack" {
                if b.secret.is_some() {
                    return Err(ApiError::field("secret", "Slack incoming webhooks are not signed; remove `secret`"));
                }
                json!({"url": url})
            } else {
                let secret = match b.secret {
                    Some(sec) if sec.len() < 16 => {
                        return Err(ApiError::field("secret", "must be at least 16 characters"));
                    }
                    Some(sec) => sec,
                    None => {
                        let mut raw = [0u8; 24];
                        getrandom::fill(&mut raw).map_err(|e| ApiError::internal(format!("no randomness: {e}")))?;
                        format!("whsec_{}", hex::encode(raw))
                    }
                };
                json!({"url": url, "secret": secret})
            }
        }
        other => return Err(ApiError::not_one_of("kind", other, &["email", "slack", "webhook"])),
    };
    Ok(NewChannel { name, kind: b.kind, config, events: b.events, enabled: b.enabled })
}

/// A channel as the API shows it: a webhook's secret only when it was just created.
fn channel_json(c: &ChannelRow, reveal: bool) -> Value {
    let mut v = serde_json::to_value(c).unwrap_or_default();
    if !reveal
        && let Some(cfg) = v.get_mut("config").and_then(Value::as_object_mut)
        && cfg.contains_key("secret")
    {
        cfg.insert("secret".into(), Value::String("(hidden)".into()));
    }
    v
}

#[utoipa::path(post, path = "/api/v1/notifications/channels", request_body = ChannelBody, tag = "notifications",
    responses((status = 201, description = "Created; a webhook's secret is shown in full only here"), (status = 409), (status = 422)))]
pub async fn create_channel(
    State(s): State<AppState>,
    caller: Caller,
    ApiJson(b): ApiJson<ChannelBody>,
) -> Result<Response, ApiError> {
    caller.require(&[Scope::Admin])?;
    let c = s.store.create_channel(&validate_channel(&s, b)?).await?;
    s.notifier.forget_channels();
    Ok((StatusCode::CREATED, Json(channel_json(&c, true))).into_response())
}

#[utoipa::path(get, path = "/api/v1/notifications/channels", tag = "notifications", responses((status = 200)))]
pub async fn list_channels(State(s): State<AppState>, caller: Caller) -> Result<Json<Value>, ApiError> {
    caller.require(&[Scope::Admin, Scope::Readonly])?;
    let items: Vec<Value> = s.store.list_channels().await?.iter().map(|c| channel_json(c, false)).collect();
    Ok(Json(json!({"items": items, "events": EVENTS})))
}

#[utoipa::path(get, path = "/api/v1/notifications/channels/{id}", tag = "notifications", responses((status = 200), (status = 404)))]
pub async fn get_channel(
    State(s): State<AppState>,
    caller: Caller,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require(&[Scope::Admin, Scope::Readonly])?;
    Ok(Json(channel_json(&s.store.get_channel(&id).await?, false)))
}

#[utoipa::path(put, path = "/api/v1/notifications/channels/{id}", request_body = ChannelBody, tag = "notifications",
    responses((status = 200), (status = 404), (status = 422)))]
pub async fn update_channel(
    State(s): State<AppState>,
    caller: Caller,
    UrlPath(id): UrlPath<String>,
    ApiJson(b): ApiJson<ChannelBody>,
) -> Result<Json<Value>, ApiError> {
    caller.require(&[Scope::Admin])?;
    let keep_secret = b.kind == "webhook" && b.secret.is_none();
    let mut new = validate_channel(&s, b)?;
    if keep_secret {
        // Updating a webhook without a secret keeps the one it has.
        let old = s.store.get_channel(&id).await?;
        if let (Some(sec), Some(cfg)) = (old.config.get("secret").cloned(), new.config.as_object_mut()) {
            cfg.insert("secret".into(), sec);
        }
    }
    let reveal = !keep_secret && new.kind == "webhook";
    let c = s.store.update_channel(&id, &new).await?;
    s.notifier.forget_channels();
    Ok(Json(channel_json(&c, reveal)))
}

#[utoipa::path(delete, path = "/api/v1/notifications/channels/{id}", tag = "notifications", responses((status = 204), (status = 404)))]
pub async fn delete_channel(
    State(s): State<AppState>,
    caller: Caller,
    UrlPath(id): UrlPath<String>,
) -> Result<StatusCode, ApiError> {
    caller.require(&[Scope::Admin])?;
    s.store.delete_channel(&id).await?;
    s.notifier.forget_channels();
    Ok(StatusCode::NO_CONTENT)
}

/// Sends one test message to a channel now and says what happened (it is also in the outbox).
#[utoipa::path(post, path = "/api/v1/notifications/channels/{id}/test", tag = "notifications",
    responses((status = 200, description = "The test message and its delivery status")))]
pub async fn test_channel(
    State(s): State<AppState>,
    caller: Caller,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<MessageRow>, ApiError> {
    caller.require(&[Scope::Admin])?;
    let c = s.store.get_channel(&id).await?;
    let mut ev = Event::new(
        "test",
        format!("test:{}", sentinel_store::new_id()),
        format!("Test notification for channel `{}`", c.name),
        "info",
    );
    ev.reach = Reach::Channel(c.id.clone());
    ev.data = json!({"channel": c.name, "message": "If you can read this, the channel works."});
    ev.facts = vec![("Channel", c.name.clone()), ("Kind", c.kind.clone())];
    send_now(&s, ev).await
}

/// Queues an event and delivers its first message at once, so the caller sees the result.
async fn send_now(s: &AppState, ev: Event) -> Result<Json<MessageRow>, ApiError> {
    let Some(id) = emit(s, ev).await?.into_iter().next() else {
        return Err(ApiError::internal("a test event produced no message".into()));
    };
    // Claim it for this request, so the dispatcher does not send it too; if the dispatcher was
    // quicker, wait for its attempt.
    let Some(m) = s.store.claim_one(&id, sentinel_store::now_ms(), LEASE_MS).await? else {
        let until = Instant::now() + Duration::from_secs(15);
        loop {
            let m = s.store.get_message(&id).await?;
            if m.attempts > 0 || Instant::now() > until {
                return Ok(Json(m));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let out = deliver(s, &m).await;
    let a = match out {
        Outcome::Ok => Attempt::Delivered,
        Outcome::Transient(error) => {
            Attempt::Retry { error, at: sentinel_store::now_ms().saturating_add(backoff(0).as_millis() as i64) }
        }
        Outcome::Permanent(error) => Attempt::Failed { error },
    };
    s.store.record_attempts(&[(id.clone(), a)]).await?;
    Ok(Json(s.store.get_message(&id).await?))
}

/// Sends a test email to a policy's alert addresses.
#[utoipa::path(post, path = "/api/v1/policies/{id}/test-alert", tag = "notifications",
    responses((status = 200, description = "The test message and its delivery status"), (status = 422, description = "The policy has no alert emails")))]
pub async fn test_policy_alert(
    State(s): State<AppState>,
    caller: Caller,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<MessageRow>, ApiError> {
    caller.require(&[Scope::Admin])?;
    let p = s.store.get_policy(&id).await?;
    let alerts: crate::Alerts =
        p.body.get("alerts").cloned().and_then(|a| serde_json::from_value(a).ok()).unwrap_or_default();
    if alerts.emails.is_empty() {
        return Err(ApiError::field("alerts.emails", "this policy has no alert emails to test"));
    }
    let mut ev = Event::new(
        "test",
        format!("test:{}", sentinel_store::new_id()),
        format!("Test alert for policy `{}`", p.name),
        "info",
    );
    ev.emails = vec![alerts.emails.join(",")];
    ev.reach = Reach::Addresses;
    ev.data = json!({"policy": p.name, "message": "If you can read this, this policy's alerts reach you."});
    ev.facts = vec![
        ("Policy", p.name.clone()),
        ("Threshold", alerts.threshold_percent.map(|t| format!("{t}%")).unwrap_or_else(|| "-".into())),
        ("Alert on failure", alerts.alert_on_failure.to_string()),
    ];
    send_now(&s, ev).await
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct MessageQuery {
    /// `pending`, `delivered` or `failed`.
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub channel_id: Option<String>,
    #[serde(default)]
    pub event: Option<String>,
    /// The `next_cursor` of the previous page.
    #[serde(default)]
    pub cursor: Option<String>,
    #[serde(default)]
    pub limit: Option<i64>,
}

/// Messages and their delivery status, newest first, with counts by status.
#[utoipa::path(get, path = "/api/v1/notifications", params(MessageQuery), tag = "notifications", responses((status = 200)))]
pub async fn list_messages(
    State(s): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<MessageQuery>,
) -> Result<Json<Value>, ApiError> {
    caller.require(&[Scope::Admin, Scope::Readonly])?;
    const STATUSES: &[&str] = &["pending", "delivered", "failed"];
    if let Some(st) = q.status.as_deref().filter(|st| !STATUSES.contains(st)) {
        return Err(ApiError::not_one_of("status", st, STATUSES));
    }
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let items = s
        .store
        .list_messages(q.status.as_deref(), q.channel_id.as_deref(), q.event.as_deref(), q.cursor.as_deref(), limit)
        .await?;
    let next = (items.len() as i64 == limit).then(|| items.last().map(|m| m.id.clone())).flatten();
    let counts: serde_json::Map<String, Value> =
        s.store.message_counts().await?.into_iter().map(|(k, v)| (k, json!(v))).collect();
    Ok(Json(json!({"items": items, "next_cursor": next, "counts": counts})))
}

#[utoipa::path(get, path = "/api/v1/notifications/{id}", tag = "notifications", responses((status = 200), (status = 404)))]
pub async fn get_message(
    State(s): State<AppState>,
    caller: Caller,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<MessageRow>, ApiError> {
    caller.require(&[Scope::Admin, Scope::Readonly])?;
    Ok(Json(s.store.get_message(&id).await?))
}

/// Puts a failed message back in the queue.
#[utoipa::path(post, path = "/api/v1/notifications/{id}/retry", tag = "notifications", responses((status = 200), (status = 409)))]
pub async fn retry_message(
    State(s): State<AppState>,
    caller: Caller,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<MessageRow>, ApiError> {
    caller.require(&[Scope::Admin])?;
    let m = s.store.retry_message(&id).await?;
    s.notifier.wake.notify_one();
    Ok(Json(m))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn failure_of(n: &Notifier) -> Outcome {
        match n.http.post("http://localhost:9/hook").send().await {
            Ok(r) => Outcome::Transient(format!("unexpected answer {}", r.status())),
            Err(e) => send_failure(&e),
        }
    }

    #[tokio::test]
    async fn a_name_that_resolves_to_a_forbidden_address_fails_for_good() {
        let n = Notifier::new(NotifyConfig::default(), b"k").unwrap();
        match failure_of(&n).await {
            Outcome::Permanent(m) => assert!(m.contains("resolves to") && m.contains("loopback"), "{m}"),
            Outcome::Transient(m) => panic!("expected a permanent refusal: {m}"),
            Outcome::Ok => panic!("sent"),
        }
        // Allowed, the same name is tried (nothing listens on port 9): worth retrying.
        let cfg = NotifyConfig {
            allow: vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()],
            ..Default::default()
        };
        let n = Notifier::new(cfg, b"k").unwrap();
        assert!(matches!(failure_of(&n).await, Outcome::Transient(_)));
    }
}
