"""The spool's SQLite file (docs/spool.md): schema, opening checks, and one writer thread.

Every statement of a process runs on one thread that owns the connection. Work
arrives as small functions (``op(conn) -> result``) on a queue; the thread takes
everything that is waiting, runs it inside one ``BEGIN IMMEDIATE`` ... ``COMMIT``
and only then resolves the callers' futures. With ``synchronous=FULL`` in WAL mode
the commit is one fsync of the WAL, shared by every call that was waiting: group
commit. A failed statement or commit (read-only file, full disk, I/O error) rolls
the batch back and fails every caller in it with :class:`SpoolUnavailable`: no call
is ever answered 200 without its commit. It also marks the store not
:attr:`Store.writable` until a later commit changes a row again: that is how the
spool's readiness learns that the disk takes writes again once space is freed,
without a restart (``Spool._stats`` probes with such a commit).

Several processes may open one file (``sidecar.workers``): SQLite's own locks
serialise their transactions (``busy_timeout``), and readers (the CLI) are never
blocked in WAL mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger("sidecar.spool")

SCHEMA_VERSION = 1
APPLICATION_ID = 0x57485350  # "WHSP": marks the file as ours (PRAGMA application_id)
BUSY_TIMEOUT_MS = 10000
MAX_BATCH = 512  # operations per transaction: bounds the time a commit holds the lock

STATE_PENDING, STATE_DEAD = 0, 1
STATE_NAMES = {STATE_PENDING: "pending", STATE_DEAD: "dead"}

_SCHEMA = """
CREATE TABLE events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,   -- arrival order, never reused
    id TEXT NOT NULL UNIQUE,                 -- the eventId answered to the client
    state INTEGER NOT NULL DEFAULT 0,        -- 0 pending, 1 dead
    ordering TEXT NOT NULL,                  -- agent and session: one in flight per value
    endpoint TEXT NOT NULL,                  -- wake, agent, route
    route TEXT,
    agent TEXT NOT NULL,
    session_key TEXT NOT NULL,
    request_id TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    path TEXT NOT NULL,
    headers TEXT NOT NULL,                   -- JSON list of [name, value], no Authorization
    body BLOB NOT NULL,
    created REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL DEFAULT 0,
    last_status INTEGER,
    last_error TEXT
);
CREATE INDEX events_by_state ON events (state, seq);
CREATE TABLE counts (state INTEGER PRIMARY KEY, n INTEGER NOT NULL);
INSERT INTO counts VALUES (0, 0), (1, 0);
CREATE TRIGGER events_insert AFTER INSERT ON events BEGIN
    UPDATE counts SET n = n + 1 WHERE state = NEW.state;
END;
CREATE TRIGGER events_delete AFTER DELETE ON events BEGIN
    UPDATE counts SET n = n - 1 WHERE state = OLD.state;
END;
CREATE TRIGGER events_state AFTER UPDATE OF state ON events WHEN OLD.state != NEW.state BEGIN
    UPDATE counts SET n = n - 1 WHERE state = OLD.state;
    UPDATE counts SET n = n + 1 WHERE state = NEW.state;
END;
CREATE TABLE meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT INTO meta VALUES ('replays', 0);
CREATE TABLE lease (name TEXT PRIMARY KEY, owner TEXT NOT NULL, expires REAL NOT NULL);
CREATE TABLE dedup (key TEXT PRIMARY KEY, done INTEGER NOT NULL, expires REAL NOT NULL);
"""

T = TypeVar("T")
Op = Callable[[sqlite3.Connection], Any]


class SpoolError(Exception):
    """The spool file cannot be used at all (exit 2 at start): the message names the path
    and what to do."""


class SpoolUnavailable(Exception):
    """A transaction failed (disk error, read-only file, full disk): 503 spool_unavailable."""


class SpoolFull(Exception):
    """``maxEvents`` events are on disk already: 503 spool_full."""


def connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    """A connection to the spool at ``path``, checked: created with the schema when the file
    is new, else a spool of this version. Raises :class:`SpoolError` naming the path."""
    if readonly and not path.exists():
        raise SpoolError(f"{path}: no spool file (has the sidecar run with this config?)")
    try:
        if readonly:
            conn = sqlite3.connect(
                f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
            )
        else:
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise SpoolError(f"{path}: cannot open the spool file: {exc}") from None
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        _check(conn, path, readonly)
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise SpoolError(
            f"{path}: not a usable spool file ({exc}); it is left as it is: move it aside "
            "(keep it if it holds events) or set sidecar.spool.path to another file"
        ) from None
    except SpoolError:
        conn.close()
        raise
    return conn


def _check(conn: sqlite3.Connection, path: Path, readonly: bool) -> None:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    app_id = conn.execute("PRAGMA application_id").fetchone()[0]
    tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
    if version == 0 and app_id == 0 and tables == 0:
        if readonly:
            raise SpoolError(f"{path}: empty file, not a spool yet")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("BEGIN IMMEDIATE")
        if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0:
            for statement in _statements(_SCHEMA):
                conn.execute(statement)
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
        version, app_id = SCHEMA_VERSION, APPLICATION_ID
    if app_id != APPLICATION_ID:
        raise SpoolError(
            f"{path}: not a webhook-sidecar spool (another program's SQLite file); it is left "
            "as it is: set sidecar.spool.path to a file of its own"
        )
    if version > SCHEMA_VERSION:
        raise SpoolError(
            f"{path}: written by a newer webhook-sidecar (spool format {version}, this one "
            f"reads {SCHEMA_VERSION}); run the newer version, or drain it with it first"
        )
    if version < 1:
        raise SpoolError(f"{path}: spool format {version} is unknown; move the file aside")
    if not readonly:
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            raise SpoolError(f"{path}: cannot switch the spool to WAL mode (got {mode})")
        conn.execute("PRAGMA synchronous = FULL")


def _statements(script: str) -> list[str]:
    """The schema's statements one by one (triggers hold ';' inside BEGIN ... END)."""
    out: list[str] = []
    current = ""
    for line in script.splitlines():
        line = line.split("--", 1)[0].rstrip()
        if not line:
            continue
        current += line + "\n"
        if sqlite3.complete_statement(current):
            out.append(current.strip())
            current = ""
    return out


class _Item:
    """One operation waiting for the writer: its future is a ``concurrent.futures`` one
    (``submit``, no loop) or an asyncio one of ``loop`` (``run``)."""

    __slots__ = ("future", "loop", "op")

    def __init__(
        self,
        op: Op,
        future: Future[Any] | asyncio.Future[Any],
        loop: asyncio.AbstractEventLoop | None,
    ) -> None:
        self.op = op
        self.future = future
        self.loop = loop


Outcome = tuple[_Item, Any, BaseException | None]


class Store:
    """One process's connection to the spool and the thread that writes through it.

    ``submit(op)`` runs ``op(conn)`` in the next transaction and returns its result
    once that transaction is committed (on disk); ``run(op)`` is the same for a
    coroutine. An op with a ``batch`` attribute (``batch(conn, ops) -> [result or
    exception, ...]``, e.g. queries.Insert) is run together with the ops of the same
    kind next to it in the transaction: one statement for many accepted calls. After
    each commit that wrote something (an fsync), ``on_commit(seconds, ops)`` is called,
    for the metrics.
    """

    def __init__(self, path: Path, max_events: int) -> None:
        self.path = path
        self.max_events = max_events
        self.conn = connect(path)
        self._queue: deque[_Item] = deque()
        self._wake = threading.Condition()
        self._closed = False
        self.commits = 0  # transactions that wrote something: one WAL fsync each
        self.committed_ops = 0  # operations they carried
        # False from a failed transaction until a commit that changed a row (one that
        # changes nothing writes nothing, so it proves nothing about the disk). Written
        # by the writer thread, read by the event loop: a plain bool is enough.
        self.writable = True
        self.on_commit: Callable[[float, int], None] | None = None
        self._thread = threading.Thread(target=self._run, name="spool-writer", daemon=True)
        self._thread.start()

    # -- callers (any thread; the event loop through run()) ------------------------------

    def _put(self, item: _Item) -> None:
        with self._wake:
            if self._closed:
                raise SpoolUnavailable("the spool is closed")
            self._queue.append(item)
            self._wake.notify()

    def submit(self, op: Op) -> Future[Any]:
        future: Future[Any] = Future()
        self._put(_Item(op, future, None))
        return future

    async def run(self, op: Callable[[sqlite3.Connection], T]) -> T:
        """``op`` committed in the next transaction; its result. The answers of a whole
        transaction come back to the loop in one call (not one wake-up per caller)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._put(_Item(op, future, loop))
        return await future

    def close(self) -> None:
        """Commit what is queued, then close the connection."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=30)

    # -- the writer thread -------------------------------------------------------------

    def _run(self) -> None:
        queue = self._queue
        while True:
            with self._wake:
                while not queue and not self._closed:
                    self._wake.wait()
                if not queue and self._closed:
                    break
                batch = [queue.popleft() for _ in range(min(len(queue), MAX_BATCH))]
            self._transaction(batch)
        with contextlib.suppress(sqlite3.Error):
            self.conn.close()

    def _transaction(self, batch: list[_Item]) -> None:
        conn = self.conn
        started = time.perf_counter()
        results: list[Outcome] = []
        live = [item for item in batch if _start(item)]
        changes = conn.total_changes
        try:
            conn.execute("BEGIN IMMEDIATE")
            i = 0
            while i < len(live):  # an op, or a run of batchable ops of one kind
                many = _batch_of(live[i])
                j = i + 1
                while many is not None and j < len(live) and _batch_of(live[j]) == many:
                    j += 1
                results += _apply(conn, live[i:j], many)
                i = j
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            log.error(
                "spool write failed: %s", exc, extra={"path": str(self.path), "ops": len(batch)}
            )
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            self.writable = False
            # A full disk: fold the WAL into the database and cut it to zero, so space the
            # deliveries free (deleted events) can be written again.
            with contextlib.suppress(sqlite3.Error):
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            error = SpoolUnavailable(str(exc))
            _settle([(item, None, error) for item in live])
            return
        if conn.total_changes != changes:  # wrote, so synced (a read-only one did not)
            self.commits += 1
            self.committed_ops += len(results)
            if self.on_commit is not None:
                self.on_commit(time.perf_counter() - started, len(results))
            if not self.writable:
                self.writable = True
                log.info("spool writes succeed again", extra={"path": str(self.path)})
        _settle(results)


def _batch_of(item: _Item) -> object:
    return getattr(item.op, "batch", None)


def _apply(conn: sqlite3.Connection, items: list[_Item], many: Any) -> list[Outcome]:
    """Run one op, or (``many``) a run of ops of one kind in one call. A failed statement
    (sqlite3.Error) is raised: the transaction is lost and every op of it fails. Any
    other exception is the op's own refusal (SpoolFull), or a bug: its callers get it."""
    try:
        if many is None:
            return [(items[0], items[0].op(conn), None)]
        outs = many(conn, [item.op for item in items])
    except sqlite3.Error:
        raise
    except Exception as exc:
        return [(item, None, exc) for item in items]
    return [
        (item, None, out) if isinstance(out, BaseException) else (item, out, None)
        for item, out in zip(items, outs, strict=True)
    ]


def _start(item: _Item) -> bool:
    """False for an item its caller gave up on (cancelled) before it ran: skipped."""
    future = item.future
    if item.loop is None:
        assert isinstance(future, Future)
        return future.set_running_or_notify_cancel()
    # Read from this thread without the loop: at worst a call cancelled at this very
    # moment is committed all the same, and delivered (never a 200 without a commit).
    return not future.cancelled()


def _settle(results: list[Outcome]) -> None:
    """Resolve the callers' futures: concurrent ones here, asyncio ones in one callback
    per event loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[Outcome]] = {}
    for outcome in results:
        item, result, exc = outcome
        if item.loop is None:
            future = item.future
            assert isinstance(future, Future)
            if exc is not None:
                future.set_exception(exc)
            else:
                future.set_result(result)
        else:
            by_loop.setdefault(item.loop, []).append(outcome)
    for loop, outcomes in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            loop.call_soon_threadsafe(_settle_async, outcomes)


def _settle_async(outcomes: list[Outcome]) -> None:
    for item, result, exc in outcomes:
        future = item.future
        if future.done():  # cancelled meanwhile
            continue
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)


# Where SQLite's Unix VFS puts temporary files (os_unix.c, unixTempFileDir): the first
# of $SQLITE_TMPDIR, $TMPDIR and these that is a directory this process may write.
SQLITE_TEMP_DIRS = ("/var/tmp", "/usr/tmp", "/tmp", ".")  # noqa: S108 - only checked, never written


def sqlite_temp_dir() -> str | None:
    """The directory SQLite will use for temporary files, or None when it has none.

    The spool needs one: a transaction that outgrows SQLite's memory (a group commit of
    many large calls, a replay of many dead letters) spills to a temporary file, and
    without a writable directory it fails ("disk I/O error", answered 503
    spool_unavailable). A container with a read-only root file system and nothing
    mounted on /tmp has none: set SQLITE_TMPDIR to a writable directory."""
    env = (os.environ.get("SQLITE_TMPDIR"), os.environ.get("TMPDIR"))
    for folder in (*env, *SQLITE_TEMP_DIRS):
        if folder and os.path.isdir(folder) and os.access(folder, os.W_OK | os.X_OK):
            return folder
    return None


def counts(conn: sqlite3.Connection) -> tuple[int, int]:
    """(pending, dead), kept by triggers: O(1) however large the spool."""
    rows = dict(conn.execute("SELECT state, n FROM counts").fetchall())
    return rows.get(STATE_PENDING, 0), rows.get(STATE_DEAD, 0)


def stored(conn: sqlite3.Connection) -> int:
    """Pending and dead events together (what ``maxEvents`` bounds), in one row."""
    return int(conn.execute("SELECT total(n) FROM counts").fetchone()[0])


def oldest_pending(conn: sqlite3.Connection) -> float | None:
    row = conn.execute("SELECT created FROM events WHERE state = 0 ORDER BY seq LIMIT 1").fetchone()
    return None if row is None else float(row[0])


def file_bytes(path: Path) -> int:
    """The spool's size on disk: the database, its WAL and shared-memory files."""
    total = 0
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(OSError):
            total += os.stat(f"{path}{suffix}").st_size
    return total
