//! The `sentinel` command: argument structs and dispatch. The work happens in `sentinel-core`.

/// The server allocates many short-lived buffers across threads; mimalloc keeps that cheap.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use comfy_table::{Table, presets::UTF8_BORDERS_ONLY};
use sentinel_core::guard::{INTERVENTIONS_FILE, LEDGER_FILE, default_home};
use sentinel_core::ledger;
use sentinel_core::{ActionRequest, Engine, PolicyDoc, PolicyError, PolicySet, load, report};
use serde_json::Value;

/// Like `println!`, but a failed write (a closed pipe) is an error to return, not a panic.
macro_rules! outln {
    ($($t:tt)*) => {
        writeln!(io::stdout().lock(), $($t)*)?
    };
}

macro_rules! out {
    ($($t:tt)*) => {
        write!(io::stdout().lock(), $($t)*)?
    };
}

#[derive(Parser)]
#[command(name = "sentinel", version, about = "Agent Sentinel: decide whether an AI agent may act, before it acts")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validate, explain and simulate policy files
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Verify and inspect a hash-chained ledger
    #[command(subcommand)]
    Ledger(LedgerCmd),
    /// Run the platform server (SQLite in the data directory by default)
    Serve(ServeArgs),
    /// List, show and decide approval requests on a server
    #[command(subcommand)]
    Approvals(ApprovalsCmd),
    /// Halt an agent or a run on a server: its decisions deny at once
    Halt(HaltArgs),
    /// Resume a halted agent or run on a server
    Resume(TargetArgs),
    /// Print shell completions
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Args)]
struct ServeArgs {
    /// Where the SQLite database, the server secret and the bootstrap key live
    #[arg(long, env = "SENTINEL_DATA_DIR", default_value = "sentinel-data")]
    data_dir: PathBuf,
    /// `postgres://USER@HOST/DB` to share one database between servers [default: SQLite in the data directory]
    #[arg(long, env = "SENTINEL_DATABASE_URL")]
    database_url: Option<String>,
    /// Address to listen on
    #[arg(long, env = "SENTINEL_LISTEN", default_value = "127.0.0.1:8080")]
    listen: std::net::SocketAddr,
    /// Seconds before a request is cut off
    #[arg(long, default_value_t = 30)]
    request_timeout: u64,
    /// Seconds a connection may take to send a request's head (from its opening, or from the
    /// answer before); a slow or idle client is then disconnected
    #[arg(long, env = "SENTINEL_IDLE_TIMEOUT", default_value_t = 30)]
    idle_timeout: u64,
    /// The key-hashing secret (every replica of a fleet needs the same) [default: DATA_DIR/server-secret]
    #[arg(long, env = "SENTINEL_SECRET_FILE")]
    secret_file: Option<PathBuf>,
    /// Allow browser calls from this origin (repeat for several); CORS is off by default
    #[arg(long = "cors-origin", value_name = "ORIGIN")]
    cors_origins: Vec<String>,
    /// SMTP server for email notifications: `smtp://HOST:PORT` (plain), `smtp://HOST:587?tls=required`
    /// (STARTTLS) or `smtps://USER:PASSWORD@HOST:465` (TLS)
    #[arg(long, env = "SENTINEL_SMTP_URL")]
    smtp_url: Option<String>,
    /// The sender of notification emails
    #[arg(long, env = "SENTINEL_SMTP_FROM", default_value = "Agent Sentinel <sentinel@localhost>")]
    smtp_from: String,
    /// A network webhook targets may be in although it is private or loopback, e.g. 10.0.0.0/8 or
    /// 127.0.0.1/32 (repeat for several); by default only public addresses are reached
    #[arg(long = "notify-allow", value_name = "CIDR")]
    notify_allow: Vec<String>,
    /// The address people open approval links at, e.g. https://sentinel.example.com [default: the listening address]
    #[arg(long, env = "SENTINEL_PUBLIC_URL")]
    public_url: Option<String>,
    /// Log format on stderr
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Threads that serve requests [default: two more than the CPU cores]
    #[arg(long, env = "SENTINEL_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    worker_threads: Option<u16>,
    /// How many `nice` steps the background fold and SQLite's threads run below the request
    /// threads (0 runs them at the same priority)
    #[arg(long, env = "SENTINEL_BACKGROUND_NICE", default_value_t = sentinel_server::background::NICE_STEPS,
          value_parser = clap::value_parser!(i32).range(0..=19))]
    background_nice: i32,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Args, Clone)]
struct ServerArgs {
    /// The server's address
    #[arg(long, env = "SENTINEL_URL", default_value = "http://127.0.0.1:8080")]
    server: String,
    /// An API key (an admin or approver key to decide)
    #[arg(long, env = "SENTINEL_API_KEY", hide_env_values = true)]
    key: String,
}

#[derive(Subcommand)]
enum ApprovalsCmd {
    /// Approval requests, newest first
    List {
        #[command(flatten)]
        server: ServerArgs,
        /// pending, approved, rejected or expired
        #[arg(long)]
        status: Option<String>,
        #[command(flatten)]
        fmt: FormatArg,
    },
    /// One request: the call, its redacted arguments, the spend so far, the rule, the context
    Show {
        id: String,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Approve a request (once; the agent's call then runs)
    Approve {
        id: String,
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Reject a request; the reason is given back to the agent
    Reject {
        id: String,
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        server: ServerArgs,
    },
}

#[derive(Args)]
#[group(required = true, multiple = false)]
struct Target {
    /// The agent to halt or resume
    #[arg(long)]
    agent: Option<String>,
    /// The run to halt or resume
    #[arg(long)]
    run: Option<String>,
}

#[derive(Args)]
struct TargetArgs {
    #[command(flatten)]
    target: Target,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(Args)]
struct HaltArgs {
    #[command(flatten)]
    target: Target,
    /// Why (shown in every denied decision)
    #[arg(long)]
    reason: Option<String>,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(Clone, Copy, Default, ValueEnum, PartialEq, Eq)]
enum Format {
    #[default]
    Text,
    Json,
}

#[derive(Args)]
struct FormatArg {
    /// Output format
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Validate policy files and list every error (exit 1 if any file is invalid)
    Check {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        #[command(flatten)]
        fmt: FormatArg,
    },
    /// Decide one call against the policies and explain why
    Explain {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// The action name
        #[arg(long)]
        action: String,
        /// Estimated cost in USD
        #[arg(long, default_value_t = 0.0)]
        cost: f64,
        /// The call's arguments as a JSON object
        #[arg(long)]
        args: Option<String>,
        #[arg(long, default_value = "default")]
        agent: String,
        #[arg(long, default_value = "default")]
        run: String,
        #[arg(long, default_value = "default")]
        session: String,
        #[command(flatten)]
        fmt: FormatArg,
    },
    /// Replay a ledger's recorded calls against candidate policies and show what would change
    Simulate {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// The ledger file or its directory
        #[arg(long)]
        ledger: PathBuf,
        /// Exit with code 2 when any verdict would change (for CI)
        #[arg(long)]
        fail_on_change: bool,
        /// Show at most this many changed calls
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[command(flatten)]
        fmt: FormatArg,
    },
    /// Print the JSON Schema of the policy file format
    Schema,
}

#[derive(Subcommand)]
enum LedgerCmd {
    /// Check the hash chain; names the first bad line (exit 1 if the ledger does not verify)
    Verify {
        /// Ledger file or directory [default: $AGENT_SENTINEL_HOME or .agent-sentinel]
        path: Option<PathBuf>,
        #[command(flatten)]
        fmt: FormatArg,
    },
    /// Calls, cost by action, and interventions by type
    Stats {
        path: Option<PathBuf>,
        #[command(flatten)]
        fmt: FormatArg,
    },
    /// Show the newest entries, and follow new ones with --follow
    Tail {
        path: Option<PathBuf>,
        /// How many entries to show
        #[arg(short = 'n', long, default_value_t = 10)]
        lines: usize,
        /// Keep printing entries as they are appended
        #[arg(short, long)]
        follow: bool,
        #[command(flatten)]
        fmt: FormatArg,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        // The reader went away (`sentinel ledger tail | head`): nothing left to say.
        Err(e) if e.chain().any(is_broken_pipe) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn is_broken_pipe(e: &(dyn std::error::Error + 'static)) -> bool {
    let pipe = Some(io::ErrorKind::BrokenPipe);
    e.downcast_ref::<io::Error>().map(io::Error::kind) == pipe
        || e.downcast_ref::<serde_json::Error>().and_then(serde_json::Error::io_error_kind) == pipe
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Policy(p) => policy(p),
        Command::Ledger(l) => ledger_cmd(l),
        Command::Serve(a) => serve(a),
        Command::Approvals(a) => approvals(a),
        Command::Halt(a) => halt(a),
        Command::Resume(a) => resume(a),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "sentinel", &mut io::stdout());
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Loads every file; returns the documents or every error found.
fn load_all(files: &[PathBuf]) -> (Vec<PolicyDoc>, Vec<PolicyError>) {
    let mut docs = Vec::new();
    let mut errors = Vec::new();
    for f in files {
        match load::load_file(f) {
            Ok(d) => docs.extend(d),
            Err(e) => errors.extend(e),
        }
    }
    (docs, errors)
}

fn compile(files: &[PathBuf]) -> Result<PolicySet> {
    let (docs, errors) = load_all(files);
    let errors = if errors.is_empty() {
        match PolicySet::compile(docs) {
            Ok(set) => return Ok(set),
            Err(e) => e,
        }
    } else {
        errors
    };
    for e in &errors {
        eprintln!("error: {e}");
    }
    bail!("{} error(s) in the policy files", errors.len())
}

fn print_json(v: &impl serde::Serialize) -> Result<()> {
    let mut out = io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, v)?;
    writeln!(out)?;
    Ok(())
}

fn policy(cmd: PolicyCmd) -> Result<ExitCode> {
    match cmd {
        PolicyCmd::Check { files, fmt } => {
            let (docs, mut errors) = load_all(&files);
            let mut names = Vec::new();
            if errors.is_empty() {
                names = docs.iter().map(|d| d.name.clone().unwrap_or_default()).collect();
                if let Err(e) = PolicySet::compile(docs) {
                    errors.extend(e);
                }
            }
            if fmt.format == Format::Json {
                let errs: Vec<Value> = errors
                    .iter()
                    .map(|e| {
                        serde_json::json!({"file": e.file, "line": e.line, "column": e.column, "message": e.message})
                    })
                    .collect();
                print_json(&serde_json::json!({"valid": errors.is_empty(), "policies": names, "errors": errs}))?;
            } else if errors.is_empty() {
                outln!("ok: {} file(s), {} policies: {}", files.len(), names.len(), names.join(", "));
            } else {
                for e in &errors {
                    outln!("error: {e}\n");
                }
                outln!("{} error(s)", errors.len());
            }
            Ok(if errors.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
        PolicyCmd::Explain { files, action, cost, args, agent, run, session, fmt } => {
            let set = compile(&files)?;
            let args: Value = match args {
                Some(a) => serde_json::from_str(&a).with_context(|| format!("`--args` is not valid JSON: `{a}`"))?,
                None => Value::Null,
            };
            if !matches!(args, Value::Object(_) | Value::Null) {
                bail!("`--args` must be a JSON object, like '{{\"amount\": 500}}'");
            }
            let req = ActionRequest::new(&action).agent(&agent).run(&run).session(&session).cost(cost).args(&args);
            let engine = Engine::new(set);
            let d = engine.evaluate(&req);
            if fmt.format == Format::Json {
                print_json(&d)?;
            } else {
                let set = engine.policies();
                out!("{}", report::explain(&d, &set, &req));
            }
            Ok(ExitCode::SUCCESS)
        }
        PolicyCmd::Simulate { files, ledger: path, fail_on_change, limit, fmt } => {
            let set = compile(&files)?;
            let path = ledger_path(Some(path));
            if !path.exists() {
                bail!("no ledger at `{}`", path.display());
            }
            let sim = report::simulate(set, &path)?;
            if fmt.format == Format::Json {
                print_json(&sim)?;
            } else {
                outln!(
                    "replayed {} calls: {} unchanged, {} changed, {} entries skipped",
                    sim.replayed,
                    sim.unchanged,
                    sim.changes.len(),
                    sim.skipped
                );
                for (t, n) in &sim.transitions {
                    outln!("  {t}: {n}");
                }
                if !sim.changes.is_empty() {
                    let mut table = Table::new();
                    table.load_preset(UTF8_BORDERS_ONLY);
                    table.set_header(["line", "time", "action", "agent", "run", "was", "would be", "reason"]);
                    for c in sim.changes.iter().take(limit) {
                        table.add_row([
                            c.line.to_string(),
                            c.timestamp.clone(),
                            c.action.clone(),
                            c.agent_id.clone(),
                            c.run_id.clone(),
                            c.recorded.as_str().to_string(),
                            c.simulated.as_str().to_string(),
                            c.reason.clone(),
                        ]);
                    }
                    outln!("{table}");
                    if sim.changes.len() > limit {
                        outln!("... and {} more (use --limit)", sim.changes.len() - limit);
                    }
                }
            }
            Ok(if fail_on_change && !sim.changes.is_empty() { ExitCode::from(2) } else { ExitCode::SUCCESS })
        }
        PolicyCmd::Schema => {
            print_json(&schemars::schema_for!(PolicyDoc))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn serve(a: ServeArgs) -> Result<ExitCode> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,tower_http=warn,sqlx=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(io::stderr).with_ansi(false);
    if a.log_format == LogFormat::Json {
        builder.json().init();
    } else {
        builder.init();
    }
    let config = sentinel_server::Config {
        data_dir: a.data_dir,
        database_url: a.database_url,
        listen: a.listen,
        request_timeout: Duration::from_secs(a.request_timeout.max(1)),
        idle_timeout: Duration::from_secs(a.idle_timeout.max(1)),
        secret_file: a.secret_file,
        cors_origins: a.cors_origins,
        notify: sentinel_server::notify::NotifyConfig {
            smtp_url: a.smtp_url,
            smtp_from: a.smtp_from,
            allow: a
                .notify_allow
                .iter()
                .map(|n| {
                    n.parse::<ipnet::IpNet>()
                        .or_else(|_| n.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                        .with_context(|| format!("--notify-allow `{n}` is not a network such as 127.0.0.1/32"))
                })
                .collect::<Result<_>>()?,
            public_url: a.public_url,
            ..Default::default()
        },
    };
    // No transparent huge pages for this process: the allocator asks for them, and the first touch
    // of each one zeroes 2 MiB while a request waits (measured: p99 of `/decide` at 20,000/s went
    // from 6-14 ms to under 2 ms without them). Failing to turn them off only costs latency.
    let _ = rustix::thread::disable_transparent_huge_pages(true);
    sentinel_server::background::set_nice_steps(a.background_nice);
    // Two more request threads than cores: when the kernel preempts one (for a client on the same
    // machine, or the background fold), the requests it would take next go to another instead of
    // waiting for it (measured at 20,000/s on 2 cores, with the fold at normal priority: p99
    // medians of 5.59 and 6.40 ms against 8.89 and 8.59 ms with one per core, in two A/Bs).
    let workers = a
        .worker_threads
        .map_or_else(|| std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get) + 2, usize::from);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(sentinel_server::run(config))?;
    Ok(ExitCode::SUCCESS)
}

/// Runs one request against a server.
fn remote<T>(
    server: &ServerArgs,
    f: impl AsyncFnOnce(sentinel_client::Client) -> sentinel_client::Result<T>,
) -> Result<T> {
    let client = sentinel_client::Client::new(&server.server, &server.key)?;
    let rt =
        tokio::runtime::Builder::new_current_thread().enable_all().build().context("cannot start the async runtime")?;
    Ok(rt.block_on(f(client))?)
}

fn approvals(cmd: ApprovalsCmd) -> Result<ExitCode> {
    match cmd {
        ApprovalsCmd::List { server, status, fmt } => {
            let path = match status.as_deref() {
                Some(s @ ("pending" | "approved" | "rejected" | "expired")) => format!("/api/v1/approvals?status={s}"),
                Some(other) => anyhow::bail!("--status `{other}` is not one of pending, approved, rejected, expired"),
                None => "/api/v1/approvals".to_string(),
            };
            let v = remote(&server, async |c| c.get_json(&path).await)?;
            let empty = Vec::new();
            let items = v.get("items").and_then(serde_json::Value::as_array).unwrap_or(&empty);
            if fmt.format == Format::Json {
                outln!("{}", serde_json::to_string_pretty(items)?);
                return Ok(ExitCode::SUCCESS);
            }
            if items.is_empty() {
                outln!("no approval requests");
                return Ok(ExitCode::SUCCESS);
            }
            let mut t = Table::new();
            t.load_preset(UTF8_BORDERS_ONLY).set_header([
                "id",
                "status",
                "agent",
                "action",
                "cost",
                "expires",
                "decided by",
            ]);
            let s = |a: &serde_json::Value, k: &str| {
                a.get(k).map(|v| v.as_str().map_or(v.to_string(), str::to_string)).unwrap_or_default()
            };
            for a in items {
                let expires = a.get("expires_at").and_then(serde_json::Value::as_i64).map(fmt_ms).unwrap_or_default();
                let decided = s(a, "decided_by");
                t.add_row([
                    s(a, "id"),
                    s(a, "status"),
                    s(a, "agent_id"),
                    s(a, "action"),
                    format!("${}", s(a, "cost_usd")),
                    expires,
                    if decided == "null" { String::new() } else { decided },
                ]);
            }
            outln!("{t}");
        }
        ApprovalsCmd::Show { id, server } => {
            let v = remote(&server, async |c| c.get_json(&format!("/api/v1/approvals/{id}")).await)?;
            outln!("{}", serde_json::to_string_pretty(&v)?);
        }
        ApprovalsCmd::Approve { id, reason, server } => {
            let v = remote(&server, async |c| {
                c.post_json(&format!("/api/v1/approvals/{id}/approve"), &serde_json::json!({"reason": reason})).await
            })?;
            outln!("approved {id} (by {})", v.get("decided_by").and_then(serde_json::Value::as_str).unwrap_or("?"));
        }
        ApprovalsCmd::Reject { id, reason, server } => {
            let v = remote(&server, async |c| {
                c.post_json(&format!("/api/v1/approvals/{id}/reject"), &serde_json::json!({"reason": reason})).await
            })?;
            outln!("rejected {id} (by {})", v.get("decided_by").and_then(serde_json::Value::as_str).unwrap_or("?"));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `YYYY-MM-DD HH:MM:SS` UTC for epoch milliseconds.
fn fmt_ms(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string()).unwrap_or_default()
}

fn target_query(t: &Target) -> (String, String) {
    match (&t.agent, &t.run) {
        (Some(a), _) => ("agent_id".into(), a.clone()),
        (None, Some(r)) => ("run_id".into(), r.clone()),
        (None, None) => ("agent_id".into(), String::new()),
    }
}

fn halt(a: HaltArgs) -> Result<ExitCode> {
    let (k, v) = target_query(&a.target);
    let mut body = serde_json::json!({ k.as_str(): v });
    if let (Some(r), serde_json::Value::Object(m)) = (&a.reason, &mut body) {
        m.insert("reason".into(), serde_json::Value::String(r.clone()));
    }
    remote(&a.server, async |c| c.post_json("/api/v1/halts", &body).await)?;
    outln!("halted {} `{v}`: its decisions now deny", k.trim_end_matches("_id"));
    Ok(ExitCode::SUCCESS)
}

fn resume(a: TargetArgs) -> Result<ExitCode> {
    let (k, v) = target_query(&a.target);
    let enc: String = v
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    remote(&a.server, async |c| c.delete(&format!("/api/v1/halts?{k}={enc}")).await)?;
    outln!("resumed {} `{v}`", k.trim_end_matches("_id"));
    Ok(ExitCode::SUCCESS)
}

/// A file path as given, a directory's `ledger.jsonl`, or the default home's.
fn ledger_path(p: Option<PathBuf>) -> PathBuf {
    let p = p.unwrap_or_else(default_home);
    if p.is_dir() { p.join(LEDGER_FILE) } else { p }
}

fn interventions_beside(ledger: &Path) -> PathBuf {
    ledger.with_file_name(INTERVENTIONS_FILE)
}

fn ledger_cmd(cmd: LedgerCmd) -> Result<ExitCode> {
    match cmd {
        LedgerCmd::Verify { path, fmt } => {
            let path = ledger_path(path);
            if !path.exists() {
                bail!("no ledger at `{}`", path.display());
            }
            let report = ledger::verify(&path)?;
            if fmt.format == Format::Json {
                print_json(&report)?;
            } else if let Some(f) = &report.failure {
                let loc =
                    if f.line > 0 { format!("{}:{}", f.file.display(), f.line) } else { f.file.display().to_string() };
                outln!("FAILED: {loc}: {}", f.problem);
                outln!("{} entries verified before the failure", report.entries);
            } else {
                let anchor = match report.anchor_seq {
                    _ if report.anchored => ", end anchored".to_string(),
                    Some(a) => format!(
                        ", anchored up to entry {a} (the writer stopped before anchoring the last {})",
                        report.last_seq.saturating_sub(a)
                    ),
                    None => String::new(),
                };
                outln!(
                    "ok: {} entries in {} file(s), chain intact{anchor}; last hash {}",
                    report.entries,
                    report.files.len(),
                    report.last_hash
                );
            }
            Ok(if report.ok() { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
        LedgerCmd::Stats { path, fmt } => {
            let path = ledger_path(path);
            if !path.exists() {
                bail!("no ledger at `{}`", path.display());
            }
            let st = report::ledger_stats(&path, Some(&interventions_beside(&path)))?;
            if fmt.format == Format::Json {
                print_json(&st)?;
                return Ok(ExitCode::SUCCESS);
            }
            outln!("entries: {}  calls: {}  total cost: ${:.6}", st.entries, st.calls, st.total_cost_usd);
            let outcomes: Vec<String> = st.by_outcome.iter().map(|(k, v)| format!("{k}={v}")).collect();
            outln!("outcomes: {}", outcomes.join(" "));
            let mut t = Table::new();
            t.load_preset(UTF8_BORDERS_ONLY);
            t.set_header(["action", "calls", "cost (USD)", "blocked"]);
            for (a, s) in &st.by_action {
                t.add_row([a.clone(), s.calls.to_string(), format!("{:.6}", s.cost_usd), s.blocked.to_string()]);
            }
            outln!("{t}");
            outln!("interventions: {}  cost prevented: ${:.6}", st.interventions, st.cost_prevented_usd);
            let mut t = Table::new();
            t.load_preset(UTF8_BORDERS_ONLY);
            t.set_header(["type", "count"]);
            for (k, v) in &st.interventions_by_type {
                t.add_row([k.clone(), v.to_string()]);
            }
            outln!("{t}");
            Ok(ExitCode::SUCCESS)
        }
        LedgerCmd::Tail { path, lines, follow, fmt } => {
            let path = ledger_path(path);
            if !path.exists() {
                bail!("no ledger at `{}`", path.display());
            }
            let all = ledger::read_all(&path)?;
            for v in all.iter().skip(all.len().saturating_sub(lines)) {
                print_entry(v, fmt.format)?;
            }
            if follow {
                follow_file(&path, fmt.format)?;
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn print_entry(v: &Value, format: Format) -> Result<()> {
    let mut out = io::stdout().lock();
    if format == Format::Json {
        serde_json::to_writer(&mut out, v)?;
        writeln!(out)?;
        return Ok(());
    }
    let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("-").to_string();
    let reason = v.pointer("/decision/reason").and_then(Value::as_str).unwrap_or("-");
    writeln!(
        out,
        "{:>6}  {}  {:<9} {:<28} ${:<10.6} {}/{}  {}",
        v.get("seq").and_then(Value::as_u64).unwrap_or(0),
        s("timestamp"),
        s("outcome"),
        s("action"),
        v.get("cost_usd").and_then(Value::as_f64).unwrap_or(0.0),
        s("agent_id"),
        s("run_id"),
        reason
    )?;
    Ok(())
}

/// Prints lines appended after the current end, following rotation, until interrupted.
fn follow_file(path: &Path, format: Format) -> Result<()> {
    let mut file = std::fs::File::open(path)?;
    let mut pos = file.seek(SeekFrom::End(0))?;
    let mut partial = Vec::new();
    loop {
        std::thread::sleep(Duration::from_millis(250));
        let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        if len < pos {
            // Rotated: the active file is new.
            file = std::fs::File::open(path)?;
            pos = 0;
        }
        file.seek(SeekFrom::Start(pos))?;
        let mut buf = Vec::new();
        let n = file.read_to_end(&mut buf)?;
        pos += n as u64;
        partial.extend_from_slice(&buf);
        while let Some(i) = partial.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = partial.drain(..=i).collect();
            if let Ok(v) = serde_json::from_slice::<Value>(&line) {
                print_entry(&v, format)?;
            }
        }
    }
}
