"""The SQLite dedup backend in the spool's file: claims atomic across two processes'
connections, surviving a restart, expiring, failing closed on a broken disk, and a
real sidecar configured with it (``sidecar.dedup.backend: "sqlite"``)."""

from __future__ import annotations

import asyncio
import json
import resource
import signal
import signal as signals
from collections.abc import Callable
from pathlib import Path

import pytest
from support.clients import post, until
from support.common import AGENT
from support.spool_runtime import RecordingRuntime, SpoolSidecar, spool_doc

from sidecar.spool.dedup import SqliteDedup
from sidecar.spool.store import Store
from sidecar.store.base import Claim, DedupUnavailable


def on(store: Store) -> SqliteDedup:
    return SqliteDedup(lambda: store)


async def test_claim_complete_release_and_restart(short_tmp: Path) -> None:
    path = short_tmp / "spool.db"
    store = Store(path, 100)
    dedup = on(store)
    assert dedup.backend == "sqlite"
    assert await dedup.claim("github:1", 30) is Claim.NEW
    assert await dedup.claim("github:1", 30) is Claim.IN_FLIGHT
    await dedup.complete("github:1", 3600)
    assert await dedup.claim("github:1", 30) is Claim.DONE
    assert await dedup.claim("github:2", 30) is Claim.NEW
    await dedup.release("github:2")  # the forwarding failed: the sender's retry goes through
    assert await dedup.claim("github:2", 30) is Claim.NEW
    store.close()
    # Another store on the same file (a restart, or another worker) sees the same ids.
    again = Store(path, 100)
    other = on(again)
    assert await other.claim("github:1", 30) is Claim.DONE
    assert await other.claim("github:2", 30) is Claim.IN_FLIGHT
    again.close()


async def test_expiry(short_tmp: Path) -> None:
    store = Store(short_tmp / "spool.db", 100)
    dedup = on(store)
    assert await dedup.claim("k", 0.2) is Claim.NEW
    await asyncio.sleep(0.3)  # a process died mid-call: its claim does not block forever
    assert await dedup.claim("k", 30) is Claim.NEW
    await dedup.complete("k", 0.2)
    await asyncio.sleep(0.3)
    assert await dedup.claim("k", 30) is Claim.NEW
    store.close()


async def test_concurrent_claims_from_two_connections_one_wins(short_tmp: Path) -> None:
    path = short_tmp / "spool.db"
    a, b = Store(path, 100), Store(path, 100)
    results = await asyncio.gather(*(on(s).claim(f"id-{i}", 30) for i in range(50) for s in (a, b)))
    for i in range(50):
        pair = results[2 * i : 2 * i + 2]
        assert sorted(r.value for r in pair) == ["in_flight", "new"]
    a.close()
    b.close()


async def test_disk_error_is_dedup_unavailable(short_tmp: Path) -> None:
    store = Store(short_tmp / "spool.db", 100)
    dedup = on(store)
    assert await dedup.claim("warm", 30) is Claim.NEW
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1, old[1]))  # no file may grow now
    try:
        with pytest.raises(DedupUnavailable):
            for i in range(200):  # the WAL grows until a write is refused
                await dedup.claim("x" * 500 + str(i), 30)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, handler)
        store.close()


async def test_a_sidecar_with_the_sqlite_backend_remembers_keys_across_a_kill(
    short_tmp: Path, recorder: RecordingRuntime, sidecars: Callable[..., SpoolSidecar]
) -> None:
    doc = spool_doc(short_tmp)
    doc["sidecar"]["dedup"] = {"backend": "sqlite"}
    call = {"agent": AGENT, "message": "deploy finished"}
    key = {"Idempotency-Key": "deploy-42"}
    first = sidecars(short_tmp, doc).start()
    status, _, body = await post(first.url + "/hooks/agent", call, headers=key)
    assert status == 200 and "eventId" in body, body
    status, _, again = await post(first.url + "/hooks/agent", call, headers=key)
    assert status == 200 and again["duplicate"] is True, again
    await until(lambda: json.loads(first.cli("stats", "--json").stdout)["pending"] == 0)
    first.signal(signals.SIGKILL)  # the memory backend would forget the key here
    first.wait()
    second = sidecars(short_tmp, doc).start()
    status, _, after = await post(second.url + "/hooks/agent", call, headers=key)
    assert status == 200 and after["duplicate"] is True, after
    status, _, other = await post(
        second.url + "/hooks/agent", call, headers={"Idempotency-Key": "deploy-43"}
    )
    assert status == 200 and "eventId" in other, other
    await until(lambda: len(recorder.delivered) == 2)
    assert [c["key"] for c in recorder.delivered] == ["deploy-42", "deploy-43"]
    assert second.stop() == 0
