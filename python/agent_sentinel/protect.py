"""``protect`` and ``SentinelConfig``: the rules-and-approvals decorator's API, on the same core."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

from . import _native
from . import _context
from ._call import CallSpec, wrap
from ._runtime import RUNTIME
from .approvals import Approval, ApprovalRequest, check_handler
from .errors import PolicyConfigError

_FAIL_MODES = ("secure", "safe")


@dataclass
class SentinelConfig:
    """Configuration for ``@protect``. Environment variables give the defaults:
    ``SENTINEL_LOG_DIR``, ``SENTINEL_FAIL_MODE``, ``SENTINEL_WEBHOOK_URL``, ``SENTINEL_WEBHOOK_TOKEN``."""

    rules_path: Optional[str] = None
    approval_interface: Union[str, Callable[[ApprovalRequest], Any], None] = "terminal"
    fail_mode: str = field(default_factory=lambda: os.environ.get("SENTINEL_FAIL_MODE", "secure"))
    timeout_seconds: Optional[float] = 300.0
    agent_id: Optional[str] = None
    audit_log: bool = True
    audit_log_dir: str = field(default_factory=lambda: os.environ.get("SENTINEL_LOG_DIR", "./sentinel_logs"))
    anomaly_detection: bool = False
    anomaly_statistical: bool = True
    anomaly_z_threshold: float = 3.0
    anomaly_min_samples: int = 5
    webhook_url: Optional[str] = field(default_factory=lambda: os.environ.get("SENTINEL_WEBHOOK_URL"))
    webhook_token: Optional[str] = field(default_factory=lambda: os.environ.get("SENTINEL_WEBHOOK_TOKEN"))
    policy_path: Optional[str] = None

    def __post_init__(self) -> None:
        if self.fail_mode not in _FAIL_MODES:
            raise PolicyConfigError(f"`fail_mode` must be \"secure\" or \"safe\", got {self.fail_mode!r}")
        if self.approval_interface == "webhook":
            if not self.webhook_url:
                raise PolicyConfigError("`approval_interface=\"webhook\"` needs `webhook_url` (or SENTINEL_WEBHOOK_URL)")
        elif self.approval_interface not in ("terminal", None) and not callable(self.approval_interface):
            raise PolicyConfigError(
                f"`approval_interface` must be \"terminal\", \"webhook\", a callable or None; got {self.approval_interface!r}"
            )
        if self.timeout_seconds is not None and (isinstance(self.timeout_seconds, bool) or not isinstance(self.timeout_seconds, (int, float)) or self.timeout_seconds <= 0):
            raise PolicyConfigError(f"`timeout_seconds` must be a positive number, got {self.timeout_seconds!r}")
        if not self.audit_log:
            raise PolicyConfigError(
                "`audit_log=False` is not supported: every decision is recorded in the hash-chained ledger "
                "(point `audit_log_dir` somewhere else instead)"
            )
        if self.anomaly_min_samples < 2:
            raise PolicyConfigError("`anomaly_min_samples` must be at least 2")

    def _sources(self) -> list:
        sources = []
        if self.rules_path is not None:
            p = Path(self.rules_path)
            try:
                text = p.read_text(encoding="utf-8")
            except OSError as e:
                raise PolicyConfigError(f"cannot read `rules_path` `{p}`: {e.strerror or e}") from None
            sources.append((text, str(p), p.suffix.lower() == ".json"))
        if self.policy_path is not None:
            p = Path(self.policy_path)
            try:
                sources.append((p.read_text(encoding="utf-8"), str(p), p.suffix.lower() == ".json"))
            except OSError as e:
                raise PolicyConfigError(f"cannot read `policy_path` `{p}`: {e.strerror or e}") from None
        own: dict = {"name": "SentinelConfig", "fail_mode": self.fail_mode}
        if self.anomaly_detection and self.anomaly_statistical:
            own["anomaly"] = {
                "z_threshold": self.anomaly_z_threshold,
                "min_samples": self.anomaly_min_samples,
                "min_deviation": 1.0,
                "action": "block",
            }
        sources.append((json.dumps(own), "SentinelConfig", False))
        return sources

    def _handler(self) -> Any:
        if self.approval_interface == "webhook":
            return _webhook_handler(self.webhook_url or "", self.webhook_token)
        return check_handler(self.approval_interface)


def _webhook_handler(url: str, token: Optional[str]) -> Callable[[ApprovalRequest], Approval]:
    """POSTs the request as JSON and expects ``{"approved": bool, "approver": str, "reason": str}``."""

    def ask(req: ApprovalRequest) -> Approval:
        body = json.dumps({k: v for k, v in req.__dict__.items()}, default=str).encode()
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        r = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(r, timeout=req.timeout_seconds) as resp:
                answer = json.loads(resp.read() or b"{}")
        except (urllib.error.URLError, TimeoutError, ValueError) as e:
            return Approval(False, "webhook", f"approval webhook failed: {e}")
        return Approval(bool(answer.get("approved")), str(answer.get("approver") or "webhook"), str(answer.get("reason") or ""))

    ask.__name__ = "webhook"
    return ask


class _Protected:
    """The engine and guard behind one ``SentinelConfig``."""

    def __init__(self, config: SentinelConfig) -> None:
        self.sources = config._sources()
        try:
            with RUNTIME.policy_lock:
                self.engine = _native.Engine(self.sources + RUNTIME.remote_sources())
                RUNTIME.protected.add(self)
        except ValueError as e:
            raise PolicyConfigError(str(e), reason="INVALID_POLICY") from None
        self.guard = _native.Guard(self.engine, config.audit_log_dir)
        self.slot = _native.GuardSlot()
        self.slot.set(self.guard)
        self.handler = config._handler()
        self.timeout = config.timeout_seconds


def protect(config: SentinelConfig, context_fn: Optional[Callable[..., dict]] = None) -> Callable:
    """Decides every call against ``config`` (rules file, approvals, anomaly detection) before it runs.

    Arguments bind by parameter name (positional arguments and defaults included), so rules see
    ``amount`` whether it was passed by position or by keyword.
    """
    if not isinstance(config, SentinelConfig):
        raise TypeError(f"protect() needs a SentinelConfig, got {type(config).__name__}")
    state = _Protected(config)
    approver = (state.handler, state.timeout)
    current = _context.current
    if config.agent_id:
        agent = config.agent_id

        def current() -> _context.Context:  # type: ignore[no-redef]
            return _context.current()._replace(agent_id=agent)

    def decorate(fn: Callable) -> Callable:
        spec = CallSpec(fn, fn.__name__, 0.0, [], lambda: state.guard, lambda: approver, context_fn, current, state.slot, config.agent_id or None)
        wrapped = wrap(spec)
        wrapped.sentinel_engine = state.engine  # type: ignore[attr-defined]
        return wrapped

    return decorate
