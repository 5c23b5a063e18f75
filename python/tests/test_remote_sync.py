"""Remote sync against a real `sentinel serve`: uploads, retries, policy sync, central authority.

Every test starts its own server (SQLite, a temporary data directory, a free port on 127.0.0.1).
"""

import asyncio
import hashlib
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import agent_sentinel
from agent_sentinel import (
    AgentHaltedError,
    AgentSentinelError,
    AuthorityUnavailableError,
    BackgroundSync,
    BudgetExceededError,
    CostTracker,
    PolicyEngine,
    PolicyViolationError,
    RateLimitError,
    SentinelConfig,
    SyncConfig,
    enable_remote_sync,
    flush_and_stop,
    guarded_action,
    protect,
)
from agent_sentinel._runtime import RUNTIME
from conftest import ROOT, read_jsonl, sentinel_bin, verify


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One `sentinel serve` process on 127.0.0.1; can be killed and restarted on the same port and data."""

    def __init__(self, data_dir: Path, extra_args=()) -> None:
        self.data_dir = data_dir
        self.extra_args = list(extra_args)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None
        self.key = None

    def start(self) -> "Server":
        self.log = open(self.data_dir.parent / f"server-{self.port}.log", "ab")
        self.proc = subprocess.Popen(
            [sentinel_bin(), "serve", "--data-dir", str(self.data_dir), "--listen", f"127.0.0.1:{self.port}",
             *self.extra_args],
            stdout=self.log, stderr=self.log, stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"`sentinel serve` exited with {self.proc.returncode}; see {self.log.name}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.02)
        else:
            pytest.fail("`sentinel serve` did not answer /healthz within 15 s")
        self.key = (self.data_dir / "bootstrap-admin-key").read_text().strip()
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def api(self, method: str, path: str, body=None, key=None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {key or self.key}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                raw = r.read()
                return r.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as e:
            raw = e.read()
            return e.code, json.loads(raw) if raw else None

    def streams(self) -> dict:
        status, body = self.api("GET", "/api/v1/ledger/streams")
        assert status == 200, body
        return {s["stream"]: s for s in body["streams"]}

    def policy(self, doc: dict) -> dict:
        status, body = self.api("POST", "/api/v1/policies", doc)
        assert status == 201, body
        return body


@pytest.fixture
def server(tmp_path):
    s = Server(tmp_path / "server-data").start()
    yield s
    s.kill()


@pytest.fixture(autouse=True)
def _no_sync_left_behind():
    yield
    flush_and_stop()
    assert agent_sentinel._call._authority is None


def make_sync(server_or_url, key=None, **kw) -> BackgroundSync:
    url = server_or_url if isinstance(server_or_url, str) else server_or_url.url
    key = key or server_or_url.key
    kw.setdefault("flush_interval", 600.0)
    kw.setdefault("policy_sync_interval", None)
    kw.setdefault("retry_backoff", 0.01)
    kw.setdefault("max_backoff", 0.05)
    return BackgroundSync(SyncConfig(url, key, **kw))


def fingerprint(home: Path) -> dict:
    """Every ledger and intervention file's bytes, to prove sync never changes them."""
    agent_sentinel.flush()
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(home.glob("*.jsonl"))}


def lines(path: Path) -> int:
    agent_sentinel.flush()
    return sum(1 for _ in path.open("rb"))


# ---------------------------------------------------------------------------------------------
# Configuration


def test_unknown_and_mistyped_options_are_errors_naming_them():
    with pytest.raises(TypeError, match="`flush_intervall`.*did you mean `flush_interval`"):
        SyncConfig("http://127.0.0.1:1", "as_x", flush_intervall=1.0)
    with pytest.raises(TypeError, match="`bogus`"):
        enable_remote_sync("http://127.0.0.1:1", "as_x", bogus=True)
    with pytest.raises(TypeError, match="`batch_size`"):
        SyncConfig("http://127.0.0.1:1", "as_x", batch_size="50")
    with pytest.raises(TypeError, match="`batch_size`"):
        SyncConfig("http://127.0.0.1:1", "as_x", batch_size=5001)
    with pytest.raises(TypeError, match="`flush_interval`"):
        SyncConfig("http://127.0.0.1:1", "as_x", flush_interval=0)
    with pytest.raises(TypeError, match="`max_retries`"):
        enable_remote_sync("http://127.0.0.1:1", "as_x", max_retries=-1)
    with pytest.raises(TypeError, match="`api_token`"):
        SyncConfig("http://127.0.0.1:1", "")
    with pytest.raises(ValueError, match="`platform_url`"):
        SyncConfig("ftp://example", "as_x")
    with pytest.raises(ValueError, match="`authority`"):
        SyncConfig("http://127.0.0.1:1", "as_x", authority="central")
    with pytest.raises(ValueError, match="`fail_mode`"):
        SyncConfig("http://127.0.0.1:1", "as_x", fail_mode="open")
    with pytest.raises(TypeError, match="SyncConfig"):
        BackgroundSync({"platform_url": "http://127.0.0.1:1"})
    # The token never shows in a repr.
    assert "as_secret" not in repr(SyncConfig("http://127.0.0.1:1", "as_secret"))
    assert SyncConfig("http://h:1/api/v1/", "as_x").base_url == "http://h:1"
    assert agent_sentinel._call._authority is None


# ---------------------------------------------------------------------------------------------
# Uploads


def test_uploads_arrive_and_a_second_flush_sends_nothing(home, server):
    PolicyEngine.configure(denied_actions=["rm"])

    @guarded_action(name="search", cost_usd=0.01)
    def search(q):
        return q

    @guarded_action(name="rm")
    def rm():
        pass

    for i in range(5):
        search(i)
    with pytest.raises(PolicyViolationError):
        rm()
    before = fingerprint(home)
    ledger_before = (home / "ledger.jsonl").read_bytes()

    sync = make_sync(server, batch_size=4)
    first = sync.flush_now()
    assert first["ok"], first
    assert (first["ledger"], first["interventions"], first["duplicates"]) == (6, 1, 0)
    assert first["requests"] == 2  # 4 lines, then 2 + 1
    streams = server.streams()
    assert streams[sync.stream]["entries"] == 6
    assert streams[sync.stream]["last_seq"] == 6
    assert streams[sync.stream + "#interventions"]["entries"] == 1
    assert sync.stream == f"{socket.gethostname()}:{os.path.realpath(home)}"

    second = sync.flush_now()
    assert second == {"ok": True, "ledger": 0, "interventions": 0, "requests": 0, "duplicates": 0, "error": None}

    search("more")
    third = sync.flush_now()
    assert (third["ledger"], third["interventions"], third["requests"]) == (1, 0, 1)
    assert server.streams()[sync.stream]["entries"] == 7
    status, findings = server.api("GET", "/api/v1/findings")
    assert status == 200 and not findings.get("findings"), findings

    # The local ledger is only read: the files synced earlier are byte-for-byte unchanged.
    after = fingerprint(home)
    assert after["interventions.jsonl"] == before["interventions.jsonl"]
    assert (home / "ledger.jsonl").read_bytes().startswith(ledger_before)
    assert verify(home / "ledger.jsonl")["entries"] == 7
    state = json.loads((home / "sync-state.json").read_text())
    [target] = state["targets"].values()
    assert target["ledger"]["seq"] == 7 and target["ledger"]["offset"] == (home / "ledger.jsonl").stat().st_size
    sync.stop()


def test_losing_the_offset_file_resends_everything_without_duplicates(home, server):
    @guarded_action(name="step", cost_usd=0.001)
    def step(i):
        return i

    for i in range(30):
        step(i)
    sync = make_sync(server, batch_size=7)
    assert sync.flush_now()["ledger"] == 30
    (home / "sync-state.json").unlink()
    again = sync.flush_now()
    assert again["ok"] and again["ledger"] == 30 and again["duplicates"] == 30
    assert server.streams()[sync.stream]["entries"] == 30
    # A corrupt state file is ignored the same way.
    (home / "sync-state.json").write_text("{not json")
    assert sync.flush_now()["duplicates"] == 30
    assert server.streams()[sync.stream]["entries"] == 30
    assert sync.flush_now()["ledger"] == 0


def test_rotated_segments_are_followed_and_nothing_is_skipped(home, server):
    @guarded_action(name="step")
    def step(i):
        return i

    for i in range(3):
        step(i)
    sync = make_sync(server, batch_size=2)
    assert sync.flush_now()["ledger"] == 3
    for i in range(2):
        step(i)  # written to the active file after the last upload, before it rotates

    # Rotate exactly as the writer does: the active file becomes the next numbered segment.
    RUNTIME.reopen()
    import gc

    gc.collect()
    os.rename(home / "ledger.jsonl", home / "ledger.000001.jsonl")
    for i in range(4):
        step(i)
    assert lines(home / "ledger.000001.jsonl") == 5 and lines(home / "ledger.jsonl") == 4
    assert verify(home / "ledger.jsonl")["entries"] == 9

    r = sync.flush_now()
    assert r["ok"] and r["ledger"] == 6 and r["duplicates"] == 0, r
    s = server.streams()[sync.stream]
    assert (s["entries"], s["last_seq"]) == (9, 9)
    status, findings = server.api("GET", "/api/v1/findings")
    assert not findings.get("findings"), findings

    # Without its offsets the sync finds every segment again; all duplicates.
    (home / "sync-state.json").unlink()
    r = sync.flush_now()
    assert r["ledger"] == 9 and r["duplicates"] == 9
    assert server.streams()[sync.stream]["entries"] == 9


def test_server_down_calls_keep_working_and_entries_arrive_later(home, server):
    server.stop()

    @guarded_action(name="work", cost_usd=0.01)
    def work(i):
        return i * 2

    sync = make_sync(server, max_retries=1, policy_sync_interval=300.0).start()
    assert [work(i) for i in range(10)] == [i * 2 for i in range(10)]
    down = sync.flush_now()
    assert not down["ok"] and down["ledger"] == 0
    assert server.url in down["error"]
    assert sync.last_error and server.url in sync.last_error
    assert lines(home / "ledger.jsonl") == 10

    server.start()
    work(10)
    up = sync.flush_now()
    assert up["ok"] and up["ledger"] == 11, up
    assert server.streams()[sync.stream]["entries"] == 11
    assert sync.last_error is None
    sync.stop()


class _Scripted(http.server.BaseHTTPRequestHandler):
    """Answers /api/v1/ledger from a script of (status, headers) pairs, then 200."""

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        srv = self.server
        srv.seen.append((time.monotonic(), self.path, self.headers.get("Authorization"), json.loads(body)))
        status, headers = srv.script.pop(0) if srv.script else (200, {})
        payload = json.dumps(
            {"ledger_accepted": 1, "ledger_duplicates": 0, "interventions_accepted": 0, "interventions_duplicates": 0, "findings": []}
            if status == 200 else {"title": "slow down", "status": status, "detail": "try later", "errors": []}
        ).encode()
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def scripted():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
    srv.seen, srv.script = [], []
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_429_is_retried_after_retry_after_then_succeeds(home, scripted):
    @guarded_action(name="step")
    def step(i):
        return i

    for i in range(3):
        step(i)
    scripted.script = [(429, {"Retry-After": "1"})]
    url = f"http://127.0.0.1:{scripted.server_address[1]}"
    sync = make_sync(url, "as_test", max_retries=3, retry_backoff=5.0)
    r = sync.flush_now()
    assert r["ok"] and r["ledger"] == 3, r
    assert len(scripted.seen) == 2
    (t1, path, auth, first), (t2, _, _, second) = scripted.seen
    assert path == "/api/v1/ledger" and auth == "Bearer as_test"
    assert 0.95 <= t2 - t1 < 4.0  # waited as told, not the 5 s backoff
    assert first == second
    assert first["ledger"] == (home / "ledger.jsonl").read_text().splitlines()  # exactly as written
    assert first["stream"] == sync.stream
    assert sync.flush_now()["requests"] == 0


def test_5xx_exhausts_retries_without_raising_and_the_offset_stays(home, scripted):
    @guarded_action(name="step")
    def step(i):
        return i

    step(1)
    scripted.script = [(503, {})] * 3
    url = f"http://127.0.0.1:{scripted.server_address[1]}"
    sync = make_sync(url, "as_test", max_retries=2)
    r = sync.flush_now()
    assert not r["ok"] and "HTTP 503" in r["error"] and len(scripted.seen) == 3
    r = sync.flush_now()  # the same line again, now accepted
    assert r["ok"] and r["ledger"] == 1 and len(scripted.seen) == 4
    assert scripted.seen[-1][3]["ledger"] == scripted.seen[0][3]["ledger"]


def test_sigkill_in_the_middle_of_uploads_then_restart_every_entry_exactly_once(home, server):
    @guarded_action(name="step", cost_usd=0.0001)
    def step(i):
        return {"i": i}

    n = 1500
    for i in range(n):
        step(i)
    sync = make_sync(server, batch_size=10, max_retries=1, timeout=2.0)
    results = []
    t = threading.Thread(target=lambda: results.append(sync.flush_now()))
    t.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        s = server.streams().get(sync.stream)
        if s and s["entries"] >= 200:
            break
        time.sleep(0.01)
    server.kill()
    t.join(20)
    [interrupted] = results
    assert not interrupted["ok"], "the upload finished before the kill; make it slower"
    assert 0 < interrupted["ledger"] < n

    server.start()
    r = sync.flush_now()
    assert r["ok"], r
    # The second flush starts where the server last acknowledged. If the kill landed after a batch
    # was stored but before its answer arrived, that batch is sent again and counted as duplicates
    # (at most one batch); either way the server ends up with each entry once.
    assert interrupted["ledger"] + r["ledger"] == n
    assert r["duplicates"] <= 10, r
    s = server.streams()[sync.stream]
    assert (s["entries"], s["last_seq"]) == (n, n)
    status, findings = server.api("GET", "/api/v1/findings")
    assert not findings.get("findings"), findings
    assert sync.flush_now()["requests"] == 0


# ---------------------------------------------------------------------------------------------
# Policy sync


def test_policy_sync_merges_with_the_local_policy_and_the_cache_serves_when_down(home, server):
    server.policy({"name": "team", "denied_actions": ["rm"], "budgets": {"actions": {"llm": 0.5}}})
    PolicyEngine.configure(denied_actions=["drop_table"])

    @guarded_action(name="rm")
    def rm():
        return "removed"

    @guarded_action(name="drop_table")
    def drop_table():
        return "dropped"

    @guarded_action(name="llm", cost_usd=0.3)
    def llm():
        return "ok"

    assert rm() == "removed"  # the local policy allows it
    sync = make_sync(server, policy_sync_interval=300.0).start()
    assert sync.policy_source == "server"
    with pytest.raises(PolicyViolationError) as e:
        rm()
    assert e.value.policy == "server:team"
    with pytest.raises(PolicyViolationError):
        drop_table()  # the local policy still applies: merged, not replaced
    assert llm() == "ok"
    with pytest.raises(BudgetExceededError):
        llm()  # the server's action budget, enforced locally
    # Changing the local policy keeps the synced one.
    PolicyEngine.configure(denied_actions=["other"])
    with pytest.raises(PolicyViolationError):
        rm()
    assert drop_table() == "dropped"
    assert sync.refresh_policies()  # 304: nothing changed
    cache = json.loads((home / "sync-policies.json").read_text())
    [entry] = cache["entries"].values()
    assert entry["policies"][0]["name"] == "team" and entry["etag"]
    sync.stop()

    # The server is down when the next sync starts: the cached policies apply.
    server.kill()
    PolicyEngine.reset()
    PolicyEngine.configure(denied_actions=["drop_table"])
    assert rm() == "removed"
    sync = make_sync(server, policy_sync_interval=300.0).start()
    assert sync.policy_source == "cache"
    with pytest.raises(PolicyViolationError) as e:
        rm()
    assert e.value.policy == "server:team"
    with pytest.raises(PolicyViolationError):
        drop_table()

    # Back up with a changed policy: the next sync picks it up.
    server.start()
    status, pol = server.api("GET", "/api/v1/policies")
    [team] = pol["policies"] if isinstance(pol, dict) else pol
    status, body = server.api("PUT", f"/api/v1/policies/{team['id']}", {"name": "team", "denied_actions": ["rm", "shutdown"]})
    assert status == 200, body
    assert sync.refresh_policies()
    assert sync.policy_source == "server"

    @guarded_action(name="shutdown")
    def shutdown():
        pass

    with pytest.raises(PolicyViolationError):
        shutdown()
    sync.stop()


def test_protect_engines_get_the_synced_policies_too(home, server, tmp_path):
    server.policy({"name": "team", "denied_actions": ["wipe"]})

    @protect(SentinelConfig(approval_interface=None, audit_log_dir=str(tmp_path / "protect-logs")))
    def wipe():
        return "wiped"

    assert wipe() == "wiped"
    sync = make_sync(server, policy_sync_interval=300.0).start()
    with pytest.raises(PolicyViolationError):
        wipe()
    sync.stop()


# ---------------------------------------------------------------------------------------------
# Central authority


def test_server_authority_denials_map_to_the_local_errors(home, server):
    server.policy({
        "name": "central",
        "denied_actions": ["rm"],
        "budgets": {"session": 0.25},
        "rate_limits": {"search": {"max_count": 2, "window_seconds": 60}},
    })
    ran = []

    @guarded_action(name="rm")
    def rm():
        ran.append("rm")

    @guarded_action(name="search")
    def search(q):
        ran.append(q)
        return q

    @guarded_action(name="llm", cost_usd=0.1)
    async def llm(prompt):
        ran.append(prompt)
        return prompt

    # policy_sync_interval=None: the local policy knows nothing; only the server decides.
    sync = make_sync(server, agent_id="bot", authority="server", reservation_ttl_seconds=1.0).start()
    with pytest.raises(PolicyViolationError) as e:
        rm()
    assert e.value.reason == "DENIED_ACTION" and e.value.policy == "central"
    assert e.value.decision["source"] == "server" and e.value.intervention_id
    assert search("a") == "a" and search("b") == "b"
    with pytest.raises(RateLimitError) as e:
        search("c")
    assert e.value.retry_after_seconds and e.value.retry_after_seconds > 0
    assert asyncio.run(llm("x")) == "x" and asyncio.run(llm("y")) == "y"
    with pytest.raises(BudgetExceededError) as e:
        asyncio.run(llm("z"))
    assert e.value.reason == "SESSION_BUDGET_EXCEEDED"
    # The allowed calls were settled: once their 1 s reservations would have expired (and been
    # given back by the server's sweeper), the budget is still spent.
    time.sleep(2.2)
    with pytest.raises(BudgetExceededError):
        asyncio.run(llm("z"))
    assert ran == ["a", "b", "x", "y"]
    # Refused calls were given back locally: no local spend for them, and the refusal is recorded.
    assert CostTracker.get_session_total() == pytest.approx(0.2)
    blocked = [e for e in read_jsonl(home / "ledger.jsonl") if e["outcome"] == "blocked"]
    assert [b["action"] for b in blocked] == ["rm", "search", "llm", "llm"]
    assert blocked[0]["payload"]["outputs"]["authority"] == server.url
    sync.stop()
    assert not sync._settles  # every reservation was settled (async ones by the background thread)
    assert agent_sentinel._call._authority is None
    assert search("after stop") == "after stop"  # local decisions only again


def test_a_halt_made_on_the_server_is_observed_by_the_next_call(home, server):
    calls = []

    @guarded_action(name="act")
    def act():
        calls.append(1)

    sync = make_sync(server, agent_id="halted-bot", authority="server").start()
    act()
    status, _ = server.api("POST", "/api/v1/halts", {"agent_id": "halted-bot", "reason": "incident 42"})
    assert status == 201
    halted_at = time.monotonic()
    with pytest.raises(AgentHaltedError) as e:
        act()
    assert time.monotonic() - halted_at < 1.0
    assert e.value.reason == "HALTED"
    assert len(calls) == 1
    status, _ = server.api("DELETE", "/api/v1/halts?agent_id=halted-bot")
    assert status == 204
    act()
    assert len(calls) == 2
    sync.stop()


def test_server_authority_fails_closed_when_the_server_is_unreachable(home):
    url = f"http://127.0.0.1:{free_port()}"
    ran = []

    @guarded_action(name="act", cost_usd=0.5)
    def act():
        ran.append(1)
        return "ran"

    sync = make_sync(url, "as_x", authority="server", timeout=1.0).start()
    with pytest.raises(AuthorityUnavailableError) as e:
        act()
    assert isinstance(e.value, AgentSentinelError) and isinstance(e.value, PolicyViolationError)
    assert url in str(e.value) and e.value.reason == "AUTHORITY_UNAVAILABLE"
    assert ran == [] and CostTracker.get_session_total() == 0.0
    [entry] = read_jsonl(home / "ledger.jsonl")
    assert entry["outcome"] == "blocked" and entry["payload"]["outputs"]["reason"] == "AUTHORITY_UNAVAILABLE"
    sync.stop()

    # fail_mode="safe": the local decision alone lets it run.
    sync = make_sync(url, "as_x", authority="server", fail_mode="safe", timeout=1.0).start()
    assert act() == "ran"
    sync.stop()


def test_a_bad_key_in_server_authority_is_refused_even_in_safe_mode(home, server):
    @guarded_action(name="act")
    def act():
        return "ran"

    sync = make_sync(server, key="as_" + "0" * 32, authority="server", fail_mode="safe").start()
    with pytest.raises(AuthorityUnavailableError) as e:
        act()
    assert e.value.reason == "AUTHORITY_REJECTED" and "401" in str(e.value)
    sync.stop()


WORKER = textwrap.dedent(
    """
    import json, os, sys, time
    import agent_sentinel as a
    url, key, go, explicit_stop = sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5] == "1"
    a.set_context(session_id="shared-session")
    a.enable_remote_sync(url, key, agent_id="fleet", authority="server", flush_interval=600,
                         policy_sync_interval=None)

    @a.guarded_action(name="llm", cost_usd=0.1)
    def llm():
        return 1

    while not os.path.exists(go):
        time.sleep(0.005)
    ok = denied = 0
    for _ in range(15):
        try:
            llm()
            ok += 1
        except a.BudgetExceededError:
            denied += 1
    print(json.dumps({"ok": ok, "denied": denied}), flush=True)
    if explicit_stop:
        a.flush_and_stop()
    # otherwise the atexit hook flushes
    """
)


def test_two_processes_share_one_session_budget_on_the_server_and_never_overspend(tmp_path, server):
    server.policy({"name": "fleet-budget", "budgets": {"session": 1.0}})
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    go = tmp_path / "go"
    procs = []
    for i in range(2):
        env = dict(os.environ, AGENT_SENTINEL_HOME=str(tmp_path / f"worker-{i}"))
        procs.append(subprocess.Popen(
            [sys.executable, str(script), str(ROOT / "python"), server.url, server.key, str(go), str(i)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))
    time.sleep(0.3)
    go.touch()
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=30)
        assert p.returncode == 0, err
        outs.append(json.loads(out.strip().splitlines()[-1]))
    assert sum(o["ok"] for o in outs) == 10  # exactly what $1.00 buys at $0.10, never more
    assert sum(o["denied"] for o in outs) == 20
    # Both ledgers were uploaded at exit (one by flush_and_stop, one by the atexit hook).
    streams = server.streams()
    for i in range(2):
        home = os.path.realpath(tmp_path / f"worker-{i}")
        assert streams[f"{socket.gethostname()}:{home}"]["entries"] == 15


class _SlowAuthority(http.server.BaseHTTPRequestHandler):
    """A stand-in server whose /decide takes 0.5 s and allows; /settle is recorded."""

    protocol_version = "HTTP/1.1"

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.seen.append((self.path, body))
        if self.path == "/api/v1/decide":
            time.sleep(0.5)
            answer = {"verdict": "allow", "reason": "ALLOWED", "message": "allowed",
                      "reservation": {"id": "res-1", "cost_usd": body["cost_usd"], "expires_at": int(time.time() * 1000) + 60000}}
        else:
            answer = {"reservation_id": body["reservation_id"], "state": "released"}
        payload = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


async def test_a_cancelled_async_call_releases_its_central_reservation(home):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SlowAuthority)
    srv.seen = []
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        ran = []

        @guarded_action(name="slow", cost_usd=0.2)
        async def slow():
            ran.append(1)

        sync = make_sync(f"http://127.0.0.1:{srv.server_address[1]}", "as_x", authority="server").start()
        task = asyncio.create_task(slow())
        await asyncio.sleep(0.1)  # the decision is in flight
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not any(p == "/api/v1/settle" for p, _ in srv.seen):
            await asyncio.sleep(0.02)
        assert [p for p, _ in srv.seen] == ["/api/v1/decide", "/api/v1/settle"]
        assert srv.seen[1][1] == {"reservation_id": "res-1", "release": True}
        assert ran == [] and CostTracker.get_session_total() == 0.0
        sync.stop()
    finally:
        srv.shutdown()
        srv.server_close()


def test_the_background_thread_uploads_and_syncs_policies_on_its_own(home, server):
    status, created = server.api("POST", "/api/v1/keys", {"name": "bot key", "scope": "agent", "agent_id": "bot"})
    assert status == 201, created
    sync = enable_remote_sync(
        server.url, created["key"], agent_id="bot", run_id="run-7", flush_interval=0.2, policy_sync_interval=0.2,
        retry_backoff=0.01,
    )
    assert agent_sentinel.get_context().agent_id == "bot" and agent_sentinel.get_context().run_id == "run-7"

    @guarded_action(name="deploy")
    def deploy():
        return "deployed"

    assert deploy() == "deployed"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and sync.stream not in server.streams():
        time.sleep(0.05)
    s = server.streams()[sync.stream]
    assert (s["entries"], s["agent_id"]) == (1, "bot")

    # A policy scoped to this agent, made after the sync started, arrives within a few intervals.
    server.policy({"name": "bot-only", "scope": "agent", "agent_id": "bot", "denied_actions": ["deploy"]})
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            deploy()
        except PolicyViolationError as e:
            assert e.policy == "server:bot-only"
            break
        time.sleep(0.05)
    else:
        pytest.fail("the synced policy never arrived")
    flush_and_stop()
    assert not sync.running
    assert server.streams()[sync.stream]["entries"] == lines(home / "ledger.jsonl")


def test_enabling_again_replaces_the_previous_sync_and_its_policies(home, server):
    server.policy({"name": "team", "denied_actions": ["rm"]})
    first = enable_remote_sync(server.url, server.key, agent_id="a", flush_interval=600)
    second = enable_remote_sync(server.url, server.key, agent_id="b", flush_interval=600)
    assert not first.running and second.running and second.policy_source == "server"
    names = [d["name"] for d in json.loads(RUNTIME.engine.docs_json())]
    assert names.count("server:team") == 1

    @guarded_action(name="rm")
    def rm():
        pass

    with pytest.raises(PolicyViolationError):
        rm()
    # reset() forgets synced policies too; the running sync installs them again at its next sync.
    PolicyEngine.reset()
    rm()
    assert second.refresh_policies()
    with pytest.raises(PolicyViolationError):
        rm()
