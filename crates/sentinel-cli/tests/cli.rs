//! The `sentinel` binary as a user runs it: exit codes, what goes to stdout, and what it says.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use sentinel_core::ledger::LogOptions;
use sentinel_core::load::parse_yaml;
use sentinel_core::{ActionRequest, Begun, CallOutcome, Engine, Guard, PolicySet};
use serde_json::{Value, json};

fn sentinel(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sentinel")).args(args).env("NO_COLOR", "1").output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples")
}

fn write(dir: &Path, name: &str, body: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p.display().to_string()
}

#[test]
fn check_accepts_the_examples_and_lists_every_error_in_bad_files() {
    let ex = examples();
    let files: Vec<String> =
        ["callguard.yaml", "production.yaml", "rules.json"].iter().map(|f| ex.join(f).display().to_string()).collect();
    let mut args = vec!["policy", "check"];
    args.extend(files.iter().map(String::as_str));
    let o = sentinel(&args);
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout(&o).starts_with("ok: 3 file(s), 5 policies"), "{}", stdout(&o));

    let dir = tempfile::tempdir().unwrap();
    let a = write(dir.path(), "a.yaml", "budjets:\n  run: 1\n");
    let b = write(dir.path(), "b.yaml", "budgets:\n  run: -1\n");
    let o = sentinel(&["policy", "check", &a, &b]);
    assert_eq!(o.status.code(), Some(1));
    let out = stdout(&o);
    assert!(out.contains("a.yaml:1:1: unknown key `budjets`"), "{out}");
    assert!(out.contains("did you mean `budgets`?"), "{out}");
    assert!(out.contains("b.yaml:2:8: amount must not be negative"), "{out}");
    assert!(out.trim_end().ends_with("2 error(s)"), "{out}");

    let o = sentinel(&["policy", "check", &a, "--format", "json"]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["valid"], false);
    assert_eq!(v["errors"][0]["line"], 1);
}

#[test]
fn explain_prints_the_decision_and_its_rationale() {
    let p = examples().join("production.yaml").display().to_string();
    let o = sentinel(&[
        "policy",
        "explain",
        &p,
        "--action",
        "transfer_funds",
        "--cost",
        "0.5",
        "--args",
        r#"{"amount": 5000}"#,
    ]);
    assert_eq!(o.status.code(), Some(0));
    let out = stdout(&o);
    assert!(out.contains("verdict:        require_approval"), "{out}");
    assert!(out.contains("rule:           large-transfer"), "{out}");
    assert!(out.contains("approval:       timeout 600s"), "{out}");

    let o = sentinel(&["policy", "explain", &p, "--action", "drop_table", "--format", "json"]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["verdict"], "deny");
    assert_eq!(v["intervention"], "HARD_BLOCK");
    assert_eq!(v["policy"], "global-safety");

    let o = sentinel(&["policy", "explain", &p, "--action", "x", "--args", "[1]"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("`--args` must be a JSON object"));
}

/// Records some guarded calls under a permissive policy.
fn make_ledger(dir: &Path) {
    let set = PolicySet::compile(parse_yaml("p.yaml", "p", "budgets:\n  run: 100\n").unwrap()).unwrap();
    let g = Guard::open(dir, Arc::new(Engine::new(set)), LogOptions::default()).unwrap();
    for (action, amount) in
        [("search", 1), ("transfer_funds", 50), ("transfer_funds", 5000), ("delete_user", 0), ("search", 2)]
    {
        let args = json!({"amount": amount});
        let req = ActionRequest::new(action).args(&args).cost(0.25).agent("bot").run("r1");
        match g.begin(&req, args.clone()).unwrap() {
            Begun::Proceed(p) => {
                g.finish(*p, CallOutcome::Success(json!("ok")), None).unwrap();
            }
            Begun::Stop { .. } => {}
        }
    }
}

#[test]
fn simulate_shows_what_a_candidate_policy_would_change() {
    let dir = tempfile::tempdir().unwrap();
    make_ledger(dir.path());
    let ledger = dir.path().join("ledger.jsonl").display().to_string();
    let candidate = write(
        dir.path(),
        "candidate.yaml",
        "denied_actions: [delete_user]\nrules:\n  - { id: big, function_pattern: transfer_*, conditions: [{param: amount, operator: gt, value: 1000}], action: block }\n",
    );
    let o = sentinel(&["policy", "simulate", &candidate, "--ledger", &ledger]);
    assert_eq!(o.status.code(), Some(0));
    let out = stdout(&o);
    assert!(out.starts_with("replayed 5 calls: 3 unchanged, 2 changed"), "{out}");
    assert!(out.contains("allow -> deny: 2"), "{out}");
    assert!(out.contains("RULE_BLOCK") && out.contains("DENIED_ACTION"), "{out}");

    let o = sentinel(&["policy", "simulate", &candidate, "--ledger", &ledger, "--fail-on-change"]);
    assert_eq!(o.status.code(), Some(2), "a CI gate fails when verdicts change");
    let same = write(dir.path(), "same.yaml", "budgets:\n  run: 100\n");
    let o = sentinel(&["policy", "simulate", &same, "--ledger", &ledger, "--fail-on-change"]);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
}

#[test]
fn ledger_verify_stats_and_tail() {
    let dir = tempfile::tempdir().unwrap();
    make_ledger(dir.path());
    let d = dir.path().display().to_string();
    let o = sentinel(&["ledger", "verify", &d]);
    assert_eq!(o.status.code(), Some(0));
    assert!(stdout(&o).starts_with("ok: 5 entries in 1 file(s), chain intact, end anchored"), "{}", stdout(&o));

    let o = sentinel(&["ledger", "stats", &d, "--format", "json"]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["entries"], 5);
    assert_eq!(v["calls"], 5);
    assert_eq!(v["total_cost_usd"], 1.25);
    assert_eq!(v["by_action"]["transfer_funds"]["calls"], 2);

    let o = sentinel(&["ledger", "tail", &d, "-n", "2", "--format", "json"]);
    let lines: Vec<Value> = stdout(&o).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[1]["seq"], 5);

    // Tamper with the third entry: verify names the line and exits 1.
    let path = dir.path().join("ledger.jsonl");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut ls: Vec<String> = text.lines().map(str::to_string).collect();
    ls[2] = ls[2].replace("\"cost_usd\":0.25", "\"cost_usd\":0.01");
    std::fs::write(&path, ls.join("\n") + "\n").unwrap();
    let o = sentinel(&["ledger", "verify", &d]);
    assert_eq!(o.status.code(), Some(1));
    let out = stdout(&o);
    assert!(out.contains("ledger.jsonl:3: `hash` does not match the line's contents"), "{out}");
}

#[test]
fn missing_ledger_and_completions() {
    let o = sentinel(&["ledger", "verify", "/nonexistent/dir/ledger.jsonl"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no ledger at `/nonexistent/dir/ledger.jsonl`"));
    let o = sentinel(&["completions", "bash"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(stdout(&o).contains("sentinel"));
}

#[test]
fn closed_pipe_does_not_panic() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    {
        let g = Guard::open(dir.path(), Arc::new(Engine::new(PolicySet::empty())), LogOptions::default()).unwrap();
        for i in 0..5000 {
            g.record("a", &json!({"i": i}), &json!(null), 0.0, 1.0, "success", &[], ("x", "y", "z")).unwrap();
        }
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_sentinel"))
        .args(["ledger", "tail", &dir.path().display().to_string(), "-n", "5000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut first).unwrap();
    // The reader goes away after one line, like `| head -1`.
    let out = child.wait_with_output().unwrap();
    assert!(first.contains("success"));
    assert_eq!(out.status.code(), Some(0), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stderr.is_empty(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
}

/// A background priority outside 0..=19, on the command line or in the environment, is refused
/// at start with the flag named, before anything is opened.
#[test]
fn serve_refuses_a_bad_background_priority() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data").display().to_string();
    let out = sentinel(&["serve", "--data-dir", &data, "--background-nice", "25"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--background-nice") && err.contains("25"), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_sentinel"))
        .args(["serve", "--data-dir", &data])
        .env("SENTINEL_BACKGROUND_NICE", "low")
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--background-nice") && err.contains("low"), "{err}");
    assert!(!dir.path().join("data").exists(), "nothing was created");
}

/// `sentinel serve` as an operator runs it: first start writes the bootstrap key (0600), the key
/// works over real HTTP, and SIGTERM stops the server gracefully.
#[test]
fn serve_bootstraps_answers_and_stops_gracefully() {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpStream;
    use std::os::unix::fs::PermissionsExt;
    use std::process::Stdio;
    use std::time::{Duration, Instant};

    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_sentinel"))
        .args(["serve", "--data-dir", &dir.path().display().to_string(), "--listen", &format!("127.0.0.1:{port}")])
        .args(["--idle-timeout", "2"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut printed = String::new();
    let started = Instant::now();
    while !printed.contains("listening on") && started.elapsed() < Duration::from_secs(30) {
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(200)) {
            printed.push_str(&l);
            printed.push('\n');
        }
    }
    let key_file = dir.path().join("bootstrap-admin-key");
    let key = std::fs::read_to_string(&key_file).unwrap().trim().to_string();
    assert_eq!(std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777, 0o600);
    assert!(
        printed.contains(&key) && printed.contains("bootstrap-admin-key"),
        "printed once with where it is stored: {printed}"
    );

    let get = |path: &str, key: &str| -> String {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    let me = get("/api/v1/users/me", &key);
    assert!(me.starts_with("HTTP/1.1 200"), "{me}");
    assert!(me.contains("\"scope\":\"admin\""), "{me}");
    assert!(get("/api/v1/users/me", "as_nope").starts_with("HTTP/1.1 401"));
    assert!(get("/readyz", "").starts_with("HTTP/1.1 200"));

    // Body limits over real HTTP, where a client declares the length: 2 MiB is read (and found
    // wrong) by the ledger, whose batches may be 16 MiB, and refused unread by `/decide` (1 MiB);
    // both answers are problem+json.
    let post = |path: &str, body: &str| -> String {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(s, "POST {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len()).unwrap();
        // The server may answer before reading everything; a refused rest is not an error here.
        let _ = s.write_all(body.as_bytes());
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    };
    let big = format!("{{\"stream\": \"s\", \"ledger\": [\"{}\"]}}", "x".repeat(2 << 20));
    let ledger = post("/api/v1/ledger", &big);
    assert!(
        ledger.starts_with("HTTP/1.1 422") && ledger.contains("application/problem+json"),
        "{}",
        &ledger[..ledger.len().min(400)]
    );
    let decide = post("/api/v1/decide", &big);
    assert!(decide.starts_with("HTTP/1.1 413") && decide.contains("application/problem+json"), "{decide}");
    assert!(decide.contains("at most 1048576 bytes"), "{decide}");

    // A client that sends its request head slowly, or not at all, or stays idle after an answer,
    // is disconnected after --idle-timeout (2 s here); one that keeps within it is served.
    let until_closed = |s: &mut TcpStream| -> (String, Duration) {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let t = Instant::now();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out); // EOF, or a reset: either way the server let go
        (String::from_utf8_lossy(&out).into_owned(), t.elapsed())
    };
    let mut silent = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut slow = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(slow, "GET /healthz HTTP/1.1\r\nHost: localhost\r\n").unwrap();
    let mut idle = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(idle, "GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut patient = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(patient, "GET /healthz HTTP/1.1\r\nHost: local").unwrap();
    std::thread::sleep(Duration::from_millis(700));
    write!(patient, "host\r\nConnection: close\r\n\r\n").unwrap();
    let (answer, _) = until_closed(&mut patient);
    assert!(answer.starts_with("HTTP/1.1 200"), "a head sent within the timeout is served: {answer}");
    // A running request is not idle: a body that takes longer than the idle timeout to arrive
    // (the request timeout is the limit for that) is read and answered.
    let body = r#"{"action": "search", "agent_id": "a", "cost_usd": 0.01}"#;
    let mut trickle = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(trickle, "POST /api/v1/decide HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len()).unwrap();
    for part in body.as_bytes().chunks(body.len() / 6 + 1) {
        std::thread::sleep(Duration::from_millis(500));
        trickle.write_all(part).unwrap();
    }
    let (answer, _) = until_closed(&mut trickle);
    assert!(answer.starts_with("HTTP/1.1 200") && answer.contains("\"verdict\":\"allow\""), "{answer}");
    for (name, s) in [("silent", &mut silent), ("slow", &mut slow), ("idle", &mut idle)] {
        let (out, took) = until_closed(s);
        assert!(took < Duration::from_secs(10), "{name}: still connected after {took:?}");
        if name == "idle" {
            assert!(out.starts_with("HTTP/1.1 200") && out.matches("HTTP/1.1").count() == 1, "{out}");
        } else {
            assert!(!out.contains("200 OK"), "{name}: {out}");
        }
    }

    // SIGTERM while a request is half received and another connection sits silent: the request
    // is still read and answered, the silent connection does not hold the stop up (the drain
    // would otherwise wait the whole request timeout, 30 s), and no new connection is taken.
    let mut quiet = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut inflight = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(inflight, "POST /api/v1/decide HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", body.len()).unwrap();
    let (first, rest) = body.as_bytes().split_at(body.len() / 2);
    inflight.write_all(first).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let t = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    inflight.write_all(rest).unwrap();
    let (answer, _) = until_closed(&mut inflight);
    assert!(answer.starts_with("HTTP/1.1 200") && answer.contains("\"verdict\":\"allow\""), "{answer}");
    assert!(answer.to_ascii_lowercase().contains("connection: close"), "no keep-alive while stopping: {answer}");
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(t.elapsed() < Duration::from_secs(15), "server did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(t.elapsed() < Duration::from_secs(8), "a silent connection held the stop up for {:?}", t.elapsed());
    let (out, _) = until_closed(&mut quiet);
    assert!(out.is_empty(), "{out}");
    assert!(status.success(), "graceful shutdown exits 0: {status:?}");

    // Restart: no new bootstrap key is made or printed, and the old one still works.
    let port2 = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut again = Command::new(env!("CARGO_BIN_EXE_sentinel"))
        .args(["serve", "--data-dir", &dir.path().display().to_string(), "--listen", &format!("127.0.0.1:{port2}")])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(again.stderr.take().unwrap());
    let mut seen = String::new();
    while !seen.contains("listening on") {
        let mut line = String::new();
        if err.read_line(&mut line).unwrap() == 0 {
            break;
        }
        seen.push_str(&line);
    }
    assert!(!seen.contains("BOOTSTRAP"), "the key is printed only on first start: {seen}");
    assert_eq!(std::fs::read_to_string(&key_file).unwrap().trim(), key);
    let me = {
        let mut s = TcpStream::connect(("127.0.0.1", port2)).unwrap();
        write!(s, "GET /api/v1/users/me HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {key}\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    assert!(me.starts_with("HTTP/1.1 200"), "{me}");
    Command::new("kill").args(["-TERM", &again.id().to_string()]).status().unwrap();
    assert!(again.wait().unwrap().success());
}
