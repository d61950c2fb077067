"""Idempotency-Key dedup on /hooks/wake and /hooks/agent, end to end (docs/dedup.md):
through the real sidecar app on a real port, in front of a real runtime on a Unix
socket; with the memory backend, a real redis-server, and two real sidecar
processes sharing one Redis."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from support.clients import post
from support.common import (
    AGENT,
    OTHER_SECRET,
    SECRET,
    Runtime,
    Sidecar,
    base_doc,
    free_port,
    serve_unix,
    write_config,
)
from support.redis_server import RedisServer
from support.scrape import Scrape

from sidecar import config
from sidecar.store import MemoryDedupStore
from sidecar.store.redis import RedisDedupStore

BODY = {"agent": AGENT, "message": "Deployed v1.2.3"}
P = "webhook_sidecar_"


def key_header(key: str) -> dict[str, str]:
    return {"Idempotency-Key": key}


def duplicates(sc: Sidecar, route: str) -> float:
    return Scrape.of(sc.state.metrics.registry).value(P + "duplicates_total", route=route)


class ScriptedRuntime:
    """A runtime on a real Unix socket whose answers the test scripts: a status list
    (one per call, then 200), and an optional gate each call waits on."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.statuses: list[int] = []
        self.gate: asyncio.Event | None = None
        self.calls: list[dict[str, Any]] = []
        self.arrived = asyncio.Event()

    async def hook(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.calls.append({"body": body, "key": request.headers.get("Idempotency-Key")})
        self.arrived.set()
        if self.gate is not None:
            await self.gate.wait()
        status = self.statuses.pop(0) if self.statuses else 200
        if status != 200:
            return web.json_response({"ok": False, "error": "boom"}, status=status)
        return web.json_response({"ok": True, "runId": f"run-{uuid.uuid4().hex[:8]}"})


async def held_call(sc: Sidecar, scripted: ScriptedRuntime, key: str) -> asyncio.Future[Any]:
    """A keyed call the runtime holds (until ``scripted.gate`` is set): in flight."""
    scripted.gate = asyncio.Event()
    call = asyncio.ensure_future(sc.post("/hooks/agent", BODY, headers=key_header(key)))
    await asyncio.wait_for(scripted.arrived.wait(), 10)
    return call


@pytest.fixture
async def scripted(short_tmp: Path) -> AsyncIterator[ScriptedRuntime]:
    rt = ScriptedRuntime(short_tmp / "scripted.sock")
    runner = await serve_unix(rt.path, rt.hook)
    yield rt
    await runner.cleanup()


# ---------------------------------------------------------------- memory backend


async def test_same_key_twice_is_forwarded_once_and_answered_duplicate(
    make_sidecar: Any, runtime: Runtime
) -> None:
    sc: Sidecar = await make_sidecar(base_doc(runtime.path))
    assert isinstance(sc.state.dedup_store, MemoryDedupStore)
    first = await sc.post("/hooks/agent", BODY, headers=key_header("deploy-42"))
    assert first[0] == 200 and "duplicate" not in first[2]
    status, _, body = await sc.post("/hooks/agent", BODY, headers=key_header("deploy-42"))
    assert status == 200
    assert body == {"status": "ok", "duplicate": True, "requestId": body["requestId"]}
    assert len(runtime.calls) == 1
    assert runtime.calls[0]["idempotencyKey"] == "deploy-42"  # the client's own key upstream
    audit = sc.audit.entries()
    assert [a["outcome"] for a in audit] == ["forwarded", "duplicate"]
    assert audit[1]["duplicate"] is True and audit[1]["status"] == 200
    assert "duplicate" not in audit[0]
    assert duplicates(sc, "agent") == 1 and duplicates(sc, "wake") == 0


async def test_calls_without_a_key_are_never_deduplicated(
    make_sidecar: Any, runtime: Runtime
) -> None:
    sc: Sidecar = await make_sidecar(base_doc(runtime.path))
    for _ in range(3):
        assert (await sc.post("/hooks/agent", BODY))[0] == 200
    assert len(runtime.calls) == 3
    assert len(sc.state.dedup_store) == 0  # type: ignore[arg-type]


async def test_a_concurrent_duplicate_is_409_with_retry_after_1(
    make_sidecar: Any, scripted: ScriptedRuntime
) -> None:
    sc: Sidecar = await make_sidecar(base_doc(scripted.path))
    first = await held_call(sc, scripted, "k")  # the first is being forwarded
    status, headers, body = await sc.post("/hooks/agent", BODY, headers=key_header("k"))
    assert (status, body["error"]) == (409, "duplicate_in_flight")
    assert headers["Retry-After"] == "1"
    assert scripted.gate is not None
    scripted.gate.set()
    assert (await first)[0] == 200
    status, _, body = await sc.post("/hooks/agent", BODY, headers=key_header("k"))
    assert status == 200 and body["duplicate"] is True
    assert len(scripted.calls) == 1
    assert duplicates(sc, "agent") == 2  # the in-flight one and the done one
    scrape = Scrape.of(sc.state.metrics.registry)
    assert scrape.value(P + "rejections_total", reason="duplicate_in_flight") == 1
    assert scrape.value(P + "requests_total", endpoint="agent", code="409") == 1


async def test_an_upstream_failure_is_forgotten_so_the_retry_goes_through(
    make_sidecar: Any, scripted: ScriptedRuntime
) -> None:
    sc: Sidecar = await make_sidecar(base_doc(scripted.path))
    scripted.statuses = [500]
    status, _, body = await sc.post("/hooks/agent", BODY, headers=key_header("retry-me"))
    assert (status, body["error"]) == (502, "upstream_error")
    status, _, body = await sc.post("/hooks/agent", BODY, headers=key_header("retry-me"))
    assert status == 200 and "duplicate" not in body  # forwarded again
    assert len(scripted.calls) == 2
    status, _, body = await sc.post("/hooks/agent", BODY, headers=key_header("retry-me"))
    assert status == 200 and body["duplicate"] is True  # now it is remembered
    assert len(scripted.calls) == 2


async def test_a_call_cut_off_by_shutdown_forgets_its_key(
    make_sidecar: Any, scripted: ScriptedRuntime
) -> None:
    sc: Sidecar = await make_sidecar(base_doc(scripted.path))
    first = await held_call(sc, scripted, "cut")
    store = sc.state.dedup_store
    assert isinstance(store, MemoryDedupStore) and "hook:default:agent:cut" in store
    assert sc.state.cut_off() == 1  # what the drain deadline does
    with pytest.raises(aiohttp.ClientError):
        await first  # no answer: the connection is closed
    assert "hook:default:agent:cut" not in store
    assert scripted.gate is not None
    scripted.gate.set()
    status, _, body = await sc.post("/hooks/agent", BODY, headers=key_header("cut"))
    assert status == 200 and "duplicate" not in body  # the sender's retry goes through
    assert len(scripted.calls) == 2


async def test_keys_are_per_secret_id_and_per_endpoint(make_sidecar: Any, runtime: Runtime) -> None:
    doc = base_doc(runtime.path)
    del doc["webhooks"]["secret"]
    doc["webhooks"]["secrets"] = [
        {"id": "ci", "value": SECRET},
        {"id": "ops", "value": OTHER_SECRET},
    ]
    sc: Sidecar = await make_sidecar(doc)
    key = key_header("same-key")
    assert (await sc.post("/hooks/agent", BODY, headers=key))[2].get("duplicate") is None
    assert (await sc.post("/hooks/agent", BODY, token=OTHER_SECRET, headers=key))[0] == 200
    assert (await sc.post("/hooks/wake", {"agent": AGENT}, headers=key))[0] == 200
    assert len(runtime.calls) == 3  # three different calls, none answered for another
    assert [c["secretId"] for c in runtime.calls] == ["ci", "ops", "ci"]
    status, _, body = await sc.post("/hooks/agent", BODY, token=OTHER_SECRET, headers=key)
    assert status == 200 and body["duplicate"] is True
    assert len(runtime.calls) == 3


async def test_a_refusal_after_the_claim_forgets_the_key(
    make_sidecar: Any, runtime: Runtime
) -> None:
    """The claim comes before the agent's limit: a 429 there must release it."""
    doc = base_doc(runtime.path)
    doc["webhooks"]["agents"][AGENT]["rateLimit"] = {"requests": 1, "per": "1h"}
    sc: Sidecar = await make_sidecar(doc)
    assert (await sc.post("/hooks/agent", BODY, headers=key_header("a")))[0] == 200
    status, _, body = await sc.post("/hooks/agent", BODY, headers=key_header("b"))
    assert (status, body["error"]) == (429, "rate_limited")
    # A duplicate of the done delivery is answered without touching the agent's budget.
    status, _, body = await sc.post("/hooks/agent", BODY, headers=key_header("a"))
    assert status == 200 and body["duplicate"] is True
    store = sc.state.dedup_store
    del doc["webhooks"]["agents"][AGENT]["rateLimit"]
    sc.state.apply(config.loads(json.dumps(doc)))
    assert sc.state.dedup_store is store  # same backend: the ids survive a reload
    status, _, body = await sc.post("/hooks/agent", BODY, headers=key_header("b"))
    assert status == 200 and "duplicate" not in body  # "b" was forgotten: forwarded now
    assert len(runtime.calls) == 2


async def test_the_memory_bound_evicts_the_oldest_first(
    make_sidecar: Any, runtime: Runtime
) -> None:
    sc: Sidecar = await make_sidecar(base_doc(runtime.path, dedup={"maxEntries": 2}))
    for key in ("a", "b", "c"):  # "c" pushes "a" out
        assert (await sc.post("/hooks/wake", {"agent": AGENT}, headers=key_header(key)))[0] == 200
    dup = await sc.post("/hooks/wake", {"agent": AGENT}, headers=key_header("c"))
    assert dup[2]["duplicate"] is True
    again = await sc.post("/hooks/wake", {"agent": AGENT}, headers=key_header("a"))
    assert "duplicate" not in again[2]  # forgotten: forwarded a second time
    assert len(runtime.calls) == 4


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("dedup", "message"),
    [
        ({"backend": "sqlite"}, "sidecar.dedup.backend: 'sqlite' needs sidecar.spool"),
        ({"backend": "disk"}, "sidecar.dedup.backend: must be 'memory', 'sqlite' or a redis://"),
        ({"backend": "redis://h/99"}, "sidecar.dedup.backend: must be 'memory', 'sqlite' or"),
        ({"maxEntries": 0}, "sidecar.dedup.maxEntries: must be between 1 and"),
        ({"maxEntries": "10"}, "sidecar.dedup.maxEntries: must be a whole number"),
        ({"ttl": "1h"}, "sidecar.dedup"),
    ],
)
def test_bad_dedup_config_names_the_key(short_tmp: Path, dedup: Any, message: str) -> None:
    doc = base_doc(short_tmp / "rt.sock", dedup=dedup)
    with pytest.raises(config.ConfigError) as caught:
        config.load(write_config(short_tmp, doc))
    assert message in str(caught.value)


def test_dedup_config_defaults_and_values(short_tmp: Path) -> None:
    plain = config.load(write_config(short_tmp, base_doc(short_tmp / "rt.sock")))
    assert (plain.sidecar.dedup.backend, plain.sidecar.dedup.max_entries) == ("memory", 100_000)
    doc = base_doc(short_tmp / "rt.sock", dedup={"backend": "redis://r:6380/2", "maxEntries": 9})
    loaded = config.load(write_config(short_tmp, doc)).sidecar.dedup
    assert (loaded.backend, loaded.max_entries) == ("redis://r:6380/2", 9)


# ---------------------------------------------------------------- Redis backend


async def test_redis_down_is_503_dedup_unavailable_and_nothing_is_forwarded(
    make_sidecar: Any, runtime: Runtime, redis_server: RedisServer
) -> None:
    sc: Sidecar = await make_sidecar(base_doc(runtime.path, dedup={"backend": redis_server.url}))
    assert isinstance(sc.state.dedup_store, RedisDedupStore)
    assert (await sc.post("/hooks/agent", BODY, headers=key_header("up")))[0] == 200
    redis_server.stop()
    for key in ("down-1", "down-2", "up"):
        status, headers, body = await sc.post("/hooks/agent", BODY, headers=key_header(key))
        assert (status, body["error"]) == (503, "dedup_unavailable")
        assert headers["Retry-After"] == "5"
    assert len(runtime.calls) == 1
    assert (await sc.post("/hooks/agent", BODY))[0] == 200  # calls without a key still pass
    assert len(runtime.calls) == 2
    await sc.client.close()  # the app's cleanup closes the store
    assert sc.state.dedup_store is None


async def test_reload_to_another_backend_retires_the_old_store(
    make_sidecar: Any, runtime: Runtime, redis_server: RedisServer
) -> None:
    doc = base_doc(runtime.path)
    sc: Sidecar = await make_sidecar(doc)
    memory = sc.state.dedup_store
    doc["sidecar"]["dedup"] = {"backend": redis_server.url}
    sc.state.apply(config.loads(json.dumps(doc)))
    assert isinstance(sc.state.dedup_store, RedisDedupStore)
    assert sc.state.retired_dedup_stores == [memory]
    assert (await sc.post("/hooks/agent", BODY, headers=key_header("r")))[0] == 200
    assert redis_server.command("EXISTS", "webhook-sidecar:dedup:hook:default:agent:r") == b":1\r\n"
    await sc.client.close()
    assert sc.state.dedup_store is None and sc.state.retired_dedup_stores == []


@pytest.mark.slow
async def test_two_sidecar_processes_sharing_redis_forward_a_delivery_once(
    runtime: Runtime, short_tmp: Path, sidecar_process: Any, redis_server: RedisServer
) -> None:
    ports = []
    for name in ("a", "b"):
        port, admin = free_port(), free_port()
        doc = base_doc(runtime.path, dedup={"backend": redis_server.url})
        doc["sidecar"].update(listen=f"127.0.0.1:{port}", admin={"listen": f"127.0.0.1:{admin}"})
        folder = short_tmp / name
        folder.mkdir()
        sidecar_process(write_config(folder, doc), admin)
        ports.append(port)

    async def send(port: int, key: str) -> tuple[int, Any, Any]:
        return await post(f"http://127.0.0.1:{port}/hooks/agent", BODY, headers=key_header(key))

    for i in range(5):  # the same delivery to both replicas at once, five times over
        key = f"delivery-{i}"
        results = await asyncio.gather(send(ports[0], key), send(ports[1], key))
        forwarded = [r for r in results if r[0] == 200 and "duplicate" not in r[2]]
        assert len(forwarded) == 1, results
        for status, _, body in results:
            assert (status, body.get("error")) in {(200, None), (409, "duplicate_in_flight")}
        for port in ports:  # afterwards each replica knows it is done
            status, _, body = await send(port, key)
            assert status == 200 and body["duplicate"] is True
    assert len(runtime.calls) == 5
    assert sorted(c["idempotencyKey"] for c in runtime.calls) == [f"delivery-{i}" for i in range(5)]
