"""Type stubs for the Rust extension. Use the public API in ``agent_sentinel`` instead."""

from typing import Any, Optional

__version__: str

class Engine:
    def __init__(self, sources: list[tuple[str, str, bool]] = ...) -> None: ...
    def replace(self, sources: list[tuple[str, str, bool]]) -> None: ...
    def policy_version(self) -> str: ...
    def docs_json(self) -> str: ...
    def spend(self, session_id: str, run_id: str) -> tuple[float, float, dict[str, tuple[int, float]]]: ...
    def reset_run(self, session_id: str, run_id: str) -> None: ...
    def reset_counters(self) -> None: ...
    def halt(self, kind: str, id: str, reason: str) -> None: ...
    def resume(self, kind: str, id: str) -> None: ...

class Permit:
    verdict: str
    message: str
    reason: str

class Stop:
    verdict: str
    reason: str
    intervention: Optional[str]
    message: str
    policy: Optional[str]
    rule: Optional[str]
    retry_after_seconds: Optional[float]
    policy_version: str
    limit: Optional[dict[str, Any]]
    approval: Optional[tuple[Optional[int], list[str]]]
    arguments: dict[str, Any]
    intervention_id: Optional[str]
    action: str
    def to_dict(self) -> dict[str, Any]: ...

class Guard:
    home: str
    def __init__(self, engine: Engine, home: str) -> None: ...
    def begin(
        self,
        action: str,
        cost: float,
        tags: list[str],
        args: tuple[Any, ...],
        kwargs: Optional[dict[str, Any]],
        names: tuple[str, ...],
        defaults: Optional[dict[str, Any]],
        ctx: tuple[str, str, str],
        approval: Optional[tuple[bool, str, str]] = None,
        escalation_id: Optional[str] = None,
    ) -> Permit | Stop: ...
    def finish(self, permit: Permit, ok: bool, output: Any, actual_cost: Optional[float] = None) -> int: ...
    def abandon(self, permit: Permit) -> None: ...
    def flush(self) -> None: ...
    def reject(self, stop: Stop, approver: str, reason: str, agent_id: str, run_id: str, session_id: str) -> str: ...
    def record(
        self,
        action: str,
        inputs: Any,
        outputs: Any,
        cost_usd: float,
        duration_ms: float,
        outcome: str,
        tags: list[str],
        agent_id: str,
        run_id: str,
        session_id: str,
    ) -> int: ...

class GuardSlot:
    """Where decorated functions find their guard (filled when the guard opens)."""
    def __init__(self) -> None: ...
    def set(self, guard: Optional[Guard]) -> None: ...

class Wrapped:
    """One decorated function's native call path (see ``_call.py``)."""
    def __init__(
        self,
        func: Any,
        action: str,
        cost: float,
        tags: list[str],
        names: list[str],
        defaults: list[tuple[str, Any]],
        slot: GuardSlot,
        open_guard: Any,
        task_context: Any,
        context_module: Any,
        agent: Optional[str],
        slow: Any,
    ) -> None: ...
    def run(self, args: tuple[Any, ...], kwargs: Optional[dict[str, Any]] = None) -> Any: ...
    def begin(self, args: tuple[Any, ...], kwargs: Optional[dict[str, Any]] = None) -> Permit | Stop | None: ...
    def finish(self, permit: Permit, ok: bool, output: Any) -> None: ...

def slow_path(delta: int) -> None: ...
def to_record(value: Any) -> Any: ...
def flush_all() -> None: ...
