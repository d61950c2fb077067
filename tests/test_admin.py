"""The admin listener (docs/admin.md): /metrics, /healthz, /readyz over real sockets, the cached
upstream probe, the expired-secrets error, and the real process's /metrics after mixed traffic."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support.clients import post
from support.common import (
    AGENT,
    OTHER_SECRET,
    SECRET,
    Runtime,
    Sidecar,
    base_doc,
    free_port,
    write_config,
)
from support.scrape import Scrape

from sidecar.admin import NO_VALID_SECRET, create_admin_app
from sidecar.app import State
from sidecar.logs import AuditLog
from sidecar.metrics import Metrics

P = "webhook_sidecar_"


async def admin_client(aiohttp_client: Any, sc: Sidecar, **kwargs: float) -> Any:
    return await aiohttp_client(create_admin_app(sc.state, **kwargs))


async def get_json(client: Any, path: str) -> tuple[int, Any]:
    async with client.get(path) as resp:
        return resp.status, await resp.json()


class CountingSocket:
    """A raw asyncio Unix server that only counts the connections it accepts."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.accepted = 0
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.accepted += 1
            writer.close()

        self.server = await asyncio.start_unix_server(accept, str(self.path))

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


@pytest.fixture
async def counting(short_tmp: Path) -> AsyncIterator[CountingSocket]:
    sock = CountingSocket(short_tmp / "count.sock")
    await sock.start()
    yield sock
    await sock.stop()


# ---------------------------------------------------------------- endpoints


async def test_healthz_readyz_and_metrics(aiohttp_client: Any, sidecar: Sidecar) -> None:
    admin = await admin_client(aiohttp_client, sidecar)
    assert await get_json(admin, "/healthz") == (200, {"status": "ok"})
    assert await get_json(admin, "/readyz") == (200, {"status": "ok"})
    async with admin.get("/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        scrape = Scrape(await resp.text())
    assert P + "requests" in scrape.families
    openmetrics = {
        "Accept": "application/openmetrics-text; version=1.0.0",
        "Accept-Encoding": "gzip",
    }
    async with admin.get("/metrics", headers=openmetrics, auto_decompress=False) as resp:
        assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
        assert resp.headers["Content-Encoding"] == "gzip"


async def test_admin_requests_are_not_counted(aiohttp_client: Any, sidecar: Sidecar) -> None:
    admin = await admin_client(aiohttp_client, sidecar)
    for path in ("/healthz", "/readyz", "/metrics", "/hooks/agent", "/nope"):
        async with admin.get(path):
            pass
    async with admin.get("/metrics") as resp:
        scrape = Scrape(await resp.text())
    assert sum(scrape.series(P + "requests_total").values()) == 0
    assert scrape.value(P + "request_duration_seconds_count", endpoint="other") == 0


async def test_hooks_are_not_on_the_admin_listener(
    aiohttp_client: Any, sidecar: Sidecar, runtime: Runtime
) -> None:
    admin = await admin_client(aiohttp_client, sidecar)
    async with admin.post(
        "/hooks/wake", json={"agent": AGENT}, headers={"Authorization": f"Bearer {SECRET}"}
    ) as resp:
        assert resp.status in (404, 405)
    assert runtime.calls == []


# ---------------------------------------------------------------- readiness


async def test_readyz_is_503_from_the_moment_shutdown_begins(
    aiohttp_client: Any, sidecar: Sidecar
) -> None:
    admin = await admin_client(aiohttp_client, sidecar)
    assert (await get_json(admin, "/readyz"))[0] == 200
    sidecar.state.draining = True
    assert await get_json(admin, "/readyz") == (
        503,
        {"status": "unavailable", "reason": "shutting down"},
    )
    assert (await get_json(admin, "/healthz"))[0] == 200  # alive, just not taking new work


async def test_readyz_is_503_before_a_config_is_applied(
    aiohttp_client: Any, sidecar: Sidecar
) -> None:
    bare = State(sidecar.state.settings, Metrics(), AuditLog(None))  # type: ignore[arg-type]
    admin = await aiohttp_client(create_admin_app(bare))
    assert await get_json(admin, "/readyz") == (
        503,
        {"status": "unavailable", "reason": "no config loaded"},
    )


async def test_readyz_follows_the_runtime_down_and_up(
    aiohttp_client: Any, make_sidecar: Any, short_tmp: Path
) -> None:
    sc = await make_sidecar(base_doc(short_tmp / "rt.sock"))
    admin = await admin_client(aiohttp_client, sc, probe_cache_seconds=0)
    status, body = await get_json(admin, "/readyz")
    assert status == 503 and body["reason"].startswith("upstream not accepting connections")
    rt = Runtime(short_tmp / "rt.sock")
    await rt.start()
    try:
        assert await get_json(admin, "/readyz") == (200, {"status": "ok"})
    finally:
        await rt.stop()
    assert (await get_json(admin, "/readyz"))[0] == 503


async def test_a_burst_of_probes_costs_one_upstream_connection(
    aiohttp_client: Any, make_sidecar: Any, counting: CountingSocket
) -> None:
    sc = await make_sidecar(base_doc(counting.path))
    admin = await admin_client(aiohttp_client, sc, probe_cache_seconds=30)
    results = await asyncio.gather(*(get_json(admin, "/readyz") for _ in range(50)))
    assert [status for status, _ in results] == [200] * 50
    assert 1 <= counting.accepted <= 2
    first = counting.accepted
    # Within the cache window, more probes (and scrapes) cost nothing.
    await asyncio.gather(*(get_json(admin, "/readyz") for _ in range(20)))
    assert counting.accepted == first


async def test_the_probe_is_repeated_once_the_cache_expires(
    aiohttp_client: Any, make_sidecar: Any, counting: CountingSocket
) -> None:
    sc = await make_sidecar(base_doc(counting.path))
    admin = await admin_client(aiohttp_client, sc, probe_cache_seconds=0.05)
    for _ in range(3):
        assert (await get_json(admin, "/readyz"))[0] == 200
        await asyncio.sleep(0.1)
    assert counting.accepted == 3


def expired_doc(socket_path: Path, not_after: float) -> dict[str, Any]:
    doc = base_doc(socket_path)
    del doc["webhooks"]["secret"]
    stamp = datetime.fromtimestamp(not_after, UTC).isoformat().replace("+00:00", "Z")
    doc["webhooks"]["secrets"] = [
        {"id": "a", "env": "TEST_WEBHOOK_SECRET", "notAfter": stamp},
        {"id": "b", "value": OTHER_SECRET, "notAfter": stamp},
    ]
    return doc


async def test_all_secrets_expired_is_503_and_an_error_logged_each_interval(
    aiohttp_client: Any, make_sidecar: Any, runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    now = time.time()
    # Loaded as of an hour ago, when both secrets were still valid; both expired a minute ago.
    sc = await make_sidecar(expired_doc(runtime.path, now - 60), now=now - 3600)
    caplog.set_level(logging.ERROR, logger="sidecar.admin")
    admin = await admin_client(aiohttp_client, sc, expiry_log_interval=0.1)
    assert await get_json(admin, "/readyz") == (
        503,
        {"status": "unavailable", "reason": NO_VALID_SECRET},
    )
    await asyncio.sleep(0.45)
    errors = [r for r in caplog.records if r.name == "sidecar.admin" and r.levelno == logging.ERROR]
    assert 3 <= len(errors) <= 7  # at start, then every 0.1 s
    assert errors[0].secrets == ["a", "b"]  # type: ignore[attr-defined]
    assert SECRET not in caplog.text and OTHER_SECRET not in caplog.text
    assert (await sc.post("/hooks/wake", {"agent": AGENT}))[0] == 401


async def test_no_expiry_error_while_a_secret_is_valid(
    aiohttp_client: Any, sidecar: Sidecar, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="sidecar.admin")
    await admin_client(aiohttp_client, sidecar, expiry_log_interval=0.05)
    await asyncio.sleep(0.2)
    assert [r for r in caplog.records if r.name == "sidecar.admin"] == []


async def test_the_expiry_error_comes_when_the_last_secret_expires_not_a_minute_later(
    aiohttp_client: Any, make_sidecar: Any, runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    sc = await make_sidecar(expired_doc(runtime.path, time.time() + 0.4))
    caplog.set_level(logging.ERROR, logger="sidecar.admin")
    admin = await admin_client(aiohttp_client, sc)  # the default one-minute interval
    assert (await get_json(admin, "/readyz"))[0] == 200
    deadline = time.monotonic() + 5
    while not caplog.records and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [NO_VALID_SECRET]
    assert (await get_json(admin, "/readyz"))[0] == 503


# ---------------------------------------------------------------- the real process, from outside


async def fetch(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return resp.status, await resp.text()


@pytest.mark.slow
async def test_real_process_metrics_after_mixed_traffic(
    runtime: Runtime, short_tmp: Path, sidecar_process: Any
) -> None:
    port, admin = free_port(), free_port()
    doc = base_doc(
        runtime.path, listen=f"127.0.0.1:{port}", admin={"listen": f"127.0.0.1:{admin}"},
        allowIps=["127.0.0.0/8"], trustedProxies=["127.0.0.1/32"],
    )  # fmt: skip
    del doc["webhooks"]["secret"]
    doc["webhooks"]["secrets"] = [
        {"id": "current", "env": "TEST_WEBHOOK_SECRET"},
        {"id": "previous", "value": OTHER_SECRET, "notAfter": "2099-01-01T00:00:00Z"},
    ]
    sidecar_process(write_config(short_tmp, doc), admin)
    url = f"http://127.0.0.1:{port}/hooks/agent"
    body = {"agent": AGENT, "message": "m"}
    statuses = [
        (await post(url, body))[0],
        (await post(url, body, token=OTHER_SECRET))[0],
        (await post(url, body, token="x" * 64))[0],
        (await post(url, body, token=None))[0],
        (await post(url, body, headers={"X-Forwarded-For": "198.51.100.7"}))[0],
    ]
    await runtime.stop()  # a dead runtime
    statuses.append((await post(url, body))[0])
    statuses.append((await fetch(f"http://127.0.0.1:{port}/metrics"))[0])  # not public
    assert statuses == [200, 200, 401, 401, 403, 503, 404]

    s = Scrape((await fetch(f"http://127.0.0.1:{admin}/metrics"))[1])
    req = P + "requests_total"
    assert {k: v for k, v in s.series(req).items() if v} == {
        frozenset({("endpoint", "agent"), ("code", "200")}): 2,
        frozenset({("endpoint", "agent"), ("code", "401")}): 2,
        frozenset({("endpoint", "agent"), ("code", "403")}): 1,
        frozenset({("endpoint", "agent"), ("code", "503")}): 1,
        frozenset({("endpoint", "other"), ("code", "404")}): 1,
    }
    rej = P + "rejections_total"
    assert {dict(k)["reason"]: v for k, v in s.series(rej).items() if v} == {
        "unauthorized": 2, "ip_not_allowed": 1, "upstream_unavailable": 1, "not_found": 1,
    }  # fmt: skip
    assert s.value(P + "auth_success_total", secret="current") == 2
    assert s.value(P + "auth_success_total", secret="previous") == 1
    assert s.value(P + "request_duration_seconds_count", endpoint="agent") == 6
    assert s.value(P + "upstream_duration_seconds_count", endpoint="agent") == 3
    assert (
        s.value(P + "secret_not_after_timestamp_seconds", secret="previous")
        == datetime(2099, 1, 1, tzinfo=UTC).timestamp()
    )
    assert s.series(P + "tls_cert_not_after_timestamp_seconds") == {}  # no TLS configured
    assert s.value(P + "config_reloads_total", result="success") == 0
    assert s.value(P + "in_flight_requests") == 0
    assert "process_resident_memory_bytes" in s.families


# ---------------------------------------------------------------- POST /admin/unlock


async def unlock(client: Any, body: Any) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with client.post("/admin/unlock", data=data) as resp:
        return resp.status, await resp.json()


@pytest.fixture
async def locking(make_sidecar: Any, runtime: Runtime) -> Sidecar:
    """A sidecar that locks an address after 3 failures, for 5 minutes."""
    doc = base_doc(runtime.path, authLockout={"maxFailures": 3, "duration": "5m"})
    sc: Sidecar = await make_sidecar(doc)
    return sc


async def wake_status(sc: Sidecar, token: str | None = SECRET) -> int:
    return (await post(str(sc.client.make_url("/hooks/wake")), token=token))[0]


async def test_unlock_releases_a_lock_logged_and_counted_once(
    aiohttp_client: Any, locking: Sidecar, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    admin = await admin_client(aiohttp_client, locking)
    for _ in range(3):
        assert await wake_status(locking, "wrong") == 401
    assert await wake_status(locking) == 429
    [locked] = [r for r in caplog.records if r.name == "sidecar.lockout"]
    assert locked.levelno == logging.WARNING and locked.address == "127.0.0.1"  # type: ignore[attr-defined]
    assert await wake_status(locking, "wrong") == 429  # refused again: not logged again
    assert len([r for r in caplog.records if r.name == "sidecar.lockout"]) == 1

    assert await unlock(admin, {"address": "127.0.0.1"}) == (
        200,
        {"status": "ok", "unlocked": True},
    )
    assert await wake_status(locking) == 200
    assert await unlock(admin, {"address": "127.0.0.1"}) == (
        200,
        {"status": "ok", "unlocked": False},
    )
    logged = [r for r in caplog.records if r.name == "sidecar.admin"]
    assert [(r.levelno, r.getMessage()) for r in logged] == [
        (logging.WARNING, "unlock 127.0.0.1: lock and failure count released"),
        (logging.WARNING, "unlock 127.0.0.1: it was not locked"),
    ]
    scrape = Scrape.of(locking.state.metrics.registry)
    assert scrape.value(P + "unlocks_total") == 2


async def test_unlock_forgets_the_failure_count_too(aiohttp_client: Any, locking: Sidecar) -> None:
    admin = await admin_client(aiohttp_client, locking)
    for _ in range(2):
        assert await wake_status(locking, "wrong") == 401
    assert await unlock(admin, {"address": "127.0.0.1"}) == (
        200,
        {"status": "ok", "unlocked": False},
    )
    assert await wake_status(locking, "wrong") == 401  # the first of three again, not the third
    assert await wake_status(locking) == 200


async def test_unlock_takes_the_ipv4_mapped_spelling(aiohttp_client: Any, locking: Sidecar) -> None:
    admin = await admin_client(aiohttp_client, locking)
    for _ in range(3):
        await wake_status(locking, "wrong")
    assert await unlock(admin, {"address": "::ffff:127.0.0.1"}) == (
        200, {"status": "ok", "unlocked": True},
    )  # fmt: skip
    assert await wake_status(locking) == 200


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"not json", "the body must be JSON"),
        ([], "address: required"),
        ({"addr": "127.0.0.1"}, "address: required"),
        ({"address": 5}, "address: required, a string"),
        ({"address": "localhost"}, "address: 'localhost' is not an IP address"),
        ({"address": "10.0.0.0/8"}, "address: '10.0.0.0/8' is not an IP address"),
        ({"address": "x" * 500}, "address: '(not shown)' is not an IP address"),
    ],
)
async def test_a_bad_unlock_is_400_naming_the_field(
    aiohttp_client: Any, locking: Sidecar, body: Any, says: str
) -> None:
    admin = await admin_client(aiohttp_client, locking)
    status, answer = await unlock(admin, body)
    assert (status, answer["status"], answer["error"]) == (400, "error", "invalid_request")
    assert answer["message"].startswith(says), answer
    assert Scrape.of(locking.state.metrics.registry).value(P + "unlocks_total") == 0


async def test_unlock_is_not_on_the_public_port(locking: Sidecar) -> None:
    for _ in range(3):
        await wake_status(locking, "wrong")
    url = str(locking.client.make_url("/admin/unlock"))
    status, _, body = await post(url, body={"address": "127.0.0.1"})
    assert status in (404, 429) and body["error"] in ("not_found", "locked_out")
    assert await wake_status(locking) == 429  # still locked
