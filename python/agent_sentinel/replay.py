"""Replay: guarded calls return what the ledger recorded, in order, without running."""

from __future__ import annotations

import contextvars
import json
import os
import threading
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, List, Optional

from .errors import AgentSentinelError, ReplayDivergenceError

_active: contextvars.ContextVar[Optional["Replay"]] = contextvars.ContextVar("agent_sentinel_replay", default=None)


def active_replay() -> Optional["Replay"]:
    return _active.get()


class ReplayedCallError(AgentSentinelError):
    """The replayed call raised when it was recorded; the message is what it raised then."""


def _first_difference(recorded: Any, current: Any, path: str = "inputs") -> Optional[tuple]:
    if isinstance(recorded, dict) and isinstance(current, dict):
        for k in list(recorded) + [k for k in current if k not in recorded]:
            if k not in current:
                return (f"{path}.{k}", "<missing>", recorded[k])
            if k not in recorded:
                return (f"{path}.{k}", current[k], "<missing>")
            d = _first_difference(recorded[k], current[k], f"{path}.{k}")
            if d:
                return d
        return None
    if isinstance(recorded, list) and isinstance(current, list):
        for i, (r, c) in enumerate(zip(recorded, current)):
            d = _first_difference(r, c, f"{path}[{i}]")
            if d:
                return d
        if len(recorded) != len(current):
            return (f"{path} (length)", len(current), len(recorded))
        return None
    if recorded != current or type(recorded) is not type(current) and not (
        isinstance(recorded, (int, float)) and isinstance(current, (int, float)) and not isinstance(recorded, bool)
    ):
        return (path, current, recorded)
    return None


class Replay:
    """The recorded calls still to be replayed."""

    def __init__(self, entries: List[dict], source: str) -> None:
        self.entries = entries
        self.source = source
        # While any replay exists (a task may keep one after its block ends), guarded calls
        # take the Python path, which looks for the replay that applies to them.
        from . import _native

        _native.slow_path(1)
        weakref.finalize(self, _native.slow_path, -1)
        self.position = 0
        self._lock = threading.Lock()

    @property
    def remaining(self) -> int:
        return len(self.entries) - self.position

    def next(self, action: str, args: tuple, kwargs: dict, names: tuple, defaults: Any) -> Any:
        from . import _native

        with self._lock:
            i = self.position
            self.position += 1
        n = i + 1
        if i >= len(self.entries):
            raise ReplayDivergenceError(
                f"call {n} (`{action}`): the ledger {self.source} recorded only {len(self.entries)} call(s)",
                reason="REPLAY_DIVERGENCE", action=action,
            )
        e = self.entries[i]
        if e.get("action") != action:
            raise ReplayDivergenceError(
                f"call {n}: `{action}` was called, but the ledger recorded `{e.get('action')}`",
                reason="REPLAY_DIVERGENCE", action=action,
            )
        current = _native.to_record({"args": list(args), "kwargs": dict(kwargs)})
        recorded = (e.get("payload") or {}).get("inputs")
        diff = _first_difference(recorded, current)
        if diff:
            where, now, then = diff
            raise ReplayDivergenceError(
                f"call {n} (`{action}`): {where} is {now!r}, but the ledger recorded {then!r}",
                reason="REPLAY_DIVERGENCE", action=action,
            )
        outputs = (e.get("payload") or {}).get("outputs")
        if e.get("outcome") == "error":
            raise ReplayedCallError(str(outputs), reason="REPLAYED_ERROR", action=action)
        return outputs


def _ledger_files(path: Path) -> List[Path]:
    if path.is_dir():
        path = path / "ledger.jsonl"
    stem, suffix = path.stem, path.suffix or ".jsonl"
    rotated = sorted(
        p for p in path.parent.glob(f"{stem}.*{suffix}") if p.name[len(stem) + 1 : -len(suffix)].isdigit()
    )
    return rotated + ([path] if path.exists() else [])


@contextmanager
def replay_mode(ledger_path: "str | os.PathLike[str] | None" = None, run_id: Optional[str] = None) -> Iterator[Replay]:
    """Inside the block, guarded calls return their recorded outputs in order, without running.

    A different action or different inputs raise ``ReplayDivergenceError`` naming the first difference.
    """
    from ._runtime import flush, home_from_env

    path = Path(ledger_path) if ledger_path is not None else home_from_env() / "ledger.jsonl"
    flush()  # this process's latest entries, if it is reading its own ledger
    files = _ledger_files(path)
    if not files:
        raise FileNotFoundError(f"no ledger at `{path}`")
    entries = []
    for f in files:
        with open(f, encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    e = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ReplayDivergenceError(f"`{f}` line {line_no} is not valid JSON: {err}") from None
                if e.get("outcome") not in ("success", "error"):
                    continue
                if run_id is not None and e.get("run_id") != run_id:
                    continue
                entries.append(e)
    replay = Replay(entries, f"`{path}`" + (f" for run `{run_id}`" if run_id else ""))
    token = _active.set(replay)
    try:
        yield replay
    finally:
        _active.reset(token)
