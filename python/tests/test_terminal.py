"""Terminal approval, driven through a real pseudo-terminal as a person would answer it."""

import os
import pty
import select
import sys
import textwrap
import time

import pytest

SCRIPT = textwrap.dedent(
    """
    import json, sys
    from agent_sentinel import protect, SentinelConfig, ApprovalRejectedError, ApprovalTimeoutError
    cfg = SentinelConfig(rules_path=sys.argv[1], audit_log_dir=sys.argv[2], agent_id="sales-agent",
                         timeout_seconds=float(sys.argv[3]))

    @protect(cfg, context_fn=lambda amount, destination: {"daily_limit_remaining": "$3,000.00"})
    def transfer_funds(amount, destination):
        return "SENT"

    try:
        print("RESULT", transfer_funds(5000, sys.argv[4]), flush=True)
    except ApprovalRejectedError as e:
        print("RESULT rejected", e.approver, flush=True)
    except ApprovalTimeoutError:
        print("RESULT timeout", flush=True)
    """
)

RULES = '{"rules": [{"id": "financial_limit", "function_pattern": "transfer_*", "conditions": [{"param": "amount", "operator": "gt", "value": 100}], "action": "require_approval", "message": "Amount exceeds $100 threshold"}]}'


def run_on_pty(tmp_path, answer, timeout=10.0, destination="vendor@example.com"):
    rules = tmp_path / "rules.json"
    rules.write_text(RULES)
    script = tmp_path / "agent.py"
    script.write_text(SCRIPT)
    pid, fd = pty.fork()
    if pid == 0:  # the child: its controlling terminal is the pty
        os.execv(sys.executable, [sys.executable, str(script), str(rules), str(tmp_path / "logs"), str(timeout), destination])
    out = b""
    deadline = time.monotonic() + 20
    answered = False
    while time.monotonic() < deadline:
        r, _, _ = select.select([fd], [], [], 0.2)
        if not r:
            continue
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
        if not answered and b"Approve? [y/n]:" in out and answer is not None:
            os.write(fd, answer.encode() + b"\r")
            answered = True
    os.waitpid(pid, 0)
    return out.decode("utf-8", "replace")


def test_yes_at_the_terminal_runs_the_call(tmp_path):
    out = run_on_pty(tmp_path, "y")
    assert "AGENT SENTINEL: APPROVAL REQUIRED" in out
    assert "Agent:    sales-agent" in out
    assert "Action:   transfer_funds" in out
    assert "amount: 5000" in out
    assert "daily_limit_remaining: $3,000.00" in out
    assert "Reason:   Amount exceeds $100 threshold" in out
    assert "RESULT SENT" in out


def test_no_at_the_terminal_rejects(tmp_path):
    out = run_on_pty(tmp_path, "n")
    assert "RESULT rejected" in out
    assert "RESULT SENT" not in out


def test_no_answer_times_out_as_reject(tmp_path):
    out = run_on_pty(tmp_path, None, timeout=0.5)
    assert "no answer in time" in out
    assert "RESULT timeout" in out


def test_control_characters_cannot_spoof_the_prompt(tmp_path):
    evil = "x\x1b[2J\r\nApprove? [y/n]: y\r\nAction:   read_file"
    out = run_on_pty(tmp_path, "n", destination=evil)
    assert "\x1b[2J" not in out
    assert "\\x1b[2J\\x0d\\x0aApprove? [y/n]: y" in out
    screen_lines = [line.strip("\r") for line in out.split("\n")]
    assert sum(line.startswith("Action:") for line in screen_lines) == 1, "no spoofed field starts a line"
    assert sum(line.startswith("Approve? [y/n]:") for line in screen_lines) == 1, "no spoofed prompt starts a line"
    assert "RESULT rejected" in out
