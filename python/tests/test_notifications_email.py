"""Email notifications from a real `sentinel serve` to a real SMTP server process (aiosmtpd) on 127.0.0.1.

Covers a channel's "send test", a policy's test alert, and an approval request emailed to its
approver with a signed link: the page the link opens shows the call and decides nothing until the
approver confirms with a POST, and the link works once.
"""

import mailbox
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from test_remote_sync import Server, free_port


@pytest.fixture
def smtp(tmp_path):
    port = free_port()
    box = tmp_path / "maildir"
    log = open(tmp_path / "smtpd.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "aiosmtpd", "-n", "-l", f"127.0.0.1:{port}", "-c", "aiosmtpd.handlers.Mailbox", str(box)],
        stdout=log, stderr=log, stdin=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the SMTP server exited with {proc.returncode}; see {log.name}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.05)
    else:
        pytest.fail("the SMTP server did not listen within 15 s")
    yield port, box
    proc.terminate()
    proc.wait(10)


def messages(box, want: int = 1, within: float = 10.0):
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if box.exists():
            msgs = list(mailbox.Maildir(str(box), create=False))
            if len(msgs) >= want:
                return msgs
        time.sleep(0.05)
    pytest.fail(f"fewer than {want} emails arrived within {within} s")


def body_of(msg) -> str:
    payload = msg.get_payload(decode=True)
    return payload.decode() if isinstance(payload, bytes) else str(msg.get_payload())


def fetch(url: str, form=None):
    data = urllib.parse.urlencode(form).encode() if form is not None else None
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.fixture
def mailing_server(tmp_path, smtp):
    port, box = smtp
    s = Server(tmp_path / "server-data", [
        "--smtp-url", f"smtp://127.0.0.1:{port}", "--smtp-from", "Sentinel <sentinel@example.com>",
    ]).start()
    yield s, box
    s.kill()


def test_send_test_and_policy_test_alert_reach_the_smtp_server(mailing_server):
    s, box = mailing_server
    status, ch = s.api("POST", "/api/v1/notifications/channels",
                       {"name": "ops-mail", "kind": "email", "to": ["ops@example.com", "cto@example.com"]})
    assert status == 201, ch
    status, m = s.api("POST", f"/api/v1/notifications/channels/{ch['id']}/test")
    assert status == 200, m
    assert m["status"] == "delivered", m
    (msg,) = messages(box, 1)
    assert msg["Subject"] == "[Agent Sentinel] Test notification for channel `ops-mail`"
    assert "ops@example.com" in msg["To"] and "cto@example.com" in msg["To"]
    assert msg["From"] == "Sentinel <sentinel@example.com>"
    assert m["id"] in msg["Message-ID"], "the idempotency key is the Message-ID"
    assert m["id"] in body_of(msg)

    status, p = s.api("POST", "/api/v1/policies", {
        "name": "prod", "budgets": {"session": 5},
        "alerts": {"emails": ["alerts@example.com"], "threshold_percent": 80, "alert_on_failure": True}})
    assert status == 201, p
    status, m = s.api("POST", f"/api/v1/policies/{p['id']}/test-alert")
    assert status == 200 and m["status"] == "delivered", m
    status, outbox = s.api("GET", "/api/v1/notifications?event=test")
    assert status == 200, outbox
    assert sorted(x["target"] for x in outbox["items"]) == ["alerts@example.com", "ops@example.com,cto@example.com"], \
        "a policy's test alert goes to its alert addresses only, not to every channel"
    msgs = messages(box, 2)
    alert = next(x for x in msgs if "alerts@example.com" in x["To"])
    assert "Test alert for policy `prod`" in alert["Subject"]
    assert "Threshold: 80%" in body_of(alert)


def test_an_approver_approves_from_the_emailed_link_once(mailing_server):
    s, box = mailing_server
    status, p = s.api("POST", "/api/v1/policies", {
        "name": "wires", "approvals": {"actions": ["wire"], "timeout_seconds": 60, "approvers": ["alice@example.com"]}})
    assert status == 201, p
    status, d = s.api("POST", "/api/v1/decide", {
        "action": "wire", "agent_id": "payments", "run_id": "r1", "cost_usd": 2.0,
        "args": {"amount": 900, "password": "hunter2"}, "context": {"invoice": "INV-7"}})
    assert status == 200 and d["verdict"] == "require_approval", d
    aid = d["approval_request"]["id"]

    (msg,) = messages(box, 1)
    assert msg["To"] == "alice@example.com"
    assert "Approval requested" in msg["Subject"] and "wire" in msg["Subject"]
    text = body_of(msg)
    assert "Agent: payments" in text and "Action: wire" in text
    link = re.search(r"(http://127\.0\.0\.1:\d+/approve/[0-9a-f]{32}\.[0-9a-f]{64})", text).group(1)

    # Opening the link shows the call and decides nothing.
    status, html = fetch(link)
    assert status == 200, html
    assert "wire" in html and "INV-7" in html and "hunter2" not in html
    assert s.api("GET", f"/api/v1/approvals/{aid}")[1]["status"] == "pending"

    # Confirming decides, as the person the link was sent to; the link then no longer works.
    status, html = fetch(link, {"decision": "approve", "confirm": "yes", "reason": "invoice checked"})
    assert status == 200, html
    row = s.api("GET", f"/api/v1/approvals/{aid}")[1]
    assert row["status"] == "approved"
    assert row["decided_by"] == "alice@example.com (signed link)"
    assert row["reason"] == "invoice checked"
    status, _ = fetch(link, {"decision": "reject", "confirm": "yes"})
    assert status == 409

    # The agent redeems its approval once.
    status, d2 = s.api("POST", "/api/v1/decide", {
        "action": "wire", "agent_id": "payments", "run_id": "r1", "cost_usd": 2.0,
        "args": {"amount": 900, "password": "hunter2"}, "approval_id": aid})
    assert status == 200 and d2["verdict"] == "allow", d2
