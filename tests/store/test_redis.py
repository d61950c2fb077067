"""The Redis dedup store against a real redis-server: one round trip per claim, the
keys and their expiry, release only while in flight, a lost script cache, and an
unreachable Redis failing closed fast and recovering by itself."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator

import pytest
from support.redis_server import RedisServer

from sidecar.store import Claim, DedupUnavailable, open_dedup_store
from sidecar.store.redis import KEY_PREFIX, RedisDedupStore


@pytest.fixture
async def store(redis_server: RedisServer) -> AsyncIterator[RedisDedupStore]:
    shared = RedisDedupStore(redis_server.url)
    yield shared
    await shared.aclose()


def test_open_dedup_store_redis_never_logs_the_password() -> None:
    store = open_dedup_store("redis://:hunter2-password@10.0.0.9:6380/3")
    assert isinstance(store, RedisDedupStore)
    assert store.where == "10.0.0.9:6380/3"


async def test_states_keys_and_expiry(store: RedisDedupStore) -> None:
    assert await store.claim("hook:a:wake:k1", 5) is Claim.NEW
    assert await store.client.get(KEY_PREFIX + "hook:a:wake:k1") == b"inflight"
    assert 4000 < await store.client.pttl(KEY_PREFIX + "hook:a:wake:k1") <= 5000
    assert await store.claim("hook:a:wake:k1", 5) is Claim.IN_FLIGHT
    await store.complete("hook:a:wake:k1", 86400)
    assert await store.client.get(KEY_PREFIX + "hook:a:wake:k1") == b"done"
    assert 86_390_000 < await store.client.pttl(KEY_PREFIX + "hook:a:wake:k1") <= 86_400_000
    assert await store.claim("hook:a:wake:k1", 5) is Claim.DONE
    assert await store.client.keys("*") == [b"webhook-sidecar:dedup:hook:a:wake:k1"]


async def test_an_unfinished_claim_expires_by_itself(store: RedisDedupStore) -> None:
    assert await store.claim("route:gh:1", 0.2) is Claim.NEW
    assert await store.claim("route:gh:1", 0.2) is Claim.IN_FLIGHT
    await asyncio.sleep(0.3)
    assert await store.claim("route:gh:1", 0.2) is Claim.NEW


async def test_release_deletes_only_an_in_flight_claim(store: RedisDedupStore) -> None:
    assert await store.claim("x", 5) is Claim.NEW
    await store.release("x")
    assert await store.client.exists(KEY_PREFIX + "x") == 0
    assert await store.claim("x", 5) is Claim.NEW
    await store.complete("x", 60)
    await store.release("x")  # a late failure must not forget a completed delivery
    assert await store.claim("x", 5) is Claim.DONE


async def test_one_round_trip_per_claim_and_one_winner_among_many(
    redis_server: RedisServer, store: RedisDedupStore
) -> None:
    assert await store.claim("warm-up", 5) is Claim.NEW  # the script is cached now
    assert redis_server.command("CONFIG", "RESETSTAT") == b"+OK\r\n"
    claims = await asyncio.gather(*(store.claim("same", 5) for _ in range(20)))
    assert claims.count(Claim.NEW) == 1 and claims.count(Claim.IN_FLIGHT) == 19
    stats = (redis_server.command("INFO", "commandstats") or b"").decode()
    # SET NX and the read are one script call each: the only commands sent from here
    # (the SET and GET lines count the script's own calls inside Redis).
    sent = [
        line.split(":")[0].split("|")[0]
        for line in stats.splitlines()
        if line.startswith("cmdstat_")
    ]
    handshake = {"cmdstat_hello", "cmdstat_client"}  # new pooled connections say hello
    assert set(sent) - handshake == {
        "cmdstat_config",
        "cmdstat_evalsha",
        "cmdstat_get",
        "cmdstat_set",
    }
    assert "cmdstat_evalsha:calls=20,usec" in stats and "failed_calls=0" in stats


async def test_concurrent_claims_and_completions_share_one_connection(
    redis_server: RedisServer, store: RedisDedupStore
) -> None:
    """40 calls at once: their claims go out as one pipeline, their completions as
    another, on one pooled connection (one per batch would open 40)."""
    keys = [f"batch-{i}" for i in range(40)]
    assert await asyncio.gather(*(store.claim(k, 5) for k in keys)) == [Claim.NEW] * 40
    await asyncio.gather(*(store.complete(k, 60) for k in keys))
    clients = redis_server.command("CLIENT", "LIST")
    assert clients is not None and clients.count(b"cmd=") == 2  # the store's and ours
    claims = await asyncio.gather(*(store.claim(k, 5) for k in keys))
    assert claims == [Claim.DONE] * 40


async def test_two_stores_share_the_ids(redis_server: RedisServer) -> None:
    a, b = RedisDedupStore(redis_server.url), RedisDedupStore(redis_server.url)
    try:
        assert await a.claim("d", 5) is Claim.NEW
        assert await b.claim("d", 5) is Claim.IN_FLIGHT
        await a.complete("d", 60)
        assert await b.claim("d", 5) is Claim.DONE
    finally:
        await a.aclose()
        await b.aclose()


async def test_an_unknown_script_is_sent_again(store: RedisDedupStore) -> None:
    assert await store.claim("s", 5) is Claim.NEW
    await store.client.script_flush()  # what a Redis restart does to the cache
    assert await store.claim("s", 5) is Claim.IN_FLIGHT
    await store.release("s")
    assert await store.claim("s", 5) is Claim.NEW


async def test_unreachable_fails_closed_fast_and_recovers_with_two_log_lines(
    redis_server: RedisServer, store: RedisDedupStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sidecar.dedup")
    assert await store.claim("before", 5) is Claim.NEW
    redis_server.stop()
    started = time.monotonic()
    for op in (store.claim("k", 5), store.complete("k", 5), store.release("k")):
        with pytest.raises(DedupUnavailable) as caught:
            await op
        assert str(caught.value) == store.where
    for _ in range(20):  # backing off: answered without touching the network
        with pytest.raises(DedupUnavailable):
            await store.claim("k", 5)
    assert time.monotonic() - started < 1.0  # refused at once, never a timeout each
    redis_server.start()  # empty: "before" is gone with the old process
    deadline = time.monotonic() + 10
    while True:
        try:
            assert await store.claim("after", 5) is Claim.NEW
            break
        except DedupUnavailable:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
    messages = [r.getMessage() for r in caplog.records if r.name == "sidecar.dedup"]
    assert messages == ["dedup backend unreachable", "dedup backend reachable again"]
    assert all("hunter" not in r.getMessage() for r in caplog.records)


async def test_a_silent_redis_costs_one_timeout_and_one_probe_at_a_time() -> None:
    """A listening socket nobody reads: connect succeeds, the reply never comes."""
    now = [0.0]
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        store = RedisDedupStore(url, timeout=0.5, clock=lambda: now[0])
        try:
            started = time.monotonic()
            with pytest.raises(DedupUnavailable):
                await store.claim("k", 5)
            assert 0.4 < time.monotonic() - started < 1.4  # one timeout, not retried
            now[0] += 1.0  # past the back-off: one call probes...
            probe = asyncio.ensure_future(store.claim("k", 5))
            await asyncio.sleep(0.05)
            started = time.monotonic()
            for _ in range(10):  # ...and the others are answered at once meanwhile
                with pytest.raises(DedupUnavailable):
                    await store.claim("k", 5)
            assert time.monotonic() - started < 0.3
            assert not probe.done()
            with pytest.raises(DedupUnavailable):
                await probe
        finally:
            await store.aclose()
