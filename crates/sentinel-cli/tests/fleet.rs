//! Two `sentinel serve` processes on one PostgreSQL database share budgets and rate limits:
//! 1,000 concurrent `/decide` calls, split between them, never overspend and allow exactly what
//! is affordable. Also: a second server on one SQLite file is refused, and a replica with another
//! secret is refused.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sqlx::Connection;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn start(data: &Path, db: Option<&str>, secret: Option<&Path>) -> Server {
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sentinel"));
    cmd.args(["serve", "--data-dir"]).arg(data).args(["--listen", &addr.to_string()]);
    if let Some(db) = db {
        cmd.args(["--database-url", db]);
    }
    if let Some(s) = secret {
        cmd.arg("--secret-file").arg(s);
    }
    let child = cmd.env("RUST_LOG", "warn").stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let server = Server { child, addr };
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "server on {addr} did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    server
}

/// One HTTP/1.1 request on its own connection.
async fn request(addr: SocketAddr, method: &str, path: &str, key: &str, body: Option<&Value>) -> (u16, Value) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let body = body.map(Value::to_string).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf);
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let payload = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, serde_json::from_str(payload).unwrap_or(Value::Null))
}

fn pg_admin() -> String {
    std::env::var("SENTINEL_TEST_PG_URL").unwrap_or_else(|_| "postgres://root@127.0.0.1:5432/postgres".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_budgets_and_rate_limits_without_overspend() {
    let admin_url = pg_admin();
    let name = format!("sentinel_test_fleet_{}", uuid::Uuid::now_v7().simple());
    let mut conn = sqlx::PgConnection::connect(&admin_url)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL is needed at {admin_url} (set SENTINEL_TEST_PG_URL): {e}"));
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut conn).await.unwrap();
    let db = format!("{}/{name}", admin_url.rsplit_once('/').unwrap().0);

    let a_dir = tempfile::tempdir().unwrap();
    let b_dir = tempfile::tempdir().unwrap();
    let a = start(a_dir.path(), Some(&db), None);
    let key = std::fs::read_to_string(a_dir.path().join("bootstrap-admin-key")).unwrap().trim().to_string();

    // A replica with its own secret would accept no key: it refuses to start.
    let mut wrong = Command::new(env!("CARGO_BIN_EXE_sentinel"))
        .args(["serve", "--data-dir"])
        .arg(b_dir.path())
        .args(["--listen", &format!("127.0.0.1:{}", free_port()), "--database-url", &db])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wrong.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(wrong.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(!status.success() && err.contains("secret"), "{err}");
    std::fs::remove_file(b_dir.path().join("server-secret")).unwrap();

    // $10 per session at $0.03 a call: 333 calls fit ($9.99), the 334th would not. 50 searches a minute.
    let policy = json!({"name": "fleet", "budgets": {"session": 10.0},
        "rate_limits": {"search": {"max_count": 50, "window_seconds": 60, "per": "agent"}}});
    let (s, p) = request(a.addr, "POST", "/api/v1/policies", &key, Some(&policy)).await;
    assert_eq!(s, 201, "{p}");
    let b = start(b_dir.path(), Some(&db), Some(&a_dir.path().join("server-secret")));
    assert!(!b_dir.path().join("bootstrap-admin-key").exists(), "only the first replica bootstraps");

    for (action, cost, expect_allowed, reason) in
        [("pay", 0.03, 333usize, "SESSION_BUDGET_EXCEEDED"), ("search", 0.0, 50, "RATE_LIMITED")]
    {
        let mut tasks = Vec::new();
        for i in 0..1000 {
            let addr = if i % 2 == 0 { a.addr } else { b.addr };
            let key = key.clone();
            let body = json!({"action": action, "cost_usd": cost, "agent_id": "bot", "session_id": "shared", "run_id": format!("r{}", i % 7)});
            tasks.push(tokio::spawn(async move { request(addr, "POST", "/api/v1/decide", &key, Some(&body)).await }));
        }
        let mut allowed = [0usize; 2];
        let mut denied = 0;
        for (i, t) in tasks.into_iter().enumerate() {
            let (s, d) = t.await.unwrap();
            assert_eq!(s, 200, "{d}");
            match d["verdict"].as_str() {
                Some("allow") => allowed[i % 2] += 1,
                Some("deny") => {
                    assert_eq!(d["reason"], reason, "{d}");
                    denied += 1;
                }
                other => panic!("unexpected verdict {other:?}: {d}"),
            }
        }
        assert_eq!(allowed[0] + allowed[1], expect_allowed, "{action}: exactly the affordable number is allowed");
        assert_eq!(denied, 1000 - expect_allowed);
        // Both replicas decided (every call above got an answer) against the one shared counter:
        // with a counter each, each replica would allow the affordable number of its own 500, so
        // the exact total is the proof. How the allowed calls split between the replicas is a
        // race; all of them went to one replica in clean-clone runs, for the rate limit and once
        // for the budget, which is still exact.
        eprintln!("{action}: allowed by replica {allowed:?}");
    }
    let reserved: i64 = sqlx::query_scalar(
        "SELECT COALESCE(SUM(cost_micros), 0)::BIGINT FROM reservations WHERE session_id = 'shared' AND state = 'reserved'",
    )
    .fetch_one(&mut sqlx::PgConnection::connect(&db).await.unwrap())
    .await
    .unwrap();
    assert_eq!(reserved, 9_990_000, "the total reserved is $9.99, never above the $10 budget");

    // A halt on one replica is seen by the other at once.
    let (s, _) =
        request(a.addr, "POST", "/api/v1/halts", &key, Some(&json!({"agent_id": "bot", "reason": "stop"}))).await;
    assert_eq!(s, 201);
    let (_, d) =
        request(b.addr, "POST", "/api/v1/decide", &key, Some(&json!({"action": "x", "agent_id": "bot"}))).await;
    assert_eq!(d["reason"], "HALTED", "{d}");

    drop(a);
    drop(b);
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE {name} WITH (FORCE)"))).execute(&mut conn).await.unwrap();
}

#[test]
fn a_second_server_on_one_sqlite_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _first = start(dir.path(), None, None);
    let out = Command::new(env!("CARGO_BIN_EXE_sentinel"))
        .args(["serve", "--data-dir"])
        .arg(dir.path())
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another `sentinel serve`") && err.contains("PostgreSQL"), "{err}");
}

fn cli(server: &Server, key: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sentinel"))
        .args(args)
        .env("SENTINEL_URL", format!("http://{}", server.addr))
        .env("SENTINEL_API_KEY", key)
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approvals_and_halts_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path(), None, None);
    let key = std::fs::read_to_string(dir.path().join("bootstrap-admin-key")).unwrap().trim().to_string();
    let policy = json!({"name": "p", "approvals": {"actions": ["deploy"], "timeout_seconds": 60}});
    assert_eq!(request(s.addr, "POST", "/api/v1/policies", &key, Some(&policy)).await.0, 201);
    let (_, d) =
        request(s.addr, "POST", "/api/v1/decide", &key, Some(&json!({"action": "deploy", "agent_id": "bot"}))).await;
    let id = d["approval_request"]["id"].as_str().unwrap().to_string();

    let (ok, out, err) = cli(&s, &key, &["approvals", "list", "--status", "pending"]);
    assert!(ok && out.contains(&id) && out.contains("deploy"), "{out}{err}");
    let (ok, out, _) = cli(&s, &key, &["approvals", "show", &id]);
    assert!(ok && out.contains("\"status\": \"pending\""), "{out}");
    let (ok, out, err) = cli(&s, &key, &["approvals", "approve", &id, "--reason", "change window"]);
    assert!(ok && out.contains("approved"), "{out}{err}");
    let (ok, _, err) = cli(&s, &key, &["approvals", "reject", &id]);
    assert!(!ok && err.contains("already approved"), "decided once: {err}");
    let (ok, _, err) = cli(&s, "as_00000000000000000000000000000000", &["approvals", "list"]);
    assert!(!ok && err.contains("401"), "{err}");

    let (ok, out, err) = cli(&s, &key, &["halt", "--agent", "bot", "--reason", "incident 7"]);
    assert!(ok, "{out}{err}");
    let (_, d) =
        request(s.addr, "POST", "/api/v1/decide", &key, Some(&json!({"action": "x", "agent_id": "bot"}))).await;
    assert_eq!(d["reason"], "HALTED");
    let (ok, _, err) = cli(&s, &key, &["resume", "--agent", "bot"]);
    assert!(ok, "{err}");
    let (_, d) =
        request(s.addr, "POST", "/api/v1/decide", &key, Some(&json!({"action": "x", "agent_id": "bot"}))).await;
    assert_eq!(d["verdict"], "allow");
    let (ok, _, err) = cli(&s, &key, &["halt", "--agent", "a", "--run", "b"]);
    assert!(!ok && err.contains("cannot be used with"), "{err}");

    // Stopping the server does not wait for open long-polls: they answer at once.
    let (_, d) =
        request(s.addr, "POST", "/api/v1/decide", &key, Some(&json!({"action": "deploy", "agent_id": "bot"}))).await;
    let id = d["approval_request"]["id"].as_str().unwrap().to_string();
    let (addr, k) = (s.addr, key.clone());
    let waiting = tokio::spawn(async move {
        request(addr, "GET", &format!("/api/v1/approvals/{id}/wait?timeout_seconds=25"), &k, None).await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut s = s;
    let t = Instant::now();
    Command::new("kill").args(["-TERM", &s.child.id().to_string()]).status().unwrap();
    let status = s.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(t.elapsed() < Duration::from_secs(5), "stopped in {:?}", t.elapsed());
    let (code, w) = waiting.await.unwrap();
    assert_eq!((code, w["status"].as_str()), (200, Some("pending")), "{w}");
}
