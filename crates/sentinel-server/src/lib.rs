//! `sentinel serve`: the platform server. `app(state)` builds the router (tests call it with no
//! socket); `run(config)` opens the store, bootstraps the first admin key and serves until asked
//! to stop.
//!
//! Implemented so far: health and readiness, API keys (HMAC-SHA256 at rest, scopes, batched
//! "last used"), `users/me`, and policies with validation, versions, diffs and history.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{FromRequestParts, Path as UrlPath, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hmac::{KeyInit, Mac};
use parking_lot::Mutex;
use sentinel_core::{PolicyDoc, PolicySet};
use sentinel_store::{ApiKey, NewApiKey, Scope, Store, StoreError, StoredPolicy};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;
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
}

/// Shared by every request.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    secret: Arc<[u8]>,
    /// Keys used since the last flush, with when; written in one batch, never per request.
    touches: Arc<Mutex<HashMap<String, i64>>>,
}

impl AppState {
    pub fn new(store: Store, secret: Vec<u8>) -> Self {
        AppState { store, secret: secret.into(), touches: Arc::default() }
    }

    /// The stored form of a key: HMAC-SHA256 under the server secret.
    pub fn hash_key(&self, plaintext: &str) -> Vec<u8> {
        match <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(&self.secret) {
            Ok(mut mac) => {
                mac.update(plaintext.as_bytes());
                mac.finalize().into_bytes().to_vec()
            }
            // HMAC accepts keys of any length; this arm is unreachable in practice.
            Err(_) => Vec::new(),
        }
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
    fn invalid(detail: impl Into<String>, errors: Vec<FieldError>) -> Self {
        ApiError { status: StatusCode::UNPROCESSABLE_ENTITY, title: "Invalid request", detail: detail.into(), errors }
    }
    fn field(path: &str, message: impl Into<String>) -> Self {
        let message = message.into();
        Self::invalid(format!("`{path}`: {message}"), vec![FieldError { path: path.into(), message }])
    }
    fn internal(detail: String) -> Self {
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
    let p = if p == "." { String::new() } else { p };
    let full = match (prefix.is_empty(), p.is_empty()) {
        (true, _) => p,
        (false, true) => prefix.to_string(),
        (false, false) => format!("{prefix}.{p}"),
    };
    let message = sentinel_core::load::improve_message(&err.to_string());
    if full.is_empty() {
        ApiError::invalid(message.clone(), vec![FieldError { path: full, message }])
    } else {
        ApiError::field(&full, message)
    }
}

/// A JSON body whose errors (syntax, wrong types, unknown fields) come back as problem+json with the field path.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> axum::extract::FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
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
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "Payload too large",
                    format!("request bodies are limited to {BODY_LIMIT} bytes"),
                )
            } else {
                ApiError::new(StatusCode::BAD_REQUEST, "Bad request", e.body_text())
            }
        })?;
        let de = &mut serde_json::Deserializer::from_slice(&bytes);
        match serde_path_to_error::deserialize::<_, T>(de) {
            Ok(v) => Ok(ApiJson(v)),
            Err(e) if e.inner().is_syntax() || e.inner().is_eof() => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "Malformed JSON",
                sentinel_core::load::improve_message(&e.into_inner().to_string()),
            )),
            Err(e) => Err(field_error("", e.path(), e.inner())),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Authentication

/// The authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller(pub ApiKey);

impl Caller {
    fn actor(&self) -> String {
        format!("key:{} ({})", self.0.prefix, self.0.name)
    }
    fn require(&self, allowed: &[Scope]) -> Result<(), ApiError> {
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
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .or_else(|| parts.headers.get("x-api-key").and_then(|v| v.to_str().ok()))
            .map(str::trim)
            .ok_or_else(|| unauthorized("send an API key as `Authorization: Bearer as_…` or `X-API-Key: as_…`"))?;
        let Some(key) = state.store.key_by_hash(&state.hash_key(token)).await? else {
            return Err(unauthorized("the API key is not valid"));
        };
        if !key.active {
            return Err(unauthorized("the API key is deactivated"));
        }
        state.touches.lock().insert(key.id.clone(), sentinel_store::now_ms());
        Ok(Caller(key))
    }
}

// ---------------------------------------------------------------------------------------------
// Handlers

async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn readyz(State(s): State<AppState>) -> Response {
    match s.store.ping().await {
        Ok(()) => Json(json!({"status": "ready", "database": s.store.backend()})).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "not ready");
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "Not ready", "the database does not answer").into_response()
        }
    }
}

async fn me(caller: Caller) -> Json<Value> {
    let k = caller.0;
    Json(json!({"key_id": k.id, "prefix": k.prefix, "name": k.name, "scope": k.scope, "agent_id": k.agent_id}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewKeyBody {
    #[serde(default)]
    name: String,
    scope: Scope,
    #[serde(default)]
    agent_id: Option<String>,
}

async fn create_key(
    State(s): State<AppState>,
    caller: Caller,
    ApiJson(b): ApiJson<NewKeyBody>,
) -> Result<Response, ApiError> {
    caller.require(&[Scope::Admin])?;
    match (&b.scope, &b.agent_id) {
        (Scope::Agent, None) => return Err(ApiError::field("agent_id", "an `agent` key must be bound to one agent")),
        (Scope::Agent, Some(a)) if a.trim().is_empty() => return Err(ApiError::field("agent_id", "must not be empty")),
        (Scope::Admin | Scope::Readonly, Some(_)) => {
            return Err(ApiError::field("agent_id", "only `agent` keys are bound to an agent"));
        }
        _ => {}
    }
    if b.name.len() > 200 {
        return Err(ApiError::field("name", "must be at most 200 characters"));
    }
    let (plaintext, rec) = s.issue_key(&b.name, b.scope, b.agent_id).await?;
    let mut body = serde_json::to_value(&rec).unwrap_or_default();
    if let Value::Object(m) = &mut body {
        m.insert("key".into(), Value::String(plaintext));
    }
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

async fn list_keys(State(s): State<AppState>, caller: Caller) -> Result<Json<Vec<ApiKey>>, ApiError> {
    caller.require(&[Scope::Admin])?;
    s.flush_touches().await?;
    Ok(Json(s.store.list_keys().await?))
}

async fn set_active(s: &AppState, caller: &Caller, id: &str, active: bool) -> Result<Json<Value>, ApiError> {
    caller.require(&[Scope::Admin])?;
    s.store.set_key_active(id, active).await?;
    Ok(Json(json!({"id": id, "active": active})))
}

async fn activate_key(
    State(s): State<AppState>,
    caller: Caller,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<Value>, ApiError> {
    set_active(&s, &caller, &id, true).await
}

async fn deactivate_key(
    State(s): State<AppState>,
    caller: Caller,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<Value>, ApiError> {
    set_active(&s, &caller, &id, false).await
}

async fn delete_key(
    State(s): State<AppState>,
    caller: Caller,
    UrlPath(id): UrlPath<String>,
) -> Result<StatusCode, ApiError> {
    caller.require(&[Scope::Admin])?;
    s.store.delete_key(&id).await?;
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

async fn create_policy(
    State(s): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<Value>,
) -> Result<Response, ApiError> {
    caller.require(&[Scope::Admin])?;
    let (name, stored) = validate_policy(body)?;
    let p = s.store.create_policy(&name, &stored, &caller.actor()).await?;
    Ok((StatusCode::CREATED, Json(policy_json(p))).into_response())
}

async fn list_policies(State(s): State<AppState>, caller: Caller) -> Result<Json<Vec<Value>>, ApiError> {
    caller.require(&[Scope::Admin, Scope::Readonly])?;
    Ok(Json(s.store.list_policies().await?.into_iter().map(policy_json).collect()))
}

async fn get_policy(
    State(s): State<AppState>,
    caller: Caller,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require(&[Scope::Admin, Scope::Readonly])?;
    Ok(Json(policy_json(s.store.get_policy(&id).await?)))
}

#[derive(Deserialize)]
struct UpdateQuery {
    expected_version: Option<i64>,
}

async fn update_policy(
    State(s): State<AppState>,
    caller: Caller,
    UrlPath(id): UrlPath<String>,
    axum::extract::Query(q): axum::extract::Query<UpdateQuery>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Json<Value>, ApiError> {
    caller.require(&[Scope::Admin])?;
    let (name, stored) = validate_policy(body)?;
    let p = s.store.update_policy(&id, &name, &stored, &caller.actor(), q.expected_version).await?;
    Ok(Json(policy_json(p)))
}

async fn delete_policy(
    State(s): State<AppState>,
    caller: Caller,
    UrlPath(id): UrlPath<String>,
) -> Result<StatusCode, ApiError> {
    caller.require(&[Scope::Admin])?;
    s.store.delete_policy(&id, &caller.actor()).await?;
    Ok(StatusCode::NO_CONTENT)
}

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
async fn policy_sync(
    State(s): State<AppState>,
    caller: Caller,
    axum::extract::Query(q): axum::extract::Query<SyncQuery>,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    caller.require(&[Scope::Admin, Scope::Readonly, Scope::Agent])?;
    let agent = match (&caller.0.agent_id, q.agent_id) {
        (Some(own), Some(asked)) if *own != asked => {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "Forbidden",
                format!("this key is bound to agent `{own}`, not `{asked}`"),
            ));
        }
        (Some(own), _) => Some(own.clone()),
        (None, asked) => asked,
    };
    let mut docs = Vec::new();
    for p in s.store.list_policies().await? {
        let mut body = p.body;
        if let Value::Object(m) = &mut body {
            m.remove("alerts");
        }
        let doc: PolicyDoc = serde_json::from_value(body)
            .map_err(|e| ApiError::internal(format!("stored policy `{}` no longer parses: {e}", p.name)))?;
        let applies = doc.enabled
            && match doc.scope {
                sentinel_core::model::Scope::Global => true,
                sentinel_core::model::Scope::Agent => doc.agent_id.is_some() && doc.agent_id == agent,
                sentinel_core::model::Scope::Run => doc.run_id.is_some() && doc.run_id == q.run_id,
            };
        if applies {
            docs.push(doc);
        }
    }
    let set = PolicySet::compile(docs.clone()).map_err(|e| {
        ApiError::internal(format!(
            "stored policies do not compile together: {}",
            e.first().map(|x| x.message.clone()).unwrap_or_default()
        ))
    })?;
    let etag = format!("\"{}\"", set.version());
    let not_modified = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    let tag = HeaderValue::from_str(&etag).map_err(|e| ApiError::internal(e.to_string()))?;
    if not_modified {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, tag)]).into_response());
    }
    let body = json!({"version": set.version(), "agent_id": agent, "run_id": q.run_id, "policies": docs});
    Ok(([(header::ETAG, tag), (header::CACHE_CONTROL, HeaderValue::from_static("no-cache"))], Json(body))
        .into_response())
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "Not found", "no such endpoint")
}

/// The whole HTTP surface. Tests call it with `oneshot`, without a socket.
pub fn app(state: AppState) -> Router {
    app_with_timeout(state, Duration::from_secs(30))
}

pub fn app_with_timeout(state: AppState, timeout: Duration) -> Router {
    let api = Router::new()
        .route("/users/me", get(me))
        .route("/keys", post(create_key).get(list_keys))
        .route("/keys/{id}", axum::routing::delete(delete_key))
        .route("/keys/{id}/activate", post(activate_key))
        .route("/keys/{id}/deactivate", post(deactivate_key))
        .route("/policies", post(create_policy).get(list_policies))
        .route("/policies/sync", get(policy_sync))
        .route("/policies/{id}", get(get_policy).put(update_policy).delete(delete_policy))
        .route("/policies/{id}/history", get(policy_history));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .nest("/api/v1", api)
        .fallback(not_found)
        .with_state(state)
        .layer(RequestBodyLimitLayer::new(BODY_LIMIT))
        .layer(TimeoutLayer::with_status_code(StatusCode::SERVICE_UNAVAILABLE, timeout))
        .layer(CatchPanicLayer::custom(|_| ApiError::internal("a handler panicked".into()).into_response()))
        .layer(TraceLayer::new_for_http())
}

// ---------------------------------------------------------------------------------------------
// Running

/// Reads the server secret, creating it (mode 0600) on first start.
fn load_secret(dir: &Path) -> Result<Vec<u8>, ServerError> {
    let path = dir.join("server-secret");
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
    let state = AppState::new(store.clone(), load_secret(&config.data_dir)?);
    bootstrap(&state, &config.data_dir).await?;
    let flusher = {
        let s = state.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                if let Err(e) = s.flush_touches().await {
                    tracing::warn!(error = %e, "cannot record key use");
                }
            }
        })
    };
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServerError::Bind { addr: config.listen, source })?;
    let addr = listener.local_addr().unwrap_or(config.listen);
    tracing::info!(%addr, database = ?store.backend(), "listening");
    eprintln!("sentinel serve: listening on http://{addr} ({:?} database)", store.backend());
    axum::serve(listener, app_with_timeout(state.clone(), config.request_timeout))
        .with_graceful_shutdown(shutdown_signal())
        .await
        .map_err(|source| ServerError::Bind { addr, source })?;
    flusher.abort();
    if let Err(e) = state.flush_touches().await {
        tracing::warn!(error = %e, "cannot record key use at shutdown");
    }
    store.close().await;
    tracing::info!("stopped");
    Ok(())
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
