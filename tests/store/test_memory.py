"""The memory dedup store: the three states, TTLs on a driven clock, the bound (oldest
first out), lazy expiry, and that a release never forgets a delivery that is done."""

from __future__ import annotations

import pytest

from sidecar.store import Claim, MemoryDedupStore, open_dedup_store


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


async def test_new_then_in_flight_then_done_until_the_ttl(clock: Clock) -> None:
    store = MemoryDedupStore(clock=clock)
    assert await store.claim("k", 10) is Claim.NEW
    assert await store.claim("k", 10) is Claim.IN_FLIGHT
    await store.complete("k", 60)
    assert await store.claim("k", 10) is Claim.DONE
    clock.now += 59.9
    assert await store.claim("k", 10) is Claim.DONE
    clock.now += 0.2  # remembered for the ttl, not longer
    assert await store.claim("k", 10) is Claim.NEW


async def test_an_unfinished_claim_expires_after_its_in_flight_ttl(clock: Clock) -> None:
    store = MemoryDedupStore(clock=clock)
    assert await store.claim("k", 15) is Claim.NEW
    clock.now += 14.9
    assert await store.claim("k", 15) is Claim.IN_FLIGHT
    clock.now += 0.2  # its process died mid-call: the id is free again
    assert await store.claim("k", 15) is Claim.NEW


async def test_release_forgets_an_in_flight_claim_but_never_a_done_one(clock: Clock) -> None:
    store = MemoryDedupStore(clock=clock)
    assert await store.claim("failed", 10) is Claim.NEW
    await store.release("failed")
    assert await store.claim("failed", 10) is Claim.NEW  # the sender's retry goes through
    await store.complete("failed", 60)
    await store.release("failed")  # a late failure of another call
    assert await store.claim("failed", 10) is Claim.DONE
    await store.release("never-claimed")  # harmless


async def test_the_bound_evicts_the_oldest_first(clock: Clock) -> None:
    store = MemoryDedupStore(max_entries=3, clock=clock)
    for key in ("a", "b", "c"):
        assert await store.claim(key, 10) is Claim.NEW
        await store.complete(key, 3600)
        clock.now += 1
    assert await store.claim("d", 10) is Claim.NEW  # full: "a" goes
    assert len(store) == 3
    assert "a" not in store and all(k in store for k in ("b", "c", "d"))
    assert await store.claim("b", 10) is Claim.DONE
    assert await store.claim("a", 10) is Claim.NEW  # forgotten: "b" is now the oldest
    assert "b" not in store and len(store) == 3


async def test_expired_entries_make_room_before_live_ones_are_evicted(clock: Clock) -> None:
    store = MemoryDedupStore(max_entries=3, clock=clock)
    await store.claim("short", 10)
    await store.complete("short", 1)
    await store.claim("long-1", 10)
    await store.complete("long-1", 3600)
    await store.claim("long-2", 10)
    await store.complete("long-2", 3600)
    clock.now += 2  # "short" has expired; the oldest entry is the expired one
    assert await store.claim("new", 10) is Claim.NEW
    assert "short" not in store
    assert all(k in store for k in ("long-1", "long-2", "new"))


async def test_lazy_expiry_keeps_the_table_small_without_a_task(clock: Clock) -> None:
    store = MemoryDedupStore(clock=clock)
    for i in range(100):
        await store.claim(f"k{i}", 1)
        await store.complete(f"k{i}", 1)
    clock.now += 5
    for i in range(100):  # each claim drops up to two expired entries at the old end
        await store.claim(f"n{i}", 1)
    assert len(store) == 100  # 100 new, the 100 expired ones gone


async def test_open_dedup_store_memory_with_its_bound() -> None:
    store = open_dedup_store("memory", 7)
    assert isinstance(store, MemoryDedupStore)
    assert store.backend == "memory" and store.max_entries == 7
    with pytest.raises(ValueError, match="unknown dedup backend"):
        open_dedup_store("sqlite")  # the spool's store, opened by the spool


async def test_an_id_completed_again_outlives_its_old_record(clock: Clock) -> None:
    store = MemoryDedupStore(max_entries=3, clock=clock)
    await store.claim("again", 10)
    await store.complete("again", 1)
    clock.now += 2  # expired: the sender's next delivery with the same id is new
    assert await store.claim("again", 10) is Claim.NEW
    await store.complete("again", 3600)
    # The first record of "again" reaches the old end and expires: it must not take
    # the id's second, live entry with it.
    for key in ("x", "y"):
        assert await store.claim(key, 10) is Claim.NEW
        await store.complete(key, 3600)
    assert await store.claim("again", 10) is Claim.DONE


async def test_records_of_ids_completed_again_stay_bounded(clock: Clock) -> None:
    store = MemoryDedupStore(max_entries=10, clock=clock)
    await store.claim("long", 10)
    await store.complete("long", 3600)  # at the old end, blocking the sweep for an hour
    for _ in range(1000):
        assert await store.claim("short", 10) is Claim.NEW
        await store.complete("short", 1)
        clock.now += 2
    assert len(store) == 2
    assert len(store._order) <= 2 * 2 + 64  # rebuilt, not one record per completion
    assert await store.claim("long", 10) is Claim.DONE


async def test_in_flight_ids_count_toward_the_bound(clock: Clock) -> None:
    store = MemoryDedupStore(max_entries=2, clock=clock)
    await store.claim("done", 10)
    await store.complete("done", 3600)
    assert await store.claim("a", 10) is Claim.NEW
    assert await store.claim("b", 10) is Claim.NEW  # full: the done id makes room
    assert "done" not in store and len(store) == 2
    assert await store.claim("c", 10) is Claim.NEW  # no done id left: the oldest claim goes
    assert "a" not in store and "b" in store and "c" in store


async def test_a_call_whose_id_went_in_flight_still_records_its_answer(clock: Clock) -> None:
    store = MemoryDedupStore(max_entries=2, clock=clock)
    for key in ("a", "b", "c"):  # three calls in flight at once: "a" has to go
        assert await store.claim(key, 10) is Claim.NEW
    await store.complete("a", 3600)  # its answer is still remembered...
    assert await store.claim("a", 10) is Claim.DONE
    assert len(store) == 3
    assert await store.claim("d", 10) is Claim.NEW  # ...until the next claim needs room
    assert len(store) == 2 and "a" not in store
