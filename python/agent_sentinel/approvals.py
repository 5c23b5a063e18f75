"""Local human approval: at the controlling terminal, or by a function the application supplies."""

from __future__ import annotations

import getpass
import os
import select
import time
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union


@dataclass
class ApprovalRequest:
    """What an approver is asked to decide."""

    agent_id: str
    action: str
    arguments: dict
    reason: str
    rule: Optional[str] = None
    policy: Optional[str] = None
    cost_usd: float = 0.0
    context: dict = field(default_factory=dict)
    timeout_seconds: Optional[float] = None
    approvers: list = field(default_factory=list)


@dataclass
class Approval:
    """An approver's answer."""

    approved: bool
    approver: str = "unknown"
    reason: str = ""


Handler = Union[str, Callable[[ApprovalRequest], Any], None]


def check_handler(handler: Handler) -> Handler:
    if handler is None or callable(handler) or handler == "terminal":
        return handler
    raise TypeError(f"an approval handler must be \"terminal\", a callable, or None; got {handler!r}")


def normalize(answer: Any, default_approver: str) -> Approval:
    """Accepts an ``Approval``, a ``(approved, approver, reason)`` tuple, a dict, or a bool."""
    if isinstance(answer, Approval):
        return answer
    if isinstance(answer, bool):
        return Approval(answer, default_approver, "")
    if isinstance(answer, dict):
        return Approval(bool(answer.get("approved")), str(answer.get("approver") or default_approver), str(answer.get("reason") or ""))
    if isinstance(answer, (tuple, list)) and answer and isinstance(answer[0], bool):
        approver = str(answer[1]) if len(answer) > 1 else default_approver
        reason = str(answer[2]) if len(answer) > 2 else ""
        return Approval(answer[0], approver, reason)
    raise TypeError(
        f"an approval callable must return Approval, (approved, approver, reason), a dict or a bool; got {answer!r}"
    )


def escape(text: str) -> str:
    """Makes text safe to show on a terminal: control and format characters (escape sequences,
    carriage returns, bidi overrides) are shown as escapes, so arguments cannot spoof the prompt."""
    out = []
    for ch in text:
        cat = unicodedata.category(ch)
        if ch == "\\":
            out.append("\\\\")
        elif cat.startswith("C") or cat in ("Zl", "Zp"):
            code = ord(ch)
            if code < 0x100:
                out.append(f"\\x{code:02x}")
            elif code < 0x10000:
                out.append(f"\\u{code:04x}")
            else:
                out.append(f"\\U{code:08x}")
        else:
            out.append(ch)
    return "".join(out)


def _render(req: ApprovalRequest) -> str:
    bar = "=" * 60
    lines = [
        "",
        bar,
        "AGENT SENTINEL: APPROVAL REQUIRED",
        bar,
        f"Agent:    {escape(req.agent_id)}",
        f"Action:   {escape(req.action)}",
    ]
    if req.cost_usd:
        lines.append(f"Cost:     ${req.cost_usd:,.6f}".rstrip("0").rstrip("."))
    if req.arguments:
        lines.append("Arguments:")
        for k, v in req.arguments.items():
            lines.append(f"  {escape(str(k))}: {escape(repr(v) if not isinstance(v, str) else v)}")
    if req.context:
        lines.append("Context:")
        for k, v in req.context.items():
            lines.append(f"  {escape(str(k))}: {escape(str(v))}")
    lines.append("")
    lines.append(f"Reason:   {escape(req.reason)}")
    if req.rule:
        lines.append(f"Rule:     {escape(req.rule)}")
    if req.timeout_seconds:
        lines.append(f"Timeout:  {req.timeout_seconds:g}s (no answer means reject)")
    lines.append("-" * 60)
    return "\n".join(lines) + "\n"


def ask_terminal(req: ApprovalRequest, tty_path: str = "/dev/tty") -> Optional[Approval]:
    """Asks at the controlling terminal. Returns None on timeout. Raises OSError without a terminal."""
    fd = os.open(tty_path, os.O_RDWR | os.O_NOCTTY)
    try:
        os.write(fd, _render(req).encode("utf-8", "replace"))
        deadline = None if not req.timeout_seconds else time.monotonic() + req.timeout_seconds
        who = f"{getpass.getuser()}@{os.ttyname(fd) if os.isatty(fd) else tty_path}"
        while True:
            os.write(fd, b"Approve? [y/n]: ")
            line = _read_line(fd, deadline)
            if line is None:
                os.write(fd, b"\n(no answer in time: rejected)\n")
                return None
            answer = line.strip().lower()
            if answer in ("y", "yes"):
                return Approval(True, who, "approved at the terminal")
            if answer in ("n", "no"):
                return Approval(False, who, "rejected at the terminal")
            os.write(fd, b"Please answer y or n.\n")
    finally:
        os.close(fd)


def _read_line(fd: int, deadline: Optional[float]) -> Optional[str]:
    buf = b""
    while True:
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            return None
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            return None
        chunk = os.read(fd, 1024)
        if not chunk:
            return buf.decode("utf-8", "replace") if buf else None
        buf += chunk
        if b"\n" in buf or b"\r" in buf:
            return buf.replace(b"\r", b"\n").split(b"\n", 1)[0].decode("utf-8", "replace")
