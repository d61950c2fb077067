"""The writer thread's group commit and what keeps it cheap (bench/spool_bench.py): the
accepts of one transaction inserted together under ``maxEvents``, only writing
transactions counted as commits, event ids that land next to each other in the index,
and a delivery loop that deletes and reads in batches."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from sidecar.settings import Spool as SpoolSettings
from sidecar.spool import delivery, queries
from sidecar.spool.delivery import Deliverer
from sidecar.spool.service import new_event_id
from sidecar.spool.store import SpoolFull, Store, counts


def row(i: int) -> queries.Row:
    event_id = new_event_id()
    now = time.time()
    return (
        event_id, "my-agent\ns", "agent", None, "my-agent", "s", f"req-{i}", f"evt:{event_id}",
        "/hooks/agent", "[]", b'{"message": "m%d"}' % i, now, now,
    )  # fmt: skip


def hold(store: Store) -> threading.Event:
    """Keep the writer busy until the returned event is set, so that what is submitted
    meanwhile waits for the next transaction, all of it together."""
    started, release = threading.Event(), threading.Event()

    def held(conn: object) -> None:
        started.set()
        release.wait(10)

    store.submit(held)
    assert started.wait(10)  # in a transaction of its own by now
    return release


async def test_accepts_of_one_transaction_share_it_and_stop_at_max_events(
    short_tmp: Path,
) -> None:
    store = Store(short_tmp / "spool.db", 5)
    release = hold(store)
    calls = [asyncio.ensure_future(store.run(queries.insert(row(i), 5))) for i in range(8)]
    await asyncio.sleep(0.05)  # every call is queued behind the held transaction
    release.set()
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    assert outcomes[:5] == [None] * 5  # in arrival order: the first five fit
    assert all(isinstance(o, SpoolFull) for o in outcomes[5:])
    # One transaction wrote (the held one did not: it is not counted as a commit).
    assert (store.commits, store.committed_ops) == (1, 8)
    pending = await store.run(counts)
    assert pending == (5, 0)
    assert store.commits == 1  # a read is no commit either
    ids = await store.run(
        lambda conn: [r[0] for r in conn.execute("SELECT request_id FROM events ORDER BY seq")]
    )
    assert ids == [f"req-{i}" for i in range(5)]
    store.close()


async def test_a_cancelled_call_is_not_committed(short_tmp: Path) -> None:
    store = Store(short_tmp / "spool.db", 100)
    release = hold(store)
    kept = asyncio.ensure_future(store.run(queries.insert(row(1), 100)))
    dropped = asyncio.ensure_future(store.run(queries.insert(row(2), 100)))
    await asyncio.sleep(0.05)
    dropped.cancel()  # its caller gave up (the drain deadline) before it ran
    await asyncio.sleep(0)
    release.set()
    await kept
    assert await store.run(counts) == (1, 0)
    store.close()


def test_event_ids_follow_the_clock_and_stay_unique() -> None:
    first = [new_event_id() for _ in range(1000)]
    time.sleep(0.002)
    later = new_event_id()
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in first)
    assert len(set(first)) == 1000
    assert later[:12] > max(first)[:12]  # milliseconds first: appended to the index
    assert abs(int(later[:12], 16) / 1000 - time.time()) < 5


def deliverer(store: Store, path: Path) -> Deliverer:
    def no_forwarder() -> Any:
        raise AssertionError("nothing is delivered here")

    return Deliverer(store, lambda: SpoolSettings(path), no_forwarder, lambda: False, print)


async def test_deliveries_are_deleted_in_one_commit(short_tmp: Path) -> None:
    path = short_tmp / "spool.db"
    store = Store(path, 1000)
    for i in range(20):
        await store.run(queries.insert(row(i), 1000))
    events = await store.run(queries.pending_after(0, 100))
    before = store.commits
    d = deliverer(store, path)
    for event in events:  # 20 deliveries answered 2xx one after the other
        d._delete(event.seq)
    await asyncio.sleep(delivery.DELETE_DELAY * 5)
    assert await store.run(counts) == (0, 0)
    assert store.commits == before + 1
    store.close()


async def test_a_large_backlog_is_read_a_quarter_window_at_a_time(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = short_tmp / "spool.db"
    store = Store(path, 10_000)
    monkeypatch.setattr(delivery, "WINDOW", 16)
    for i in range(40):
        await store.run(queries.insert(row(i), 10_000))
    reads: list[int] = []
    real = queries.pending_after

    def counted(seq: int, limit: int) -> Any:
        reads.append(limit)
        return real(seq, limit)

    monkeypatch.setattr(queries, "pending_after", counted)
    d = deliverer(store, path)
    await d._read()
    assert (d.loaded, d.more, reads) == (16, True, [16])
    for _ in range(3):  # an event leaves the window: no read for one event
        event = next(iter(d.queues.values()))[0]
        d._finish(event)
        await d._read()
    assert reads == [16]
    d._finish(next(iter(d.queues.values()))[0])  # a quarter of the window is free
    await d._read()
    assert reads == [16, 4] and d.loaded == 16
    store.close()
