"""Process lifecycle (docs/lifecycle.md) on real processes: SIGTERM drains calls in flight while
/readyz answers 503 and new connections are refused; the drain deadline and a second
SIGTERM cut calls off (audited); SIGHUP reloads are counted and apply the log format."""

from __future__ import annotations

import asyncio
import http.client
import json
import signal
import socket
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from support.clients import post, until
from support.common import SidecarProcess, base_doc, free_port, write_config
from support.scrape import Scrape

pytestmark = pytest.mark.slow


class SlowRuntime:
    """A tiny runtime on a Unix socket that holds every call for ``hold`` seconds."""

    def __init__(self, path: Path, hold: float) -> None:
        self.path = path
        self.hold = hold
        self.arrived = asyncio.Event()
        self.runner: web.AppRunner | None = None

    async def hook(self, request: web.Request) -> web.Response:
        await request.read()
        self.arrived.set()
        await asyncio.sleep(self.hold)
        return web.json_response({"ok": True, "runId": "slow-run"})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hooks/{hook}", self.hook)
        self.runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self.runner.setup()
        await web.UnixSite(self.runner, str(self.path)).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def slow_runtime(
    short_tmp: Path, request: pytest.FixtureRequest
) -> AsyncIterator[SlowRuntime]:
    rt = SlowRuntime(short_tmp / "slow.sock", getattr(request, "param", 3.0))
    await rt.start()
    yield rt
    await rt.stop()


class Ports:
    def __init__(self) -> None:
        self.public, self.admin = free_port(), free_port()


def start(
    sidecar_process: Any, folder: Path, socket_path: Path, **sidecar: Any
) -> tuple[SidecarProcess, Ports]:
    ports = Ports()
    doc = base_doc(
        socket_path, listen=f"127.0.0.1:{ports.public}",
        admin={"listen": f"127.0.0.1:{ports.admin}"}, **sidecar,
    )  # fmt: skip
    return sidecar_process(write_config(folder, doc), ports.admin), ports


def wake_url(ports: Ports) -> str:
    return f"http://127.0.0.1:{ports.public}/hooks/wake"


async def get(port: int, path: str) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}{path}") as r,
    ):
        return r.status, await r.text()


async def readyz(admin: int) -> tuple[int, Any]:
    status, text = await get(admin, "/readyz")
    return status, json.loads(text)


async def metrics(admin: int) -> Scrape:
    return Scrape((await get(admin, "/metrics"))[1])


async def ready_is(ports: Ports, status: int) -> bool:
    return (await readyz(ports.admin))[0] == status


def refuses_connections(port: int, within: float = 3.0) -> bool:
    """True once connecting to ``port`` is refused (polls: the signal is asynchronous)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except ConnectionRefusedError:
            return True
        time.sleep(0.02)
    return False


def audit_lines(proc: SidecarProcess) -> list[dict[str, Any]]:
    return [e for e in proc.json_lines() if "outcome" in e]


async def call_in_flight(ports: Ports, runtime: SlowRuntime) -> asyncio.Future[Any]:
    """Start a wake call and return once the runtime holds it."""
    call = asyncio.ensure_future(post(wake_url(ports)))
    await asyncio.wait_for(runtime.arrived.wait(), 10)
    return call


async def assert_no_reply(call: asyncio.Future[Any]) -> None:
    """The call was cut off: its connection closed without a reply."""
    with pytest.raises(aiohttp.ClientError):
        await call


# ---------------------------------------------------------------- the graceful drain


async def test_sigterm_lets_a_slow_call_finish_while_refusing_new_work(
    short_tmp: Path, sidecar_process: Any, slow_runtime: SlowRuntime
) -> None:
    proc, ports = start(sidecar_process, short_tmp, slow_runtime.path)
    # An idle keep-alive client: it must be told to go away (closed), not kept waiting.
    idle = http.client.HTTPConnection("127.0.0.1", ports.public, timeout=10)
    idle.request("POST", "/nope", body=b"{}", headers={"Content-Type": "application/json"})
    reply = idle.getresponse()
    assert reply.status == 404 and reply.read()

    slow_call = await call_in_flight(ports, slow_runtime)
    sent_at = time.monotonic()
    proc.signal(signal.SIGTERM)

    # The admin listener stays up through the drain and reports it at once.
    await until(lambda: ready_is(ports, 503), timeout=2)
    draining = await readyz(ports.admin)
    assert draining == (503, {"status": "unavailable", "reason": "shutting down"})
    assert await asyncio.to_thread(refuses_connections, ports.public)
    assert idle.sock is not None
    idle.sock.settimeout(5)
    assert await asyncio.to_thread(idle.sock.recv, 1) == b""  # closed by the server
    idle.close()
    assert not slow_call.done() and proc.proc is not None and proc.proc.poll() is None

    status, _, body = await slow_call
    assert (status, body["status"], body["runId"]) == (200, "ok", "slow-run")
    assert await asyncio.to_thread(proc.wait) == 0
    assert time.monotonic() - sent_at < 10
    [entry] = [e for e in audit_lines(proc) if e["endpoint"] == "wake"]
    assert (entry["status"], entry["outcome"]) == (200, "forwarded")
    messages = [e.get("msg") for e in proc.json_lines()]
    assert "shutdown requested: draining" in messages and messages[-1] == "stopped"
    assert not any("cut off" in str(m) for m in messages)


@pytest.mark.parametrize("slow_runtime", [60.0], indirect=True)
async def test_the_drain_deadline_cuts_off_the_call_and_still_exits_0(
    short_tmp: Path, sidecar_process: Any, slow_runtime: SlowRuntime
) -> None:
    proc, ports = start(sidecar_process, short_tmp, slow_runtime.path, shutdownTimeout="1s")
    slow_call = await call_in_flight(ports, slow_runtime)
    sent_at = time.monotonic()
    proc.signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait) == 0
    assert 0.9 <= time.monotonic() - sent_at < 8  # the deadline, not aiohttp's doubled one
    await assert_no_reply(slow_call)
    [entry] = audit_lines(proc)
    assert (entry["status"], entry["error"], entry["outcome"]) == (
        504,
        "upstream_timeout",
        "upstream_failed",
    )
    warnings = [e for e in proc.json_lines() if e.get("level") == "warning"]
    assert any(
        e["msg"] == "drain deadline passed: cut off 1 call(s) still in flight" for e in warnings
    )


@pytest.mark.parametrize("slow_runtime", [60.0], indirect=True)
async def test_a_second_sigterm_exits_promptly_with_1(
    short_tmp: Path, sidecar_process: Any, slow_runtime: SlowRuntime
) -> None:
    proc, ports = start(sidecar_process, short_tmp, slow_runtime.path, shutdownTimeout="60s")
    slow_call = await call_in_flight(ports, slow_runtime)
    proc.signal(signal.SIGTERM)
    await until(lambda: ready_is(ports, 503), timeout=2)
    sent_at = time.monotonic()
    proc.signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait) == 1
    assert time.monotonic() - sent_at < 6
    await assert_no_reply(slow_call)
    [entry] = audit_lines(proc)
    assert (entry["status"], entry["error"]) == (504, "upstream_timeout")
    assert any("hurried by a second signal" in str(e.get("msg")) for e in proc.json_lines())


async def test_sigterm_when_idle_exits_0_at_once(
    short_tmp: Path, sidecar_process: Any, slow_runtime: SlowRuntime
) -> None:
    proc, _ = start(sidecar_process, short_tmp, slow_runtime.path)
    sent_at = time.monotonic()
    proc.signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait) == 0
    assert time.monotonic() - sent_at < 3


# ---------------------------------------------------------------- reload


async def reloads_are(ports: Ports, **counts: int) -> bool:
    scrape = await metrics(ports.admin)
    name = "webhook_sidecar_config_reloads_total"
    return all(scrape.value(name, result=r) == n for r, n in counts.items())


@pytest.mark.parametrize("slow_runtime", [0.0], indirect=True)
async def test_sighup_reloads_are_counted_and_switch_the_log_format(
    short_tmp: Path, sidecar_process: Any, slow_runtime: SlowRuntime
) -> None:
    proc, ports = start(sidecar_process, short_tmp, slow_runtime.path)
    path = proc.config_path
    doc = json.loads(path.read_text())

    doc["sidecar"]["log"] = {"level": "info", "format": "text"}
    path.write_text(json.dumps(doc))
    proc.signal(signal.SIGHUP)
    await until(lambda: reloads_are(ports, success=1))
    assert (await post(wake_url(ports)))[0] == 200
    await until(lambda: any(line.startswith("audit ") for line in proc.lines))
    [line] = [line for line in proc.lines if line.startswith("audit ")]
    assert "endpoint=wake" in line and "status=200" in line

    doc["sidecar"]["shutdownTimeout"] = "soon"
    path.write_text(json.dumps(doc))
    proc.signal(signal.SIGHUP)
    await until(lambda: reloads_are(ports, success=1, error=1))
    assert (await post(wake_url(ports)))[0] == 200  # the running config stays
    await until(
        lambda: any("shutdownTimeout" in line and "reload refused" in line for line in proc.lines)
    )


# ---------------------------------------------------------------- every secret expired


@pytest.mark.parametrize("slow_runtime", [0.0], indirect=True)
async def test_when_the_last_secret_expires_readyz_fails_and_an_error_is_logged(
    short_tmp: Path, sidecar_process: Any, slow_runtime: SlowRuntime
) -> None:
    ports = Ports()
    expires = time.time() + 2.5
    doc = base_doc(
        slow_runtime.path,
        listen=f"127.0.0.1:{ports.public}",
        admin={"listen": f"127.0.0.1:{ports.admin}"},
    )
    del doc["webhooks"]["secret"]
    doc["webhooks"]["secrets"] = [{
        "id": "only", "env": "TEST_WEBHOOK_SECRET",
        "notAfter": datetime.fromtimestamp(expires, UTC).isoformat().replace("+00:00", "Z"),
    }]  # fmt: skip
    proc = sidecar_process(write_config(short_tmp, doc), ports.admin)
    assert (await readyz(ports.admin))[0] == 200
    assert (await post(wake_url(ports)))[0] == 200
    scrape = await metrics(ports.admin)
    assert scrape.value(
        "webhook_sidecar_secret_not_after_timestamp_seconds", secret="only"
    ) == pytest.approx(expires)
    await until(
        lambda: any("no configured secret is valid now" in line for line in proc.lines), timeout=10
    )
    assert await readyz(ports.admin) == (
        503, {"status": "unavailable", "reason": "no configured secret is valid now"},
    )  # fmt: skip
    assert (await post(wake_url(ports)))[0] == 401
    [error] = [e for e in proc.json_lines() if "no configured secret" in str(e.get("msg"))]
    assert error["level"] == "error" and error["secrets"] == ["only"]
    assert time.time() - expires < 8
