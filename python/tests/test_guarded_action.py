"""The SDK's decorator, engine, tracker and ledger, as its README documents them."""

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass

import pytest

import agent_sentinel
from agent_sentinel import (
    AgentHaltedError,
    AgentSentinelError,
    BudgetExceededError,
    CostTracker,
    Ledger,
    PolicyEngine,
    PolicyViolationError,
    RateLimitError,
    guarded_action,
)
from conftest import read_jsonl, verify


def test_sync_call_is_recorded_with_the_sdk_fields(home):
    @guarded_action(name="search_tool", cost_usd=0.01, tags=["search", "api"])
    def search_web(query: str) -> dict:
        """Search the web for a query"""
        return {"results": [query], "count": 1}

    assert search_web("Python best practices") == {"results": ["Python best practices"], "count": 1}
    assert search_web.__name__ == "search_web"
    assert search_web.__doc__ == "Search the web for a query"
    [e] = read_jsonl(home / "ledger.jsonl")
    for field in ("id", "timestamp", "action", "cost_usd", "duration_ms", "outcome", "tags", "payload"):
        assert field in e
    assert e["action"] == "search_tool"
    assert e["cost_usd"] == 0.01
    assert e["outcome"] == "success"
    assert e["tags"] == ["search", "api"]
    assert e["payload"]["inputs"] == {"args": ["Python best practices"], "kwargs": {}}
    assert e["payload"]["outputs"] == {"results": ["Python best practices"], "count": 1}
    assert e["decision"]["verdict"] == "allow"
    assert e["policy_version"]
    assert verify(home / "ledger.jsonl")["entries"] == 1


async def test_async_call(home):
    @guarded_action(name="generate_text", cost_usd=0.05, tags=["llm"])
    async def generate_text(prompt: str) -> str:
        """Generate text"""
        await asyncio.sleep(0)
        return prompt.upper()

    assert await generate_text("haiku") == "HAIKU"
    assert generate_text.__name__ == "generate_text"
    assert asyncio.iscoroutinefunction(generate_text)
    assert CostTracker.get_run_total() == pytest.approx(0.05)


def test_default_name_is_the_function_name(home):
    @guarded_action(cost_usd=0.01)
    def my_function():
        pass

    my_function()
    assert read_jsonl(home / "ledger.jsonl")[0]["action"] == "my_function"


def test_exceptions_propagate_unchanged_and_are_recorded(home):
    class Oops(ValueError):
        pass

    @guarded_action(name="might_fail", cost_usd=0.01)
    def risky():
        raise Oops("Oops!")

    with pytest.raises(Oops, match="Oops!"):
        risky()
    [e] = read_jsonl(home / "ledger.jsonl")
    assert e["outcome"] == "error"
    assert "Oops!" in e["payload"]["outputs"]
    assert e["cost_usd"] == 0.01, "a call that raised still costs"


def test_arguments_json_cannot_hold_are_recorded_as_their_string_form(home):
    @dataclass
    class Context:
        user_id: int
        session: str
        connection: socket.socket

    @guarded_action(name="process_data", cost_usd=0.001)
    def process_data(ctx, data):
        return {"processed": True, "user": ctx.user_id, "at": object()}

    with socket.socket() as s:
        out = process_data(Context(123, "abc", s), {"value": 42, "when": {1, 2}})
    assert out["processed"] is True
    [e] = read_jsonl(home / "ledger.jsonl")
    recorded_ctx = e["payload"]["inputs"]["args"][0]
    assert isinstance(recorded_ctx, str) and "user_id=123" in recorded_ctx
    assert e["payload"]["inputs"]["args"][1]["when"] in ("{1, 2}", "{2, 1}")
    assert e["payload"]["outputs"]["at"].startswith("<object object at")


def test_budgets(home):
    PolicyEngine.configure(session_budget=5.0, run_budget=1.0, action_budgets={"expensive_llm": 0.50})

    @guarded_action(name="expensive_llm", cost_usd=0.30)
    def call_gpt4(prompt):
        return "ok"

    call_gpt4("a")
    with pytest.raises(BudgetExceededError) as err:
        call_gpt4("b")
    e = err.value
    assert isinstance(e, AgentSentinelError)
    assert e.reason == "ACTION_BUDGET_EXCEEDED"
    assert e.limit == {"kind": "action_budget", "limit": 0.5, "used": 0.3, "requested": 0.3}
    assert e.policy == "PolicyEngine"
    assert CostTracker.get_run_total() == pytest.approx(0.30)
    assert CostTracker.get_action_stats("expensive_llm") == {"count": 1, "total_cost": pytest.approx(0.30)}
    blocked = read_jsonl(home / "ledger.jsonl")[-1]
    assert blocked["outcome"] == "blocked" and blocked["cost_usd"] == 0.0
    [i] = read_jsonl(home / "interventions.jsonl")
    assert (i["type"], i["outcome"]) == ("BUDGET_EXCEEDED", "BLOCKED")
    assert i["cost_prevented_usd"] == 0.30


def test_hundred_cents_fill_a_dollar(home):
    PolicyEngine.configure(run_budget=1.0)

    @guarded_action(cost_usd=0.01)
    def cent():
        pass

    for _ in range(100):
        cent()
    with pytest.raises(BudgetExceededError):
        cent()
    assert CostTracker.get_run_total() == 1.0


def test_reset_run_keeps_session_totals_and_action_stats(home):
    PolicyEngine.configure(run_budget=1.0)

    @guarded_action(name="step", cost_usd=0.6)
    def step():
        pass

    step()
    with pytest.raises(BudgetExceededError):
        step()
    CostTracker.reset_run()
    step()
    snap = CostTracker.get_snapshot()
    assert snap["session_total"] == pytest.approx(1.2)
    assert snap["run_total"] == pytest.approx(0.6)
    assert snap["action_counts"] == {"step": 2}
    all_stats = CostTracker.get_action_stats()
    assert all_stats["counts"] == {"step": 2}
    assert all_stats["costs"]["step"] == pytest.approx(1.2)


def test_deny_and_allow_lists(home):
    PolicyEngine.configure(denied_actions=["delete_database", "send_money"])

    @guarded_action(name="delete_database")
    def delete_database():
        raise AssertionError("must not run")

    with pytest.raises(PolicyViolationError) as err:
        delete_database()
    assert isinstance(err.value, PermissionError)
    assert err.value.reason == "DENIED_ACTION"

    PolicyEngine.configure(allowed_actions=["read_file", "search_web"])

    @guarded_action(name="search_web")
    def search():
        return 1

    @guarded_action(name="write_file")
    def write():
        raise AssertionError("must not run")

    assert search() == 1
    with pytest.raises(PolicyViolationError, match="not in the allowlist"):
        write()


def test_rate_limit_carries_retry_after(home):
    PolicyEngine.configure(rate_limits={"search": {"max_count": 2, "window_seconds": 60}})

    @guarded_action(name="search")
    def search():
        return "ok"

    search()
    search()
    with pytest.raises(RateLimitError) as err:
        search()
    assert isinstance(err.value, PolicyViolationError)
    assert err.value.reason == "RATE_LIMITED"
    assert 59 < err.value.retry_after_seconds <= 60


def test_halt_is_a_kill_switch(home):
    @guarded_action(name="act")
    def act():
        return 1

    PolicyEngine.halt(agent_id="default", reason="runaway spend")
    with pytest.raises(AgentHaltedError, match="runaway spend"):
        act()
    PolicyEngine.resume(agent_id="default")
    assert act() == 1


def test_ledger_record(home):
    seq = Ledger.record(
        action="manual_entry",
        inputs={"key": "value", "password": "hunter2"},
        outputs={"result": 42},
        cost_usd=0.01,
        duration_ms=100.0,
        outcome="success",
        tags=["manual"],
    )
    assert seq == 1
    [e] = read_jsonl(home / "ledger.jsonl")
    assert e["payload"]["inputs"] == {"key": "value", "password": "[REDACTED]"}
    assert e["tags"] == ["manual"]
    with pytest.raises(ValueError, match="cost_usd"):
        Ledger.record(action="x", cost_usd=-1)
    verify(home)


def test_agent_sentinel_home_is_honoured(tmp_path, monkeypatch):
    target = tmp_path / "my-agent-logs"
    monkeypatch.setenv("AGENT_SENTINEL_HOME", str(target))
    PolicyEngine.reset()

    @guarded_action(name="x")
    def x():
        return 1

    x()
    assert (target / "ledger.jsonl").exists()
    assert (target / "interventions.jsonl").exists()


def test_secrets_are_redacted_in_every_record(home):
    PolicyEngine.configure(denied_actions=["leak"])

    @guarded_action(name="leak")
    def leak(api_key, note):
        pass

    @guarded_action(name="fetch")
    def fetch(url, headers):
        return {"token": "tok_abcdef123456", "body": "ok"}

    with pytest.raises(PolicyViolationError):
        leak("sk-live-abcdefghijklmnopqrst", note="my key is sk-live-zyxwvutsrqponmlk")
    fetch("https://admin:s3cret-pass@db.internal/x", headers={"Authorization": "Bearer abcdefghijklmnopq"})
    agent_sentinel.flush()
    text = (home / "ledger.jsonl").read_text() + (home / "interventions.jsonl").read_text()
    for secret in ("sk-live-abcdefghijklmnopqrst", "sk-live-zyxwvutsrqponmlk", "s3cret-pass", "abcdefghijklmnopq", "tok_abcdef123456"):
        assert secret not in text


def test_threads_racing_a_budget_never_overspend(home):
    PolicyEngine.configure(run_budget=1.0)
    allowed = []
    lock = threading.Lock()

    @guarded_action(name="work", cost_usd=0.03)
    def work():
        with lock:
            allowed.append(1)

    def worker():
        for _ in range(50):
            try:
                work()
            except BudgetExceededError:
                pass

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(allowed) == 33  # floor(1.00 / 0.03)
    assert CostTracker.get_run_total() == pytest.approx(0.99)
    assert verify(home)["entries"] == 400


async def test_concurrent_asyncio_tasks_with_their_own_runs_are_accounted_separately(home):
    PolicyEngine.configure(run_budget=0.10)

    @guarded_action(name="think", cost_usd=0.04)
    async def think(i):
        await asyncio.sleep(0.001)
        return i

    async def run(run_id):
        with agent_sentinel.context(run_id=run_id):
            done = 0
            for i in range(5):
                try:
                    await think(i)
                    done += 1
                except BudgetExceededError:
                    pass
            return run_id, done, CostTracker.get_run_total()

    results = await asyncio.gather(*(run(f"run-{n}") for n in range(6)))
    for run_id, done, total in results:
        assert done == 2, run_id
        assert total == pytest.approx(0.08)
    runs = {e["run_id"] for e in read_jsonl(home / "ledger.jsonl")}
    assert runs == {f"run-{n}" for n in range(6)}


LEDGER_SYNC_CHILD = r"""
import os, sys
from pathlib import Path
from agent_sentinel import guarded_action

@guarded_action(name="step")
def step(i):
    return i

step(1)
lines = (Path(os.environ["AGENT_SENTINEL_HOME"]) / "ledger.jsonl").read_text().splitlines()
print(len(lines), flush=True)
os._exit(0)  # no atexit: only what was already handed to the OS survives
"""


def _run_child(tmp_path, sync: str):
    env = dict(os.environ, AGENT_SENTINEL_HOME=str(tmp_path / sync), AGENT_SENTINEL_LEDGER_SYNC=sync)
    return subprocess.run([sys.executable, "-c", LEDGER_SYNC_CHILD], env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("sync", ["entry", "fsync"])
def test_ledger_sync_entry_writes_each_entry_before_the_call_returns(tmp_path, sync):
    r = _run_child(tmp_path, sync)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "1", "the entry was in the file as soon as the call returned"
    assert verify(tmp_path / sync / "ledger.jsonl")["entries"] == 1


def test_ledger_sync_rejects_an_unknown_mode_naming_the_variable(tmp_path):
    r = _run_child(tmp_path, "sometimes")
    assert r.returncode != 0
    assert "AGENT_SENTINEL_LEDGER_SYNC is `sometimes`" in r.stderr and "`group`, `entry`, `fsync`" in r.stderr, r.stderr


def test_group_commit_writes_every_entry_by_exit(tmp_path):
    script = (
        "from agent_sentinel import guarded_action\n"
        "f = guarded_action(name='n')(lambda i: i)\n"
        "for i in range(500): f(i)\n"
    )
    env = dict(os.environ, AGENT_SENTINEL_HOME=str(tmp_path / "g"))
    env.pop("AGENT_SENTINEL_LEDGER_SYNC", None)
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    report = verify(tmp_path / "g" / "ledger.jsonl")
    assert report["entries"] == 500 and report["anchored"], report


FULL_DISK_CHILD = r"""
import json, os, resource, signal, time
from pathlib import Path
import agent_sentinel
from agent_sentinel import guarded_action

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
ledger = Path(os.environ["AGENT_SENTINEL_HOME"]) / "ledger.jsonl"
ran = []

@guarded_action(name="step")
def step(i):
    ran.append(i)
    return i

step(0)
agent_sentinel.flush()
# The ledger file may grow by about two more entries: the disk is "full" after that.
resource.setrlimit(resource.RLIMIT_FSIZE, (ledger.stat().st_size + 1500, resource.RLIM_INFINITY))
errors = []
for i in range(1, 3000):  # group commit: until the writer thread has met the full disk
    try:
        step(i)
    except RuntimeError as e:
        errors.append(str(e))
        break
    time.sleep(0.002)
refused_ran = None
try:
    step(1000)  # the ledger is still failing: refused before it runs
except RuntimeError as e:
    errors.append(str(e))
    refused_ran = 1000 in ran
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
step(2000)  # the disk has room again: the kept entries are written first, then this one
agent_sentinel.flush()
print(json.dumps({"ran": ran, "errors": errors, "refused_ran": refused_ran}), flush=True)
"""


@pytest.mark.parametrize("sync", ["group", "entry"])
def test_a_full_disk_fails_closed_and_loses_no_accepted_entry(tmp_path, sync):
    env = dict(os.environ, AGENT_SENTINEL_HOME=str(tmp_path / sync), AGENT_SENTINEL_LEDGER_SYNC=sync)
    r = subprocess.run([sys.executable, "-c", FULL_DISK_CHILD], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(out["errors"]) == 2, out
    assert all("ledger.jsonl" in e and "File too large" in e and "refused" in e for e in out["errors"]), out["errors"]
    assert out["refused_ran"] is False, "a call must not run while its ledger cannot be written"
    report = verify(tmp_path / sync / "ledger.jsonl")
    # Every call that ran has its entry, in order, on a chain that verifies (a line cut in half
    # by the full disk was completed once there was room).
    assert report["entries"] == len(out["ran"]), (report, out["ran"])
    entries = read_jsonl(tmp_path / sync / "ledger.jsonl")
    assert [e["payload"]["inputs"]["args"][0] for e in entries] == out["ran"]


def _comparable(e: dict) -> dict:
    """An entry without what differs between any two calls (id, time, duration, chain)."""
    return {k: v for k, v in e.items() if k not in ("id", "timestamp", "duration_ms", "seq", "prev_hash", "hash")}


def test_the_native_path_records_what_the_python_path_records(home):
    """A plain allowed call takes one crossing into Rust; with a reason to take the Python path
    (here forced, as a central authority does) the same call must leave the same entry."""
    from agent_sentinel import _native

    PolicyEngine.configure(run_budget=10.0, denied_actions=["drop_table"])

    @guarded_action(name="pay", cost_usd=0.25, tags=["billing"])
    def pay(amount, currency="EUR", *extra, note=None):
        return {"paid": amount}

    with agent_sentinel.context(run_id="r-native"):
        assert pay(3, "USD", "x", note="n") == {"paid": 3}
        _native.slow_path(1)
        try:
            assert pay(3, "USD", "x", note="n") == {"paid": 3}
        finally:
            _native.slow_path(-1)
        assert CostTracker.get_run_total() == 0.5
    fast, slow = read_jsonl(home / "ledger.jsonl")
    assert _comparable(fast) == _comparable(slow)
    assert fast["payload"]["inputs"] == {"args": [3, "USD", "x"], "kwargs": {"note": "n"}}
    assert fast["run_id"] == "r-native"


def test_the_native_path_passes_exceptions_through_and_records_them(home):
    class Boom(Exception):
        pass

    @guarded_action(name="flaky", cost_usd=0.1)
    def flaky():
        raise Boom("it broke")

    with pytest.raises(Boom, match="it broke") as info:
        flaky()
    assert info.traceback[-1].name == "flaky", "the traceback still ends in the function"
    [e] = read_jsonl(home / "ledger.jsonl")
    assert e["outcome"] == "error"
    assert e["payload"]["outputs"] == "Boom: it broke"
    assert CostTracker.get_session_total() == pytest.approx(0.1), "a call that raised still costs"


def test_the_native_path_sees_denials_and_context_changes(home):
    PolicyEngine.configure(denied_actions=["drop_table"])

    @guarded_action(name="drop_table")
    def drop_table():
        raise AssertionError("must not run")

    @guarded_action(name="read")
    def read():
        return agent_sentinel.get_context().agent_id

    with pytest.raises(PolicyViolationError):
        drop_table()
    agent_sentinel.set_context(agent_id="agent-a")
    assert read() == "agent-a"
    with agent_sentinel.context(agent_id="agent-b"):
        assert read() == "agent-b"
    entries = read_jsonl(home / "ledger.jsonl")
    assert [e["agent_id"] for e in entries] == ["default", "agent-a", "agent-b"]
    assert entries[0]["outcome"] == "blocked"


def test_recorded_inputs_are_what_replay_compares_them_with(home):
    """The ledger's inputs are written as the call is decided (before the values move on to the
    rules); they must match the redacted form replay computes for the same arguments, and be
    redacted the same way, on the sync and the async path, with rules reading the arguments."""
    from agent_sentinel import _native

    rules = home.parent / "rules.yaml"
    rules.write_text("rules:\n  - {id: big, function_pattern: call, conditions: [{param: amount, operator: gt, value: 100}], action: block}\n")
    PolicyEngine.load_from_yaml(str(rules))

    class Odd:
        def __str__(self):
            return "<odd>"

    calls = [
        (("sk-live-abcdefghijklmnopqrst", 5), {"zeta": [1, {"password": "p", "ok": True}], "alpha": None}),
        (("a  b   c  d  e  f  g  h",), {"api_key": "k", "headers": {"Authorization": "Bearer abcdefghijklmnopq"}}),
        ((1.5, 2, "extra", Odd()), {"note": "https://u:pw@h/x", "ñame": "ü"}),
        ((), {"amount": 7, "query": "q"}),
    ]

    @guarded_action(name="call")
    def call(query=None, amount=0, *args, **kwargs):
        return "ok"

    @guarded_action(name="call")
    async def acall(query=None, amount=0, *args, **kwargs):
        return "ok"

    for args, kwargs in calls:
        call(*args, **kwargs)
        asyncio.run(acall(*args, **kwargs))
    with pytest.raises(PolicyViolationError):
        call("q", 101, token="t")
    entries = read_jsonl(home / "ledger.jsonl")
    assert len(entries) == 2 * len(calls) + 1
    for i, (args, kwargs) in enumerate(calls):
        want = _native.to_record({"args": list(args), "kwargs": kwargs})
        assert entries[2 * i]["payload"]["inputs"] == want, args
        assert entries[2 * i + 1]["payload"]["inputs"] == want, args
    assert entries[-1]["payload"]["inputs"] == {"args": ["q", 101], "kwargs": {"token": "[REDACTED]"}}
    assert entries[-1]["outcome"] == "blocked"
    (blocked,) = read_jsonl(home / "interventions.jsonl")
    assert blocked["intent"]["inputs"] == {"args": ["q", 101], "kwargs": {"token": "[REDACTED]"}}
    text = (home / "ledger.jsonl").read_text()
    for secret in ("abcdefghijklmnopqrst", "abcdefghijklmnopq", "u:pw@"):
        assert secret not in text
