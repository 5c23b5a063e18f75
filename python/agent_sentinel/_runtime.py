"""Process-wide state behind the class-level APIs (``PolicyEngine``, ``CostTracker``, ``Ledger``)."""

from __future__ import annotations

import os
import threading
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
        self.approval_handler: Any = None
        self.approval_timeout: Optional[float] = None

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
            return self._guard

    def reopen(self) -> None:
        """Re-reads ``AGENT_SENTINEL_HOME`` at the next call."""
        with self.lock:
            self._guard = None


RUNTIME = Runtime()
