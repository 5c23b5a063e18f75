"""The exception tree. Every error carries the reason code, the policy, rule and limit involved,
and ``retry_after_seconds`` where it applies, so an agent (or an LLM) can adapt."""

from __future__ import annotations

from typing import Any, Optional


class AgentSentinelError(Exception):
    """Root of every error this package raises on purpose."""

    def __init__(
        self,
        message: str = "",
        *,
        reason: Optional[str] = None,
        action: Optional[str] = None,
        policy: Optional[str] = None,
        rule: Optional[str] = None,
        limit: Optional[dict] = None,
        retry_after_seconds: Optional[float] = None,
        intervention_id: Optional[str] = None,
        decision: Optional[dict] = None,
    ) -> None:
        Exception.__init__(self, message)
        self.message = message
        self.reason = reason
        self.action = action
        self.policy = policy
        self.rule = rule
        self.limit = limit
        self.retry_after_seconds = retry_after_seconds
        self.intervention_id = intervention_id
        self.decision = decision or {}

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> Any:
        return (_rebuild, (type(self), self.message, self.__dict__))


def _rebuild(cls: type, message: str, state: dict) -> "AgentSentinelError":
    e = cls.__new__(cls)
    Exception.__init__(e, message)
    e.__dict__.update(state)
    return e


class PolicyViolationError(AgentSentinelError, PermissionError):
    """A policy denied the action: deny list, allowlist, rule, rate limit, loop, anomaly."""


class RateLimitError(PolicyViolationError):
    """A rate limit (or loop detection) denied the action; see ``retry_after_seconds``."""


class BudgetExceededError(AgentSentinelError):
    """The call would exceed an action, run or session budget."""


class AgentHaltedError(PolicyViolationError):
    """The agent or run is halted (kill switch)."""


class ReplayDivergenceError(AgentSentinelError):
    """In replay mode, a call differs from the one the ledger recorded."""


class ApprovalRejectedError(AgentSentinelError, PermissionError):
    """A human rejected the action. ``approver`` and ``rejection_reason`` say who and why;
    ``approval_id`` is the server's approval request when the server asked for the approval."""

    approver: Optional[str] = None
    rejection_reason: Optional[str] = None
    approval_id: Optional[str] = None


class ApprovalTimeoutError(AgentSentinelError, TimeoutError):
    """Nobody decided in time; the action did not run. ``approval_id`` as for ``ApprovalRejectedError``."""

    approval_id: Optional[str] = None


_BY_REASON = {
    "HALTED": AgentHaltedError,
    "RATE_LIMITED": RateLimitError,
    "LOOP_DETECTED": RateLimitError,
    "ACTION_BUDGET_EXCEEDED": BudgetExceededError,
    "RUN_BUDGET_EXCEEDED": BudgetExceededError,
    "SESSION_BUDGET_EXCEEDED": BudgetExceededError,
}


def error_for(stop: Any) -> AgentSentinelError:
    """The exception for a denial returned by the native layer."""
    cls = _BY_REASON.get(stop.reason, PolicyViolationError)
    return cls(
        stop.message,
        reason=stop.reason,
        action=stop.action,
        policy=stop.policy,
        rule=stop.rule,
        limit=stop.limit,
        retry_after_seconds=stop.retry_after_seconds,
        intervention_id=stop.intervention_id,
        decision=stop.to_dict(),
    )


class PolicyConfigError(AgentSentinelError, ValueError):
    """A policy file or ``configure()`` argument is invalid; the message names what and where."""
