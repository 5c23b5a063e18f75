"""The rules-and-approvals decorator's API: ``protect`` and ``SentinelConfig``."""

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from agent_sentinel import (
    Approval,
    ApprovalRejectedError,
    ApprovalTimeoutError,
    PolicyConfigError,
    PolicyViolationError,
    SentinelConfig,
    protect,
)
from conftest import read_jsonl, verify

RULES = {
    "version": "1.0",
    "default_action": "allow",
    "rules": [
        {
            "id": "financial_limit",
            "function_pattern": "transfer_*",
            "conditions": [{"param": "amount", "operator": "gt", "value": 100}],
            "action": "require_approval",
            "message": "Transfers over $100 require approval",
        },
        {"id": "block_deletes", "function_pattern": "delete_*", "action": "block", "message": "Delete operations are disabled"},
    ],
}


@pytest.fixture
def rules(tmp_path):
    p = tmp_path / "rules.json"
    p.write_text(json.dumps(RULES))
    return str(p)


def config(rules, tmp_path, **kw):
    kw.setdefault("audit_log_dir", str(tmp_path / "logs"))
    return SentinelConfig(rules_path=rules, **kw)


async def test_block_rule(home, rules, tmp_path):
    @protect(config(rules, tmp_path))
    async def delete_user(user_id: int) -> str:
        raise AssertionError("must not run")

    with pytest.raises(PolicyViolationError, match="Delete operations are disabled") as err:
        await delete_user(42)
    assert err.value.rule == "block_deletes"


async def test_callable_approval_approve_and_reject_are_recorded(home, rules, tmp_path):
    seen = []

    def approver(req):
        seen.append(req)
        if req.arguments["amount"] < 1000:
            return Approval(True, "alice@corp.com", "known vendor")
        return Approval(False, "bob@corp.com", "too large; split it")

    cfg = config(rules, tmp_path, approval_interface=approver, agent_id="sales-agent")

    ran = []

    @protect(cfg, context_fn=lambda amount, destination: {"current_balance": "$10,000.00"})
    async def transfer_funds(amount: float, destination: str) -> str:
        ran.append(amount)
        return f"Transferred ${amount} to {destination}"

    assert await transfer_funds(50, "vendor@example.com") == "Transferred $50 to vendor@example.com"
    assert seen == [], "below the threshold nobody is asked"
    assert await transfer_funds(500, destination="vendor@example.com") == "Transferred $500 to vendor@example.com"
    with pytest.raises(ApprovalRejectedError) as err:
        await transfer_funds(5000, "vendor@example.com")
    assert err.value.approver == "bob@corp.com"
    assert err.value.rejection_reason == "too large; split it"
    assert "too large; split it" in str(err.value)
    assert ran == [50, 500], "a rejected call does not run"
    req = seen[0]
    assert (req.agent_id, req.action, req.rule) == ("sales-agent", "transfer_funds", "financial_limit")
    assert req.reason == "Transfers over $100 require approval"
    assert req.context == {"current_balance": "$10,000.00"}
    logs = tmp_path / "logs"
    ledger = read_jsonl(logs / "ledger.jsonl")
    approved = [e for e in ledger if e.get("approval", {}).get("approved")]
    assert approved[0]["approval"]["approver"] == "alice@corp.com"
    assert approved[0]["outcome"] == "success"
    rejected = [e for e in ledger if e["outcome"] == "rejected"]
    assert rejected[0]["approval"] == {**rejected[0]["approval"], "approved": False, "approver": "bob@corp.com"}
    assert rejected[0]["cost_usd"] == 0.0
    outcomes = [i["outcome"] for i in read_jsonl(logs / "interventions.jsonl")]
    assert outcomes == ["ESCALATED", "APPROVED_AFTER_REVIEW", "ESCALATED", "REJECTED_AFTER_REVIEW"]
    verify(logs)


def test_arguments_bind_by_name_positional_and_defaults(home, rules, tmp_path):
    asked = []
    cfg = config(rules, tmp_path, approval_interface=lambda r: asked.append(r.arguments) or False)

    @protect(cfg)
    def transfer_money(destination, amount=500):
        return "sent"

    for call in (lambda: transfer_money("acct", 500), lambda: transfer_money(destination="acct"), lambda: transfer_money("acct")):
        with pytest.raises(ApprovalRejectedError):
            call()
    assert asked == [{"destination": "acct", "amount": 500}] * 3
    assert transfer_money("acct", amount=5) == "sent"


def test_missing_argument_fails_closed(home, rules, tmp_path):
    cfg = config(rules, tmp_path, approval_interface=lambda r: False)

    @protect(cfg)
    def transfer_any(**kwargs):
        return "sent"

    with pytest.raises(ApprovalRejectedError):
        transfer_any(to="acct")  # no `amount`: the approval rule still applies


def test_approval_timeout_means_reject(home, rules, tmp_path):
    def slow(req):
        time.sleep(2)
        return True

    cfg = config(rules, tmp_path, approval_interface=slow, timeout_seconds=0.2)

    @protect(cfg)
    def transfer_x(amount):
        raise AssertionError("must not run")

    t = time.monotonic()
    with pytest.raises(ApprovalTimeoutError) as err:
        transfer_x(500)
    assert time.monotonic() - t < 1.5
    assert isinstance(err.value, TimeoutError)
    assert read_jsonl(tmp_path / "logs" / "ledger.jsonl")[-1]["approval"]["approver"] == "timeout"


def test_no_terminal_rejects(home, rules, tmp_path):
    """A process with no controlling terminal cannot ask anyone: the call is rejected, not run."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        f"""
        from agent_sentinel import protect, SentinelConfig, ApprovalRejectedError
        @protect(SentinelConfig(rules_path={rules!r}, audit_log_dir={str(tmp_path / "logs")!r}))
        def transfer_y(amount):
            print("RAN")
        try:
            transfer_y(1000)
        except ApprovalRejectedError as e:
            print("REJECTED", e)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                         start_new_session=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "REJECTED" in out.stdout and "no terminal to ask" in out.stdout
    assert "RAN" not in out.stdout
    [rejected] = [e for e in read_jsonl(tmp_path / "logs" / "ledger.jsonl") if e["outcome"] == "rejected"]
    assert rejected["cost_usd"] == 0.0


def test_unknown_operator_is_rejected_at_load(home, tmp_path):
    p = tmp_path / "rules.json"
    p.write_text(json.dumps({"rules": [{"id": "a", "function_pattern": "x", "conditions": [{"param": "p", "operator": "greater_than", "value": 1}], "action": "block"}]}))
    with pytest.raises(PolicyConfigError, match="unknown value `greater_than`.*did you mean `gt`"):
        SentinelConfig(rules_path=str(p), audit_log_dir=str(tmp_path / "l"))
        protect(SentinelConfig(rules_path=str(p), audit_log_dir=str(tmp_path / "l")))


def test_config_validation(home, tmp_path):
    with pytest.raises(PolicyConfigError, match="fail_mode"):
        SentinelConfig(fail_mode="open")
    with pytest.raises(PolicyConfigError, match="approval_interface"):
        SentinelConfig(approval_interface="carrier pigeon")
    with pytest.raises(PolicyConfigError, match="audit_log=False"):
        SentinelConfig(audit_log=False)
    with pytest.raises(PolicyConfigError, match="rules_path"):
        protect(SentinelConfig(rules_path=str(tmp_path / "missing.json"), audit_log_dir=str(tmp_path)))
    with pytest.raises(TypeError, match="SentinelConfig"):
        protect({"rules_path": "x"})


def test_environment_variables(home, tmp_path, monkeypatch, rules):
    monkeypatch.setenv("SENTINEL_LOG_DIR", str(tmp_path / "envlogs"))
    monkeypatch.setenv("SENTINEL_FAIL_MODE", "safe")
    cfg = SentinelConfig(rules_path=rules)
    assert cfg.fail_mode == "safe"
    assert cfg.audit_log_dir == str(tmp_path / "envlogs")

    @protect(cfg)
    def hello():
        return "hi"

    assert hello() == "hi"
    assert (tmp_path / "envlogs" / "ledger.jsonl").exists()


def test_webhook_approval(home, rules, tmp_path, monkeypatch):
    got = []

    class H(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            got.append((self.headers.get("Authorization"), body))
            answer = {"approved": body["arguments"]["amount"] < 1000, "approver": "ops@corp.com", "reason": "checked"}
            data = json.dumps(answer).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *a):
            pass

    server = HTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("SENTINEL_WEBHOOK_URL", f"http://127.0.0.1:{server.server_port}/approve")
    monkeypatch.setenv("SENTINEL_WEBHOOK_TOKEN", "t0ken")
    try:
        cfg = config(rules, tmp_path, approval_interface="webhook")

        @protect(cfg)
        def transfer_w(amount):
            return "done"

        assert transfer_w(500) == "done"
        with pytest.raises(ApprovalRejectedError):
            transfer_w(5000)
        assert got[0][0] == "Bearer t0ken"
        assert got[0][1]["action"] == "transfer_w"
    finally:
        server.shutdown()


def test_anomaly_detection_blocks_outliers(home, tmp_path):
    cfg = SentinelConfig(audit_log_dir=str(tmp_path / "logs"), anomaly_detection=True, anomaly_statistical=True)

    @protect(cfg)
    def pay(amount):
        return amount

    for amount in (50, 60, 70, 80, 90):
        assert pay(amount) == amount
    with pytest.raises(PolicyViolationError, match="311.8 standard deviations") as err:
        pay(5000)
    assert err.value.reason == "ANOMALY_DETECTED"
    assert pay(75) == 75


def test_sync_calls_are_made_as_the_configured_agent(home, rules, tmp_path):
    """A plain allowed sync call takes the native path; it must still be made (and recorded) as
    `SentinelConfig(agent_id=...)`, with its arguments bound by name for the rules."""
    seen = []

    def approver(req):
        seen.append(req)
        return Approval(True, "alice@corp.com", "ok")

    @protect(config(rules, tmp_path, approval_interface=approver, agent_id="sales-agent"))
    def transfer_funds(amount: float, destination: str = "vendor") -> str:
        return f"sent {amount}"

    assert transfer_funds(50) == "sent 50"
    assert seen == []
    assert transfer_funds(amount=500) == "sent 500"
    assert seen[0].arguments == {"amount": 500, "destination": "vendor"}, "keyword and default bound by name"
    ledger = read_jsonl(tmp_path / "logs" / "ledger.jsonl")
    assert [(e["agent_id"], e["outcome"]) for e in ledger] == [
        ("sales-agent", "success"),
        ("sales-agent", "escalated"),
        ("sales-agent", "success"),
    ]
    assert ledger[0]["payload"]["inputs"] == {"args": [50], "kwargs": {}}
