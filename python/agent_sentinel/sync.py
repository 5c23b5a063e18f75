"""Remote sync with a ``sentinel serve`` platform: ledger uploads, policy sync, central decisions.

- **Uploads.** ``<AGENT_SENTINEL_HOME>/ledger.jsonl`` and ``interventions.jsonl`` (and their rotated
  segments ``ledger.NNNNNN.jsonl``) are read incrementally from a persisted position and sent, in
  file order, to ``POST /api/v1/ledger``. The position advances only after a 2xx answer, so a lost
  answer means a re-send, which the server recognises as duplicates. The local files are only read.
- **Retries.** Exponential backoff with full jitter; 429, 5xx and connection errors are retried and
  ``Retry-After`` is honoured. Uploads fail open: the agent never sees an error from them.
- **Policy sync.** ``GET /api/v1/policies/sync`` every ``policy_sync_interval`` seconds (ETag,
  304); the answer is cached on disk and **merged** with the local policy (never replacing it).
- **Central authority.** With ``authority="server"`` every guarded call that the local policy allows
  is also decided by ``POST /api/v1/decide`` and settled with ``POST /api/v1/settle``. When the
  server gives no answer, calls fail closed (``AuthorityUnavailableError``) unless
  ``fail_mode="safe"``.
- **Approvals through the server.** When ``/decide`` answers ``require_approval`` with an
  ``approval_request``, the call waits for a human by long-polling
  ``GET /api/v1/approvals/{id}/wait`` (never busy polling). Connection errors and 5xx during the
  wait are retried with full-jitter backoff until the request's ``expires_at`` plus a short grace, so
  the wait survives server restarts. Approved: ``/decide`` again with ``approval_id``, and the call
  runs and is settled as any allowed call. Rejected: ``ApprovalRejectedError`` with the approver and
  their reason. Expired (or no answer before the expiry): ``ApprovalTimeoutError``. A call that does
  not run gives back its local permit and costs nothing. Async calls wait in a thread of their own.
"""

from __future__ import annotations

import asyncio
import atexit
import difflib
import email.utils
import functools
import http.client
import json
import logging
import math
import os
import random
import re
import socket
import threading
import time
import urllib.parse
import weakref
from collections import deque
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from . import _call
from . import _context
from . import _native
from ._runtime import RUNTIME, home_from_env
from .errors import ApprovalRejectedError, ApprovalTimeoutError, PolicyViolationError, error_for

__all__ = [
    "AuthorityUnavailableError",
    "BackgroundSync",
    "SyncConfig",
    "enable_remote_sync",
    "flush_and_stop",
]

log = logging.getLogger("agent_sentinel.sync")

STATE_FILE = "sync-state.json"
POLICY_CACHE_FILE = "sync-policies.json"
LOGS = ("ledger", "interventions")
MAX_LINES_PER_REQUEST = 5000  # the server's limit
MAX_BYTES_PER_REQUEST = 8 * 1024 * 1024  # raw line bytes; JSON escaping stays well under the 16 MiB body limit
SERVER_PREFIX = "server:"

_AUTHORITIES = ("local", "server")
# How long after an approval request's expiry (by the server's clock) a wait that cannot reach the
# server keeps trying before it ends as a timeout.
APPROVAL_GRACE_SECONDS = 3.0
# How many approval rounds one call may go through (a round ends when the approval cannot be used,
# for example because the policy changed meanwhile, and the server is asked again).
_APPROVAL_ROUNDS = 3
_FAIL_MODES = ("secure", "safe")
_TAIL = re.compile(rb'"seq":(\d+),"prev_hash":"([0-9a-f]{64})","hash":"([0-9a-f]{64})"\}\r?\n?$')


class AuthorityUnavailableError(PolicyViolationError):
    """``authority="server"`` and the server gave no decision (unreachable, error, bad key): the
    action did not run. ``fail_mode="safe"`` lets calls proceed on the local decision instead when
    the server is unreachable."""


# ---------------------------------------------------------------------------------------------
# Configuration


def _positive(name: str, value: Any, allow_none: bool = False) -> Optional[float]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or math.isinf(value) or value <= 0:
        extra = " (or None to disable)" if allow_none else ""
        raise TypeError(f"`{name}` must be a positive number of seconds{extra}, got {value!r}")
    return float(value)


def _count(name: str, value: Any, low: int, high: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise TypeError(f"`{name}` must be an integer {bound}, got {value!r}")
    return value


def _opt_id(name: str, value: Any) -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > 200 or any(c < " " for c in value):
        raise TypeError(f"`{name}` must be a non-empty string of at most 200 printable characters, got {value!r}")
    return value


@dataclass
class SyncConfig:
    """How to reach the platform and what to sync. Every option is checked; an unknown one is a TypeError.

    - ``platform_url``: the server's base URL (``http://127.0.0.1:8080``); a trailing ``/api/v1`` is accepted.
    - ``api_token``: an API key (``as_…``), sent as ``Authorization: Bearer``. Never written to disk.
    - ``agent_id``, ``run_id``: who this process acts for. When given they also become the process's
      context (``agent_sentinel.set_context``), so local decisions, ledger entries, synced scoped
      policies and central decisions agree; ``agent_id`` is also the upload's agent.
    - ``flush_interval``: seconds between uploads; ``batch_size``: lines per upload request (≤ 5000);
      ``max_retries``: retries of one request after the first attempt (429, 5xx, connection errors).
    - ``policy_sync_interval``: seconds between policy syncs (None disables policy sync).
    - ``authority``: ``"local"`` (decide in-process only) or ``"server"`` (also ask ``/decide``).
    - ``fail_mode``: with ``authority="server"``, what a call does when the server gives no answer:
      ``"secure"`` (default) raises ``AuthorityUnavailableError``; ``"safe"`` proceeds on the local decision.
    - ``stream``: the name of this ledger on the server (default ``"<hostname>:<absolute home>"``).
    - ``home``: the ledger directory (default ``AGENT_SENTINEL_HOME`` or ``.agent-sentinel``).
    - ``timeout``: seconds per HTTP request; ``retry_backoff``/``max_backoff``: first and largest
      backoff in seconds; ``shutdown_timeout``: how long ``stop()`` may spend on the final flush;
      ``reservation_ttl_seconds``: how long a central reservation holds if this process dies.
    - ``approval_poll_seconds``: with ``authority="server"``, how long each long-poll for a human's
      decision is held open (at most 60; keep it below the server's ``--request-timeout``, 30 s by
      default). A server shutting down finishes open long-polls first, so this also bounds how long
      a restart waits for a waiting agent.
    """

    platform_url: str
    api_token: str = field(repr=False)
    agent_id: Optional[str] = None
    run_id: Optional[str] = None
    flush_interval: float = 10.0
    batch_size: int = 50
    max_retries: int = 3
    policy_sync_interval: Optional[float] = 300.0
    authority: str = "local"
    fail_mode: str = "secure"
    stream: Optional[str] = None
    home: Optional[str] = None
    timeout: float = 5.0
    retry_backoff: float = 0.5
    max_backoff: float = 30.0
    shutdown_timeout: float = 10.0
    reservation_ttl_seconds: Optional[float] = None
    approval_poll_seconds: float = 25.0

    def __post_init__(self) -> None:
        if not isinstance(self.platform_url, str):
            raise TypeError(f"`platform_url` must be a string like \"http://127.0.0.1:8080\", got {self.platform_url!r}")
        u = urllib.parse.urlsplit(self.platform_url.strip())
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"`platform_url` must be an http:// or https:// URL, got {self.platform_url!r}")
        try:
            _ = u.port
        except ValueError:
            raise ValueError(f"`platform_url` has an invalid port: {self.platform_url!r}") from None
        if not isinstance(self.api_token, str) or not self.api_token.strip() or any(c in self.api_token for c in "\r\n"):
            raise TypeError("`api_token` must be a non-empty string (an API key such as `as_…`)")
        self.agent_id = _opt_id("agent_id", self.agent_id)
        self.run_id = _opt_id("run_id", self.run_id)
        self.flush_interval = _positive("flush_interval", self.flush_interval)  # type: ignore[assignment]
        self.batch_size = _count("batch_size", self.batch_size, 1, MAX_LINES_PER_REQUEST)
        self.max_retries = _count("max_retries", self.max_retries, 0, 100)
        self.policy_sync_interval = _positive("policy_sync_interval", self.policy_sync_interval, allow_none=True)
        if self.authority not in _AUTHORITIES:
            raise ValueError(f"`authority` must be \"local\" or \"server\", got {self.authority!r}")
        if self.fail_mode not in _FAIL_MODES:
            raise ValueError(f"`fail_mode` must be \"secure\" or \"safe\", got {self.fail_mode!r}")
        if self.stream is not None and (
            not isinstance(self.stream, str) or not 1 <= len(self.stream) <= 300 or any(c < " " for c in self.stream)
        ):
            raise TypeError(f"`stream` must be 1 to 300 printable characters, got {self.stream!r}")
        if self.home is not None:
            if not isinstance(self.home, (str, os.PathLike)):
                raise TypeError(f"`home` must be a path, got {self.home!r}")
            self.home = os.fspath(self.home)
        self.timeout = _positive("timeout", self.timeout)  # type: ignore[assignment]
        self.retry_backoff = _positive("retry_backoff", self.retry_backoff)  # type: ignore[assignment]
        self.max_backoff = _positive("max_backoff", self.max_backoff)  # type: ignore[assignment]
        self.shutdown_timeout = _positive("shutdown_timeout", self.shutdown_timeout)  # type: ignore[assignment]
        ttl = _positive("reservation_ttl_seconds", self.reservation_ttl_seconds, allow_none=True)
        if ttl is not None and ttl > 86400:
            raise TypeError(f"`reservation_ttl_seconds` must be at most 86400, got {ttl!r}")
        self.reservation_ttl_seconds = ttl
        poll = _positive("approval_poll_seconds", self.approval_poll_seconds)
        if poll is not None and poll > 60:
            raise TypeError(f"`approval_poll_seconds` must be at most 60 (the server's limit), got {poll!r}")
        self.approval_poll_seconds = poll  # type: ignore[assignment]

    @property
    def base_url(self) -> str:
        """The URL with any trailing ``/`` or ``/api/v1`` removed."""
        url = self.platform_url.strip().rstrip("/")
        if url.endswith("/api/v1"):
            url = url[: -len("/api/v1")]
        return url


_CONFIG_FIELDS = tuple(f.name for f in fields(SyncConfig))


def _unknown(kind: str, key: str) -> TypeError:
    close = difflib.get_close_matches(key, _CONFIG_FIELDS, n=1)
    hint = f"; did you mean `{close[0]}`?" if close else f"; expected one of {', '.join(_CONFIG_FIELDS)}"
    return TypeError(f"{kind}() got an unknown keyword argument `{key}`{hint}")


# ---------------------------------------------------------------------------------------------
# HTTP


class _Response:
    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int, headers: Dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body or b"null")

    def problem(self) -> str:
        """The server's explanation of an error (problem+json ``detail`` and field paths), or the body."""
        try:
            p = self.json()
        except ValueError:
            return self.body[:300].decode("utf-8", "replace")
        if not isinstance(p, dict):
            return str(p)[:300]
        text = str(p.get("detail") or p.get("title") or "")
        paths = [f"{e.get('path')}: {e.get('message')}" for e in p.get("errors") or [] if isinstance(e, dict)]
        return "; ".join([text] + paths) if paths else text


class _Client:
    """One kept-alive ``http.client`` connection per thread; a broken connection is replaced."""

    def __init__(self, config: SyncConfig) -> None:
        u = urllib.parse.urlsplit(config.base_url)
        self.url = config.base_url
        self.https = u.scheme == "https"
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or (443 if self.https else 80)
        self.prefix = u.path.rstrip("/")
        self.timeout = config.timeout
        self.headers = {
            "Authorization": f"Bearer {config.api_token.strip()}",
            "Accept": "application/json",
            "User-Agent": f"agent-sentinel-python/{_native.__version__}",
        }
        self._local = threading.local()
        # Weak, so a finished thread's connection is closed when the thread's locals go.
        self._all: "weakref.WeakSet[http.client.HTTPConnection]" = weakref.WeakSet()
        self._generation = 0
        self._lock = threading.Lock()

    def _connect(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        conn = cls(self.host, self.port, timeout=self.timeout)
        with self._lock:
            self._all.add(conn)
            self._local.generation = self._generation
        return conn

    def _current(self) -> Optional[http.client.HTTPConnection]:
        conn = getattr(self._local, "conn", None)
        if conn is not None and getattr(self._local, "generation", -1) != self._generation:
            conn.close()  # closed by close() since; start afresh
            conn = self._local.conn = None
        return conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            conn.close()
            with self._lock:
                self._all.discard(conn)

    def request(self, method: str, path: str, body: Any = None, headers: Optional[Dict[str, str]] = None) -> _Response:
        """Sends one request. Raises ``OSError``/``http.client.HTTPException`` when no answer came."""
        data = None
        h = dict(self.headers)
        if headers:
            h.update(headers)
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body, separators=(",", ":")).encode("utf-8")
            h["Content-Type"] = "application/json"
        for attempt in (0, 1):
            conn = self._current()
            reused = conn is not None
            if conn is None:
                conn = self._local.conn = self._connect()
            try:
                conn.request(method, self.prefix + path, body=data, headers=h)
                resp = conn.getresponse()
                payload = resp.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError, http.client.CannotSendRequest):
                self._drop()
                # A kept-alive connection the server closed while idle: one fresh attempt.
                if reused and attempt == 0:
                    continue
                raise
            except BaseException:
                self._drop()
                raise
            if resp.will_close:
                self._drop()
            return _Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, payload)
        raise ConnectionError("unreachable")  # pragma: no cover - the loop always returns or raises

    def close(self) -> None:
        with self._lock:
            conns = list(self._all)
            self._all = weakref.WeakSet()
            self._generation += 1
        for c in conns:
            try:
                c.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                pass


def _retry_after(value: Optional[str]) -> Optional[float]:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())


def _retryable(status: int) -> bool:
    return status in (408, 429) or status >= 500


# ---------------------------------------------------------------------------------------------
# Reading the logs incrementally


def _segments(path: Path) -> List[Tuple[Path, int, int, int]]:
    """Every file of a log, oldest first (as ``sentinel_core::ledger::segments``): rotated
    ``<stem>.<NNNNNN>.jsonl`` by number, then the active file. ``(path, dev, ino, size)``."""
    stem, ext = path.stem, path.suffix.lstrip(".")
    found = []
    try:
        names = os.listdir(path.parent)
    except FileNotFoundError:
        return []
    for name in names:
        if not (name.startswith(stem + ".") and name.endswith("." + ext)):
            continue
        num = name[len(stem) + 1 : -(len(ext) + 1)]
        if len(num) == 6 and num.isdigit():
            found.append((int(num), path.parent / name))
    found.sort()
    files = [p for _, p in found]
    if path.exists():
        files.append(path)
    out = []
    for p in files:
        try:
            st = os.stat(p)
        except FileNotFoundError:
            continue
        out.append((p, st.st_dev, st.st_ino, st.st_size))
    return out


def _tail(line: bytes) -> Optional[Tuple[int, str]]:
    m = _TAIL.search(line, max(0, len(line) - 200))
    if m is None:
        return None
    return int(m.group(1)), m.group(3).decode("ascii")


class _Reader:
    """Where the upload of one log stands: a file (by device and inode, so a rotation that renames it
    is followed), a byte offset in it, and the ``seq`` and ``hash`` of the last line sent."""

    def __init__(self, path: Path, state: Optional[dict]) -> None:
        self.path = path
        self.segs = _segments(path)
        st = state or {}
        self.seq = int(st.get("seq") or 0)
        self.hash = str(st.get("hash") or "")
        self.index, self.offset = self._locate(st)
        self._pending: Optional[Tuple[int, int, int, str]] = None

    def _locate(self, st: dict) -> Tuple[int, int]:
        if not st or not self.segs:
            return 0, 0
        want = (st.get("dev"), st.get("ino"))
        off = int(st.get("offset") or 0)
        for i, (p, dev, ino, size) in enumerate(self.segs):
            if (dev, ino) == want and size >= off and self._ends_at(p, off):
                return i, off
        # The file was replaced, truncated or the identity is stale: find the last line sent by seq.
        return self._find_by_seq()

    def _ends_at(self, p: Path, off: int) -> bool:
        """Does the line before `off` end with the hash recorded for it?"""
        if off == 0:
            return True
        if not self.hash:
            return False
        want = b'"hash":"' + self.hash.encode("ascii") + b'"}\n'
        try:
            with open(p, "rb") as f:
                f.seek(off - len(want))
                return f.read(len(want)) == want
        except OSError:
            return False

    def _find_by_seq(self) -> Tuple[int, int]:
        if self.seq <= 0:
            return 0, 0
        for i, (p, _dev, _ino, _size) in enumerate(self.segs):
            try:
                f = open(p, "rb")
            except OSError:
                continue
            with f:
                pos = 0
                for line in f:
                    pos += len(line)
                    if not line.endswith(b"\n"):
                        break
                    t = _tail(line)
                    if t is None or t[0] != self.seq:
                        continue
                    if t[1] == self.hash:
                        if pos >= self.segs[i][3] and i + 1 < len(self.segs):
                            return i + 1, 0
                        return i, pos
                    log.warning(
                        "agent_sentinel sync: line %d of %s is not the line uploaded before (the ledger was "
                        "recreated or rewritten); uploading it again from the start", self.seq, p,
                    )
                    self.seq, self.hash = 0, ""
                    return 0, 0
        log.warning(
            "agent_sentinel sync: the last uploaded line (seq %d) of %s is no longer on disk; "
            "uploading from the oldest segment", self.seq, self.path,
        )
        self.seq, self.hash = 0, ""
        return 0, 0

    def take(self, max_lines: int, max_bytes: int) -> List[str]:
        """Up to `max_lines` complete lines from the current position (nothing is committed)."""
        out: List[str] = []
        used = 0
        i, off = self.index, self.offset
        seq, hsh = self.seq, self.hash
        while len(out) < max_lines and i < len(self.segs):
            p, dev, ino, _size = self.segs[i]
            last = i == len(self.segs) - 1
            try:
                f = open(p, "rb")
            except FileNotFoundError:
                break
            with f:
                st = os.fstat(f.fileno())
                if (st.st_dev, st.st_ino) != (dev, ino):
                    break  # rotated since it was listed: the next flush lists again
                f.seek(off)
                at_end = False
                while len(out) < max_lines and used < max_bytes:
                    line = f.readline()
                    if not line:
                        at_end = True
                        break
                    if not line.endswith(b"\n"):
                        at_end = False
                        break  # a line still being written; never sent half
                    if out and used + len(line) > max_bytes:
                        break
                    text = line.decode("utf-8", "replace")
                    out.append(text.rstrip("\n"))
                    used += len(line)
                    off += len(line)
                    t = _tail(line)
                    if t is not None:
                        seq, hsh = t
                if len(out) >= max_lines or used >= max_bytes or not at_end:
                    break
            if last:
                break
            i, off = i + 1, 0
        self._pending = (i, off, seq, hsh)
        return out

    def commit(self) -> None:
        if self._pending is None:
            return
        self.index, self.offset, self.seq, self.hash = self._pending
        self._pending = None

    def state(self) -> dict:
        if not self.segs or self.index >= len(self.segs):
            return {"seq": self.seq, "hash": self.hash}
        _p, dev, ino, _size = self.segs[self.index]
        return {"dev": dev, "ino": ino, "offset": self.offset, "seq": self.seq, "hash": self.hash}


def _write_json_atomic(path: Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, separators=(",", ":"), sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("agent_sentinel sync: ignoring unreadable %s: %s", path, e)
        return None


# One lock per (home, server, stream): two syncs of the same log never upload at the same time,
# so batches always arrive in file order.
_TARGET_LOCKS: Dict[Tuple[str, str, str], threading.Lock] = {}
_TARGET_LOCKS_LOCK = threading.Lock()
# Read-modify-write of the state and cache files (shared by every sync of a home in this process).
_FILES_LOCK = threading.Lock()


def _target_lock(key: Tuple[str, str, str]) -> threading.Lock:
    with _TARGET_LOCKS_LOCK:
        return _TARGET_LOCKS.setdefault(key, threading.Lock())


def _default_stream(home: Path) -> str:
    s = f"{socket.gethostname()}:{home}"
    s = "".join(c if c >= " " else "?" for c in s)
    if len(s) > 300:
        import hashlib

        s = s[:280] + "#" + hashlib.sha256(s.encode()).hexdigest()[:16]
    return s


# ---------------------------------------------------------------------------------------------
# Central authority


class _Decided:
    """An allowed central decision: the reservation to settle once the call finished."""

    __slots__ = ("reservation_id", "expires_at")

    def __init__(self, reservation_id: Optional[str], expires_at: Optional[int]) -> None:
        self.reservation_id = reservation_id
        self.expires_at = expires_at


class _ServerStop:
    """A server decision in the shape ``errors.error_for`` maps to an exception."""

    def __init__(self, action: str, d: dict, note: str = "") -> None:
        self.action = action
        self.reason = str(d.get("reason") or "DENIED")
        self.message = str(d.get("message") or f"the server denied `{action}`") + note
        self.policy = d.get("policy")
        self.rule = d.get("rule")
        self.limit = d.get("limit")
        self.retry_after_seconds = d.get("retry_after_seconds")
        self.intervention_id = d.get("intervention_id")
        self._d = d

    def to_dict(self) -> dict:
        return dict(self._d, source="server")


def _bound(names: tuple, defaults: Optional[dict], args: tuple, kwargs: dict) -> Any:
    """The call's arguments by parameter name, as the local rules see them (redacted JSON)."""
    m: Dict[str, Any] = {}
    n = len(names)
    extra = []
    for i, a in enumerate(args):
        if i < n:
            m[names[i]] = a
        else:
            extra.append(a)
    if extra:
        m["args"] = extra
    if kwargs:
        m.update(kwargs)
    if defaults:
        for k, v in defaults.items():
            m.setdefault(k, v)
    return _native.to_record(m)


class _PendingApproval:
    """A call the server wants a human to approve: what to wait on and how to ask again."""

    __slots__ = ("body", "answer", "date")

    def __init__(self, body: dict, answer: dict, date: Optional[str]) -> None:
        self.body = body
        self.answer = answer
        self.date = date


class _Cancelled(Exception):
    """The asyncio task waiting for an approval was cancelled: stop quietly."""


class _Final(Exception):
    """The server answered the wait with an error that waiting longer will not change (401, 403, 404)."""


def _server_now(date: Optional[str]) -> float:
    """The server's clock (from its ``Date`` header, to the second), or ours without one."""
    if date:
        try:
            when = email.utils.parsedate_to_datetime(date)
        except (TypeError, ValueError):
            when = None
        if when is not None:
            return when.timestamp()
    return time.time()


async def _in_thread(fn: Any, name: str) -> Any:
    """Runs `fn` in a thread of its own (not the loop's executor, which a long wait would starve)
    and awaits its result without blocking the event loop."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()

    def deliver(ok: bool, value: Any) -> None:
        if not fut.done():
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)

    def target() -> None:
        try:
            value, ok = fn(), True
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting task
            value, ok = e, False
        try:
            loop.call_soon_threadsafe(deliver, ok, value)
        except RuntimeError:
            pass  # the loop is closed; nobody is waiting any more

    threading.Thread(target=target, name=name, daemon=True).start()
    return await fut


class _Authority:
    """Asks ``/decide`` for every guarded call the local policy allowed; settles afterwards; waits
    for a human when the server asks for approval."""

    def __init__(self, sync: "BackgroundSync") -> None:
        self.sync = sync
        self.client = sync._decide_client
        self.waiter = sync._wait_client
        self.url = sync.config.base_url
        self.safe = sync.config.fail_mode == "safe"
        self.ttl = sync.config.reservation_ttl_seconds
        self.poll = sync.config.approval_poll_seconds
        self._warned_at = 0.0

    def _refuse(self, spec: Any, guard: Any, permit: Any, ctx: Any, args: tuple, kwargs: dict, err: Exception, outputs: dict, outcome: str = "blocked") -> None:
        guard.abandon(permit)
        try:
            guard.record(
                spec.action, {"args": list(args), "kwargs": dict(kwargs)}, outputs, 0.0, 0.0, outcome,
                list(spec.tags), ctx.agent_id, ctx.run_id, ctx.session_id,
            )
        except Exception as e:  # noqa: BLE001 - the refusal is raised whatever the local ledger says
            log.error("agent_sentinel sync: cannot record the refusal of `%s` locally: %s", spec.action, e)
        raise err

    def _unavailable(self, spec: Any, guard: Any, permit: Any, ctx: Any, args: tuple, kwargs: dict, why: str, answered: bool, may_proceed: bool = True) -> Optional[_Decided]:
        if self.safe and not answered and may_proceed:
            now = time.monotonic()
            if now - self._warned_at > 30:
                self._warned_at = now
                log.warning(
                    "agent_sentinel sync: the central authority at %s gave no decision (%s); "
                    "fail_mode=\"safe\": calls proceed on the local decision", self.url, why,
                )
            return None
        reason = "AUTHORITY_UNAVAILABLE" if not answered else "AUTHORITY_REJECTED"
        msg = (
            f"`{spec.action}` did not run: the central authority at {self.url} gave no decision ({why}); "
            + ("decisions fail closed (fail_mode=\"secure\")" if not answered else "check the API key and agent_id")
        )
        if not may_proceed and not answered:
            msg = f"`{spec.action}` did not run: the central authority at {self.url} gave no decision ({why}); a call that needs approval never runs without one"
        err = AuthorityUnavailableError(msg, reason=reason, action=spec.action, decision={"verdict": "deny", "reason": reason, "message": msg})
        self._refuse(spec, guard, permit, ctx, args, kwargs, err, {"authority": self.url, "verdict": "deny", "reason": reason, "message": msg})
        return None  # pragma: no cover - _refuse raises

    def _body(self, spec: Any, ctx: Any, args: tuple, kwargs: dict) -> dict:
        body: Dict[str, Any] = {
            "action": spec.action,
            "agent_id": ctx.agent_id,
            "run_id": ctx.run_id,
            "session_id": ctx.session_id,
            "cost_usd": spec.cost,
            "args": _bound(spec.names, spec.defaults, args, kwargs),
            "tags": list(spec.tags),
        }
        if self.ttl is not None:
            body["reservation_ttl_seconds"] = self.ttl
        if spec.context_fn is not None:
            # Shown to the approver if the server asks for approval; the request is made by this
            # very /decide, so the context goes with every call of a function that has one.
            try:
                extra = _call.context_of(spec, args, kwargs)
            except Exception as e:  # noqa: BLE001 - the context is optional; the call is not
                log.warning("agent_sentinel sync: context_fn of `%s` failed (%s: %s); asking without it", spec.action, type(e).__name__, e)
                extra = {}
            if extra:
                body["context"] = _native.to_record(extra)
        return body

    def decide(self, spec: Any, guard: Any, permit: Any, ctx: Any, args: tuple, kwargs: dict, defer: bool = False) -> Any:
        """Raises (after giving back the local reservation) unless the server allows the call.
        Waits for a human when the server asks for approval, unless `defer`: then it returns a
        ``_PendingApproval`` for ``approve`` (so async callers can wait in a thread of their own)."""
        try:
            body = self._body(spec, ctx, args, kwargs)
        except BaseException:
            guard.abandon(permit)
            raise
        try:
            r = self.client.request("POST", "/api/v1/decide", body)
        except (OSError, http.client.HTTPException) as e:
            return self._unavailable(spec, guard, permit, ctx, args, kwargs, f"{type(e).__name__}: {e}", False)
        except BaseException:
            guard.abandon(permit)
            raise
        if r.status != 200:
            answered = not _retryable(r.status)
            return self._unavailable(spec, guard, permit, ctx, args, kwargs, f"HTTP {r.status}: {r.problem()}", answered)
        try:
            d = r.json()
            verdict = d["verdict"]
        except (ValueError, KeyError, TypeError) as e:
            return self._unavailable(spec, guard, permit, ctx, args, kwargs, f"unreadable answer: {e}", False)
        if verdict in ("allow", "warn"):
            res = d.get("reservation") or {}
            return _Decided(res.get("id"), res.get("expires_at"))
        if verdict == "require_approval" and isinstance(d.get("approval_request"), dict):
            pending = _PendingApproval(body, d, r.headers.get("date"))
            if defer:
                return pending
            try:
                return self.approve(spec, guard, permit, ctx, args, kwargs, pending, None)
            except BaseException:
                guard.abandon(permit)  # an interrupt while waiting; refusals gave it back already
                raise
        self._deny(spec, guard, permit, ctx, args, kwargs, d)
        return None  # pragma: no cover - _deny raises

    def _deny(self, spec: Any, guard: Any, permit: Any, ctx: Any, args: tuple, kwargs: dict, d: dict) -> None:
        verdict = d.get("verdict")
        note = ""
        if verdict == "require_approval":
            note = " (the server requires approval but did not open an approval request; the call is refused)"
        stop = _ServerStop(spec.action, d, note)
        err = error_for(stop)
        outputs = {
            "authority": self.url, "verdict": verdict, "reason": stop.reason, "message": stop.message,
            "policy": stop.policy, "rule": stop.rule, "decision_id": d.get("decision_id"),
            "intervention_id": stop.intervention_id,
        }
        self._refuse(spec, guard, permit, ctx, args, kwargs, err, outputs)

    # -- approvals --------------------------------------------------------------------------

    def approve(self, spec: Any, guard: Any, permit: Any, ctx: Any, args: tuple, kwargs: dict, pending: _PendingApproval, cancel: Optional[threading.Event]) -> Optional[_Decided]:
        """Waits for the human's decision on `pending`, then asks ``/decide`` again with the
        approval. Returns the allowed decision, or raises (recording the refusal locally)."""
        d = pending.answer
        date = pending.date
        for _round in range(_APPROVAL_ROUNDS):
            req = d["approval_request"]
            aid = str(req.get("id") or "")
            wait_path = str(req.get("wait") or f"/api/v1/approvals/{urllib.parse.quote(aid, safe='')}/wait")
            try:
                expires_at = float(req["expires_at"]) / 1000.0
            except (KeyError, TypeError, ValueError):
                expires_at = _server_now(date) + 300.0
            deadline = time.monotonic() + max(0.0, expires_at - _server_now(date)) + APPROVAL_GRACE_SECONDS
            try:
                row, last_error = self._wait(wait_path, deadline, cancel)
            except _Final as e:
                self._unavailable(spec, guard, permit, ctx, args, kwargs, f"waiting for approval `{aid}`: {e}", True)
            except ConnectionAbortedError as e:
                self._unavailable(spec, guard, permit, ctx, args, kwargs, str(e), False, may_proceed=False)
            status = row.get("status") if row is not None else None
            base = {"authority": self.url, "verdict": "require_approval", "approval_id": aid, "policy": d.get("policy"), "rule": d.get("rule")}
            if status == "rejected":
                approver = str(row.get("decided_by") or "an approver")  # type: ignore[union-attr]
                why = str(row.get("reason") or "")  # type: ignore[union-attr]
                err = ApprovalRejectedError(
                    f"`{spec.action}` was rejected by {approver}" + (f": {why}" if why else "") + "; the action did not run",
                    reason="APPROVAL_REJECTED", action=spec.action, policy=d.get("policy"), rule=d.get("rule"),
                    intervention_id=d.get("intervention_id"), decision=dict(d, source="server", approval=row),
                )
                err.approver, err.rejection_reason, err.approval_id = approver, why, aid
                self._refuse(spec, guard, permit, ctx, args, kwargs, err, dict(base, status="rejected", approver=approver, reason=why), "rejected")
            if status != "approved":
                if status == "expired":
                    msg = f"approval `{aid}` for `{spec.action}` expired without a decision; the action did not run"
                else:
                    msg = (
                        f"no decision on approval `{aid}` for `{spec.action}` before it expired: the server at "
                        f"{self.url} could not be reached ({last_error}); the action did not run"
                    )
                err = ApprovalTimeoutError(
                    msg, reason="APPROVAL_TIMEOUT", action=spec.action, policy=d.get("policy"), rule=d.get("rule"),
                    intervention_id=d.get("intervention_id"), decision=dict(d, source="server", approval=row),
                )
                err.approval_id = aid
                self._refuse(spec, guard, permit, ctx, args, kwargs, err, dict(base, status=status or "unreachable", reason=msg), "rejected")
            # Approved: the same call again, with the approval (used once, by this call only).
            try:
                r, error = self._redeem(dict(pending.body, approval_id=aid), cancel)
                if r is not None and r.status == 409:
                    # Approved but not usable (already used, or the policy changed since): ask again.
                    log.warning("agent_sentinel sync: approval `%s` for `%s` cannot be used (%s); asking the server again", aid, spec.action, r.problem())
                    r, error = self._redeem(pending.body, cancel)
            except ConnectionAbortedError as e:
                r, error = None, str(e)
            if r is None:
                self._unavailable(spec, guard, permit, ctx, args, kwargs, f"after approval `{aid}`: {error}", False, may_proceed=False)
            if r.status != 200:  # type: ignore[union-attr]
                self._unavailable(spec, guard, permit, ctx, args, kwargs, f"HTTP {r.status}: {r.problem()}", True)  # type: ignore[union-attr]
            try:
                d = r.json()  # type: ignore[union-attr]
                verdict = d["verdict"]
            except (ValueError, KeyError, TypeError) as e:
                self._unavailable(spec, guard, permit, ctx, args, kwargs, f"unreadable answer: {e}", False, may_proceed=False)
            date = r.headers.get("date")  # type: ignore[union-attr]
            if verdict in ("allow", "warn"):
                res = d.get("reservation") or {}
                return _Decided(res.get("id"), res.get("expires_at"))
            if not (verdict == "require_approval" and isinstance(d.get("approval_request"), dict)):
                self._deny(spec, guard, permit, ctx, args, kwargs, d)
            # A new approval request (after a policy change): another round.
        self._deny(spec, guard, permit, ctx, args, kwargs, dict(d, verdict="deny", message=f"`{spec.action}` needed approval {_APPROVAL_ROUNDS} times in a row; the call is refused"))
        return None  # pragma: no cover - _deny raises

    def _pause(self, seconds: float, cancel: Optional[threading.Event]) -> None:
        if seconds <= 0:
            return
        if cancel is not None:
            if cancel.wait(seconds):
                raise _Cancelled()
        else:
            self.sync._stopping.wait(seconds)

    def _check(self, cancel: Optional[threading.Event]) -> None:
        if cancel is not None and cancel.is_set():
            raise _Cancelled()
        if self.sync._stopping.is_set():
            raise ConnectionAbortedError("the sync was stopped while the call waited for approval")

    def _wait(self, path: str, deadline: float, cancel: Optional[threading.Event]) -> Tuple[Optional[dict], Optional[str]]:
        """Long-polls until the request is decided or expired: (row, None). Connection errors and
        5xx are retried with full-jitter backoff until `deadline`: then (None, last error).
        Raises ``_Final`` (401, 403, 404), ``_Cancelled`` (the task was cancelled) or
        ``ConnectionAbortedError`` (the sync was stopped)."""
        c = self.sync.config
        attempt = 0
        error: Optional[str] = None
        failing = False
        sep = "&" if "?" in path else "?"
        while True:
            self._check(cancel)
            left = deadline - time.monotonic()
            if left <= 0:
                return None, error
            n = round(max(0.1, min(self.poll, left)), 3)
            started = time.monotonic()
            retry_after: Optional[float] = None
            try:
                r = self.waiter.request("GET", f"{path}{sep}timeout_seconds={n:g}")
            except (OSError, http.client.HTTPException) as e:
                error = f"{type(e).__name__}: {e}"
            else:
                if r.status == 200:
                    if failing:
                        failing = False
                        log.info("agent_sentinel sync: %s answers again; still waiting for approval (%s)", self.url, path)
                    try:
                        row = r.json()
                        status = row["status"]
                    except (ValueError, KeyError, TypeError) as e:
                        row, status = None, None
                        error = f"unreadable answer: {e}"
                    if status in ("approved", "rejected", "expired"):
                        return row, None
                    if status == "pending":
                        attempt = 0
                        error = None
                        # A long-poll answers "pending" only after holding on; one that comes back
                        # at once (a proxy, a clock step) must not turn into busy polling.
                        if time.monotonic() - started < min(n, 1.0) / 2:
                            self._pause(min(1.0, left), cancel)
                        continue
                    if status is not None:
                        error = f"unknown approval status {status!r}"
                elif _retryable(r.status):
                    error = f"HTTP {r.status}: {r.problem()}"
                    retry_after = _retry_after(r.headers.get("retry-after"))
                else:
                    # 401, 403, 404: this key can no longer see the request; nothing will change that.
                    raise _Final(f"HTTP {r.status}: {r.problem()}")
            if not failing and error is not None:
                failing = True
                log.warning(
                    "agent_sentinel sync: waiting for approval (%s): %s gave no answer (%s); retrying until the request expires",
                    path, self.url, error,
                )
            # At most 5 s between attempts: someone is waiting for this call once it is approved.
            wait = retry_after if retry_after is not None else random.uniform(0, min(c.max_backoff, 5.0, c.retry_backoff * (2 ** min(attempt, 30))))
            attempt += 1
            self._pause(min(wait, max(0.0, deadline - time.monotonic())), cancel)

    def _redeem(self, body: dict, cancel: Optional[threading.Event]) -> Tuple[Optional[_Response], Optional[str]]:
        """``/decide`` after an approval, retried on connection errors and 5xx (an approved request
        stays usable) for a while; (None, error) if the server never answered."""
        c = self.sync.config
        deadline = time.monotonic() + max(30.0, 3 * c.timeout)
        error = "no attempt"
        for attempt in range(1000):
            self._check(cancel)
            retry_after = None
            try:
                r = self.client.request("POST", "/api/v1/decide", body)
            except (OSError, http.client.HTTPException) as e:
                error = f"{type(e).__name__}: {e}"
            else:
                if not _retryable(r.status):
                    return r, None
                error = f"HTTP {r.status}: {r.problem()}"
                retry_after = _retry_after(r.headers.get("retry-after"))
            wait = retry_after if retry_after is not None else random.uniform(0, min(c.max_backoff, c.retry_backoff * (2 ** min(attempt, 30))))
            if time.monotonic() + wait > deadline:
                break
            self._pause(wait, cancel)
        return None, error

    async def decide_async(self, spec: Any, guard: Any, permit: Any, ctx: Any, args: tuple, kwargs: dict) -> Optional[_Decided]:
        """``decide`` in a worker thread; a wait for approval in a thread of its own. If the task is
        cancelled meanwhile, the local permit is given back, the wait stops, and a reservation the
        server made is released (by the background thread)."""
        lock = threading.Lock()
        box: Dict[str, Any] = {"cancelled": False, "ticket": None}
        cancel = threading.Event()

        def keep(t: Any) -> Any:
            with lock:
                if box["cancelled"]:
                    if isinstance(t, _Decided):
                        self.release_later(t)
                    return None
                if isinstance(t, _Decided):
                    box["ticket"] = t
            return t

        def first() -> Any:
            return keep(self.decide(spec, guard, permit, ctx, args, kwargs, defer=True))

        def wait(pending: _PendingApproval) -> Any:
            try:
                return keep(self.approve(spec, guard, permit, ctx, args, kwargs, pending, cancel))
            except _Cancelled:
                return None

        try:
            t = await asyncio.get_running_loop().run_in_executor(None, first)
            if isinstance(t, _PendingApproval):
                t = await _in_thread(functools.partial(wait, t), "agent-sentinel-approval-wait")
            return t
        except asyncio.CancelledError:
            cancel.set()
            with lock:
                box["cancelled"] = True
                t = box["ticket"]
            if t is not None:
                self.release_later(t)
            guard.abandon(permit)
            raise

    def release_later(self, ticket: _Decided) -> None:
        """The call never ran: give the reservation back (queued; never blocks)."""
        if ticket.reservation_id is not None:
            self.sync._queue_settle({"reservation_id": ticket.reservation_id, "release": True}, ticket.expires_at)

    def settle_later(self, ticket: _Decided, cost: Optional[float]) -> None:
        """``settle`` by the background thread (async calls: the event loop never waits on it).
        The reservation holds the estimate until then, so nothing can be overspent meanwhile."""
        if ticket.reservation_id is not None:
            body: Dict[str, Any] = {"reservation_id": ticket.reservation_id}
            if cost is not None:
                body["actual_cost_usd"] = cost
            self.sync._queue_settle(body, ticket.expires_at)

    def settle(self, ticket: _Decided, cost: Optional[float], release: bool = False) -> None:
        """Settles (or releases) the reservation; never raises. A failed settle is retried in the background."""
        if ticket.reservation_id is None:
            return
        body: Dict[str, Any] = {"reservation_id": ticket.reservation_id}
        if release:
            body["release"] = True
        elif cost is not None:
            body["actual_cost_usd"] = cost
        if not self.sync._send_settle(body):
            self.sync._queue_settle(body, ticket.expires_at)


# ---------------------------------------------------------------------------------------------
# The background sync


_ACTIVE: "List[BackgroundSync]" = []
_ACTIVE_LOCK = threading.Lock()
_ATEXIT_REGISTERED = False
_DEFAULT: "Optional[BackgroundSync]" = None


class BackgroundSync:
    """Uploads the ledger, syncs policies and (``authority="server"``) asks the server for decisions.

    ``start()`` begins; ``flush_now()`` uploads at once and returns what happened; ``stop()`` ends
    with a final flush. None of them raise because the server is down: logging fails open.
    """

    def __init__(self, config: SyncConfig) -> None:
        if not isinstance(config, SyncConfig):
            raise TypeError(f"BackgroundSync() needs a SyncConfig, got {type(config).__name__}")
        self.config = config
        self.home = Path(os.path.realpath(config.home if config.home is not None else home_from_env()))
        self.stream = config.stream or _default_stream(self.home)
        self.url = config.base_url
        self._client = _Client(config)
        self._decide_client = _Client(config)
        # Long-polls for approvals: held open up to approval_poll_seconds, so a longer socket timeout.
        self._wait_client = _Client(config)
        self._wait_client.timeout = config.approval_poll_seconds + config.timeout
        self._key = f"{self.url}|{self.stream}"
        self._lock = _target_lock((str(self.home), self.url, self.stream))
        self._stopping = threading.Event()
        self._interrupt = threading.Event()
        self._wake = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._authority: Optional[_Authority] = None
        self._settles: "deque[Tuple[dict, Optional[int]]]" = deque()
        self._not_before = 0.0
        self._failing = False
        # The cache is per server, agent and run; the merged slot is per server, so a later sync
        # with the same server replaces what an earlier one installed.
        self._policy_key = f"{self.url}|{config.agent_id or ''}|{config.run_id or ''}"
        self._slot = self.url
        self._policy_etag: Optional[str] = None
        self._policy_sources: Optional[list] = None
        self._policy_synced = False
        self.last_error: Optional[str] = None
        self.last_flush: Optional[dict] = None
        self.policy_version: Optional[str] = None
        self.policy_source: Optional[str] = None  # "server" or "cache" once policies are installed

    def __repr__(self) -> str:
        return f"BackgroundSync(url={self.url!r}, stream={self.stream!r}, running={self.running})"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> "BackgroundSync":
        """Syncs policies once (falling back to the on-disk cache), then uploads every
        ``flush_interval`` seconds in a daemon thread. Returns ``self``."""
        global _ATEXIT_REGISTERED
        if self.running:
            return self
        c = self.config
        if c.agent_id is not None or c.run_id is not None:
            _context.set_context(agent_id=c.agent_id, run_id=c.run_id)
        self._stopping.clear()
        self._interrupt.clear()
        if c.policy_sync_interval is not None:
            self._sync_policies(initial=True)
        if c.authority == "server":
            self._authority = _Authority(self)
            _call.set_authority(self._authority)
        self._thread = threading.Thread(target=self._run, name="agent-sentinel-sync", daemon=True)
        self._thread.start()
        with _ACTIVE_LOCK:
            if self not in _ACTIVE:
                _ACTIVE.append(self)
            if not _ATEXIT_REGISTERED:
                atexit.register(flush_and_stop)
                _ATEXIT_REGISTERED = True
        return self

    def stop(self, timeout: Optional[float] = None) -> dict:
        """Stops the thread and does a final flush (at most ``timeout`` or ``shutdown_timeout``
        seconds). Central decisions stop with it; the synced policies stay merged. Never raises."""
        budget = self.config.shutdown_timeout if timeout is None else max(0.0, float(timeout))
        deadline = time.monotonic() + budget
        self._stopping.set()
        self._interrupt.set()
        self._wake.set()
        if self._authority is not None:
            _call.clear_authority(self._authority)
            self._authority = None
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(max(0.0, deadline - time.monotonic()))
        self._thread = None
        with _ACTIVE_LOCK:
            if self in _ACTIVE:
                _ACTIVE.remove(self)
        result = self._flush(deadline=deadline, interruptible=False)
        self._retry_settles(deadline)
        self._client.close()
        self._decide_client.close()
        self._wait_client.close()
        return result

    def flush_now(self) -> dict:
        """Uploads everything written so far, now, in this thread. Returns
        ``{"ok", "ledger", "interventions", "requests", "duplicates", "error"}`` (lines sent)."""
        return self._flush(deadline=None, interruptible=False)

    def refresh_policies(self) -> bool:
        """Syncs policies now. True if the server answered (200 or 304)."""
        return self._sync_policies(initial=False)

    # -- the loop ---------------------------------------------------------------------------

    def _run(self) -> None:
        c = self.config
        now = time.monotonic()
        next_flush = now + c.flush_interval
        next_policy = now + (c.policy_sync_interval if self._policy_synced else c.flush_interval) if c.policy_sync_interval else math.inf
        while not self._stopping.is_set():
            now = time.monotonic()
            due = min(next_flush, next_policy, now + 1.0 if self._settles else math.inf)
            self._wake.wait(max(0.0, due - now))
            self._wake.clear()
            if self._stopping.is_set():
                break
            now = time.monotonic()
            try:
                if self._settles:
                    self._retry_settles(None)
                if now >= next_policy:
                    ok = self._sync_policies(initial=False)
                    interval = c.policy_sync_interval or math.inf
                    next_policy = time.monotonic() + (interval if ok else min(interval, c.flush_interval))
                if now >= next_flush and now >= self._not_before:
                    self._flush(deadline=None, interruptible=True)
                    next_flush = time.monotonic() + c.flush_interval
            except Exception as e:  # noqa: BLE001 - the thread must survive anything
                log.exception("agent_sentinel sync: unexpected error: %s", e)
                next_flush = time.monotonic() + c.flush_interval

    def _sleep(self, seconds: float, interruptible: bool) -> bool:
        """Waits; False if interrupted by ``stop()``."""
        if interruptible:
            return not self._interrupt.wait(seconds)
        time.sleep(seconds)
        return True

    def _send(self, client: _Client, method: str, path: str, body: Any, deadline: Optional[float], interruptible: bool, headers: Optional[dict] = None, retries: Optional[int] = None) -> Tuple[Optional[_Response], Optional[str]]:
        """Sends with retries. Returns (response, None) for any final answer that is not retryable,
        or (None, error) when every attempt failed."""
        c = self.config
        tries = c.max_retries if retries is None else retries
        error = "no attempt"
        for attempt in range(tries + 1):
            wait: Optional[float] = None
            try:
                r = client.request(method, path, body, headers)
            except (OSError, http.client.HTTPException) as e:
                error = f"{self.url}{path}: {type(e).__name__}: {e}"
            else:
                if not _retryable(r.status):
                    return r, None
                error = f"{self.url}{path}: HTTP {r.status}: {r.problem()}"
                wait = _retry_after(r.headers.get("retry-after"))
            if attempt == tries:
                if wait is not None:
                    self._not_before = time.monotonic() + wait
                break
            if wait is None:
                wait = random.uniform(0, min(c.max_backoff, c.retry_backoff * (2**attempt)))
            if deadline is not None and time.monotonic() + wait > deadline:
                break
            if not self._sleep(wait, interruptible):
                break
        return None, error

    # -- uploads ----------------------------------------------------------------------------

    def _load_state(self) -> dict:
        doc = _read_json(self.home / STATE_FILE)
        if not isinstance(doc, dict):
            return {}
        entry = (doc.get("targets") or {}).get(self._key)
        return entry if isinstance(entry, dict) else {}

    def _save_state(self, entry: dict) -> None:
        path = self.home / STATE_FILE
        with _FILES_LOCK:
            doc = _read_json(path)
            if not isinstance(doc, dict) or not isinstance(doc.get("targets"), dict):
                doc = {"version": 1, "targets": {}}
            doc["targets"][self._key] = entry
            _write_json_atomic(path, doc)

    def _flush(self, deadline: Optional[float], interruptible: bool) -> dict:
        result: Dict[str, Any] = {"ok": True, "ledger": 0, "interventions": 0, "requests": 0, "duplicates": 0, "error": None}
        try:
            timeout = -1 if deadline is None else max(0.0, deadline - time.monotonic())
            if not self._lock.acquire(timeout=timeout):
                result.update(ok=False, error="another upload of this ledger is still running")
                return result
            try:
                self._upload(result, deadline, interruptible)
            finally:
                self._lock.release()
        except Exception as e:  # noqa: BLE001 - uploads fail open
            result.update(ok=False, error=f"{type(e).__name__}: {e}")
            log.exception("agent_sentinel sync: upload failed: %s", e)
        self.last_flush = result
        if result["ok"]:
            if self._failing:
                log.info("agent_sentinel sync: uploads to %s work again", self.url)
            self._failing = False
            self.last_error = None
        else:
            self.last_error = result["error"]
            if not self._failing:
                log.warning("agent_sentinel sync: upload failed, entries stay local and are retried: %s", result["error"])
            self._failing = True
        return result

    def _upload(self, result: dict, deadline: Optional[float], interruptible: bool) -> None:
        if not self.home.is_dir():
            return
        try:
            # Entries are written in groups; hand this process's latest ones to the files first.
            _native.flush_all()
        except RuntimeError as e:
            log.warning("the local ledger could not be written before the upload: %s", e)
        state = self._load_state()
        readers = {kind: _Reader(self.home / f"{kind}.jsonl", state.get(kind)) for kind in LOGS}
        batch = self.config.batch_size
        while True:
            if deadline is not None and time.monotonic() >= deadline:
                result.update(ok=False, error="the shutdown timeout ended the upload; the rest stays local")
                return
            ledger = readers["ledger"].take(batch, MAX_BYTES_PER_REQUEST)
            used = sum(len(x) for x in ledger)
            interventions = readers["interventions"].take(batch - len(ledger), MAX_BYTES_PER_REQUEST - used) if len(ledger) < batch and used < MAX_BYTES_PER_REQUEST else []
            if not ledger and not interventions:
                return
            body: Dict[str, Any] = {"stream": self.stream, "ledger": ledger, "interventions": interventions}
            if self.config.agent_id is not None:
                body["agent_id"] = self.config.agent_id
            r, error = self._send(self._client, "POST", "/api/v1/ledger", body, deadline, interruptible)
            result["requests"] += 1
            if r is None or not 200 <= r.status < 300:
                if r is not None:
                    error = f"{self.url}/api/v1/ledger: HTTP {r.status}: {r.problem()}"
                result.update(ok=False, error=error)
                return
            for reader in readers.values():
                reader.commit()
            self._save_state({kind: readers[kind].state() for kind in LOGS})
            result["ledger"] += len(ledger)
            result["interventions"] += len(interventions)
            try:
                report = r.json() or {}
                result["duplicates"] += int(report.get("ledger_duplicates", 0)) + int(report.get("interventions_duplicates", 0))
                for f in report.get("findings") or []:
                    log.warning("agent_sentinel sync: the server found a break in the chain of %s: %s", self.stream, f)
            except (ValueError, TypeError, AttributeError):
                pass

    # -- settles ----------------------------------------------------------------------------

    def _send_settle(self, body: dict) -> bool:
        """True when the server has the settle (200), or it can never take it (404, 409)."""
        try:
            r = self._decide_client.request("POST", "/api/v1/settle", body)
        except (OSError, http.client.HTTPException):
            return False
        if r.status in (200, 404, 409):
            return True
        if _retryable(r.status):
            return False
        log.error("agent_sentinel sync: the server refused to settle %s: HTTP %d: %s", body.get("reservation_id"), r.status, r.problem())
        return True

    def _queue_settle(self, body: dict, expires_at: Optional[int]) -> None:
        self._settles.append((body, expires_at))
        self._wake.set()

    def _retry_settles(self, deadline: Optional[float]) -> None:
        for _ in range(len(self._settles)):
            if deadline is not None and time.monotonic() >= deadline:
                return
            try:
                body, expires_at = self._settles.popleft()
            except IndexError:
                return
            if expires_at is not None and expires_at < time.time() * 1000:
                continue  # the server released it already
            if not self._send_settle(body):
                self._settles.append((body, expires_at))
                return

    # -- policies ---------------------------------------------------------------------------

    def _sync_policies(self, initial: bool) -> bool:
        c = self.config
        q = {}
        if c.agent_id is not None:
            q["agent_id"] = c.agent_id
        if c.run_id is not None:
            q["run_id"] = c.run_id
        path = "/api/v1/policies/sync" + ("?" + urllib.parse.urlencode(q) if q else "")
        headers = {}
        if self._policy_etag and self._policy_sources is not None:
            headers["If-None-Match"] = self._policy_etag
        try:
            r, error = self._send(self._client, "GET", path, None, None, True, headers, retries=0 if initial else None)
        except Exception as e:  # noqa: BLE001 - policy sync fails open to the cache
            r, error = None, f"{type(e).__name__}: {e}"
        if r is not None and r.status == 304:
            self._install(self._policy_sources or [])
            return True
        if r is not None and r.status == 200:
            try:
                body = r.json()
                docs = body["policies"]
                if not isinstance(docs, list):
                    raise TypeError("`policies` is not a list")
            except (ValueError, KeyError, TypeError) as e:
                error = f"unreadable policy sync answer: {e}"
            else:
                etag = r.headers.get("etag")
                if self._apply_policies(docs, str(body.get("version") or ""), "server"):
                    self._policy_etag = etag
                    try:
                        self._save_cache(docs, etag, body.get("version"))
                    except OSError as e:
                        log.warning("agent_sentinel sync: cannot cache the synced policies in %s: %s", self.home, e)
                    return True
                return False
        elif r is not None:
            error = f"{self.url}{path}: HTTP {r.status}: {r.problem()}"
        log.warning("agent_sentinel sync: policy sync failed (%s)", error)
        if self._policy_sources is None:
            self._load_cache()
        return False

    def _apply_policies(self, docs: list, version: str, origin: str) -> bool:
        renamed = []
        for i, d in enumerate(docs):
            if not isinstance(d, dict):
                log.error("agent_sentinel sync: ignoring the synced policies: item %d is not a policy", i)
                return False
            d = dict(d)
            d["name"] = SERVER_PREFIX + str(d.get("name") or f"policy-{i + 1}")
            renamed.append(d)
        text = json.dumps({"policies": renamed}, separators=(",", ":"))
        sources = [(text, f"{self.url}/api/v1/policies/sync", False)] if renamed else []
        try:
            self._install(sources)
        except ValueError as e:
            log.error("agent_sentinel sync: the synced policies do not load here; keeping the previous ones: %s", e)
            return False
        self._policy_sources = sources
        self._policy_synced = True
        self.policy_version = version or None
        self.policy_source = origin
        return True

    def _install(self, sources: list) -> None:
        if RUNTIME.remote.get(self._slot, []) != sources:
            RUNTIME.install_remote(self._slot, sources)

    def _save_cache(self, docs: list, etag: Optional[str], version: Any) -> None:
        if not self.home.is_dir():
            self.home.mkdir(parents=True, exist_ok=True)
        path = self.home / POLICY_CACHE_FILE
        with _FILES_LOCK:
            doc = _read_json(path)
            if not isinstance(doc, dict) or not isinstance(doc.get("entries"), dict):
                doc = {"version": 1, "entries": {}}
            doc["entries"][self._policy_key] = {"etag": etag, "version": version, "policies": docs, "fetched_at": time.time()}
            _write_json_atomic(path, doc)

    def _load_cache(self) -> None:
        doc = _read_json(self.home / POLICY_CACHE_FILE)
        entry = ((doc or {}).get("entries") or {}).get(self._policy_key) if isinstance(doc, dict) else None
        if not isinstance(entry, dict) or not isinstance(entry.get("policies"), list):
            return
        if self._apply_policies(entry["policies"], str(entry.get("version") or ""), "cache"):
            log.warning(
                "agent_sentinel sync: %s is unreachable; using the policies cached in %s (version %s)",
                self.url, self.home / POLICY_CACHE_FILE, entry.get("version"),
            )


# ---------------------------------------------------------------------------------------------
# Module-level API


def enable_remote_sync(
    platform_url: str,
    api_token: str,
    agent_id: Optional[str] = None,
    run_id: Optional[str] = None,
    flush_interval: float = 10.0,
    batch_size: int = 500,
    max_retries: int = 3,
    policy_sync_interval: Optional[float] = 300.0,
    authority: str = "local",
    stream: Optional[str] = None,
    **options: Any,
) -> BackgroundSync:
    """Starts syncing with the platform and returns the ``BackgroundSync``. A previous sync started
    by this function is stopped (with a final flush) first. ``flush_and_stop`` runs at exit.

    ``options`` are the other ``SyncConfig`` fields (``fail_mode``, ``home``, ``timeout``, …).
    """
    global _DEFAULT
    for key in options:
        if key not in _CONFIG_FIELDS:
            raise _unknown("enable_remote_sync", key)
    config = SyncConfig(
        platform_url=platform_url,
        api_token=api_token,
        agent_id=agent_id,
        run_id=run_id,
        flush_interval=flush_interval,
        batch_size=batch_size,
        max_retries=max_retries,
        policy_sync_interval=policy_sync_interval,
        authority=authority,
        stream=stream,
        **options,
    )
    if _DEFAULT is not None:
        _DEFAULT.stop()
    _DEFAULT = BackgroundSync(config).start()
    return _DEFAULT


def flush_and_stop() -> None:
    """Stops every running sync, each with a final flush. Registered with ``atexit``. Never raises."""
    global _DEFAULT
    with _ACTIVE_LOCK:
        active = list(_ACTIVE)
    for s in active:
        try:
            s.stop()
        except Exception as e:  # noqa: BLE001 - at exit nothing may raise
            log.error("agent_sentinel sync: stopping failed: %s", e)
    _DEFAULT = None


_orig_init = SyncConfig.__init__


@functools.wraps(_orig_init)
def _checked_init(self: SyncConfig, *args: Any, **kwargs: Any) -> None:
    for key in kwargs:
        if key not in _CONFIG_FIELDS:
            raise _unknown("SyncConfig", key)
    _orig_init(self, *args, **kwargs)


SyncConfig.__init__ = _checked_init  # type: ignore[method-assign]
