"""``guarded_action``: the SDK's decorator."""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Optional

from ._call import CallSpec, wrap
from ._runtime import RUNTIME


def _approver() -> tuple:
    return RUNTIME.approval_handler, RUNTIME.approval_timeout


def guarded_action(name: Optional[str] = None, cost_usd: float = 0.0, tags: Optional[Iterable[str]] = None) -> Callable:
    """Decides every call of the decorated function (sync or async) before it runs, and records it.

    Denials raise ``PolicyViolationError``, ``BudgetExceededError`` (and their relatives); the
    function's own exceptions propagate unchanged and are recorded with outcome ``error``.
    """
    if callable(name) and cost_usd == 0.0 and tags is None:
        # Used bare, as @guarded_action.
        return guarded_action()(name)
    if name is not None and (not isinstance(name, str) or not name):
        raise TypeError(f"`name` must be a non-empty string, got {name!r}")
    if isinstance(cost_usd, bool) or not isinstance(cost_usd, (int, float)) or math.isnan(cost_usd) or math.isinf(cost_usd) or cost_usd < 0:
        raise TypeError(f"`cost_usd` must be a finite, non-negative number, got {cost_usd!r}")
    if isinstance(tags, str):
        raise TypeError(f"`tags` must be a list of strings, not a single string {tags!r}")
    tag_list = [str(t) for t in (tags or [])]

    def decorate(fn: Callable) -> Callable:
        spec = CallSpec(fn, name or fn.__name__, float(cost_usd), tag_list, RUNTIME.guard, _approver, slot=RUNTIME.slot)
        return wrap(spec)

    return decorate
