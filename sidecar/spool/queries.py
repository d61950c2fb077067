"""The spool's statements, each a function of a connection: the writer thread runs them
inside its group transaction (store.Store.run), the CLI on a connection of its own."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .store import STATE_DEAD, STATE_NAMES, STATE_PENDING, SpoolFull, stored

LEASE = "deliverer"

_COLUMNS = (
    "id, ordering, endpoint, route, agent, session_key, request_id, idempotency_key, path, "
    "headers, body, created, next_at"
)
_VALUES = "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
INSERT = f"INSERT INTO events ({_COLUMNS}) VALUES {_VALUES}"  # noqa: S608 - constants
Row = tuple[str, str, str, str | None, str, str, str, str, str, str, bytes, float, float]


class Insert:
    """Add one event, unless ``max_events`` are on disk (pending or dead): SpoolFull.

    The accepted calls of one transaction are inserted together (``batch``, which the
    store calls with the run of Inserts next to each other): one count and one
    multi-row INSERT per 2**k rows instead of two statements a call. Each statement is
    a moment the writer thread lets go of the GIL and waits to get it back from a busy
    event loop, so their number, not their size, sets a commit's latency."""

    __slots__ = ("max_events", "row")

    def __init__(self, row: Row, max_events: int) -> None:
        self.row = row
        self.max_events = max_events

    def __call__(self, conn: sqlite3.Connection) -> None:
        out = Insert.batch(conn, [self])[0]
        if out is not None:
            raise out

    @staticmethod
    def batch(conn: sqlite3.Connection, ops: Sequence[Insert]) -> list[SpoolFull | None]:
        on_disk = stored(conn)
        outs: list[SpoolFull | None] = []
        rows: list[Row] = []
        for op in ops:
            if on_disk >= op.max_events:
                outs.append(SpoolFull())
            else:
                on_disk += 1
                rows.append(op.row)
                outs.append(None)
        while rows:  # chunks of 2**k rows: a handful of statements, each prepared once
            n = 1 << min(len(rows).bit_length() - 1, _MAX_CHUNK_BITS)
            conn.execute(_INSERTS[n], [v for row in rows[:n] for v in row])
            del rows[:n]
        return outs


_MAX_CHUNK_BITS = 6  # 64 rows x 13 values: well under SQLite's 32766 bound variables
_INSERTS = {1 << k: INSERT + f", {_VALUES}" * ((1 << k) - 1) for k in range(_MAX_CHUNK_BITS + 1)}


def insert(row: Row, max_events: int) -> Insert:
    """Add one event, unless ``max_events`` are on disk (pending or dead): SpoolFull."""
    return Insert(row, max_events)


@dataclass(slots=True)
class Event:
    """A pending event as the delivery loop holds it."""

    seq: int
    id: str
    ordering: str
    request_id: str
    idempotency_key: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes
    created: float
    attempts: int
    next_at: float


_PENDING_COLUMNS = (
    "seq, id, ordering, request_id, idempotency_key, path, headers, body, created, attempts, "
    "next_at"
)


def pending_after(seq: int, limit: int) -> Callable[[sqlite3.Connection], list[Event]]:
    """Up to ``limit`` pending events after ``seq``, in arrival order."""

    def op(conn: sqlite3.Connection) -> list[Event]:
        rows = conn.execute(  # constant columns, values bound
            f"SELECT {_PENDING_COLUMNS} FROM events WHERE state = 0 AND seq > ? "  # noqa: S608
            "ORDER BY seq LIMIT ?",
            (seq, limit),
        ).fetchall()
        return [
            Event(r[0], r[1], r[2], r[3], r[4], r[5], [tuple(h) for h in json.loads(r[6])], r[7],
                  r[8], r[9], r[10])
            for r in rows
        ]  # fmt: skip

    return op


def delete(seqs: Sequence[int]) -> Callable[[sqlite3.Connection], None]:
    def op(conn: sqlite3.Connection) -> None:
        conn.executemany("DELETE FROM events WHERE seq = ?", [(s,) for s in seqs])

    return op


def retry_later(
    seq: int, attempts: int, next_at: float, status: int | None, error: str
) -> Callable[[sqlite3.Connection], None]:
    def op(conn: sqlite3.Connection) -> None:
        conn.execute(
            "UPDATE events SET attempts = ?, next_at = ?, last_status = ?, last_error = ? "
            "WHERE seq = ? AND state = 0",
            (attempts, next_at, status, error, seq),
        )

    return op


def to_dead(
    seq: int, attempts: int, status: int | None, error: str
) -> Callable[[sqlite3.Connection], None]:
    def op(conn: sqlite3.Connection) -> None:
        conn.execute(
            "UPDATE events SET state = 1, attempts = ?, last_status = ?, last_error = ? "
            "WHERE seq = ? AND state = 0",
            (attempts, status, error, seq),
        )

    return op


def replays(conn: sqlite3.Connection) -> int:
    """Bumped by every ``spool replay``: the delivery loop then reads the file afresh."""
    return int(conn.execute("SELECT value FROM meta WHERE name = 'replays'").fetchone()[0])


def probe(conn: sqlite3.Connection) -> None:
    """A write that really changes a row (SQLite writes nothing for a row rewritten with
    the same values): after a disk error, does a commit get through again?"""
    conn.execute(
        "INSERT INTO meta (name, value) VALUES ('probe', 1) "
        "ON CONFLICT (name) DO UPDATE SET value = value + 1"
    )


def take_lease(owner: str, ttl: float) -> Callable[[sqlite3.Connection], bool]:
    """Become (or stay) the one deliverer of the file: True when ``owner`` holds the lease
    for ``ttl`` seconds from now. Taken over only once the holder let it lapse."""

    def op(conn: sqlite3.Connection) -> bool:
        now = time.time()
        conn.execute(
            "INSERT INTO lease (name, owner, expires) VALUES (?, ?, ?) "
            "ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, "
            "expires = excluded.expires WHERE lease.owner = excluded.owner OR lease.expires < ?",
            (LEASE, owner, now + ttl, now),
        )
        row = conn.execute("SELECT owner FROM lease WHERE name = ?", (LEASE,)).fetchone()
        return bool(row is not None and row[0] == owner)

    return op


def release_lease(owner: str) -> Callable[[sqlite3.Connection], None]:
    def op(conn: sqlite3.Connection) -> None:
        conn.execute("DELETE FROM lease WHERE name = ? AND owner = ?", (LEASE, owner))

    return op


# -- the CLI ------------------------------------------------------------------------------

_LIST_COLUMNS = (
    "id, state, endpoint, route, agent, session_key, attempts, created, last_status, last_error"
)


def listing(conn: sqlite3.Connection, dead: bool, limit: int) -> list[dict[str, object]]:
    """Events oldest first, as ``spool list --json`` prints them; never the message text."""
    state = STATE_DEAD if dead else STATE_PENDING
    now = time.time()
    rows = conn.execute(  # constant columns, values bound
        f"SELECT {_LIST_COLUMNS} FROM events WHERE state = ? ORDER BY seq LIMIT ?",  # noqa: S608
        (state, limit),
    ).fetchall()
    return [
        {
            "id": r[0],
            "state": STATE_NAMES[r[1]],
            "endpoint": r[2],
            "route": r[3],
            "agent": r[4],
            "sessionKey": r[5],
            "attempts": r[6],
            "ageSeconds": round(max(0.0, now - r[7]), 3),
            "lastStatus": r[8],
            "lastError": r[9],
        }
        for r in rows
    ]


def one(conn: sqlite3.Connection, event_id: str) -> dict[str, object] | None:
    """Everything about one event, its body included (``spool show``)."""
    row = conn.execute(  # constant columns, values bound
        f"SELECT {_LIST_COLUMNS}, path, headers, body, idempotency_key, request_id, next_at "  # noqa: S608
        "FROM events WHERE id = ?",
        (event_id,),
    ).fetchone()
    if row is None:
        return None
    body: object
    try:
        body = json.loads(row[12])
    except ValueError:
        body = row[12].decode("utf-8", "replace")
    return {
        "id": row[0],
        "state": STATE_NAMES[row[1]],
        "endpoint": row[2],
        "route": row[3],
        "agent": row[4],
        "sessionKey": row[5],
        "attempts": row[6],
        "ageSeconds": round(max(0.0, time.time() - row[7]), 3),
        "lastStatus": row[8],
        "lastError": row[9],
        "path": row[10],
        "headers": dict(json.loads(row[11])),
        "body": body,
        "idempotencyKey": row[13],
        "requestId": row[14],
        "nextAttemptAt": row[15] if row[1] == STATE_PENDING else None,
    }


def replay(event_ids: Sequence[str] | None) -> Callable[[sqlite3.Connection], int]:
    """Dead letters back to pending with attempts reset; ``None``: every dead letter."""

    def op(conn: sqlite3.Connection) -> int:
        now = time.time()
        sql = "UPDATE events SET state = 0, attempts = 0, next_at = ?, created = ? WHERE state = 1"
        if event_ids is None:
            changed = conn.execute(sql, (now, now)).rowcount
        else:
            changed = sum(
                conn.execute(sql + " AND id = ?", (now, now, i)).rowcount for i in event_ids
            )
        conn.execute("UPDATE meta SET value = value + 1 WHERE name = 'replays'")
        return int(changed)

    return op


def drop(event_ids: Sequence[str]) -> Callable[[sqlite3.Connection], list[str]]:
    """Delete events for good; the ids that existed."""

    def op(conn: sqlite3.Connection) -> list[str]:
        dropped = [i for i in event_ids if conn.execute(
            "DELETE FROM events WHERE id = ?", (i,)).rowcount]  # fmt: skip
        # The delivery loop re-reads the file: what it held of these is forgotten.
        conn.execute("UPDATE meta SET value = value + 1 WHERE name = 'replays'")
        return dropped

    return op
