"""The SDK's class-level API: ``PolicyEngine``, ``CostTracker`` and ``Ledger``."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

from . import _context
from ._runtime import RUNTIME
from .errors import PolicyConfigError


@dataclass
class PolicyConfig:
    """The configured policy, as ``PolicyEngine.get_config()`` returns it."""

    session_budget: Optional[float] = None
    run_budget: Optional[float] = None
    action_budgets: Dict[str, float] = field(default_factory=dict)
    denied_actions: List[str] = field(default_factory=list)
    allowed_actions: Optional[List[str]] = None
    rate_limits: Dict[str, Dict[str, float]] = field(default_factory=dict)
    strict_mode: bool = True


_CONFIGURE_PARAMS = (
    "session_budget",
    "run_budget",
    "action_budgets",
    "denied_actions",
    "allowed_actions",
    "rate_limits",
    "strict_mode",
)


def _amount(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a number of US dollars, got {type(value).__name__} {value!r}")
    if math.isnan(value) or math.isinf(value) or value < 0:
        raise ValueError(f"`{name}` must be a finite, non-negative number of US dollars, got {value!r}")
    return float(value)


def _names(name: str, value: Any) -> List[str]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple, set, frozenset)):
        raise TypeError(f"`{name}` must be a list of action names, got {type(value).__name__} {value!r}")
    out = []
    for v in value:
        if not isinstance(v, str) or not v.strip():
            raise TypeError(f"`{name}` must contain non-empty action names, got {v!r}")
        out.append(v)
    return out


def _doc_from_kwargs(kwargs: Mapping[str, Any]) -> tuple:
    cfg = PolicyConfig()
    doc: Dict[str, Any] = {}
    budgets: Dict[str, Any] = {}
    for key, value in kwargs.items():
        if value is None and key != "strict_mode":
            continue
        if key == "session_budget":
            cfg.session_budget = budgets["session"] = _amount(key, value)
        elif key == "run_budget":
            cfg.run_budget = budgets["run"] = _amount(key, value)
        elif key == "action_budgets":
            if not isinstance(value, Mapping):
                raise TypeError(f"`action_budgets` must be a mapping of action name to USD, got {type(value).__name__}")
            cfg.action_budgets = {str(a): _amount(f"action_budgets[{a!r}]", v) for a, v in value.items()}
            budgets["actions"] = cfg.action_budgets
        elif key == "denied_actions":
            cfg.denied_actions = doc["denied_actions"] = _names(key, value)
        elif key == "allowed_actions":
            cfg.allowed_actions = doc["allowed_actions"] = _names(key, value)
        elif key == "rate_limits":
            if not isinstance(value, Mapping):
                raise TypeError(f"`rate_limits` must be a mapping like {{'search': {{'max_count': 10, 'window_seconds': 60}}}}, got {type(value).__name__}")
            limits = {}
            for action, spec in value.items():
                where = f"rate_limits[{action!r}]"
                if not isinstance(spec, Mapping):
                    raise TypeError(f"`{where}` must be a mapping with `max_count` and `window_seconds`, got {spec!r}")
                unknown = set(spec) - {"max_count", "window_seconds", "per"}
                if unknown:
                    raise TypeError(f"`{where}` has unknown key(s) {sorted(unknown)}; expected `max_count`, `window_seconds` and optionally `per`")
                mc, ws = spec.get("max_count"), spec.get("window_seconds")
                if isinstance(mc, bool) or not isinstance(mc, int) or mc < 1:
                    raise TypeError(f"`{where}['max_count']` must be an integer of at least 1, got {mc!r}")
                if isinstance(ws, bool) or not isinstance(ws, (int, float)) or not (ws > 0) or math.isinf(ws):
                    raise TypeError(f"`{where}['window_seconds']` must be a positive number of seconds, got {ws!r}")
                limits[str(action)] = dict(spec)
            cfg.rate_limits = doc["rate_limits"] = limits
        elif key == "strict_mode":
            if value is None:
                continue
            if not isinstance(value, bool):
                raise TypeError(f"`strict_mode` must be True or False, got {value!r}")
            cfg.strict_mode = doc["strict_mode"] = value
    if budgets:
        doc["budgets"] = budgets
    return cfg, doc


def _halt_target(agent_id: Optional[str], run_id: Optional[str]) -> tuple:
    """`("agent", id)` or `("run", id)`; exactly one of the two must be given, as a non-empty string."""
    if (agent_id is None) == (run_id is None):
        raise TypeError("give exactly one of `agent_id` or `run_id`")
    kind, target = ("agent", agent_id) if agent_id is not None else ("run", run_id)
    if not isinstance(target, str) or not target:
        raise TypeError(f"`{kind}_id` must be a non-empty string, got {target!r}")
    return kind, target


class PolicyEngine:
    """The process's policy. Decisions are made by the Rust core."""

    @classmethod
    def configure(
        cls,
        session_budget: Optional[float] = None,
        run_budget: Optional[float] = None,
        action_budgets: Optional[Mapping[str, float]] = None,
        denied_actions: Optional[List[str]] = None,
        allowed_actions: Optional[List[str]] = None,
        rate_limits: Optional[Mapping[str, Mapping[str, float]]] = None,
        strict_mode: Optional[bool] = None,
    ) -> None:
        """Replaces the configured policy. Spend so far is kept; an unknown keyword is a TypeError."""
        kwargs = dict(
            session_budget=session_budget,
            run_budget=run_budget,
            action_budgets=action_budgets,
            denied_actions=denied_actions,
            allowed_actions=allowed_actions,
            rate_limits=rate_limits,
            strict_mode=strict_mode,
        )
        cfg, doc = _doc_from_kwargs(kwargs)
        if not doc:
            doc = {"strict_mode": True}
        cls._install([(json.dumps(doc), "PolicyEngine.configure()", False)], cfg)

    @classmethod
    def load_from_yaml(cls, path: "str | os.PathLike[str]") -> None:
        """Loads a policy file (``callguard.yaml`` keys and the extended format). Errors name the line."""
        path = os.fspath(path)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        cls._install([(text, path, path.lower().endswith(".json"))], None)

    @classmethod
    def _install(cls, sources: list, cfg: Optional[PolicyConfig]) -> None:
        with RUNTIME.policy_lock:
            try:
                # Policies synced from a platform stay merged after the local ones.
                RUNTIME.engine.replace(sources + RUNTIME.remote_sources())
            except ValueError as e:
                raise PolicyConfigError(str(e), reason="INVALID_POLICY") from None
            RUNTIME.sources = sources
        RUNTIME.configured = True
        RUNTIME.config = cfg if cfg is not None else cls._config_from_docs()
        RUNTIME.reopen()

    @staticmethod
    def _config_from_docs() -> PolicyConfig:
        docs = json.loads(RUNTIME.engine.docs_json())
        cfg = PolicyConfig()
        if not docs:
            return cfg
        top = docs[0]
        budgets = top.get("budgets") or {}
        cfg.session_budget = budgets.get("session")
        cfg.run_budget = budgets.get("run")
        cfg.action_budgets = dict(budgets.get("actions") or {})
        cfg.denied_actions = list(top.get("denied_actions") or [])
        cfg.allowed_actions = top.get("allowed_actions")
        cfg.rate_limits = dict(top.get("rate_limits") or {})
        cfg.strict_mode = top.get("strict_mode", True) if top.get("fail_mode") != "safe" else False
        return cfg

    @classmethod
    def is_configured(cls) -> bool:
        return RUNTIME.configured

    @classmethod
    def get_config(cls) -> PolicyConfig:
        return RUNTIME.config if RUNTIME.config is not None else PolicyConfig()

    @classmethod
    def reset(cls) -> None:
        """Forgets the policy (synced policies too, until a running sync installs them again) and
        all spend, windows and baselines (for tests)."""
        with RUNTIME.policy_lock:
            RUNTIME.engine.replace([])
            RUNTIME.remote = {}
            RUNTIME.sources = []
        RUNTIME.engine.reset_counters()
        RUNTIME.configured = False
        RUNTIME.config = None
        RUNTIME.approval_handler = None
        RUNTIME.approval_timeout = None
        RUNTIME.reopen()

    @classmethod
    def policy_version(cls) -> str:
        return RUNTIME.engine.policy_version()

    @classmethod
    def set_approval_handler(cls, handler: Any, timeout_seconds: Optional[float] = None) -> None:
        """How ``require_approval`` decisions are answered: ``"terminal"``, a callable, or None (reject)."""
        from .approvals import check_handler

        RUNTIME.approval_handler = check_handler(handler)
        RUNTIME.approval_timeout = timeout_seconds

    @classmethod
    def halt(cls, agent_id: Optional[str] = None, run_id: Optional[str] = None, reason: str = "halted") -> None:
        """Kill switch: every decision for this agent or run is denied until ``resume``."""
        RUNTIME.engine.halt(*_halt_target(agent_id, run_id), reason)

    @classmethod
    def resume(cls, agent_id: Optional[str] = None, run_id: Optional[str] = None) -> None:
        RUNTIME.engine.resume(*_halt_target(agent_id, run_id))


class CostTracker:
    """Spend for the current session and run (see ``agent_sentinel.context``)."""

    @classmethod
    def _spend(cls) -> tuple:
        ctx = _context.current()
        return RUNTIME.engine.spend(ctx.session_id, ctx.run_id)

    @classmethod
    def get_session_total(cls) -> float:
        return cls._spend()[0]

    @classmethod
    def get_run_total(cls) -> float:
        return cls._spend()[1]

    @classmethod
    def get_action_stats(cls, action: Optional[str] = None) -> Dict[str, Any]:
        actions = cls._spend()[2]
        if action:
            count, cost = actions.get(action, (0, 0.0))
            return {"count": count, "total_cost": cost}
        return {"counts": {a: c for a, (c, _) in actions.items()}, "costs": {a: s for a, (_, s) in actions.items()}}

    @classmethod
    def reset_run(cls) -> None:
        """Starts the current run's budget afresh; session totals and action statistics are kept."""
        ctx = _context.current()
        RUNTIME.engine.reset_run(ctx.session_id, ctx.run_id)

    @classmethod
    def reset_all(cls) -> None:
        RUNTIME.engine.reset_counters()

    @classmethod
    def get_snapshot(cls) -> Dict[str, Any]:
        session, run, actions = cls._spend()
        return {
            "session_total": session,
            "run_total": run,
            "action_counts": {a: c for a, (c, _) in actions.items()},
            "action_costs": {a: s for a, (_, s) in actions.items()},
        }


class Ledger:
    """Direct access to the hash-chained ledger."""

    @classmethod
    def record(
        cls,
        action: str,
        inputs: Any = None,
        outputs: Any = None,
        cost_usd: float = 0.0,
        duration_ms: float = 0.0,
        outcome: str = "success",
        tags: Optional[List[str]] = None,
    ) -> int:
        """Writes one entry (redacted, chained) and returns its sequence number."""
        if not isinstance(action, str) or not action:
            raise TypeError(f"`action` must be a non-empty string, got {action!r}")
        cost = _amount("cost_usd", cost_usd)
        if isinstance(duration_ms, bool) or not isinstance(duration_ms, (int, float)):
            raise TypeError(f"`duration_ms` must be a number, got {duration_ms!r}")
        ctx = _context.current()
        return RUNTIME.guard().record(
            action, inputs, outputs, cost, float(duration_ms), str(outcome), list(tags or []),
            ctx.agent_id, ctx.run_id, ctx.session_id,
        )

    @classmethod
    def path(cls) -> str:
        return str(RUNTIME.guard().home / "ledger.jsonl")
