"""Approvals through the server, from the SDK's side (`authority="server"`), against a real `sentinel serve`.

The server answers `/decide` with `require_approval` and an approval request; the SDK long-polls
`/approvals/{id}/wait` while a human (here: the admin bootstrap key, from another thread) approves
or rejects, then redeems the approval with `/decide` + `approval_id`. Every test starts its own
server (SQLite, a temporary data directory, a free port on 127.0.0.1).
"""

import asyncio
import threading
import time

import pytest

import agent_sentinel
from agent_sentinel import (
    AgentSentinelError,
    ApprovalRejectedError,
    ApprovalTimeoutError,
    CostTracker,
    SentinelConfig,
    guarded_action,
    protect,
)
from conftest import read_jsonl
from test_remote_sync import Server, make_sync, server, _no_sync_left_behind  # noqa: F401 - fixtures


def needs_approval(server: Server, timeout: int = 30, actions=("wire",)) -> None:
    server.policy({
        "name": "needs-a-human",
        "approvals": {"actions": list(actions), "timeout_seconds": timeout, "approvers": ["alice"]},
    })


def agent_key(server: Server, agent: str = "bot") -> str:
    status, created = server.api("POST", "/api/v1/keys", {"name": f"{agent} key", "scope": "agent", "agent_id": agent})
    assert status == 201, created
    return created["key"]


def pending(server: Server, action: str = "wire", count: int = 1, within: float = 5.0) -> list:
    """The pending requests for `action`, once there are `count` of them, oldest first."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        status, body = server.api("GET", "/api/v1/approvals?status=pending")
        assert status == 200, body
        items = [a for a in body["items"] if a["action"] == action]
        if len(items) >= count:
            return list(reversed(items))
        time.sleep(0.02)
    pytest.fail(f"no pending approval request for `{action}` within {within} s")


def decide_in_thread(server: Server, verdict: str, reason: str, count: int = 1, after: float = 0.0) -> dict:
    """A human deciding the next `count` pending requests from another thread, `after` seconds
    after they appear. The returned dict fills in with `ids` and `answers` (status, body)."""
    out: dict = {"ids": [], "answers": []}

    def run() -> None:
        try:
            items = pending(server, count=count)
            time.sleep(after)
            for a in items:
                out["ids"].append(a["id"])
                out["answers"].append(server.api("POST", f"/api/v1/approvals/{a['id']}/{verdict}", {"reason": reason}))
        except BaseException as e:  # noqa: BLE001 - shown by the test
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    out["thread"] = t
    return out


def approval(server: Server, id: str) -> dict:
    status, row = server.api("GET", f"/api/v1/approvals/{id}")
    assert status == 200, row
    return row


def test_an_approval_made_while_the_agent_waits_lets_the_call_run_once(home, server):
    needs_approval(server)
    ran = []

    @guarded_action(name="wire", cost_usd=0.5)
    def wire(amount):
        ran.append(amount)
        return f"sent {amount}"

    key = agent_key(server)
    sync = make_sync(server, key=key, agent_id="bot", authority="server").start()
    human = decide_in_thread(server, "approve", "looks right", after=0.3)
    started = time.monotonic()
    assert wire(700) == "sent 700"
    assert time.monotonic() - started >= 0.3  # it waited for the human
    human["thread"].join(5)
    assert "error" not in human, human.get("error")
    [(status, decided)] = human["answers"]
    assert status == 200 and decided["status"] == "approved", decided
    assert ran == [700]
    assert CostTracker.get_session_total() == pytest.approx(0.5)

    # The approval was used by this call, once: the same call cannot use it again.
    [aid] = human["ids"]
    row = approval(server, aid)
    assert row["status"] == "approved" and row["consumed_at"] is not None
    assert row["request"]["args"] == {"amount": 700}
    ctx = agent_sentinel.get_context()
    status, problem = server.api("POST", "/api/v1/decide", {
        "action": "wire", "agent_id": "bot", "run_id": ctx.run_id, "session_id": ctx.session_id,
        "cost_usd": 0.5, "args": {"amount": 700}, "approval_id": aid,
    })
    assert status == 409 and "already used" in problem["detail"], problem
    # The agent's own key can never decide its requests.
    status, problem = server.api("POST", f"/api/v1/approvals/{aid}/approve", {"reason": "me"}, key=key)
    assert status == 403, problem

    # Its cost is spent centrally (settled with the call's cost): the next request shows the
    # approver this session's spend. The first approval does not cover this other call.
    human = decide_in_thread(server, "reject", "one transfer is enough")
    with pytest.raises(ApprovalRejectedError):
        wire(701)
    human["thread"].join(5)
    assert approval(server, human["ids"][0])["request"]["spend"]["session_usd"] == pytest.approx(0.5)
    assert ran == [700] and CostTracker.get_session_total() == pytest.approx(0.5)
    sync.stop()
    assert not sync._settles
    assert [e["outcome"] for e in read_jsonl(home / "ledger.jsonl")] == ["success", "rejected"]


def test_a_rejection_raises_with_the_approvers_reason_and_the_call_never_runs(home, server):
    needs_approval(server)
    ran = []

    @guarded_action(name="wire", cost_usd=0.5)
    def wire(amount):
        ran.append(amount)

    sync = make_sync(server, key=agent_key(server), agent_id="bot", authority="server").start()
    why = "over the $500 limit for new payees; split it or ask finance"
    human = decide_in_thread(server, "reject", why)
    with pytest.raises(ApprovalRejectedError) as e:
        wire(900)
    human["thread"].join(5)
    [aid] = human["ids"]
    err = e.value
    assert isinstance(err, PermissionError) and isinstance(err, AgentSentinelError)
    assert why in str(err) and err.rejection_reason == why
    assert err.approver == approval(server, aid)["decided_by"] and "bootstrap admin" in err.approver
    assert err.approver in str(err)
    assert err.approval_id == aid and err.reason == "APPROVAL_REJECTED" and err.action == "wire"
    assert err.decision["approval"]["status"] == "rejected"
    # Nothing ran and nothing was spent, locally or on the server.
    assert ran == []
    assert CostTracker.get_session_total() == 0.0
    [entry] = read_jsonl(home / "ledger.jsonl")
    assert entry["outcome"] == "rejected"
    assert entry["payload"]["outputs"]["approval_id"] == aid and entry["payload"]["outputs"]["reason"] == why
    # On the server too: the next request shows the approver no spend for this session.
    human = decide_in_thread(server, "reject", "still no")
    with pytest.raises(ApprovalRejectedError, match="still no"):
        wire(901)
    human["thread"].join(5)
    assert approval(server, human["ids"][0])["request"]["spend"]["session_usd"] == 0.0
    assert ran == []
    sync.stop()


def test_no_decision_before_the_policy_timeout_raises_approval_timeout(home, server):
    needs_approval(server, timeout=1)
    ran = []

    @guarded_action(name="wire", cost_usd=0.5)
    def wire(amount):
        ran.append(amount)

    sync = make_sync(server, key=agent_key(server), agent_id="bot", authority="server").start()
    started = time.monotonic()
    with pytest.raises(ApprovalTimeoutError) as e:
        wire(10)
    took = time.monotonic() - started
    assert 0.8 <= took < 4.0, took
    assert isinstance(e.value, TimeoutError) and e.value.reason == "APPROVAL_TIMEOUT"
    assert "expired" in str(e.value) and e.value.approval_id
    assert approval(server, e.value.approval_id)["status"] == "expired"
    assert ran == [] and CostTracker.get_session_total() == 0.0
    [entry] = read_jsonl(home / "ledger.jsonl")
    assert entry["outcome"] == "rejected"
    sync.stop()


def test_the_wait_survives_a_server_restart(home, server, caplog):
    caplog.set_level("INFO", logger="agent_sentinel.sync")
    needs_approval(server)
    ran = []

    @guarded_action(name="wire", cost_usd=0.5)
    def wire(amount):
        ran.append(amount)
        return "sent"

    # Short long-polls: a server shutting down first finishes the long-polls it holds.
    sync = make_sync(server, key=agent_key(server), agent_id="bot", authority="server", approval_poll_seconds=1.0).start()
    box: dict = {}

    def agent() -> None:
        try:
            box["result"] = wire(250)
        except BaseException as e:  # noqa: BLE001 - shown by the test
            box["error"] = e

    t = threading.Thread(target=agent, daemon=True)
    t.start()
    [req] = pending(server)
    server.stop()  # SIGTERM; returns once the process has exited
    assert server.proc.poll() is not None
    # The stopping server answered the open long-poll at once ("pending"); the agent's next poll
    # meets a closed port, and it keeps waiting.
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline and not any("gave no answer" in r.getMessage() for r in caplog.records):
        time.sleep(0.05)
    assert t.is_alive() and "error" not in box, box
    assert any("gave no answer" in r.getMessage() for r in caplog.records), caplog.text
    server.start()  # same data directory and port
    status, decided = server.api("POST", f"/api/v1/approvals/{req['id']}/approve", {"reason": "after the restart"})
    assert status == 200, decided
    t.join(8)
    assert not t.is_alive()
    assert box.get("result") == "sent", box
    assert ran == [250]
    assert approval(server, req["id"])["consumed_at"] is not None
    assert any("answers again; still waiting" in r.getMessage() for r in caplog.records), caplog.text
    sync.stop()


async def test_an_async_call_waiting_for_approval_does_not_block_the_event_loop(home, server):
    needs_approval(server)
    ran = []

    @guarded_action(name="wire", cost_usd=0.25)
    async def wire(amount):
        ran.append(amount)
        return amount

    sync = make_sync(server, key=agent_key(server), agent_id="bot", authority="server").start()
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.02)
            ticks += 1

    clock = asyncio.create_task(ticker())
    human = decide_in_thread(server, "approve", "fine", count=2, after=1.0)
    started = time.monotonic()
    results = await asyncio.gather(wire(1), wire(2))
    waited = time.monotonic() - started
    clock.cancel()
    assert sorted(results) == [1, 2] and sorted(ran) == [1, 2]
    assert waited >= 1.0
    # The loop kept running other tasks the whole time (a blocked loop would show ~0 ticks).
    assert ticks >= waited / 0.02 * 0.4, (ticks, waited)
    human["thread"].join(5)
    assert CostTracker.get_session_total() == pytest.approx(0.5)

    # A waiting task that is cancelled gives its permit back; a late approval runs nothing.
    task = asyncio.create_task(wire(3))
    [req] = await asyncio.to_thread(pending, server)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    status, _ = await asyncio.to_thread(server.api, "POST", f"/api/v1/approvals/{req['id']}/approve", {"reason": "too late"})
    assert status == 200
    await asyncio.sleep(0.5)
    assert sorted(ran) == [1, 2] and CostTracker.get_session_total() == pytest.approx(0.5)
    assert (await asyncio.to_thread(approval, server, req["id"]))["consumed_at"] is None
    sync.stop()


def test_the_applications_context_reaches_the_approver(home, server, tmp_path):
    needs_approval(server)
    ran = []

    def context_fn(amount, destination):
        return {"ticket": "SUP-1234", "requested_by": "jane@customer.example", "note": f"refund of {amount}"}

    @protect(SentinelConfig(approval_interface=None, audit_log_dir=str(tmp_path / "protect-logs")), context_fn=context_fn)
    def wire(amount, destination):
        ran.append((amount, destination))
        return "sent"

    sync = make_sync(server, key=agent_key(server), agent_id="bot", authority="server").start()
    box: dict = {}

    def agent() -> None:
        try:
            box["result"] = wire(120, destination="acct-9")
        except BaseException as e:  # noqa: BLE001 - shown by the test
            box["error"] = e

    t = threading.Thread(target=agent, daemon=True)
    t.start()
    [req] = pending(server)
    row = approval(server, req["id"])  # what the approver sees
    assert row["request"]["context"] == {"ticket": "SUP-1234", "requested_by": "jane@customer.example", "note": "refund of 120"}
    assert row["request"]["args"] == {"amount": 120, "destination": "acct-9"}
    status, _ = server.api("POST", f"/api/v1/approvals/{req['id']}/approve", {"reason": "ticket checked"})
    assert status == 200
    t.join(5)
    assert box.get("result") == "sent", box
    assert ran == [(120, "acct-9")]
    sync.stop()


def test_the_long_poll_length_is_checked():
    from agent_sentinel import SyncConfig

    assert SyncConfig("http://127.0.0.1:1", "as_x").approval_poll_seconds == 25.0
    with pytest.raises(TypeError, match="`approval_poll_seconds`"):
        SyncConfig("http://127.0.0.1:1", "as_x", approval_poll_seconds=61)
    with pytest.raises(TypeError, match="`approval_poll_seconds`"):
        SyncConfig("http://127.0.0.1:1", "as_x", approval_poll_seconds=0)
