"""Who is acting: ``agent_id``, ``run_id`` and ``session_id``, for the whole process and per task.

``set_context`` sets process-wide defaults; ``with context(run_id=...)`` (or ``async with``) applies
to the current thread or asyncio task only, so concurrent runs are accounted separately.
"""

from __future__ import annotations

import contextvars
import os
import uuid
from contextlib import contextmanager
from typing import Iterator, NamedTuple, Optional


class Context(NamedTuple):
    agent_id: str
    run_id: str
    session_id: str


_process = Context(
    agent_id=os.environ.get("AGENT_SENTINEL_AGENT_ID", "default"),
    run_id=os.environ.get("AGENT_SENTINEL_RUN_ID", "default"),
    # A session is the application's lifetime, unless the caller names one.
    session_id=os.environ.get("AGENT_SENTINEL_SESSION_ID", f"session-{uuid.uuid4().hex[:12]}"),
)
_task: contextvars.ContextVar[Optional[Context]] = contextvars.ContextVar("agent_sentinel_context", default=None)


_task_get = _task.get


def current() -> Context:
    """The context that applies here: this task's, else the process's."""
    return _task_get() or _process


def set_context(agent_id: Optional[str] = None, run_id: Optional[str] = None, session_id: Optional[str] = None) -> Context:
    """Sets process-wide defaults. Returns the new process context."""
    global _process
    for name, value in (("agent_id", agent_id), ("run_id", run_id), ("session_id", session_id)):
        if value is not None and (not isinstance(value, str) or not value):
            raise TypeError(f"`{name}` must be a non-empty string, got {value!r}")
    _process = Context(
        agent_id if agent_id is not None else _process.agent_id,
        run_id if run_id is not None else _process.run_id,
        session_id if session_id is not None else _process.session_id,
    )
    return _process


@contextmanager
def context(agent_id: Optional[str] = None, run_id: Optional[str] = None, session_id: Optional[str] = None) -> Iterator[Context]:
    """Applies ids to the current thread or asyncio task until the block ends."""
    base = current()
    for name, value in (("agent_id", agent_id), ("run_id", run_id), ("session_id", session_id)):
        if value is not None and (not isinstance(value, str) or not value):
            raise TypeError(f"`{name}` must be a non-empty string, got {value!r}")
    ctx = Context(agent_id or base.agent_id, run_id or base.run_id, session_id or base.session_id)
    token = _task.set(ctx)
    try:
        yield ctx
    finally:
        _task.reset(token)


def get_context() -> Context:
    return current()
