"""Agent Sentinel: decide whether an AI agent may act, before it acts.

Both earlier Python APIs are here, decided by the Rust core:

- ``guarded_action``, ``PolicyEngine``, ``CostTracker``, ``Ledger`` (the SDK);
- ``protect``, ``SentinelConfig`` (the rules-and-approvals decorator);
- ``enable_remote_sync``, ``BackgroundSync``, ``SyncConfig``, ``flush_and_stop`` (sync with a
  ``sentinel serve`` platform: ledger uploads, policy sync, central decisions).
"""

from ._native import __version__
from .approvals import Approval, ApprovalRequest
from ._context import Context, context, get_context, set_context
from .decorators import guarded_action
from .errors import (
    AgentHaltedError,
    AgentSentinelError,
    ApprovalRejectedError,
    ApprovalTimeoutError,
    BudgetExceededError,
    PolicyConfigError,
    PolicyViolationError,
    RateLimitError,
    ReplayDivergenceError,
)
from .policy import CostTracker, Ledger, PolicyConfig, PolicyEngine
from .protect import SentinelConfig, protect
from .replay import ReplayedCallError, replay_mode
from ._runtime import flush
from .sync import AuthorityUnavailableError, BackgroundSync, SyncConfig, enable_remote_sync, flush_and_stop

__all__ = [
    "AgentHaltedError",
    "AgentSentinelError",
    "Approval",
    "ApprovalRejectedError",
    "ApprovalRequest",
    "ApprovalTimeoutError",
    "AuthorityUnavailableError",
    "BackgroundSync",
    "BudgetExceededError",
    "Context",
    "CostTracker",
    "Ledger",
    "PolicyConfig",
    "PolicyConfigError",
    "PolicyEngine",
    "PolicyViolationError",
    "RateLimitError",
    "ReplayDivergenceError",
    "ReplayedCallError",
    "SentinelConfig",
    "SyncConfig",
    "__version__",
    "context",
    "enable_remote_sync",
    "flush",
    "flush_and_stop",
    "get_context",
    "guarded_action",
    "protect",
    "replay_mode",
    "set_context",
]
