"""Process-wide state behind the class-level APIs (``PolicyEngine``, ``CostTracker``, ``Ledger``)."""

from __future__ import annotations

import atexit
import logging
import os
import threading
import weakref
from pathlib import Path
from typing import Any, Optional

from . import _native


def home_from_env() -> Path:
    return Path(os.environ.get("AGENT_SENTINEL_HOME") or ".agent-sentinel")


class Runtime:
    """One engine (the configured policy) and its guard over the ledger directory."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.engine = _native.Engine()
        self.sources: list = []
        self.configured = False
        self.config: Any = None
        self.home: Optional[Path] = None
        self._guard: Optional[_native.Guard] = None
        # The same guard, where the native fast path of a guarded call looks for it.
        self.slot = _native.GuardSlot()
        self.approval_handler: Any = None
        self.approval_timeout: Optional[float] = None
        # Policies synced from a platform (``sync.py``), by sync: merged after the local sources of
        # this engine and of every ``protect`` engine, never replacing them.
        self.policy_lock = threading.RLock()
        self.remote: dict = {}
        self.protected: "weakref.WeakSet[Any]" = weakref.WeakSet()

    def remote_sources(self) -> list:
        return [s for sources in self.remote.values() for s in sources]

    def install_remote(self, key: str, sources: list) -> None:
        """Merges `sources` (``(text, filename, is_rules_json)``) under `key` into every engine.
        Raises ValueError (and changes nothing here) if the merged policy does not compile."""
        with self.policy_lock:
            remote = dict(self.remote)
            if sources:
                remote[key] = list(sources)
            else:
                remote.pop(key, None)
            merged = [s for v in remote.values() for s in v]
            self.engine.replace(self.sources + merged)
            self.remote = remote
            for p in list(self.protected):
                try:
                    p.engine.replace(p.sources + merged)
                except ValueError as e:
                    logging.getLogger("agent_sentinel.sync").error(
                        "the synced policies do not merge with a protect() policy; it keeps its own: %s", e
                    )

    def guard(self) -> _native.Guard:
        g = self._guard
        if g is None:
            g = self._open()
        return g

    def _open(self) -> _native.Guard:
        with self.lock:
            if self._guard is None:
                self.home = home_from_env()
                self._guard = _native.Guard(self.engine, str(self.home))
                self.slot.set(self._guard)
            return self._guard

    def reopen(self) -> None:
        """Re-reads ``AGENT_SENTINEL_HOME`` at the next call."""
        with self.lock:
            self._guard = None
            self.slot.set(None)


RUNTIME = Runtime()


def flush() -> None:
    """Hands every ledger and interventions entry recorded so far to the OS.

    Entries are written in groups about a millisecond after each call (``AGENT_SENTINEL_LEDGER_SYNC``:
    ``group``, the default; ``entry`` writes each entry before the call returns; ``fsync`` also waits
    for the disk). Call this before reading the files in the same process; it also runs at exit.
    """
    _native.flush_all()


def _flush_at_exit() -> None:
    try:
        _native.flush_all()
    except Exception as e:  # noqa: BLE001 - nothing left to raise to at exit
        logging.getLogger("agent_sentinel").error("the ledger could not be written at exit: %s", e)


atexit.register(_flush_at_exit)
