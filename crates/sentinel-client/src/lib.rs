//! A small client for an Agent Sentinel server, for agents written in Rust.
//!
//! - [`Client`]: central decisions (`decide`, `settle`, `release`), halts, and the raw calls the
//!   uploader uses. Errors name the URL and what went wrong; a denial is not an error.
//! - [`BackgroundSync`]: uploads a local SDK home (`ledger.jsonl`, `interventions.jsonl` and their
//!   rotated segments) incrementally from a persisted offset, with retries (exponential backoff,
//!   full jitter, `Retry-After` honoured, 429 and 5xx retried), and syncs policies (ETag, cached on
//!   disk). Uploads fail open: nothing here ever stops the agent. The local files are only read.
//!
//! The Python package implements the same protocol in `agent_sentinel.sync`.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the Agent Sentinel server at {url}: {source}")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("the server at {url} answered {status}: {detail}")]
    Status { url: String, status: u16, detail: String, retry_after: Option<Duration> },
    #[error("invalid client configuration: {0}")]
    Config(String),
    #[error("approval `{id}` was rejected by {by}: {reason}")]
    ApprovalRejected { id: String, by: String, reason: String },
    #[error("approval `{id}` was not decided before it expired")]
    ApprovalTimeout { id: String },
    #[error("cannot {what} `{path}`: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ClientError {
    /// Worth trying again: the server could not be reached, was overloaded (429) or failed (5xx).
    pub fn retryable(&self) -> bool {
        match self {
            ClientError::Unreachable { .. } => true,
            ClientError::Status { status, .. } => *status == 429 || *status == 408 || *status >= 500,
            _ => false,
        }
    }
}

pub type Result<T> = std::result::Result<T, ClientError>;

/// One call to decide (the body of `POST /api/v1/decide`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct DecideRequest {
    pub action: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    pub cost_usd: f64,
    #[serde(skip_serializing_if = "Value::is_null")]
    pub args: Value,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Shown to the approver if the call needs approval.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context: Option<Value>,
    /// An approved request for exactly this call (set by [`Client::decide_and_wait`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approval_id: Option<String>,
}

/// The approval request a `require_approval` decision created.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ApprovalRequest {
    pub id: String,
    pub status: String,
    pub expires_at: i64,
}

/// A reservation held by an allowed decision.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Reservation {
    pub id: String,
    pub cost_usd: f64,
    pub expires_at: i64,
}

/// The server's answer. `verdict` is `allow`, `warn`, `deny` or `require_approval`.
#[derive(Debug, Clone, Deserialize)]
pub struct Decision {
    pub verdict: String,
    pub reason: String,
    pub message: String,
    #[serde(default)]
    pub policy: Option<String>,
    #[serde(default)]
    pub retry_after_seconds: Option<f64>,
    pub policy_version: String,
    #[serde(default)]
    pub reservation: Option<Reservation>,
    #[serde(default)]
    pub approval_request: Option<ApprovalRequest>,
    /// A call over budget under `on_budget_exceeded: pause`, waiting like an approval.
    #[serde(default)]
    pub paused: bool,
}

impl Decision {
    pub fn permits(&self) -> bool {
        self.verdict == "allow" || self.verdict == "warn"
    }
}

/// A connection (pooled, kept alive) to one server with one API key.
#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Client {
    pub fn new(platform_url: &str, api_token: &str) -> Result<Self> {
        let base = platform_url.trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(ClientError::Config(format!(
                "platform_url `{platform_url}` must start with http:// or https://"
            )));
        }
        if api_token.trim().is_empty() {
            return Err(ClientError::Config("api_token is empty".into()));
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .connect_timeout(Duration::from_secs(5))
            .pool_idle_timeout(Duration::from_secs(90))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| ClientError::Config(format!("cannot build the HTTP client: {e}")))?;
        Ok(Client { base, token: api_token.to_string(), http })
    }

    async fn send(&self, req: reqwest::RequestBuilder, url: &str) -> Result<reqwest::Response> {
        let resp = req
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|source| ClientError::Unreachable { url: url.to_string(), source })?;
        let status = resp.status();
        if status.is_success() || status == reqwest::StatusCode::NOT_MODIFIED {
            return Ok(resp);
        }
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map(Duration::from_secs_f64);
        let text = resp.text().await.unwrap_or_default();
        let detail = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v.get("detail").and_then(Value::as_str).map(str::to_string))
            .unwrap_or(text);
        Err(ClientError::Status { url: url.to_string(), status: status.as_u16(), detail, retry_after })
    }

    /// `GET` a path under the server (for example `/api/v1/approvals?status=pending`) as JSON.
    pub async fn get_json(&self, path: &str) -> Result<Value> {
        let url = format!("{}{path}", self.base);
        let resp = self.send(self.http.get(&url), &url).await?;
        resp.json().await.map_err(|source| ClientError::Unreachable { url, source })
    }

    /// `POST` JSON to a path under the server.
    pub async fn post_json(&self, path: &str, body: &Value) -> Result<Value> {
        self.post(path, body).await
    }

    /// `DELETE` a path under the server.
    pub async fn delete(&self, path: &str) -> Result<()> {
        let url = format!("{}{path}", self.base);
        self.send(self.http.delete(&url), &url).await.map(|_| ())
    }

    async fn post(&self, path: &str, body: &Value) -> Result<Value> {
        let url = format!("{}{path}", self.base);
        let resp = self.send(self.http.post(&url).json(body), &url).await?;
        resp.json().await.map_err(|source| ClientError::Unreachable { url, source })
    }

    /// Waits, by long-poll, until a human decides approval request `id` or it expires. Network
    /// errors and server restarts are retried with backoff until the request's expiry has passed.
    /// Returns the decided request (`status` `approved`, `rejected` or `expired`).
    pub async fn wait_for_approval(&self, id: &str, expires_at_ms: i64) -> Result<Value> {
        let mut backoff = Duration::from_millis(200);
        loop {
            match self.get_json(&format!("/api/v1/approvals/{id}/wait?timeout_seconds=25")).await {
                Ok(a) if a.get("status").and_then(Value::as_str) != Some("pending") => return Ok(a),
                Ok(_) => backoff = Duration::from_millis(200),
                Err(e) if e.retryable() => {
                    // Past the expiry (with a minute's grace for clocks), the wait is over.
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
                    if now > expires_at_ms.saturating_add(60_000) {
                        return Err(e);
                    }
                    tracing::debug!(error = %e, "approval wait interrupted; retrying");
                    tokio::time::sleep(jitter(backoff)).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Decides; if the call needs a human (an approval, or a pause over budget), waits for the
    /// decision and, once approved, decides again with the approval, once. A rejection or expiry is
    /// an error that carries the approver's reason, so an agent can adapt.
    pub async fn decide_and_wait(&self, req: &DecideRequest) -> Result<Decision> {
        let d = self.decide(req).await?;
        let Some(ar) = d.approval_request.clone().filter(|_| d.verdict == "require_approval") else {
            return Ok(d);
        };
        let a = self.wait_for_approval(&ar.id, ar.expires_at).await?;
        let text = |k: &str| a.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
        match text("status").as_str() {
            "approved" => {
                let mut again = req.clone();
                again.approval_id = Some(ar.id);
                self.decide(&again).await
            }
            "expired" => Err(ClientError::ApprovalTimeout { id: ar.id }),
            _ => Err(ClientError::ApprovalRejected { id: ar.id, by: text("decided_by"), reason: text("reason") }),
        }
    }

    /// Decides and, when allowed, reserves. A denial is an `Ok` decision with `permits() == false`.
    pub async fn decide(&self, req: &DecideRequest) -> Result<Decision> {
        let url = format!("{}/api/v1/decide", self.base);
        let v = self.post("/api/v1/decide", &serde_json::to_value(req).unwrap_or_default()).await?;
        serde_json::from_value(v).map_err(|e| ClientError::Status {
            url,
            status: 200,
            detail: format!("unexpected decision shape: {e}"),
            retry_after: None,
        })
    }

    /// The action ran and cost `actual_cost_usd`.
    pub async fn settle(&self, reservation_id: &str, actual_cost_usd: f64) -> Result<()> {
        self.post("/api/v1/settle", &json!({"reservation_id": reservation_id, "actual_cost_usd": actual_cost_usd}))
            .await
            .map(|_| ())
    }

    /// The action never ran: give the reservation back.
    pub async fn release(&self, reservation_id: &str) -> Result<()> {
        self.post("/api/v1/settle", &json!({"reservation_id": reservation_id, "release": true})).await.map(|_| ())
    }

    /// Halts an agent (admin key).
    pub async fn halt_agent(&self, agent_id: &str, reason: &str) -> Result<()> {
        self.post("/api/v1/halts", &json!({"agent_id": agent_id, "reason": reason})).await.map(|_| ())
    }

    /// Sends raw lines of one stream (`POST /api/v1/ledger`) as `agent_id`'s (with an admin key;
    /// an agent key's own agent when `None`, else `default`); returns the server's report.
    pub async fn upload(
        &self,
        stream: &str,
        agent_id: Option<&str>,
        ledger: &[String],
        interventions: &[String],
    ) -> Result<Value> {
        let mut body = json!({"stream": stream, "ledger": ledger, "interventions": interventions});
        if let (Some(agent), Some(o)) = (agent_id, body.as_object_mut()) {
            o.insert("agent_id".into(), json!(agent));
        }
        self.post("/api/v1/ledger", &body).await
    }

    /// The effective policies for an agent and run. `None` when unchanged since `etag`.
    pub async fn sync_policies(
        &self,
        agent_id: Option<&str>,
        run_id: Option<&str>,
        etag: Option<&str>,
    ) -> Result<Option<(String, Value)>> {
        let mut url = reqwest::Url::parse(&format!("{}/api/v1/policies/sync", self.base))
            .map_err(|e| ClientError::Config(format!("platform_url is not a URL: {e}")))?;
        {
            let mut q = url.query_pairs_mut();
            if let Some(a) = agent_id {
                q.append_pair("agent_id", a);
            }
            if let Some(r) = run_id {
                q.append_pair("run_id", r);
            }
        }
        let url = url.to_string();
        let mut req = self.http.get(&url);
        if let Some(t) = etag {
            req = req.header(reqwest::header::IF_NONE_MATCH, t);
        }
        let resp = self.send(req, &url).await?;
        if resp.status() == reqwest::StatusCode::NOT_MODIFIED {
            return Ok(None);
        }
        let tag = resp.headers().get(reqwest::header::ETAG).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let body = resp.json().await.map_err(|source| ClientError::Unreachable { url, source })?;
        Ok(Some((tag, body)))
    }
}

// ---------------------------------------------------------------------------------------------
// Background sync

/// What to sync, where, and how often.
#[derive(Debug, Clone)]
pub struct SyncConfig {
    pub platform_url: String,
    pub api_token: String,
    pub agent_id: Option<String>,
    pub run_id: Option<String>,
    /// The SDK home holding `ledger.jsonl` and `interventions.jsonl`.
    pub home: PathBuf,
    /// Identifies this home on the server; default `<hostname>:<absolute home>`.
    pub stream: Option<String>,
    pub flush_interval: Duration,
    pub batch_size: usize,
    pub max_retries: u32,
    pub policy_sync_interval: Duration,
}

impl SyncConfig {
    pub fn new(platform_url: &str, api_token: &str, home: &Path) -> Self {
        SyncConfig {
            platform_url: platform_url.into(),
            api_token: api_token.into(),
            agent_id: None,
            run_id: None,
            home: home.into(),
            stream: None,
            flush_interval: Duration::from_secs(10),
            batch_size: 500,
            max_retries: 3,
            policy_sync_interval: Duration::from_secs(300),
        }
    }

    fn validate(&self) -> Result<()> {
        if !(1..=5000).contains(&self.batch_size) {
            return Err(ClientError::Config(format!("batch_size must be 1..=5000, got {}", self.batch_size)));
        }
        if self.flush_interval.is_zero() {
            return Err(ClientError::Config("flush_interval must be positive".into()));
        }
        Ok(())
    }
}

/// Where uploading stands for one log: the next byte to read in the file with this identity.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
struct Position {
    /// The `seq` of the last line sent, so a rotated or replaced file is found again.
    seq: u64,
    offset: u64,
    inode: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
struct State {
    ledger: Position,
    interventions: Position,
    policy_etag: Option<String>,
}

const POLICY_CACHE: &str = "sync-policies.rust.json";

/// One state file per server and stream: pointing a home at another server uploads it all there.
fn state_file(home: &Path, server: &str, stream: &str) -> PathBuf {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in server.bytes().chain([0]).chain(stream.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    home.join(format!("sync-state.rust.{h:016x}.json"))
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ClientError + use<> {
    let path = path.to_path_buf();
    move |source| ClientError::Io { what, path, source }
}

fn load_state(path: &Path) -> State {
    std::fs::read(path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
}

/// Writes via a temporary file and a rename, so a crash never leaves half a state file.
fn save_json(path: &Path, v: &impl Serialize) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(v).unwrap_or_default()).map_err(io("write", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("rename", path))
}

/// The seq at the end of a line, if it is a chained line.
fn seq_of(line: &str) -> Option<u64> {
    sentinel_core::ledger::parse_tail(line.as_bytes()).map(|t| t.seq)
}

/// Complete lines after `pos` across a log's rotated segments and its active file, in order.
/// Returns the lines (at most `max`) and where reading stopped.
fn read_new(log: &Path, pos: &Position, max: usize) -> Result<(Vec<String>, Position)> {
    use std::io::{Read, Seek, SeekFrom};
    use std::os::unix::fs::MetadataExt;
    let files: Vec<(PathBuf, std::fs::Metadata)> = sentinel_core::ledger::segments(log)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(_, p)| std::fs::metadata(&p).ok().map(|m| (p, m)))
        .collect();
    // Files before the one last read from (found by inode: rotation renames it) are done.
    let first = files.iter().position(|(_, m)| m.ino() == pos.inode).unwrap_or(0);
    let mut out = Vec::new();
    let mut at = pos.clone();
    for (path, meta) in files.into_iter().skip(first) {
        let inode = meta.ino();
        let start = if inode == at.inode && meta.len() >= at.offset { at.offset } else { 0 };
        if start == meta.len() && inode == at.inode {
            continue;
        }
        let mut f = std::fs::File::open(&path).map_err(io("open", &path))?;
        f.seek(SeekFrom::Start(start)).map_err(io("read", &path))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf).map_err(io("read", &path))?;
        let mut consumed = 0usize;
        for raw in buf.split_inclusive(|b| *b == b'\n') {
            if !raw.ends_with(b"\n") || out.len() >= max {
                break;
            }
            consumed += raw.len();
            let line = String::from_utf8_lossy(raw).trim_end().to_string();
            let Some(seq) = seq_of(&line) else { continue };
            if seq <= at.seq {
                continue; // already sent (a file seen again from its start after rotation)
            }
            at.seq = seq;
            out.push(line);
        }
        at.inode = inode;
        at.offset = start + consumed as u64;
        if out.len() >= max {
            break;
        }
    }
    Ok((out, at))
}

fn jitter(max: Duration) -> Duration {
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    max.mul_f64((u64::from_le_bytes(b) as f64) / (u64::MAX as f64))
}

/// Runs `f` until it succeeds, a non-retryable error, or `max_retries` retries, with exponential
/// backoff and full jitter (or the server's `Retry-After`).
async fn with_retries<T, F, Fut>(max_retries: u32, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut attempt = 0;
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if e.retryable() && attempt < max_retries => {
                let base = Duration::from_millis(200).saturating_mul(1 << attempt.min(10)).min(Duration::from_secs(30));
                let wait = match &e {
                    ClientError::Status { retry_after: Some(r), .. } => *r,
                    _ => jitter(base),
                };
                tracing::debug!(error = %e, ?wait, "retrying");
                tokio::time::sleep(wait).await;
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

struct Syncer {
    client: Client,
    cfg: SyncConfig,
    stream: String,
    state: State,
    state_path: PathBuf,
}

impl Syncer {
    /// Uploads everything new; returns how many lines the server accepted. The position moves only
    /// after the server acknowledged a batch.
    async fn flush(&mut self) -> Result<u64> {
        let mut accepted = 0;
        loop {
            let (ledger, lpos) =
                read_new(&self.cfg.home.join("ledger.jsonl"), &self.state.ledger, self.cfg.batch_size)?;
            let room = self.cfg.batch_size.saturating_sub(ledger.len()).max(1);
            let (ivs, ipos) = read_new(&self.cfg.home.join("interventions.jsonl"), &self.state.interventions, room)?;
            if ledger.is_empty() && ivs.is_empty() {
                // Still remember where the files end (lines without a chain were skipped).
                self.state.ledger = lpos;
                self.state.interventions = ipos;
                return Ok(accepted);
            }
            let report = with_retries(self.cfg.max_retries, || {
                self.client.upload(&self.stream, self.cfg.agent_id.as_deref(), &ledger, &ivs)
            })
            .await?;
            accepted += report.get("ledger_accepted").and_then(Value::as_u64).unwrap_or(0)
                + report.get("interventions_accepted").and_then(Value::as_u64).unwrap_or(0);
            if let Some(f) = report.get("findings").and_then(Value::as_array).filter(|f| !f.is_empty()) {
                tracing::warn!(findings = f.len(), stream = %self.stream, "the server found breaks in this log's chain");
            }
            self.state.ledger = lpos;
            self.state.interventions = ipos;
            save_json(&self.state_path, &self.state)?;
        }
    }

    async fn sync_policies(&mut self) -> Result<bool> {
        let got = with_retries(self.cfg.max_retries, || {
            self.client.sync_policies(
                self.cfg.agent_id.as_deref(),
                self.cfg.run_id.as_deref(),
                self.state.policy_etag.as_deref(),
            )
        })
        .await?;
        let Some((etag, body)) = got else { return Ok(false) };
        save_json(&self.cfg.home.join(POLICY_CACHE), &body)?;
        self.state.policy_etag = Some(etag);
        save_json(&self.state_path, &self.state)?;
        Ok(true)
    }
}

enum Command {
    Flush(mpsc::Sender<Result<u64>>),
    Stop(mpsc::Sender<Result<u64>>),
}

/// Uploads a home's logs and syncs its policies on a background thread until stopped.
pub struct BackgroundSync {
    tx: tokio::sync::mpsc::UnboundedSender<Command>,
    thread: Option<JoinHandle<()>>,
}

impl BackgroundSync {
    /// Starts syncing. Fails only on a bad configuration, never because the server is down.
    pub fn start(cfg: SyncConfig) -> Result<Self> {
        cfg.validate()?;
        let client = Client::new(&cfg.platform_url, &cfg.api_token)?;
        let home = std::fs::canonicalize(&cfg.home).map_err(io("open the SDK home", &cfg.home))?;
        let stream = cfg.stream.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
            format!("{}:{}", host.trim(), home.display())
        });
        let state_path = state_file(&home, &client.base, &stream);
        let state = load_state(&state_path);
        let mut syncer = Syncer { client, cfg: SyncConfig { home, ..cfg }, stream, state, state_path };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ClientError::Config(format!("cannot start the sync runtime: {e}")))?;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Command>();
        let thread = std::thread::Builder::new()
            .name("sentinel-sync".into())
            .spawn(move || {
                rt.block_on(async move {
                    // The first upload comes one interval after start, so an explicit flush and the timer
                    // never race over the same lines.
                    let first = tokio::time::Instant::now() + syncer.cfg.flush_interval;
                    let mut flush = tokio::time::interval_at(first, syncer.cfg.flush_interval);
                    let mut policies = tokio::time::interval(syncer.cfg.policy_sync_interval);
                    loop {
                        tokio::select! {
                            _ = flush.tick() => {
                                if let Err(e) = syncer.flush().await {
                                    tracing::warn!(error = %e, "upload failed; entries stay local and are retried");
                                }
                            }
                            _ = policies.tick() => {
                                if let Err(e) = syncer.sync_policies().await {
                                    tracing::warn!(error = %e, "policy sync failed; the cached policies stay in force");
                                }
                            }
                            cmd = rx.recv() => match cmd {
                                Some(Command::Flush(done)) => { let _ = done.send(syncer.flush().await); }
                                Some(Command::Stop(done)) => { let _ = done.send(syncer.flush().await); break; }
                                None => break,
                            },
                        }
                    }
                });
            })
            .map_err(|e| ClientError::Config(format!("cannot start the sync thread: {e}")))?;
        Ok(BackgroundSync { tx, thread: Some(thread) })
    }

    /// Uploads everything written so far and waits; returns how many lines the server accepted.
    pub fn flush_now(&self) -> Result<u64> {
        let (done, wait) = mpsc::channel();
        self.tx.send(Command::Flush(done)).map_err(|_| ClientError::Config("the sync thread has stopped".into()))?;
        wait.recv().map_err(|_| ClientError::Config("the sync thread has stopped".into()))?
    }

    /// A final flush, then the thread ends.
    pub fn stop(mut self) -> Result<u64> {
        let (done, wait) = mpsc::channel();
        let sent = self.tx.send(Command::Stop(done)).is_ok();
        let result = if sent { wait.recv().unwrap_or(Ok(0)) } else { Ok(0) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        result
    }

    /// The policies last synced (cached on disk), to merge with the local ones.
    pub fn cached_policies(home: &Path) -> Option<Value> {
        std::fs::read(home.join(POLICY_CACHE)).ok().and_then(|b| serde_json::from_slice(&b).ok())
    }
}

impl Drop for BackgroundSync {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            let (done, wait) = mpsc::channel();
            if self.tx.send(Command::Stop(done)).is_ok() {
                let _ = wait.recv_timeout(Duration::from_secs(10));
            }
            let _ = t.join();
        }
    }
}
