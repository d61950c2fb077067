"""``sidecar.dedup.backend: "sqlite"`` (docs/routes.md): delivery ids kept in the spool's
database, so they survive restarts and are shared by every ``sidecar.workers`` process.

Each call is one small operation in the spool's group commit (store.Store): a claim
is atomic across processes because it runs inside ``BEGIN IMMEDIATE``, which takes
the file's write lock. Expired rows are swept a few at a time by later claims.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable

from ..store.base import Claim, DedupUnavailable
from .store import SpoolUnavailable, Store

SWEEP = 32  # expired rows removed per claim, at most


class SqliteDedup:
    """A :class:`~sidecar.store.base.DedupStore` in the spool file ``store()`` returns.

    ``store`` is asked at each call, not when the guards are built: the server builds
    its guards before it opens the spool, and serves no call until both are done."""

    backend = "sqlite"

    def __init__(self, store: Callable[[], Store]) -> None:
        self.store = store

    async def _run(self, op: Callable[[sqlite3.Connection], Claim | None]) -> Claim | None:
        try:
            return await self.store().run(op)
        except SpoolUnavailable as exc:
            raise DedupUnavailable(str(exc)) from None

    async def claim(self, key: str, in_flight_ttl: float) -> Claim:
        def op(conn: sqlite3.Connection) -> Claim:
            now = time.time()
            conn.execute(
                "DELETE FROM dedup WHERE rowid IN "
                "(SELECT rowid FROM dedup WHERE expires <= ? LIMIT ?)",
                (now, SWEEP),
            )
            row = conn.execute("SELECT done, expires FROM dedup WHERE key = ?", (key,)).fetchone()
            if row is not None and row[1] > now:
                return Claim.DONE if row[0] else Claim.IN_FLIGHT
            conn.execute(
                "INSERT OR REPLACE INTO dedup (key, done, expires) VALUES (?, 0, ?)",
                (key, now + in_flight_ttl),
            )
            return Claim.NEW

        result = await self._run(op)
        assert result is not None
        return result

    async def complete(self, key: str, ttl: float) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT OR REPLACE INTO dedup (key, done, expires) VALUES (?, 1, ?)",
                (key, time.time() + ttl),
            )

        await self._run(op)

    async def release(self, key: str) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM dedup WHERE key = ? AND done = 0", (key,))

        await self._run(op)

    async def aclose(self) -> None:
        """The spool owns the file and closes it."""
