//! `sentinel serve`: the platform server. `app(state)` builds the router (tests call it with no
//! socket); `run(config)` opens the store, bootstraps the first admin key and serves until asked
//! to stop.
//!
//! Health and readiness, Prometheus metrics, the OpenAPI document, API keys (HMAC-SHA256 at rest,
//! scopes, batched "last used"), `users/me`, policies with validation, versions, diffs, history and
//! sync, central decisions with reservations and halts ([`central`]), and ingest with the
//! interventions and agents read back from it ([`ingest`]).

pub mod approvals;
pub mod background;
pub mod central;
pub mod ingest;
pub mod journal;
pub mod links;
pub mod notify;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{FromRequestParts, Path as UrlPath, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hmac::{KeyInit, Mac};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use parking_lot::{Mutex, RwLock};
use sentinel_core::{Engine, PolicyDoc, PolicySet};
use sentinel_store::{ApiKey, NewApiKey, Scope, Store, StoreError, StoredPolicy};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::TraceLayer;

/// Largest request body accepted.
pub const BODY_LIMIT: usize = 1024 * 1024;

#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    /// `sqlite://…` or `postgres://…`; the default is `sqlite://<data_dir>/sentinel.db`.
    pub database_url: Option<String>,
    pub listen: SocketAddr,
    pub request_timeout: Duration,
    /// How long a connection may take to send a request's head, counted from its opening or from
    /// the answer before: a slow or idle client is disconnected after it.
    pub idle_timeout: Duration,
    /// The key-hashing secret; default `<data_dir>/server-secret`, created on first start. Every
    /// replica of a fleet must use the same one.
    pub secret_file: Option<PathBuf>,
    /// Origins allowed to call the API from a browser. Empty (the default) sends no CORS headers.
    pub cors_origins: Vec<String>,
    /// Email, webhook targets and approval links.
    pub notify: notify::NotifyConfig,
}

impl Config {
    pub fn database_url(&self) -> String {
        self.database_url.clone().unwrap_or_else(|| format!("sqlite://{}", self.data_dir.join("sentinel.db").display()))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("{what} `{path}`: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("the stored policies cannot be used: {}", .0.detail)]
    Policies(ApiError),
    #[error(
        "another `sentinel serve` already uses `{0}`; a SQLite database has one server (use PostgreSQL for several)"
    )]
    Locked(PathBuf),
    #[error(
        "this server's secret (`{0}`) differs from the one the database was set up with, so no API key would work; \
         give every replica the same secret file (copy `server-secret` from the first replica's data directory, or pass --secret-file)"
    )]
    SecretMismatch(PathBuf),
    #[error("the server secret cannot be used as an HMAC key: {0}")]
    Secret(String),
    #[error("invalid CORS origin `{0}`; give a full origin such as https://console.example.com")]
    Cors(String),
    #[error(transparent)]
    Notify(#[from] notify::NotifyError),
}

/// How long an authenticated key is trusted without asking the database again. Changes made on
/// this server apply at once; changes made on another replica apply within this time.
pub const KEY_CACHE_TTL: Duration = Duration::from_secs(1);

/// Authenticated keys by hash, with when they were read.
type KeyCache = HashMap<Vec<u8>, (Arc<ApiKey>, Instant)>;

/// Shared by every request. One reference count to clone: axum clones the state for every
/// extractor of every request.
#[derive(Clone)]
pub struct AppState(Arc<StateInner>);

impl std::ops::Deref for AppState {
    type Target = StateInner;
    fn deref(&self) -> &StateInner {
        &self.0
    }
}

/// What [`AppState`] holds.
pub struct StateInner {
    pub store: Store,
    /// HMAC-SHA256 keyed with the server secret, ready to clone: keying costs two SHA-256 blocks,
    /// and every request hashes its key.
    key_mac: hmac::Hmac<sha2::Sha256>,
    /// Keys used since the last flush, with when; written in one batch, never per request.
    touches: Arc<Mutex<HashMap<String, i64>>>,
    /// Recently authenticated keys by hash.
    keys: Arc<RwLock<KeyCache>>,
    engine: Arc<Engine>,
    pub(crate) authority: Arc<central::Authority>,
    pub(crate) activity: Arc<central::Activity>,
    /// What the stored policies looked like when they were last compiled.
    policy_mark: Arc<Mutex<(i64, i64)>>,
    /// Wakes long-polls when an approval is decided on this server.
    pub(crate) approvals_changed: Arc<tokio::sync::Notify>,
    /// Set when the server begins to stop: long-polls answer at once, so shutdown never waits on them.
    pub(crate) shutting_down: Arc<std::sync::atomic::AtomicBool>,
    /// The longest a long-poll is held, in milliseconds, kept below the request timeout.
    long_poll_max_ms: std::sync::atomic::AtomicU64,
    pub(crate) notifier: Arc<notify::Notifier>,
    /// The stored policies' alert settings, refreshed with the policies.
    pub(crate) alerts: Arc<RwLock<notify::PolicyAlerts>>,
}

/// The process's Prometheus recorder (installed once, shared by every server in the process).
pub fn prometheus() -> Option<&'static PrometheusHandle> {
    static PROM: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    PROM.get_or_init(|| {
        let buckets = [0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0];
        let handle = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &buckets)
            .ok()?
            .install_recorder()
            .ok()?;
        // Histogram samples wait in a buffer until a scrape or an upkeep folds them into their
        // buckets; without a scraper that buffer would grow with every decision.
        let h = handle.clone();
        let upkeep = std::thread::Builder::new().name("sentinel-metrics".into()).spawn(move || {
            loop {
                std::thread::sleep(Duration::from_secs(5));
                h.run_upkeep();
            }
        });
        if let Err(e) = upkeep {
            tracing::warn!(error = %e, "cannot start the metrics upkeep thread; histograms are folded only when scraped");
        }
        Some(handle)
    })
    .as_ref()
}

/// The enabled stored policies, as core documents (alert settings are the server's, not the engine's).
async fn stored_docs(store: &Store) -> Result<Vec<PolicyDoc>, ApiError> {
    let mut docs = Vec::new();
    for p in store.list_policies().await? {
        let mut body = p.body;
        if let Value::Object(m) = &mut body {
            m.remove("alerts");
        }
        let doc: PolicyDoc = serde_json::from_value(body)
            .map_err(|e| ApiError::internal(format!("stored policy `{}` no longer parses: {e}", p.name)))?;
        docs.push(doc);
    }
    Ok(docs)
}

/// The alert settings of the enabled policies, by name, with the agent an agent-scoped policy is for.
async fn policy_alerts(store: &Store) -> Result<notify::PolicyAlerts, ApiError> {
    let mut out = notify::PolicyAlerts::default();
    for p in store.list_policies().await? {
        let enabled = p.body.get("enabled").and_then(Value::as_bool).unwrap_or(true);
        let Some(a) = p.body.get("alerts").cloned().and_then(|a| serde_json::from_value::<Alerts>(a).ok()) else {
            continue;
        };
        if !enabled {
            continue;
        }
        // Global policies apply to every agent (`None`); a run-scoped one to no agent as a whole.
        let agent = match p.body.get("scope").and_then(Value::as_str) {
            Some("agent") => p.body.get("agent_id").and_then(Value::as_str).map(str::to_string),
            Some("run") => Some(String::new()),
            _ => None,
        };
        out.by_policy.insert(p.name, (a, agent));
    }
    Ok(out)
}

fn compile_docs(docs: Vec<PolicyDoc>) -> Result<PolicySet, ApiError> {
    PolicySet::compile(docs).map_err(|e| {
        ApiError::internal(format!(
            "stored policies do not compile together: {}",
            e.first().map(|x| x.message.clone()).unwrap_or_default()
        ))
    })
}

impl AppState {
    /// Builds the state over an open store: compiles the stored policies and, on SQLite, rebuilds
    /// the decision counters from the database.
    pub async fn open(store: Store, secret: Vec<u8>) -> Result<Self, ServerError> {
        Self::open_with(store, secret, notify::NotifyConfig::default()).await
    }

    /// As [`AppState::open`], with how notifications are sent.
    pub async fn open_with(
        store: Store,
        secret: Vec<u8>,
        notify_cfg: notify::NotifyConfig,
    ) -> Result<Self, ServerError> {
        prometheus();
        let notifier = Arc::new(notify::Notifier::new(notify_cfg, &secret)?);
        let alerts = policy_alerts(&store).await.map_err(ServerError::Policies)?;
        let mark = store.policy_mark().await?;
        let set =
            compile_docs(stored_docs(&store).await.map_err(ServerError::Policies)?).map_err(ServerError::Policies)?;
        let engine = Arc::new(Engine::new(set));
        let authority = central::Authority::open(&store, &engine).await?;
        let activity = Arc::new(central::Activity::default());
        store.spawn_checkpointer();
        let state = AppState(Arc::new(StateInner {
            store,
            key_mac: <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(&secret)
                .map_err(|e| ServerError::Secret(e.to_string()))?,
            touches: Arc::default(),
            keys: Arc::default(),
            engine,
            authority: Arc::new(authority),
            activity,
            policy_mark: Arc::new(Mutex::new(mark)),
            approvals_changed: Arc::default(),
            shutting_down: Arc::default(),
            long_poll_max_ms: std::sync::atomic::AtomicU64::new(25_000),
            notifier,
            alerts: Arc::default(),
        }));
        state.set_alerts(alerts);
        central::spawn_activity(state.clone());
        Ok(state)
    }

    /// Starts delivering notifications (and escalating approvals, and checking budget thresholds).
    pub fn spawn_notifications(&self) -> tokio::task::JoinHandle<()> {
        notify::spawn_dispatcher(self.clone())
    }

    /// The longest a long-poll is held.
    pub fn long_poll_max(&self) -> Duration {
        Duration::from_millis(self.long_poll_max_ms.load(std::sync::atomic::Ordering::Relaxed))
    }

    pub fn set_long_poll_max(&self, d: Duration) {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        self.long_poll_max_ms.store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn notifier(&self) -> &notify::Notifier {
        &self.notifier
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Recompiles the stored policies if they changed (here or on another replica).
    pub async fn reload_policies(&self) -> Result<bool, ApiError> {
        let mark = self.store.policy_mark().await?;
        if *self.policy_mark.lock() == mark {
            return Ok(false);
        }
        let set = compile_docs(stored_docs(&self.store).await?)?;
        tracing::info!(version = %set.version(), "policies reloaded");
        self.engine.replace_policies(set);
        self.set_alerts(policy_alerts(&self.store).await?);
        // A raised limit ends the pauses it now covers.
        let s = self.clone();
        tokio::spawn(async move {
            if let Err(e) = approvals::resolve_pauses(&s).await {
                tracing::warn!(error = %e.detail, "cannot re-check paused calls");
            }
        });
        *self.policy_mark.lock() = mark;
        Ok(true)
    }

    /// Installs the policies' alert settings; decisions note their spend only if some policy has a threshold.
    fn set_alerts(&self, alerts: notify::PolicyAlerts) {
        let any = alerts.by_policy.values().any(|(a, _)| a.threshold_percent.is_some());
        self.notifier.thresholds_on.store(any, std::sync::atomic::Ordering::Relaxed);
        *self.alerts.write() = alerts;
    }

    fn forget_keys(&self) {
        self.keys.write().clear();
    }

    /// The stored form of a key: HMAC-SHA256 under the server secret.
    pub fn hash_key(&self, plaintext: &str) -> Vec<u8> {
        let mut mac = self.key_mac.clone();
        mac.update(plaintext.as_bytes());
        mac.finalize().into_bytes().to_vec()
    }

    /// Writes pending "last used" times. Called periodically and at shutdown.
    pub async fn flush_touches(&self) -> Result<(), StoreError> {
        let pending: Vec<(String, i64)> = std::mem::take(&mut *self.touches.lock()).into_iter().collect();
        self.store.touch_keys(&pending).await
    }

    /// Creates a key and returns its plaintext (shown once) with the stored record.
    pub async fn issue_key(
        &self,
        name: &str,
        scope: Scope,
        agent_id: Option<String>,
    ) -> Result<(String, ApiKey), ApiError> {
        let mut raw = [0u8; 16];
        getrandom::fill(&mut raw).map_err(|e| ApiError::internal(format!("no randomness: {e}")))?;
        let plaintext = format!("as_{}", hex::encode(raw));
        let prefix: String = plaintext.chars().take(12).collect();
        let rec = self
            .store
            .create_key(NewApiKey { prefix, hash: self.hash_key(&plaintext), name: name.into(), scope, agent_id })
            .await?;
        Ok((plaintext, rec))
    }
}

// ---------------------------------------------------------------------------------------------
// Errors: application/problem+json

/// One field-level problem.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

/// An error response in RFC 9457 problem+json form. A 5xx never carries internal detail.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub title: &'static str,
    pub detail: String,
    pub errors: Vec<FieldError>,
}

impl ApiError {
    pub fn new(status: StatusCode, title: &'static str, detail: impl Into<String>) -> Self {
        ApiError { status, title, detail: detail.into(), errors: Vec::new() }
    }
    pub(crate) fn unavailable(detail: &str) -> Self {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "Unavailable", detail)
    }
    fn invalid(detail: impl Into<String>, errors: Vec<FieldError>) -> Self {
        ApiError { status: StatusCode::UNPROCESSABLE_ENTITY, title: "Invalid request", detail: detail.into(), errors }
    }
    pub(crate) fn field(path: &str, message: impl Into<String>) -> Self {
        let message = message.into();
        Self::invalid(format!("`{path}`: {message}"), vec![FieldError { path: path.into(), message }])
    }
    /// A 422 for `field`, whose `value` is not among `allowed`.
    pub(crate) fn not_one_of(field: &str, value: &str, allowed: &[&str]) -> Self {
        Self::field(field, format!("`{value}` is not one of {}", allowed.join(", ")))
    }
    pub(crate) fn internal(detail: String) -> Self {
        tracing::error!(%detail, "internal error");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "Internal error", "the server failed; see its log")
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(what) => {
                ApiError::new(StatusCode::NOT_FOUND, "Not found", format!("{what} does not exist"))
            }
            StoreError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, "Conflict", m),
            StoreError::Invalid(m) => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "Invalid request", m),
            other => ApiError::internal(other.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({
            "type": "about:blank",
            "title": self.title,
            "status": self.status.as_u16(),
            "detail": self.detail,
            "errors": self.errors,
        });
        let mut r = (self.status, Json(body)).into_response();
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        r
    }
}

/// A deserialization error as a 422 that names the field (`prefix` is prepended to its path) and
/// suggests the nearest valid key.
fn field_error(prefix: &str, path: &serde_path_to_error::Path, err: &impl std::fmt::Display) -> ApiError {
    let p = path.to_string();
    let mut p = if p == "." { String::new() } else { p };
    // A missing field is reported at its parent; the path names the field itself.
    let text = err.to_string();
    if let Some(field) = text.strip_prefix("missing field `").and_then(|r| r.split('`').next()) {
        p = if p.is_empty() { field.to_string() } else { format!("{p}.{field}") };
    }
    let full = match (prefix.is_empty(), p.is_empty()) {
        (true, _) => p,
        (false, true) => prefix.to_string(),
        (false, false) => format!("{prefix}.{p}"),
    };
    let message = sentinel_core::load::improve_message(&text);
    if full.is_empty() {
        ApiError::invalid(message.clone(), vec![FieldError { path: full, message }])
    } else {
        ApiError::field(&full, message)
    }
}

/// What every JSON body must be beyond its type: an object (a struct's fields are never read by
/// position from an array), without a key given twice in any object (a policy whose second
/// `denied_actions` would silently replace the first, or arguments whose rules see one value and
/// the tool another), and without NUL in any string (PostgreSQL's text cannot hold it). Read with
/// [`strict_value`], which checks all of it.
struct Checked;

impl<'de> Deserialize<'de> for Checked {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        strict_value(d).map(|_| Checked)
    }
}

/// A value refused as it is read, so that the error's path ends at its key.
struct Refuse(&'static str);

impl<'de> serde::de::DeserializeSeed<'de> for Refuse {
    type Value = Value;
    fn deserialize<D: serde::Deserializer<'de>>(self, _: D) -> Result<Value, D::Error> {
        Err(serde::de::Error::custom(self.0))
    }
}

fn no_nul<E: serde::de::Error>(v: &str) -> Result<(), E> {
    if v.contains('\0') { Err(E::custom("must not contain the NUL character")) } else { Ok(()) }
}

/// A JSON value built like `serde_json::Value`'s own, but refusing a key given twice in an object
/// (`serde_json::Value` keeps the last) and NUL in a key or string. For the free-form parts of the
/// bodies read as [`TypedJson`] (`/decide`'s arguments and context), which skip [`check_strict`].
pub(crate) fn strict_value<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Value, D::Error> {
    d.deserialize_any(ValueVisitor)
}

/// [`strict_value`] for an optional field (`null` is `None`, as for `Option<Value>`).
pub(crate) fn strict_value_opt<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    strict_value(d).map(|v| if v.is_null() { None } else { Some(v) })
}

struct ValueVisitor;

impl<'de> serde::de::DeserializeSeed<'de> for ValueVisitor {
    type Value = Value;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(ValueVisitor)
    }
}

impl<'de> serde::de::Visitor<'de> for ValueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("JSON")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Value, E> {
        no_nul(v)?;
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Value, E> {
        no_nul(&v)?;
        Ok(Value::String(v))
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
        while let Some(v) = seq.next_element_seed(ValueVisitor)? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = serde_json::Map::new();
        while let Some(k) = map.next_key::<String>()? {
            if k.contains('\0') {
                // Refused at the key's value, whose path names the key.
                map.next_value_seed(Refuse("a key must not contain the NUL character"))?;
            }
            match out.entry(k) {
                serde_json::map::Entry::Occupied(_) => {
                    map.next_value_seed(Refuse("this key is given more than once in its object"))?;
                }
                serde_json::map::Entry::Vacant(slot) => {
                    slot.insert(map.next_value_seed(ValueVisitor)?);
                }
            }
        }
        Ok(Value::Object(out))
    }
}

/// Refuses a body that is not a JSON object.
fn check_object(bytes: &[u8]) -> Result<(), ApiError> {
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::invalid(
            "the body must be a JSON object",
            vec![FieldError { path: String::new(), message: "the body must be a JSON object".into() }],
        ));
    }
    Ok(())
}

/// Checks a whole body (see [`Checked`]); the error names where.
fn check_strict(bytes: &[u8]) -> Result<(), ApiError> {
    check_object(bytes)?;
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    match serde_path_to_error::deserialize::<_, Checked>(de) {
        Ok(Checked) => Ok(()),
        Err(e) => Err(field_error("", e.path(), e.inner())),
    }
}

/// Whether the operation at `method` and `path` (its route, as the OpenAPI document spells it)
/// takes query parameters. Read off the generated document once, so the two cannot disagree.
fn takes_query(method: &axum::http::Method, path: &str) -> bool {
    static TAKING: OnceLock<Vec<(String, String)>> = OnceLock::new();
    let taking = TAKING.get_or_init(|| {
        let doc = serde_json::to_value(openapi_doc()).unwrap_or_default();
        let mut out = Vec::new();
        for (path, item) in doc.get("paths").and_then(Value::as_object).into_iter().flatten() {
            for (method, op) in item.as_object().into_iter().flatten() {
                let mut params = op.get("parameters").and_then(Value::as_array).into_iter().flatten();
                if params.any(|p| p.get("in").is_some_and(|i| i == "query")) {
                    out.push((method.to_uppercase(), path.clone()));
                }
            }
        }
        out
    });
    // A `HEAD` is answered by the route's `GET`, parameters included.
    let method = if method == axum::http::Method::HEAD { "GET" } else { method.as_str() };
    taking.iter().any(|(m, p)| m == method && p == path)
}

/// For an operation that takes no query parameters, any query string is refused (a filter that
/// looks applied but is ignored would mislead). Checked by [`Caller`], which every API request
/// passes; the operations that take parameters check them with [`ApiQuery`].
fn refuse_query(parts: &Parts) -> Result<(), ApiError> {
    let Some(q) = parts.uri.query().filter(|q| !q.is_empty()) else { return Ok(()) };
    let route = parts.extensions.get::<axum::extract::MatchedPath>().map(axum::extract::MatchedPath::as_str);
    if route.is_some_and(|r| takes_query(&parts.method, r)) {
        return Ok(());
    }
    let name = q.split(['=', '&']).next().unwrap_or(q);
    Err(ApiError::field(name, format!("this endpoint takes no query parameters; got `{q}`")))
}

/// A query string whose errors (wrong types, unknown parameters) come back as problem+json naming
/// the parameter, like a body's.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> axum::extract::FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, _: &S) -> Result<Self, ApiError> {
        let query = parts.uri.query().unwrap_or_default();
        let de = serde_urlencoded::Deserializer::new(url::form_urlencoded::parse(query.as_bytes()));
        serde_path_to_error::deserialize::<_, T>(de).map(ApiQuery).map_err(|e| field_error("", e.path(), e.inner()))
    }
}

/// A JSON body whose errors (syntax, wrong types, unknown fields) come back as problem+json with
/// the field path. Besides its type, the whole body is checked as [`Checked`] says.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> axum::extract::FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        read_json(req, state, true).await.map(ApiJson)
    }
}

/// [`ApiJson`] for the per-call paths (`/decide`, `/settle`, `/ledger`), without the second pass
/// over the body: for a type whose fields serde refuses when given twice (every derived struct)
/// and whose free-form parts are read with [`strict_value`]. It still refuses a body that is not
/// an object, and runs the full check when the raw body holds an escaped NUL (the only way a
/// string can contain one).
pub struct TypedJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> axum::extract::FromRequest<S> for TypedJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        read_json(req, state, false).await.map(TypedJson)
    }
}

/// The route whose bodies may be larger than [`BODY_LIMIT`].
const LEDGER_PATH: &str = "/api/v1/ledger";

/// Reads a JSON body as `T`; `full` runs [`check_strict`] on every body, else only where needed.
async fn read_json<T: DeserializeOwned, S: Send + Sync>(
    req: axum::extract::Request,
    state: &S,
    full: bool,
) -> Result<T, ApiError> {
    let is_json = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !is_json {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Unsupported media type",
            "send `Content-Type: application/json`",
        ));
    }
    // For the message only: the limit itself is the route's `DefaultBodyLimit`.
    let limit = if req.uri().path() == LEDGER_PATH { crate::ingest::INGEST_BODY_LIMIT } else { BODY_LIMIT };
    let bytes = <Bytes as axum::extract::FromRequest<S>>::from_request(req, state).await.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "Payload too large",
                format!("this endpoint takes request bodies of at most {limit} bytes"),
            )
        } else {
            ApiError::new(StatusCode::BAD_REQUEST, "Bad request", e.body_text())
        }
    })?;
    // Well-formed bodies take the plain parser; only a failure pays for tracking the field path.
    let plain = match serde_json::from_slice::<T>(&bytes) {
        Ok(v) => {
            if full || memchr::memmem::find(&bytes, b"\\u0000").is_some() {
                check_strict(&bytes)?;
            } else {
                check_object(&bytes)?;
            }
            return Ok(v);
        }
        Err(e) => e,
    };
    let de = &mut serde_json::Deserializer::from_slice(&bytes);
    match serde_path_to_error::deserialize::<_, T>(de) {
        // The value parsed, but something follows it.
        Ok(_) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "Malformed JSON",
            sentinel_core::load::improve_message(&plain.to_string()),
        )),
        Err(e) if e.inner().is_syntax() || e.inner().is_eof() => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "Malformed JSON",
            sentinel_core::load::improve_message(&e.into_inner().to_string()),
        )),
        Err(e) => Err(field_error("", e.path(), e.inner())),
    }
}

// ---------------------------------------------------------------------------------------------
// Authentication

/// The authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller(pub Arc<ApiKey>);

impl Caller {
    pub(crate) fn actor(&self) -> String {
        format!("key:{} ({})", self.0.prefix, self.0.name)
    }
    /// Only an `agent` key is restricted: to its own agent's data and calls.
    pub(crate) fn may_act_for(&self, agent: &str) -> bool {
        self.0.agent_id.as_deref().is_none_or(|own| own == agent)
    }

    /// 403, naming `what` and its agent, unless this caller may act for `agent`.
    pub(crate) fn must_own(&self, what: &str, agent: &str) -> Result<(), ApiError> {
        match self.0.agent_id.as_deref() {
            Some(own) if own != agent => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "Forbidden",
                format!("{what} belongs to agent `{agent}`; this key is bound to `{own}`"),
            )),
            _ => Ok(()),
        }
    }

    /// The agent a request is about: an agent key's own (asking for another is 403), else the one asked for.
    pub(crate) fn agent_scope(&self, asked: Option<&str>) -> Result<Option<String>, ApiError> {
        if let (Some(own), Some(a)) = (self.0.agent_id.as_deref(), asked)
            && own != a
        {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "Forbidden",
                format!("this key is bound to agent `{own}`, not `{a}`"),
            ));
        }
        Ok(self.0.agent_id.clone().or_else(|| asked.map(str::to_string)))
    }

    pub(crate) fn require(&self, allowed: &[Scope]) -> Result<(), ApiError> {
        if allowed.contains(&self.0.scope) {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "Forbidden",
                format!("a `{}` key may not do this; it needs {}", self.0.scope.as_str(), scopes(allowed)),
            ))
        }
    }
}

fn scopes(s: &[Scope]) -> String {
    s.iter().map(|x| format!("`{}`", x.as_str())).collect::<Vec<_>>().join(" or ")
}

fn unauthorized(detail: &str) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "Unauthorized", detail)
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        // Checked here, where every API request passes: an id or filter with NUL in it would reach
        // the database, whose text (on PostgreSQL) cannot hold it.
        if parts.uri.path_and_query().is_some_and(|pq| pq.as_str().contains("%00")) {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "Bad request",
                "the path or query contains the NUL character (`%00`), which no id or filter may hold",
            ));
        }
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .or_else(|| parts.headers.get("x-api-key").and_then(|v| v.to_str().ok()))
            .map(str::trim)
            .ok_or_else(|| unauthorized("send an API key as `Authorization: Bearer as_…` or `X-API-Key: as_…`"))?;
        let hash = state.hash_key(token);
        let cached =
            state.keys.read().get(&hash).filter(|(_, at)| at.elapsed() < KEY_CACHE_TTL).map(|(k, _)| k.clone());
        let key = match cached {
            Some(k) => k,
            None => {
                let Some(key) = state.store.key_by_hash(&hash).await? else {
                    return Err(unauthorized("the API key is not valid"));
                };
                let key = Arc::new(key);
                let mut w = state.keys.write();
                if w.len() > 10_000 {
                    w.clear();
                }
                w.insert(hash, (Arc::clone(&key), Instant::now()));
                key
            }
        };
        if !key.active {
            return Err(unauthorized("the API key is deactivated"));
        }
        // After the key: a caller without a valid one learns nothing but that.
        refuse_query(parts)?;
        let now = sentinel_store::now_ms();
        let mut t = state.touches.lock();
        match t.get_mut(&key.id) {
            Some(at) => *at = now,
            None => {
                t.insert(key.id.clone(), now);
            }
        }
        drop(t);
        Ok(Caller(key))
    }
}

// ---------------------------------------------------------------------------------------------
// Handlers

#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, description = "Alive")))]
async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

#[utoipa::path(get, path = "/readyz", tag = "operations", responses((status = 200, description = "The database answers"), (status = 503)))]
async fn readyz(State(s): State<AppState>) -> Response {
    match s.store.ping().await {
        Ok(()) => Json(json!({"status": "ready", "database": s.store.backend()})).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "not ready");
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "Not ready", "the database does not answer").into_response()
        }
    }
}

#[utoipa::path(get, path = "/api/v1/users/me", tag = "keys", responses((status = 200, description = "The calling key"), (status = 401)))]
async fn me(caller: Caller) -> Json<Value> {
    let k = caller.0;
    Json(json!({"key_id": k.id, "prefix": k.prefix, "name": k.name, "scope": k.scope, "agent_id": k.agent_id}))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct NewKeyBody {
    #[serde(default)]
    name: String,
    /// `admin`, `agent` (needs `agent_id`) or `readonly`.
    #[schema(value_type = String)]
    scope: Scope,
    #[serde(default)]
    agent_id: Option<String>,
}

#[utoipa::path(post, path = "/api/v1/keys", request_body = NewKeyBody, tag = "keys", responses((status = 201, description = "The key, with its plaintext shown once"), (status = 403)))]
async fn create_key(
    State(s): State<AppState>,
    caller: Caller,
    ApiJson(b): ApiJson<NewKeyBody>,
) -> Result<Response, ApiError> {
    caller.require(&[Scope::Admin])?;
    match (&b.scope, &b.agent_id) {
        (Scope::Agent, None) => return Err(ApiError::field("agent_id", "an `agent` key must be bound to one agent")),
        (Scope::Agent, Some(a)) if a.trim().is_empty() => return Err(ApiError::field("agent_id", "must not be empty")),
        // The ids `/decide` accepts, or the key could never decide anything.
        (Scope::Agent, Some(a)) => central::check_id("agent_id", a)?,
        (Scope::Admin | Scope::Readonly, Some(_)) => {
            return Err(ApiError::field("agent_id", "only `agent` keys are bound to an agent"));
        }
        _ => {}
    }
    if b.name.len() > 200 || b.name.chars().any(char::is_control) {
        return Err(ApiError::field("name", "must be at most 200 characters, without control characters"));
    }
    let (plaintext, rec) = s.issue_key(&b.name, b.scope, b.agent_id).await?;
    let mut body = serde_json::to_value(&rec).unwrap_or_default();
    if let Value::Object(m) = &mut body {
        m.insert("key".into(), Value::String(plaintext));
    }
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

#[utoipa::path(get, path = "/api/v1/keys", tag = "keys", responses((status = 200, description = "Keys: prefix, name, scope, created, last used, active")))]
async fn list_keys(State(s): State<AppState>, caller: Caller) -> Result<Json<Vec<ApiKey>>, ApiError> {
    caller.require(&[Scope::Admin])?;
    s.flush_touches().await?;
    Ok(Json(s.store.list_keys().await?))
}

async fn set_active(s: &AppState, caller: &Caller, id: &str, active: bool) -> Result<Json<Value>, ApiError> {
    caller.require(&[Scope::Admin])?;
    s.store.set_key_active(id, active).await?;
    s.forget_keys();
    Ok(Json(json!({"id": id, "active": active})))
}

#[utoipa::path(post, path = "/api/v1/keys/{id}/activate", tag = "keys", responses((status = 200), (status = 404)))]
async fn activate_key(
    State(s): State<AppState>,
    caller: Caller,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<Value>, ApiError> {
    set_active(&s, &caller, &id, true).await
}

#[utoipa::path(post, path = "/api/v1/keys/{id}/deactivate", tag = "keys", responses((status = 200), (status = 404)))]
async fn deactivate_key(
    State(s): State<AppState>,
    caller: Caller,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<Value>, ApiError> {
    set_active(&s, &caller, &id, false).await
}

#[utoipa::path(delete, path = "/api/v1/keys/{id}", tag = "keys", responses((status = 204), (status = 404)))]
async fn delete_key(
    State(s): State<AppState>,
    caller: Caller,
    UrlPath(id): UrlPath<String>,
) -> Result<StatusCode, ApiError> {
    caller.require(&[Scope::Admin])?;
    s.store.delete_key(&id).await?;
    s.forget_keys();
    Ok(StatusCode::NO_CONTENT)
}

/// Alert settings of a policy (the platform's policy builder).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Alerts {
    #[serde(default)]
    pub emails: Vec<String>,
    #[serde(default)]
    pub threshold_percent: Option<f64>,
    #[serde(default)]
    pub alert_on_failure: bool,
}

/// Validates a policy body: the core's policy format (every field, unknown keys rejected) plus `alerts`.
fn validate_policy(mut body: Value) -> Result<(String, Value), ApiError> {
    let Value::Object(map) = &mut body else {
        return Err(ApiError::invalid(
            "a policy must be a JSON object",
            vec![FieldError { path: String::new(), message: "expected an object".into() }],
        ));
    };
    let alerts = map.remove("alerts");
    let doc: PolicyDoc =
        serde_path_to_error::deserialize(body.clone()).map_err(|e| field_error("", e.path(), e.inner()))?;
    let Some(name) = doc.name.clone().filter(|n| !n.trim().is_empty()) else {
        return Err(ApiError::field("name", "a policy needs a unique, non-empty `name`"));
    };
    if name.len() > 200 || name.chars().any(char::is_control) {
        return Err(ApiError::field("name", "must be at most 200 characters, without control characters"));
    }
    // Action names as `/decide` takes them: a longer one could never match a call.
    let allowed = doc.allowed_actions.as_deref().unwrap_or_default();
    for (field, list) in [("denied_actions", doc.denied_actions.as_slice()), ("allowed_actions", allowed)] {
        if let Some((i, _)) = list.iter().enumerate().find(|(_, a)| a.len() > 512) {
            return Err(ApiError::field(&format!("{field}[{i}]"), "must be at most 512 characters"));
        }
    }
    if !doc.policies.is_empty() {
        return Err(ApiError::field("policies", "store each policy separately; a stored policy cannot hold others"));
    }
    if let Some(a) = &alerts {
        let parsed: Alerts =
            serde_path_to_error::deserialize(a.clone()).map_err(|e| field_error("alerts", e.path(), e.inner()))?;
        if let Some(t) = parsed.threshold_percent
            && !(t > 0.0 && t <= 100.0)
        {
            return Err(ApiError::field("alerts.threshold_percent", format!("must be in (0, 100], got {t}")));
        }
        if let Some(bad) = parsed.emails.iter().find(|e| !e.contains('@')) {
            return Err(ApiError::field("alerts.emails", format!("`{bad}` is not an email address")));
        }
    }
    if let Err(errs) = PolicySet::compile(vec![doc.clone()]) {
        let message = errs.iter().map(|e| e.message.clone()).collect::<Vec<_>>().join("; ");
        return Err(ApiError::invalid(message.clone(), vec![FieldError { path: String::new(), message }]));
    }
    let mut stored = serde_json::to_value(&doc).unwrap_or_default();
    if let (Value::Object(m), Some(a)) = (&mut stored, alerts) {
        m.insert("alerts".into(), a);
    }
    Ok((name, stored))
}

fn policy_json(p: StoredPolicy) -> Value {
    let mut v = p.body;
    if let Value::Object(m) = &mut v {
        m.insert("id".into(), Value::String(p.id));
        m.insert("version".into(), json!(p.version));
        m.insert("created_at".into(), json!(p.created_at));
        m.insert("updated_at".into(), json!(p.updated_at));
        m.insert("updated_by".into(), Value::String(p.updated_by));
    }
    v
}

#[utoipa::path(post, path = "/api/v1/policies", tag = "policies", request_body(content = Object, description = "A policy document (the policy file format, as JSON) with a unique `name`, plus `alerts`"), responses((status = 201, description = "Created, version 1"), (status = 409), (status = 422)))]
async fn create_policy(
    State(s): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<Value>,
) -> Result<Response, ApiError> {
    caller.require(&[Scope::Admin])?;
    let (name, stored) = validate_policy(body)?;
    let p = s.store.create_policy(&name, &stored, &caller.actor()).await?;
    s.reload_policies().await?;
    Ok((StatusCode::CREATED, Json(policy_json(p))).into_response())
}

#[utoipa::path(get, path = "/api/v1/policies", tag = "policies", responses((status = 200)))]
async fn list_policies(State(s): State<AppState>, caller: Caller) -> Result<Json<Vec<Value>>, ApiError> {
    caller.require(&[Scope::Admin, Scope::Readonly])?;
    Ok(Json(s.store.list_policies().await?.into_iter().map(policy_json).collect()))
}

#[utoipa::path(get, path = "/api/v1/policies/{id}", tag = "policies", responses((status = 200), (status = 404)))]
async fn get_policy(
    State(s): State<AppState>,
    caller: Caller,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require(&[Scope::Admin, Scope::Readonly])?;
    Ok(Json(policy_json(s.store.get_policy(&id).await?)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateQuery {
    expected_version: Option<i64>,
}

#[utoipa::path(put, path = "/api/v1/policies/{id}", tag = "policies", params(("expected_version" = Option<i64>, Query, description = "Refuse the update unless the policy is at this version")), request_body(content = Object), responses((status = 200, description = "The new version"), (status = 409), (status = 422)))]
async fn update_policy(
    State(s): State<AppState>,
    caller: Caller,
    UrlPath(id): UrlPath<String>,
    ApiQuery(q): ApiQuery<UpdateQuery>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Json<Value>, ApiError> {
    caller.require(&[Scope::Admin])?;
    let (name, stored) = validate_policy(body)?;
    let p = s.store.update_policy(&id, &name, &stored, &caller.actor(), q.expected_version).await?;
    s.reload_policies().await?;
    Ok(Json(policy_json(p)))
}

#[utoipa::path(delete, path = "/api/v1/policies/{id}", tag = "policies", responses((status = 204), (status = 404)))]
async fn delete_policy(
    State(s): State<AppState>,
    caller: Caller,
    UrlPath(id): UrlPath<String>,
) -> Result<StatusCode, ApiError> {
    caller.require(&[Scope::Admin])?;
    s.store.delete_policy(&id, &caller.actor()).await?;
    s.reload_policies().await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/api/v1/policies/{id}/history", tag = "policies", responses((status = 200, description = "Every version: who, when, and the diff")))]
async fn policy_history(
    State(s): State<AppState>,
    caller: Caller,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require(&[Scope::Admin, Scope::Readonly])?;
    Ok(Json(serde_json::to_value(s.store.policy_history(&id).await?).unwrap_or_default()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SyncQuery {
    agent_id: Option<String>,
    run_id: Option<String>,
}

/// The enabled policies that apply to an agent and run (global, the agent's, the run's), with an
/// ETag over their content; `If-None-Match` with the same tag gets 304. An agent key reads only its own.
#[utoipa::path(get, path = "/api/v1/policies/sync", tag = "policies", params(("agent_id" = Option<String>, Query), ("run_id" = Option<String>, Query)), responses((status = 200, description = "The policies that apply, with an ETag"), (status = 304, description = "Unchanged since If-None-Match")))]
async fn policy_sync(
    State(s): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<SyncQuery>,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    caller.require(&[Scope::Admin, Scope::Readonly, Scope::Agent])?;
    for (f, v) in [("agent_id", &q.agent_id), ("run_id", &q.run_id)] {
        if let Some(v) = v {
            central::check_id(f, v)?;
        }
    }
    let agent = caller.agent_scope(q.agent_id.as_deref())?;
    let docs: Vec<PolicyDoc> = stored_docs(&s.store)
        .await?
        .into_iter()
        .filter(|doc| {
            doc.enabled
                && match doc.scope {
                    sentinel_core::model::Scope::Global => true,
                    sentinel_core::model::Scope::Agent => doc.agent_id.is_some() && doc.agent_id == agent,
                    sentinel_core::model::Scope::Run => doc.run_id.is_some() && doc.run_id == q.run_id,
                }
        })
        .collect();
    let set = compile_docs(docs.clone())?;
    let etag = format!("\"{}\"", set.version());
    let not_modified = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        // Weak comparison, as RFC 9110 has it for If-None-Match: `W/"x"` matches `"x"`.
        .is_some_and(|v| v.split(',').map(|t| t.trim()).any(|t| t == "*" || t.strip_prefix("W/").unwrap_or(t) == etag));
    let tag = HeaderValue::from_str(&etag).map_err(|e| ApiError::internal(e.to_string()))?;
    if not_modified {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, tag)]).into_response());
    }
    let body = json!({"version": set.version(), "agent_id": agent, "run_id": q.run_id, "policies": docs});
    Ok(([(header::ETAG, tag), (header::CACHE_CONTROL, HeaderValue::from_static("no-cache"))], Json(body))
        .into_response())
}

#[utoipa::path(get, path = "/metrics", tag = "operations", responses((status = 200, description = "Prometheus text format")))]
async fn metrics_text() -> Response {
    match prometheus() {
        Some(h) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], h.render()).into_response(),
        None => ApiError::unavailable("metrics are not available in this process").into_response(),
    }
}

#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "Agent Sentinel", description = "The runtime authority for autonomous AI agents."),
    paths(
        healthz, readyz, metrics_text, me, create_key, list_keys, activate_key, deactivate_key, delete_key,
        create_policy, list_policies, get_policy, update_policy, delete_policy, policy_history, policy_sync,
        central::decide, central::settle, central::create_halt, central::delete_halt, central::list_halts,
        ingest::ingest_ledger, ingest::ingest_event, ingest::list_interventions, ingest::intervention_stats,
        ingest::get_intervention, ingest::list_agents, ingest::get_agent, ingest::list_findings, ingest::list_streams,
        approvals::list, approvals::get, approvals::approve, approvals::reject, approvals::wait,
        notify::list_messages, notify::get_message, notify::retry_message, notify::create_channel,
        notify::list_channels, notify::get_channel, notify::update_channel, notify::delete_channel,
        notify::test_channel, notify::test_policy_alert,
    ),
    components(schemas(NewKeyBody, central::DecideBody, central::SettleBody, central::HaltBody, central::ReservationOut,
        ingest::LedgerBatch, ingest::EventBody, approvals::DecisionBody, notify::ChannelBody)),
    modifiers(&SecurityAddon),
)]
struct ApiDoc;

struct SecurityAddon;

impl utoipa::Modify for SecurityAddon {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{ApiKey as Key, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
        let c = openapi.components.get_or_insert_with(Default::default);
        c.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        c.add_security_scheme("x-api-key", SecurityScheme::ApiKey(Key::Header(ApiKeyValue::new("X-API-Key"))));
    }
}

/// The OpenAPI document, generated from the handlers' annotations and types.
pub fn openapi_doc() -> utoipa::openapi::OpenApi {
    <ApiDoc as utoipa::OpenApi>::openapi()
}

async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(openapi_doc())
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "Not found", "no such endpoint")
}

async fn method_not_allowed(method: axum::http::Method) -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed", format!("this endpoint does not take {method}"))
}

/// The whole HTTP surface. Tests call it with `oneshot`, without a socket.
pub fn app(state: AppState) -> Router {
    app_with_timeout(state, Duration::from_secs(30))
}

pub fn app_with_timeout(state: AppState, timeout: Duration) -> Router {
    // Full paths, not a nested router: nesting costs every request a rewritten URI and an extension.
    let api = Router::new()
        .route("/api/v1/users/me", get(me))
        .route("/api/v1/keys", post(create_key).get(list_keys))
        .route("/api/v1/keys/{id}", axum::routing::delete(delete_key))
        .route("/api/v1/keys/{id}/activate", post(activate_key))
        .route("/api/v1/keys/{id}/deactivate", post(deactivate_key))
        .route("/api/v1/policies", post(create_policy).get(list_policies))
        .route("/api/v1/policies/sync", get(policy_sync))
        .route("/api/v1/policies/{id}", get(get_policy).put(update_policy).delete(delete_policy))
        .route("/api/v1/policies/{id}/history", get(policy_history))
        .route("/api/v1/decide", post(central::decide))
        .route("/api/v1/settle", post(central::settle))
        .route("/api/v1/halts", post(central::create_halt).get(central::list_halts).delete(central::delete_halt))
        .route(
            LEDGER_PATH,
            post(ingest::ingest_ledger).layer(axum::extract::DefaultBodyLimit::max(ingest::INGEST_BODY_LIMIT)),
        )
        .route("/api/v1/ledger/streams", get(ingest::list_streams))
        .route("/api/v1/events", post(ingest::ingest_event))
        .route("/api/v1/interventions", get(ingest::list_interventions))
        .route("/api/v1/interventions/stats", get(ingest::intervention_stats))
        .route("/api/v1/interventions/{id}", get(ingest::get_intervention))
        .route("/api/v1/agents", get(ingest::list_agents))
        .route("/api/v1/agents/{id}", get(ingest::get_agent))
        .route("/api/v1/findings", get(ingest::list_findings))
        .route("/api/v1/approvals", get(approvals::list))
        .route("/api/v1/approvals/{id}", get(approvals::get))
        .route("/api/v1/approvals/{id}/approve", post(approvals::approve))
        .route("/api/v1/approvals/{id}/reject", post(approvals::reject))
        .route("/api/v1/approvals/{id}/wait", get(approvals::wait))
        .route("/api/v1/notifications", get(notify::list_messages))
        .route("/api/v1/notifications/channels", post(notify::create_channel).get(notify::list_channels))
        .route(
            "/api/v1/notifications/channels/{id}",
            get(notify::get_channel).put(notify::update_channel).delete(notify::delete_channel),
        )
        .route("/api/v1/notifications/channels/{id}/test", post(notify::test_channel))
        .route("/api/v1/notifications/{id}", get(notify::get_message))
        .route("/api/v1/notifications/{id}/retry", post(notify::retry_message))
        .route("/api/v1/policies/{id}/test-alert", post(notify::test_policy_alert))
        .route("/api/v1/openapi.json", get(openapi));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/approve/{token}", get(links::show).post(links::decide))
        .merge(api)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
        // One stack, applied once: each `Router::layer` call boxes every route again, and each box
        // is one more clone and allocation per request. Outermost first: trace, catch a panic,
        // set the body limit, time out.
        .layer(
            tower::ServiceBuilder::new()
                .layer(TraceLayer::new_for_http())
                .layer(CatchPanicLayer::custom(|_| ApiError::internal("a handler panicked".into()).into_response()))
                // Read by the body extractors, so that a body over it is refused as problem+json (like
                // any other bad body) whether or not it declared its length; `/api/v1/ledger` sets its own.
                .layer(axum::extract::DefaultBodyLimit::max(BODY_LIMIT))
                // A request not answered in time (a slow handler, or a client that stops sending
                // its body) gets a problem+json 503, like every other error.
                .layer(axum::error_handling::HandleErrorLayer::new(move |_: tower::BoxError| async move {
                    ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "Request timeout",
                        format!("the request was not answered within the server's request timeout of {timeout:?}"),
                    )
                }))
                .layer(tower::timeout::TimeoutLayer::new(timeout)),
        )
}

// ---------------------------------------------------------------------------------------------
// Running

/// Reads the server secret, creating it (mode 0600) on first start.
fn load_secret(path: PathBuf) -> Result<Vec<u8>, ServerError> {
    match std::fs::read(&path) {
        Ok(b) if b.len() >= 32 => return Ok(b),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(ServerError::Io { what: "cannot read", path, source }),
    }
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| ServerError::Io {
        what: "no randomness for",
        path: path.clone(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let hexed = hex::encode(secret).into_bytes();
    write_private(&path, &hexed)?;
    Ok(hexed)
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), ServerError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| ServerError::Io { what: "cannot create", path: path.to_path_buf(), source })?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(|source| ServerError::Io {
        what: "cannot write",
        path: path.to_path_buf(),
        source,
    })
}

/// On first start (no keys at all), creates an admin key, writes it to `<data dir>/bootstrap-admin-key`
/// with mode 0600 and prints it once to stderr.
pub async fn bootstrap(state: &AppState, data_dir: &Path) -> Result<Option<PathBuf>, ServerError> {
    if !state.store.list_keys().await?.is_empty() {
        return Ok(None);
    }
    let (plaintext, _) = state.issue_key("bootstrap admin", Scope::Admin, None).await.map_err(|e| ServerError::Io {
        what: "cannot create the bootstrap key in",
        path: data_dir.into(),
        source: std::io::Error::other(e.detail),
    })?;
    let path = data_dir.join("bootstrap-admin-key");
    write_private(&path, format!("{plaintext}\n").as_bytes())?;
    eprintln!(
        "\n  AGENT SENTINEL BOOTSTRAP ADMIN KEY (shown once; also stored in {} with mode 0600)\n\n  {plaintext}\n",
        path.display()
    );
    Ok(Some(path))
}

/// Opens the store, bootstraps, and serves until Ctrl-C or SIGTERM; then flushes and closes.
pub async fn run(config: Config) -> Result<(), ServerError> {
    std::fs::create_dir_all(&config.data_dir).map_err(|source| ServerError::Io {
        what: "cannot create the data directory",
        path: config.data_dir.clone(),
        source,
    })?;
    let store = Store::open(&config.database_url()).await?;
    // A SQLite database is decided in this process's memory, so only one server may own it.
    let _lock = if store.backend() == sentinel_store::Backend::Sqlite {
        let path = config.data_dir.join("serve.lock");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|source| ServerError::Io { what: "cannot create", path: path.clone(), source })?;
        match f.try_lock() {
            Ok(()) => Some(f),
            Err(std::fs::TryLockError::WouldBlock) => return Err(ServerError::Locked(config.data_dir.clone())),
            Err(std::fs::TryLockError::Error(source)) => {
                return Err(ServerError::Io { what: "cannot lock", path, source });
            }
        }
    } else {
        None
    };
    let secret_path = config.secret_file.clone().unwrap_or_else(|| config.data_dir.join("server-secret"));
    let secret = load_secret(secret_path.clone())?;
    if store.backend() == sentinel_store::Backend::Sqlite {
        // One server owns a SQLite database: leases left by a previous run are stale.
        store.release_leases().await?;
    }
    let state = AppState::open_with(store.clone(), secret, config.notify.clone()).await?;
    state.set_long_poll_max(
        config
            .request_timeout
            .saturating_sub(Duration::from_secs(2))
            .clamp(Duration::from_secs(1), Duration::from_secs(60)),
    );
    let check = hex::encode(state.hash_key("sentinel secret check"));
    if store.agree_meta("secret_check", &check).await? != check {
        return Err(ServerError::SecretMismatch(secret_path));
    }
    bootstrap(&state, &config.data_dir).await?;
    central::spawn_sweeper(state.clone());
    let flusher = {
        let s = state.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let mut n = 0u64;
            loop {
                tick.tick().await;
                n += 1;
                // Policies changed on another replica are picked up within a second.
                if let Err(e) = s.reload_policies().await {
                    tracing::warn!(error = %e.detail, "cannot reload policies");
                }
                if n.is_multiple_of(5)
                    && let Err(e) = s.flush_touches().await
                {
                    tracing::warn!(error = %e, "cannot record key use");
                }
            }
        })
    };
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServerError::Bind { addr: config.listen, source })?;
    let addr = listener.local_addr().unwrap_or(config.listen);
    state.notifier.set_listen_url(format!("http://{addr}"));
    let dispatcher = state.spawn_notifications();
    tracing::info!(%addr, database = ?store.backend(), "listening");
    eprintln!("sentinel serve: listening on http://{addr} ({:?} database)", store.backend());
    let mut router = app_with_timeout(state.clone(), config.request_timeout);
    if !config.cors_origins.is_empty() {
        let origins = config
            .cors_origins
            .iter()
            .map(|o| HeaderValue::from_str(o).map_err(|_| ServerError::Cors(o.clone())))
            .collect::<Result<Vec<_>, _>>()?;
        router = router.layer(
            tower_http::cors::CorsLayer::new()
                .allow_origin(origins)
                .allow_methods([
                    axum::http::Method::GET,
                    axum::http::Method::POST,
                    axum::http::Method::PUT,
                    axum::http::Method::DELETE,
                ])
                .allow_headers([
                    header::AUTHORIZATION,
                    header::CONTENT_TYPE,
                    header::HeaderName::from_static("x-api-key"),
                ]),
        );
    }
    serve(listener, router, Some(config.idle_timeout), config.request_timeout, {
        let s = state.clone();
        async move {
            shutdown_signal().await;
            s.shutting_down.store(true, std::sync::atomic::Ordering::SeqCst);
            s.approvals_changed.notify_waiters();
        }
    })
    .await;
    flusher.abort();
    let _ = tokio::time::timeout(Duration::from_secs(5), dispatcher).await;
    let left = state.activity.flush(&state.store).await;
    notify::interventions(&state, &left).await;
    state.authority.close(&state.store).await;
    if let Err(e) = state.flush_touches().await {
        tracing::warn!(error = %e, "cannot record key use at shutdown");
    }
    store.close().await;
    tracing::info!("stopped");
    Ok(())
}

/// Serves HTTP/1.1 connections until `shutdown` completes, then lets the requests in flight finish
/// (for at most `drain`; what still runs then is cut off before this returns). A connection with
/// no request running is closed once it has been `idle` (if given) since it opened or since its
/// last answer: a client cannot hold a connection by sending its request head slowly or not at
/// all, nor by keeping it open unused.
///
/// Written out instead of `axum::serve`, which installs no timer, so that hyper's own header-read
/// timeout is inert there. That timeout is not used either: it arms a timer for every request,
/// 1,428 instructions each over bare hyper (`examples/conn_cost.rs`), where [`Activity`] costs
/// 418 (a clock read, an `Arc` clone and drop, three atomic operations) and a task per
/// connection that wakes once per `idle`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    idle: Option<Duration>,
    drain: Duration,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    // Not hyper's (see above); said explicitly, so that hyper does not warn of its default.
    http.header_read_timeout(None);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        while connections.try_join_next().is_some() {}
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // A connection that failed before it was accepted concerns only its client;
                    // anything else (no file descriptors left) is given a moment to pass.
                    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
                    if !matches!(e.kind(), ConnectionAborted | ConnectionRefused | ConnectionReset) {
                        tracing::warn!(error = %e, "cannot accept a connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Answers go out at once: a decision is one small write, and waiting for an ACK (Nagle)
        // would only add latency.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let activity = Arc::new(Activity::new());
        let service = hyper::service::service_fn({
            let (router, activity) = (router.clone(), Arc::clone(&activity));
            move |req: axum::http::Request<hyper::body::Incoming>| {
                let running = Running::start(&activity);
                let answer = tower::ServiceExt::oneshot(router.clone(), req);
                async move {
                    let answer = answer.await;
                    drop(running);
                    answer
                }
            }
        });
        let conn = http.serve_connection(hyper_util::rt::TokioIo::new(tcp), service);
        let ended = Ended(Arc::clone(&activity));
        let served = connections.spawn(async move {
            let mut conn = std::pin::pin!(conn);
            let mut closing = false;
            loop {
                tokio::select! {
                    biased;
                    done = conn.as_mut() => {
                        if let Err(e) = done {
                            tracing::debug!(error = %e, "connection ended");
                        }
                        return;
                    }
                    () = ended.0.close.notified(), if !closing => {}
                }
                // No further request is read; one being read or run is answered first.
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
        });
        // A task of its own, so that the connection's many wake-ups do not poll its timer.
        tokio::spawn(activity.watch(idle, stopped.clone(), served));
    }
    drop(listener);
    let _ = stop.send(true);
    // A little past `drain`, so that a request stopped by its own timeout still sends its 503.
    let limit = drain.saturating_add(CLOSE_GRACE);
    let drained = tokio::time::timeout(limit, async { while connections.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(after = ?limit, running = connections.len(), "requests still running at shutdown were cut off");
        connections.shutdown().await;
    }
}

/// What one connection is doing: how many of its requests are running, and when it opened and
/// when its last request ended (milliseconds since the first connection; [`Activity::NEVER`]
/// until one has); and the signals between it and its watch.
struct Activity {
    running: std::sync::atomic::AtomicU32,
    opened_ms: u64,
    last_ms: std::sync::atomic::AtomicU64,
    /// The watch asks the connection to close gracefully.
    close: tokio::sync::Notify,
    /// The connection's task ended (or was aborted).
    ended: tokio::sync::Notify,
}

/// How long a connection asked to close may take to do it, with no request running, before it is
/// cut: a request head that started arriving is not waited for.
const CLOSE_GRACE: Duration = Duration::from_millis(200);

impl Activity {
    fn epoch() -> Instant {
        static EPOCH: OnceLock<Instant> = OnceLock::new();
        *EPOCH.get_or_init(Instant::now)
    }

    fn now_ms() -> u64 {
        u64::try_from(Self::epoch().elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// `last_ms` of a connection on which no request has ended yet.
    const NEVER: u64 = u64::MAX;

    fn new() -> Self {
        Activity {
            running: 0.into(),
            opened_ms: Self::now_ms(),
            last_ms: Self::NEVER.into(),
            close: tokio::sync::Notify::new(),
            ended: tokio::sync::Notify::new(),
        }
    }

    /// Closes the connection once no request has run on it for `idle`, and at shutdown; ends with
    /// the connection. Closing asks hyper (a request whose head was read is answered first, and no
    /// further one is read; a head only partly received on a connection that answered before is
    /// dropped, as any keep-alive close may), and cuts the connection if it is still open
    /// [`CLOSE_GRACE`] later with nothing running and no request ever read on it: a head that
    /// never came, or came too slowly.
    async fn watch(
        self: Arc<Self>,
        idle: Option<Duration>,
        mut stopped: tokio::sync::watch::Receiver<bool>,
        conn: tokio::task::AbortHandle,
    ) {
        use std::sync::atomic::Ordering::{Acquire, Relaxed};
        let idle_ms = idle.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let grace_ms = u64::try_from(CLOSE_GRACE.as_millis()).unwrap_or(u64::MAX);
        let (mut stopping, mut asked_at) = (*stopped.borrow(), None::<u64>);
        loop {
            // `running` first: a request that ended before it was read has its end in `last_ms`.
            let running = self.running.load(Acquire) > 0;
            let now = Self::now_ms();
            let last = self.last_ms.load(Relaxed);
            let answered = last != Self::NEVER;
            let quiet = now.saturating_sub(if answered { last } else { self.opened_ms });
            let wait = match asked_at {
                None if stopping || (!running && idle_ms.is_some_and(|l| quiet >= l)) => {
                    self.close.notify_one();
                    asked_at = Some(now);
                    Some(CLOSE_GRACE)
                }
                // Running requests are the request timeout's business; look again a period later.
                None => idle_ms.map(|l| Duration::from_millis(if running { l } else { l - quiet }.max(1))),
                Some(at) => {
                    // hyper closes by itself a connection that has answered (once the answer is
                    // written) or received nothing; one with a head begun but never finished is
                    // cut after the grace. One whose client does not read its answer is cut a
                    // whole idle period after it (at shutdown the drain's limit does that).
                    let patience = if answered { if stopping { None } else { idle_ms } } else { Some(grace_ms) };
                    if !running && patience.is_some_and(|p| quiet >= p && now.saturating_sub(at) >= grace_ms) {
                        conn.abort();
                        tracing::debug!(stopping, "cut a connection that did not close when asked");
                        return;
                    }
                    Some(CLOSE_GRACE)
                }
            };
            let sleep = async {
                match wait {
                    Some(w) => tokio::time::sleep(w).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = self.ended.notified() => return,
                changed = stopped.changed(), if !stopping => stopping = changed.is_err() || *stopped.borrow(),
                () = sleep => {}
            }
        }
    }
}

/// Held by a connection's task: its end (or abort) ends its watch.
struct Ended(Arc<Activity>);

impl Drop for Ended {
    fn drop(&mut self) {
        self.0.ended.notify_one();
    }
}

/// One running request of a connection; its end (or its cancellation) marks the connection busy
/// until now.
struct Running(Arc<Activity>);

impl Running {
    fn start(a: &Arc<Activity>) -> Self {
        a.running.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Running(Arc::clone(a))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering::{Relaxed, Release};
        // The end first, then the count (released): a watch that reads the lower count reads
        // this end too, and does not take a connection that just answered for an idle one.
        self.0.last_ms.store(Activity::now_ms(), Relaxed);
        self.0.running.fetch_sub(1, Release);
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
