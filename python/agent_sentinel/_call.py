"""The wrapper every guarded call goes through (``guarded_action`` and ``protect`` alike).

Per call it makes one crossing into Rust to decide (and reserve), runs the function, and one more
to settle and write the ledger entry. Everything else is prepared when the function is decorated.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import threading
from typing import Any, Callable, Optional

from . import _native
from . import _context
from .approvals import Approval, ApprovalRequest, ask_terminal, normalize
from .errors import ApprovalRejectedError, ApprovalTimeoutError, error_for
from .replay import _active as _replay_var

_Permit = _native.Permit
_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)

# The central authority (``sync.py``, ``authority="server"``): when set, every call the local
# policy allows is also decided by the server before it runs, and settled there afterwards.
_authority: Any = None


def set_authority(authority: Any) -> None:
    global _authority
    if _authority is None and authority is not None:
        _native.slow_path(1)
    elif _authority is not None and authority is None:
        _native.slow_path(-1)
    _authority = authority


def clear_authority(authority: Any) -> None:
    """Removes `authority` if it is still the one in effect."""
    if _authority is authority:
        set_authority(None)


class CallSpec:
    """Everything about a decorated function that does not change between calls."""

    __slots__ = (
        "fn", "action", "cost", "tags", "names", "defaults", "guard", "approver", "context_fn", "context_arity", "current",
        "slot", "agent",
    )

    def __init__(
        self,
        fn: Callable,
        action: str,
        cost: float,
        tags: list,
        guard: Callable[[], Any],
        approver: Callable[[], tuple],
        context_fn: Optional[Callable] = None,
        current: Optional[Callable[[], Any]] = None,
        slot: Any = None,
        agent: Optional[str] = None,
    ) -> None:
        # `current` gives the context in Python; `agent` (protect's `agent_id`) is the agent the
        # native path substitutes, as `current` does.
        self.current = current or _context.current
        self.agent = agent
        # Where the native fast path finds the guard (``guard()`` fills it when it opens one).
        self.slot = slot
        try:
            params = list(inspect.signature(fn).parameters.values())
        except (TypeError, ValueError):
            params = []
        self.fn = fn
        self.action = action
        self.cost = cost
        self.tags = tags
        self.names = tuple(p.name for p in params if p.kind in _POSITIONAL)
        defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
        self.defaults = defaults or None
        self.guard = guard
        self.approver = approver
        self.context_fn = context_fn
        self.context_arity = 0
        if context_fn is not None:
            try:
                self.context_arity = len(inspect.signature(context_fn).parameters)
            except (TypeError, ValueError):
                self.context_arity = 1


def context_of(spec: CallSpec, args: tuple, kwargs: dict) -> dict:
    """The application's context for this call (``protect``'s ``context_fn``), or ``{}``."""
    if spec.context_fn is None:
        return {}
    got = spec.context_fn(*args, **kwargs) if spec.context_arity else spec.context_fn()
    return dict(got or {})


def _request(spec: CallSpec, stop: Any, ctx: Any, args: tuple, kwargs: dict, timeout: Optional[float], approvers: list) -> ApprovalRequest:
    extra = context_of(spec, args, kwargs)
    return ApprovalRequest(
        agent_id=ctx.agent_id,
        action=spec.action,
        arguments=_native.to_record(stop.arguments),
        reason=stop.message,
        rule=stop.rule,
        policy=stop.policy,
        cost_usd=spec.cost,
        context=_native.to_record(extra),
        timeout_seconds=timeout,
        approvers=approvers,
    )


def _ask_blocking(handler: Any, req: ApprovalRequest) -> Optional[Approval]:
    """Returns the approval, or None when nobody answered in time."""
    if handler is None:
        return Approval(False, "agent-sentinel", "no approver is configured (PolicyEngine.set_approval_handler)")
    if handler == "terminal":
        try:
            return ask_terminal(req)
        except OSError as e:
            return Approval(False, "agent-sentinel", f"no terminal to ask ({e.strerror or e})")
    # A callable: wait for it at most the timeout; a late answer is ignored.
    result: list = []
    error: list = []

    def run() -> None:
        try:
            result.append(normalize(handler(req), getattr(handler, "__name__", "callable")))
        except BaseException as e:  # noqa: BLE001 - re-raised below in the caller's thread
            error.append(e)

    t = threading.Thread(target=run, name="agent-sentinel-approval", daemon=True)
    t.start()
    t.join(req.timeout_seconds)
    if error:
        raise error[0]
    return result[0] if result else None


def _resolve(spec: CallSpec, guard: Any, stop: Any, ctx: Any, answer: Optional[Approval], timeout: Optional[float], args: tuple, kwargs: dict) -> Any:
    """Turns the approver's answer into a permit, or raises (recording the rejection)."""
    if answer is None:
        guard.reject(stop, "timeout", f"no decision within {timeout:g}s" if timeout else "no decision", ctx.agent_id, ctx.run_id, ctx.session_id)
        raise ApprovalTimeoutError(
            f"approval for `{spec.action}` timed out after {timeout:g}s; the action did not run" if timeout else f"approval for `{spec.action}` got no answer",
            reason="APPROVAL_TIMEOUT", action=spec.action, policy=stop.policy, rule=stop.rule,
            intervention_id=stop.intervention_id, decision=stop.to_dict(),
        )
    if not answer.approved:
        guard.reject(stop, answer.approver, answer.reason, ctx.agent_id, ctx.run_id, ctx.session_id)
        err = ApprovalRejectedError(
            f"`{spec.action}` was rejected by {answer.approver}" + (f": {answer.reason}" if answer.reason else ""),
            reason="APPROVAL_REJECTED", action=spec.action, policy=stop.policy, rule=stop.rule,
            intervention_id=stop.intervention_id, decision=stop.to_dict(),
        )
        err.approver = answer.approver
        err.rejection_reason = answer.reason
        raise err
    r = guard.begin(
        spec.action, spec.cost, spec.tags, args, kwargs or None, spec.names, spec.defaults,
        ctx, (True, answer.approver, answer.reason), stop.intervention_id,
    )
    if type(r) is not _Permit:
        raise error_for(r)
    return r


def _timeouts(spec: CallSpec, stop: Any) -> tuple:
    handler, default_timeout = spec.approver()
    policy_timeout, approvers = stop.approval or (None, [])
    timeout = policy_timeout if policy_timeout is not None else default_timeout
    return handler, timeout, list(approvers)


def wrap(spec: CallSpec) -> Callable:
    fn = spec.fn
    action, cost, tags, names, defaults, get_guard = spec.action, spec.cost, spec.tags, spec.names, spec.defaults, spec.guard
    current = spec.current
    active_replay = _replay_var.get

    def start(args: tuple, kwargs: dict, r: Any) -> tuple:
        """`(ctx, guard, decision)`: the decision the native path made (`r`), else one made here;
        under replay `(None, None, recorded result)`."""
        if r is None:
            replay = active_replay()
            if replay is not None:
                return None, None, replay.next(action, args, kwargs, names, defaults)
            ctx = current()
            guard = get_guard()
            return ctx, guard, guard.begin(action, cost, tags, args, kwargs or None, names, defaults, ctx)
        # The context the native path decided in: nothing ran in between, so it is still current.
        return current(), get_guard(), r

    async def call_async(args: tuple, kwargs: dict, r: Any = None) -> Any:
        """The whole call in Python; `r` is a decision the native path already made."""
        ctx, guard, r = start(args, kwargs, r)
        if ctx is None:
            return r
        if type(r) is not _Permit:
            if r.verdict != "require_approval":
                raise error_for(r)
            handler, timeout, approvers = _timeouts(spec, r)
            req = _request(spec, r, ctx, args, kwargs, timeout, approvers)
            if handler is not None and handler != "terminal" and inspect.iscoroutinefunction(handler):
                try:
                    answer = normalize(await asyncio.wait_for(handler(req), timeout), handler.__name__)
                except asyncio.TimeoutError:
                    answer = None
            else:
                answer = await asyncio.to_thread(_ask_blocking, handler, req)
            r = _resolve(spec, guard, r, ctx, answer, timeout, args, kwargs)
        central = _authority
        ticket = None if central is None else await central.decide_async(spec, guard, r, ctx, args, kwargs)
        try:
            result = await fn(*args, **kwargs)
        except BaseException as e:
            if ticket is not None:
                central.settle_later(ticket, cost)
            guard.finish(r, False, f"{type(e).__name__}: {e}")
            raise
        if ticket is not None:
            central.settle_later(ticket, cost)
        guard.finish(r, True, result)
        return result

    def call(args: tuple, kwargs: dict, r: Any = None) -> Any:
        """The whole call in Python; `r` is a decision the native path already made."""
        ctx, guard, r = start(args, kwargs, r)
        if ctx is None:
            return r
        if type(r) is not _Permit:
            if r.verdict != "require_approval":
                raise error_for(r)
            handler, timeout, approvers = _timeouts(spec, r)
            answer = _ask_blocking(handler, _request(spec, r, ctx, args, kwargs, timeout, approvers))
            r = _resolve(spec, guard, r, ctx, answer, timeout, args, kwargs)
        central = _authority
        ticket = None if central is None else central.decide(spec, guard, r, ctx, args, kwargs)
        try:
            result = fn(*args, **kwargs)
        except BaseException as e:
            if ticket is not None:
                central.settle(ticket, cost)
            guard.finish(r, False, f"{type(e).__name__}: {e}")
            raise
        if ticket is not None:
            central.settle(ticket, cost)
        guard.finish(r, True, result)
        return result

    is_async = inspect.iscoroutinefunction(fn)
    if spec.slot is None:
        if is_async:

            @functools.wraps(fn)
            async def plain_async(*args: Any, **kwargs: Any) -> Any:
                return await call_async(args, kwargs)

            return plain_async

        @functools.wraps(fn)
        def plain(*args: Any, **kwargs: Any) -> Any:
            return call(args, kwargs)

        return plain

    # The fast path: one crossing into Rust decides, runs, settles and records the call. It hands
    # the call back to `call` for anything else (a denial or approval, replay, a central authority).
    def slow(args: tuple, kwargs: Optional[dict], r: Any) -> Any:
        return call(args, kwargs or {}, r)

    native = _native.Wrapped(
        fn, action, cost, list(tags), list(names), list((defaults or {}).items()), spec.slot, get_guard,
        _context._task_get, _context, spec.agent, slow,
    )

    if is_async:
        # Async functions are awaited here, between the two crossings into Rust.
        begin, finish = native.begin, native.finish

        @functools.wraps(fn)
        async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
            r = begin(args, kwargs)
            if type(r) is not _Permit:
                return await call_async(args, kwargs, r)
            try:
                result = await fn(*args, **kwargs)
            except BaseException as e:
                finish(r, False, f"{type(e).__name__}: {e}")
                raise
            finish(r, True, result)
            return result

        return async_wrapper

    run = native.run

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return run(args, kwargs)

    return wrapper
