"""SQLite quota store: one file shared by every meltguard process on a host.

Same answers as `MemoryQuotaStore` (fixed windows aligned to the epoch, all-or-nothing across
windows, EPSILON tolerance), made durable and safe across processes:

- WAL mode, so readers never wait for the writer, and `BEGIN IMMEDIATE` per consume, so the
  check and the charge happen under the file's write lock: two processes cannot both see the
  last free image.
- `synchronous=NORMAL`: in WAL mode a commit is then atomic and survives a crash of the
  process, but a power cut may lose the last few commits (a few images a tenant gets again).
  `FULL` would fsync every admitted request, which costs more than it protects here.
- All sqlite work runs on one dedicated thread that owns the connection: the event loop never
  waits on the disk or on another process's lock (`busy_timeout` sleeps on that thread).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from meltguard.admission.quota_memory import EPSILON
from meltguard.daemon.stores.errors import QuotaStoreError
from meltguard.values import QuotaOutcome, QuotaWindow, WindowState

_T = TypeVar("_T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS quota_usage (
    key TEXT NOT NULL,
    window_id INTEGER NOT NULL,
    used REAL NOT NULL,
    ends REAL NOT NULL,
    PRIMARY KEY (key, window_id)
) WITHOUT ROWID
"""
_SELECT = "SELECT used FROM quota_usage WHERE key = ? AND window_id = ?"
_UPSERT = (
    "INSERT INTO quota_usage (key, window_id, used, ends) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (key, window_id) DO UPDATE SET used = excluded.used"
)
_REFUND = "UPDATE quota_usage SET used = max(used - ?, 0.0) WHERE key = ? AND window_id = ?"
_EXPIRE = "DELETE FROM quota_usage WHERE ends <= ?"

# Garbage collection runs at most this often (seconds of the caller's clock), and only drops
# windows that ended this long ago, so a refund racing a window's end still finds its row.
GC_INTERVAL = 60.0
GC_GRACE = 60.0


class SqliteQuotaStore:
    """Durable, multi-process quota store in one SQLite file (created with its directories)."""

    def __init__(
        self, path: str | Path, *, busy_timeout: float = 2.0, synchronous: str = "NORMAL"
    ) -> None:
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be NORMAL or FULL, got {synchronous!r}")
        self._path = Path(path).expanduser()
        self._busy_timeout_ms = int(busy_timeout * 1000)
        self._synchronous = synchronous
        # One worker thread, so the connection is only ever touched by the thread that made it.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="meltguard-sqlite")
        self._conn: sqlite3.Connection | None = None
        self._next_gc = float("-inf")
        self._closed = False

    @property
    def name(self) -> str:
        return "sqlite"

    @property
    def path(self) -> Path:
        return self._path

    async def ping(self) -> None:
        """Open the file now (startup, readiness): a bad path fails here, not on a request."""
        await self._run(self._connection)

    async def consume(
        self, windows: Sequence[QuotaWindow], cost: float, now: float
    ) -> QuotaOutcome:
        return await self._run(lambda: self._consume(windows, cost, now))

    async def refund(self, windows: Sequence[QuotaWindow], cost: float, charged_at: float) -> None:
        await self._run(lambda: self._refund(windows, cost, charged_at))

    async def peek(self, windows: Sequence[QuotaWindow], now: float) -> QuotaOutcome:
        return await self._run(lambda: self._peek(windows, now))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._close_conn)
        finally:
            self._executor.shutdown(wait=False)

    async def _run(self, job: Callable[[], _T]) -> _T:
        if self._closed:
            raise QuotaStoreError(self.name, "store is closed")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, job)
        except sqlite3.Error as exc:
            # "database is locked" after busy_timeout lands here too: the state is unknown.
            raise QuotaStoreError(self.name, f"{self._path}: {exc}") from exc
        except OSError as exc:
            raise QuotaStoreError(self.name, f"{self._path}: {exc}") from exc

    # Everything below runs on the store's own thread.

    def _connection(self) -> sqlite3.Connection:
        if self._conn is not None:
            return self._conn
        self._path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: transactions are ours (BEGIN IMMEDIATE), not the module's.
        conn = sqlite3.connect(self._path, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(f"PRAGMA synchronous = {self._synchronous}")
            conn.execute(_SCHEMA)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return conn

    def _close_conn(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _consume(self, windows: Sequence[QuotaWindow], cost: float, now: float) -> QuotaOutcome:
        conn = self._connection()
        slots = [(w.key, w.window_id(now)) for w in windows]
        conn.execute("BEGIN IMMEDIATE")
        try:
            used = [_read(conn, slot) for slot in slots]
            states = tuple(
                WindowState(window=w, used=u, reset_at=w.reset_at(now))
                for w, u in zip(windows, used, strict=True)
            )
            for state in states:
                if state.used + cost > state.window.limit + EPSILON:
                    conn.execute("ROLLBACK")
                    return QuotaOutcome(False, states, exhausted=state, charged_at=now)
            # The sum is computed here, not in SQL, so the stored value is bit-for-bit what
            # MemoryQuotaStore would hold after the same calls.
            charged = tuple(
                WindowState(window=s.window, used=s.used + cost, reset_at=s.reset_at)
                for s in states
            )
            conn.executemany(
                _UPSERT,
                [(k, wid, s.used, s.reset_at) for (k, wid), s in zip(slots, charged, strict=True)],
            )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self._maybe_expire(conn, now)
        return QuotaOutcome(True, charged, charged_at=now)

    def _refund(self, windows: Sequence[QuotaWindow], cost: float, charged_at: float) -> None:
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(
                _REFUND, [(cost, w.key, w.window_id(charged_at)) for w in windows]
            )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _peek(self, windows: Sequence[QuotaWindow], now: float) -> QuotaOutcome:
        conn = self._connection()
        # One read transaction, so both windows come from the same snapshot.
        conn.execute("BEGIN")
        try:
            states = tuple(
                WindowState(window=w, used=_read(conn, (w.key, w.window_id(now))),
                            reset_at=w.reset_at(now))
                for w in windows
            )
        finally:
            conn.execute("COMMIT")
        exhausted = next((s for s in states if s.remaining <= EPSILON), None)
        return QuotaOutcome(exhausted is None, states, exhausted=exhausted, charged_at=now)

    def _maybe_expire(self, conn: sqlite3.Connection, now: float) -> None:
        # Ended windows are never read again; dropping them keeps the file (and the primary
        # key's b-tree) the size of the live tenants, not of history.
        if now < self._next_gc:
            return
        self._next_gc = now + GC_INTERVAL
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(_EXPIRE, (now - GC_GRACE,))
            conn.execute("COMMIT")
        except sqlite3.Error:
            # Best effort: the charge before it is committed, and a busy file only delays GC.
            if conn.in_transaction:
                conn.execute("ROLLBACK")


def _read(conn: sqlite3.Connection, slot: tuple[str, int]) -> float:
    row = conn.execute(_SELECT, slot).fetchone()
    return float(row[0]) if row is not None else 0.0
