"""SQLite quota store: one file shared by every meltguard process on a host.

Same answers as `MemoryQuotaStore` (fixed windows aligned to the epoch, all-or-nothing across
windows, EPSILON tolerance), made durable and safe across processes:

- WAL mode, so readers never wait for the writer, and `BEGIN IMMEDIATE` around every check and
  charge, so both happen under the file's write lock: two processes cannot both see the last
  free image.
- `synchronous=NORMAL`: in WAL mode a commit is then atomic and survives a crash of the
  process, but a power cut may lose the last few commits (a few images a tenant gets again).
  `FULL` would fsync every commit, which costs more than it protects here.
- All sqlite work runs on one dedicated thread that owns the connection: the event loop never
  waits on the disk or on another process's lock (`busy_timeout` sleeps on that thread).

Group commit. Handing each call to the thread on its own (a thread hop there, a loop wake-up
back, a transaction each) made an admission cost about 3x what it costs with the memory store
under concurrent load. So calls are queued on the event loop, and at the end of the loop's turn
everything queued goes to the thread as one batch, run in one `BEGIN IMMEDIATE ... COMMIT`, with
one wake-up of the loop to hand all the answers back. While a batch runs, new calls queue and go
as the next batch when it is done: one batch at a time, so calls run in exactly the order they
were made. Inside the batch each call keeps its own semantics (a refused consume charges nothing
and does not undo its neighbours; a later call sees what an earlier one charged), so the answers
are those of the same calls made one after another. What the batch shares is failure: an sqlite
or OS error (a lock held past `busy_timeout`, a full disk) rolls the whole transaction back and
fails every call in it with `QuotaStoreError`; nothing of it was charged.

A store serves one event loop at a time (the daemon's); a fresh loop may take over once the old
one is closed, as in tests that call `asyncio.run` twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import queue
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from meltguard.admission.quota_memory import EPSILON
from meltguard.daemon.stores.errors import QuotaStoreError
from meltguard.values import QuotaOutcome, QuotaWindow, WindowState

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
_EXPIRE = "DELETE FROM quota_usage WHERE ends <= ?"
# One row per named charge: still charged (1) or given back / voided (0), and the end of the
# charge's last window, after which neither its consume nor its refund can matter any more.
_CHARGES_SCHEMA = """
CREATE TABLE IF NOT EXISTS quota_charges (
    charge_id TEXT PRIMARY KEY,
    charged INTEGER NOT NULL,
    ends REAL NOT NULL
) WITHOUT ROWID
"""
_CHARGE_SELECT = "SELECT charged FROM quota_charges WHERE charge_id = ?"
_CHARGE_UPSERT = (
    "INSERT INTO quota_charges (charge_id, charged, ends) VALUES (?, ?, ?) "
    "ON CONFLICT (charge_id) DO UPDATE SET charged = excluded.charged, ends = excluded.ends"
)
_CHARGES_EXPIRE = "DELETE FROM quota_charges WHERE ends <= ?"
# ping() writes here: a file that opens but cannot be written fails at startup, not on the
# first request.
_PROBE_SCHEMA = "CREATE TABLE IF NOT EXISTS meltguard_probe (id INTEGER PRIMARY KEY, at REAL)"
_PROBE = "INSERT OR REPLACE INTO meltguard_probe (id, at) VALUES (1, ?)"

# Garbage collection runs at most this often (seconds of the caller's clock), and only drops
# windows that ended this long ago, so a refund racing a window's end still finds its row.
GC_INTERVAL = 60.0
GC_GRACE = 60.0

# A batch holds the file's write lock while it runs; the cap keeps that short for the other
# processes on the file (a few ms at most), and the rest of the queue goes as the next batch.
MAX_BATCH = 256

_Slot = tuple[str, int]
_Result = QuotaOutcome | None


class _Kind(enum.Enum):
    PING = enum.auto()
    CONSUME = enum.auto()
    REFUND = enum.auto()
    PEEK = enum.auto()
    CLOSE = enum.auto()


@dataclass(slots=True, eq=False)
class _Op:
    """One call. The thread fills in `result` or `error`; the loop reads them only after the
    batch came back through `call_soon_threadsafe`, which orders the two threads' accesses."""

    kind: _Kind
    windows: Sequence[QuotaWindow]
    cost: float
    at: float  # `now`, or `charged_at` for a refund
    future: asyncio.Future[_Result]
    charge_id: str | None = None
    # When the call was made (monotonic): a call never waits for the file's lock longer than
    # busy_timeout in all, however many batches ahead of it waited too.
    queued_at: float = 0.0
    result: _Result = None
    error: BaseException | None = None


_Work = tuple[list[_Op], asyncio.AbstractEventLoop]


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
        self._closed = False
        # The loop's side: touched only on the event loop's thread.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: deque[_Op] = deque()
        self._flush_scheduled = False
        self._in_flight = False
        self._batches = 0
        # The thread's side: the connection is only ever touched by the thread that made it.
        self._inbox: queue.SimpleQueue[_Work] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None
        self._next_gc = float("-inf")
        self._current_wait_ms = self._busy_timeout_ms
        self._transactions = 0

    @property
    def name(self) -> str:
        return "sqlite"

    @property
    def path(self) -> Path:
        return self._path

    @property
    def batches(self) -> int:
        """Batches handed to the store's thread so far (each one call or more)."""
        return self._batches

    @property
    def transactions(self) -> int:
        """Transactions this store committed for its callers so far (garbage collection aside);
        fewer than the calls made whenever calls arrived together."""
        return self._transactions

    async def ping(self) -> None:
        """Open the file and write to it now (startup, readiness): a bad path, a read-only
        file or directory, or a file that is not a database fails here, not on a request."""
        await self._submit(_Kind.PING, (), 0.0, time.time())

    async def consume(
        self,
        windows: Sequence[QuotaWindow],
        cost: float,
        now: float,
        *,
        charge_id: str | None = None,
    ) -> QuotaOutcome:
        return cast(
            QuotaOutcome, await self._submit(_Kind.CONSUME, windows, cost, now, charge_id)
        )

    async def refund(
        self,
        windows: Sequence[QuotaWindow],
        cost: float,
        charged_at: float,
        *,
        charge_id: str | None = None,
    ) -> None:
        await self._submit(_Kind.REFUND, windows, cost, charged_at, charge_id)

    async def peek(self, windows: Sequence[QuotaWindow], now: float) -> QuotaOutcome:
        return cast(QuotaOutcome, await self._submit(_Kind.PEEK, windows, 0.0, now))

    async def close(self) -> None:
        """Calls already made still run (and are committed) before the connection closes;
        calls made after this raise `QuotaStoreError("store is closed")`."""
        if self._closed:
            return
        self._closed = True
        if self._thread is None and not self._pending:
            return  # never used: no thread, no connection
        # The close goes through the queue like a call, so it runs after every call before it.
        await self._enqueue(_Kind.CLOSE, (), 0.0, 0.0)

    # -- the event loop's side ------------------------------------------------------------------

    def _submit(
        self, kind: _Kind, windows: Sequence[QuotaWindow], cost: float, at: float,
        charge_id: str | None = None,
    ) -> asyncio.Future[_Result]:
        if self._closed:
            raise QuotaStoreError(self.name, "store is closed", maybe_applied=False)
        return self._enqueue(kind, windows, cost, at, charge_id)

    def _enqueue(
        self, kind: _Kind, windows: Sequence[QuotaWindow], cost: float, at: float,
        charge_id: str | None = None,
    ) -> asyncio.Future[_Result]:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._bind(loop)
        future: asyncio.Future[_Result] = loop.create_future()
        self._pending.append(_Op(kind, windows, cost, at, future, charge_id, time.monotonic()))
        if not self._flush_scheduled and not self._in_flight:
            # After the callbacks already due in this turn: the other requests that arrived
            # with this one get to queue their calls into the same batch.
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return future

    def _bind(self, loop: asyncio.AbstractEventLoop) -> None:
        old = self._loop
        if old is not None and not old.is_closed() and (self._pending or self._flush_scheduled):
            raise RuntimeError("a SqliteQuotaStore serves one event loop at a time")
        # Whatever the old loop left undone has nobody waiting for it any more. A batch of it
        # still on the thread runs before ours (one queue); its answers go nowhere.
        self._pending.clear()
        self._flush_scheduled = False
        self._in_flight = False
        self._loop = loop

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._in_flight:
            self._dispatch()

    def _dispatch(self) -> None:
        batch: list[_Op] = []
        pending = self._pending
        while pending and len(batch) < MAX_BATCH:
            op = pending.popleft()
            # A caller cancelled before its call was taken is never charged. The close is
            # never skipped: it stops the thread.
            if op.future.cancelled() and op.kind is not _Kind.CLOSE:
                continue
            batch.append(op)
        if not batch:
            return
        loop = self._loop
        assert loop is not None
        if self._thread is None:
            # A daemon thread: a store left unclosed does not hold the process at exit.
            self._thread = threading.Thread(
                target=self._work, name="meltguard-sqlite", daemon=True
            )
            self._thread.start()
        self._in_flight = True
        self._batches += 1
        self._inbox.put((batch, loop))

    def _deliver(self, batch: list[_Op], loop: asyncio.AbstractEventLoop) -> None:
        try:
            for op in batch:
                # A caller cancelled after the batch was taken is skipped here, but its call
                # ran: a consume was charged, as a cancelled run_in_executor job was before.
                # The gate refunds only what it knows it charged, so that stays as it is.
                if op.future.done():
                    continue
                if op.error is not None:
                    op.future.set_exception(op.error)
                else:
                    op.future.set_result(op.result)
        finally:
            # Whatever happened above, the queue must not stay blocked behind this batch.
            if loop is self._loop:  # else: answers of a loop the store has since left
                self._in_flight = False
                if self._pending:
                    self._dispatch()

    # -- the store's thread -----------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            batch, loop = self._inbox.get()
            try:
                self._run_batch(batch)
            except Exception as exc:  # a bug here must not leave callers waiting forever
                for op in batch:
                    op.result, op.error = None, exc
            # RuntimeError: the loop is closed, nobody is waiting for these answers.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._deliver, batch, loop)
            if batch[-1].kind is _Kind.CLOSE:
                return

    def _run_batch(self, batch: list[_Op]) -> None:
        closing = batch[-1].kind is _Kind.CLOSE
        calls = batch[:-1] if closing else batch
        try:
            self._transact(calls)
        except (sqlite3.Error, OSError) as exc:
            # "database is locked" after busy_timeout lands here too: nothing was committed.
            for op in calls:
                op.result, op.error = None, self._error(exc)
        if closing:
            try:
                self._close_conn()
            except sqlite3.Error as exc:
                batch[-1].error = self._error(exc)

    def _error(self, exc: BaseException) -> QuotaStoreError:
        # One exception per call: several tasks raising one instance would share a traceback.
        # The batch's transaction was rolled back (or never began): nothing of it was applied.
        error = QuotaStoreError(self.name, f"{self._path}: {exc}", maybe_applied=False)
        error.__cause__ = exc
        return error

    def _transact(self, calls: list[_Op]) -> None:
        if not calls:
            return
        conn = self._connection()
        writes = any(op.kind is not _Kind.PEEK for op in calls)
        tx = _Transaction(conn)
        gc_at: float | None = None
        if writes:
            self._limit_wait(conn, min(op.queued_at for op in calls))
        # Reads only: a plain BEGIN gives one snapshot without taking the write lock.
        conn.execute("BEGIN IMMEDIATE" if writes else "BEGIN")
        try:
            for op in calls:
                try:
                    if op.kind is _Kind.CONSUME:
                        op.result = tx.consume(op.windows, op.cost, op.at, op.charge_id)
                        if op.result.allowed:
                            gc_at = op.at if gc_at is None else max(gc_at, op.at)
                    elif op.kind is _Kind.REFUND:
                        tx.refund(op.windows, op.cost, op.at, op.charge_id)
                    elif op.kind is _Kind.PEEK:
                        op.result = tx.peek(op.windows, op.at)
                    elif op.kind is _Kind.PING:
                        conn.execute(_PROBE, (op.at,))
                except (sqlite3.Error, OSError):
                    raise
                except Exception as exc:  # a bad call (not the file) fails alone
                    # Each call computes before it changes anything, so this one left no trace.
                    op.error = exc
            tx.write()
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise
        self._transactions += 1
        if gc_at is not None:
            self._maybe_expire(conn, gc_at)

    def _limit_wait(self, conn: sqlite3.Connection, oldest: float) -> None:
        # Batches run one after another, so a call queued behind a batch that waited for the
        # lock would wait again in its own: the documented busy_timeout is the whole wait.
        # Past it, one try without waiting: the lock may be free by now.
        left_ms = max(self._busy_timeout_ms - int((time.monotonic() - oldest) * 1000), 0)
        if left_ms != self._current_wait_ms:
            conn.execute(f"PRAGMA busy_timeout = {left_ms}")
            self._current_wait_ms = left_ms

    def _connection(self) -> sqlite3.Connection:
        if self._conn is not None:
            return self._conn
        self._path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: transactions are ours (BEGIN IMMEDIATE), not the module's.
        # check_same_thread stays on: only this thread may touch the connection.
        conn = sqlite3.connect(self._path, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")
            self._enable_wal(conn)
            conn.execute(f"PRAGMA synchronous = {self._synchronous}")
            conn.execute(_SCHEMA)
            conn.execute(_CHARGES_SCHEMA)
            conn.execute(_PROBE_SCHEMA)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        self._current_wait_ms = self._busy_timeout_ms
        return conn

    def _enable_wal(self, conn: sqlite3.Connection) -> None:
        # Two processes opening a new file at once both try to switch it to WAL, and the loser
        # gets SQLITE_BUSY at once: sqlite does not call the busy handler for that lock. So we
        # retry here, within the same busy_timeout.
        deadline = time.monotonic() + self._busy_timeout_ms / 1000
        while True:
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as exc:
                code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
                if code not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                    raise
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.005)

    def _close_conn(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.close()

    def _maybe_expire(self, conn: sqlite3.Connection, now: float) -> None:
        # Ended windows are never read again; dropping them keeps the file (and the primary
        # key's b-tree) the size of the live tenants, not of history.
        if now < self._next_gc:
            return
        self._next_gc = now + GC_INTERVAL
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(_EXPIRE, (now - GC_GRACE,))
            conn.execute(_CHARGES_EXPIRE, (now - GC_GRACE,))
            conn.execute("COMMIT")
        except sqlite3.Error:
            # Best effort: the batch before it is committed, and a busy file only delays GC.
            _rollback(conn)


def _rollback(conn: sqlite3.Connection) -> None:
    # The error that brought us here is the one to report, not a failed ROLLBACK after it
    # (sqlite may already have rolled back, e.g. after SQLITE_FULL).
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


class _Transaction:
    """The calls of one transaction, against the rows as this transaction sees them.

    Each (key, window id) is read from the file once and then kept here, so a later call sees
    what an earlier one charged; the changed rows are written once, before COMMIT. The sums are
    computed in Python, not SQL, so every stored value is bit-for-bit what MemoryQuotaStore
    would hold after the same calls.
    """

    __slots__ = ("_charges", "_conn", "_dirty", "_dirty_charges", "_used")

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self._used: dict[_Slot, float | None] = {}  # None: no row
        self._dirty: dict[_Slot, float] = {}  # changed rows -> `ends` should it be inserted
        self._charges: dict[str, bool | None] = {}  # charge id -> still charged; None: no row
        self._dirty_charges: dict[str, tuple[bool, float]] = {}

    def _charge(self, charge_id: str) -> bool | None:
        try:
            return self._charges[charge_id]
        except KeyError:
            row = self._conn.execute(_CHARGE_SELECT, (charge_id,)).fetchone()
            found = bool(row[0]) if row is not None else None
            self._charges[charge_id] = found
            return found

    def _set_charge(self, charge_id: str, charged: bool, ends: float) -> None:
        self._charges[charge_id] = charged
        self._dirty_charges[charge_id] = (charged, ends)

    def _read(self, slot: _Slot) -> float | None:
        try:
            return self._used[slot]
        except KeyError:
            row = self._conn.execute(_SELECT, slot).fetchone()
            used = float(row[0]) if row is not None else None
            self._used[slot] = used
            return used

    def consume(
        self, windows: Sequence[QuotaWindow], cost: float, now: float, charge_id: str | None
    ) -> QuotaOutcome:
        slots = [(w.key, w.window_id(now)) for w in windows]
        states = tuple(
            WindowState(window=w, used=_zero(self._read(slot)), reset_at=w.reset_at(now))
            for w, slot in zip(windows, slots, strict=True)
        )
        if charge_id is not None:
            known = self._charge(charge_id)
            if known is not None:
                # A retried consume, or one whose refund (a void) arrived first: never twice.
                return QuotaOutcome(known, states, charged_at=now)
        for state in states:
            if state.used + cost > state.window.limit + EPSILON:
                return QuotaOutcome(False, states, exhausted=state, charged_at=now)
        used = self._used
        for slot, state in zip(slots, states, strict=True):
            used[slot] = _zero(used[slot]) + cost
            self._dirty.setdefault(slot, state.reset_at)
        if charge_id is not None:
            self._set_charge(charge_id, True, _last_end(windows, now))
        charged = tuple(
            WindowState(window=s.window, used=_zero(used[slot]), reset_at=s.reset_at)
            for slot, s in zip(slots, states, strict=True)
        )
        return QuotaOutcome(True, charged, charged_at=now)

    def refund(
        self, windows: Sequence[QuotaWindow], cost: float, charged_at: float,
        charge_id: str | None,
    ) -> None:
        if charge_id is not None:
            still_charged = self._charge(charge_id)
            self._set_charge(charge_id, False, _last_end(windows, charged_at))
            if not still_charged:
                return  # given back before, or never charged: the id is now void
        slots = [(w.key, w.window_id(charged_at)) for w in windows]
        for slot in slots:
            self._read(slot)
        used = self._used
        for slot, window in zip(slots, windows, strict=True):
            before = used[slot]
            if before is not None:  # as MemoryQuotaStore: no row, nothing to give back
                used[slot] = max(before - cost, 0.0)
                self._dirty.setdefault(slot, window.reset_at(charged_at))

    def peek(self, windows: Sequence[QuotaWindow], now: float) -> QuotaOutcome:
        states = tuple(
            WindowState(
                window=w, used=_zero(self._read((w.key, w.window_id(now)))),
                reset_at=w.reset_at(now),
            )
            for w in windows
        )
        exhausted = next((s for s in states if s.remaining <= EPSILON), None)
        return QuotaOutcome(exhausted is None, states, exhausted=exhausted, charged_at=now)

    def write(self) -> None:
        if self._dirty:
            self._conn.executemany(
                _UPSERT,
                [
                    (key, wid, self._used[(key, wid)], ends)
                    for (key, wid), ends in self._dirty.items()
                ],
            )
        if self._dirty_charges:
            self._conn.executemany(
                _CHARGE_UPSERT,
                [(cid, int(charged), ends) for cid, (charged, ends) in self._dirty_charges.items()],
            )


def _zero(used: float | None) -> float:
    return 0.0 if used is None else used


def _last_end(windows: Sequence[QuotaWindow], at: float) -> float:
    return max((w.reset_at(at) for w in windows), default=at)
