"""``sidecar.workers``: real ``webhook-sidecar run`` supervisors with two worker processes
on one loopback port, in front of a runtime that records which process called it (the
peer's PID from SO_PEERCRED on its Unix socket)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import ssl
import struct
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import generate_latest
from support.clients import post, until
from support.common import (
    AGENT,
    SECRET,
    SidecarProcess,
    base_doc,
    free_port,
    serve_unix,
    terminate,
    write_config,
)
from support.load import run_load
from support.redis_server import RedisServer, running_redis_server
from support.scrape import Scrape

from sidecar.certs import write_demo_pki
from sidecar.metrics import Metrics
from sidecar.process import workers

BODY = {"agent": AGENT, "message": "hello"}
OK_AGENT = ("webhook_sidecar_requests_total", {"endpoint": "agent", "code": "200"})


class PidRuntime:
    """A runtime on a Unix socket that records the PID of the process behind each call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.pids: list[int] = []
        self.delay = 0.0
        self.started = 0
        self.release = asyncio.Event()  # ends every delay at once (teardown)
        self.runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        sock = request.transport.get_extra_info("socket") if request.transport else None
        assert sock is not None
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        self.pids.append(struct.unpack("3i", creds)[0])
        await request.read()
        self.started += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.release.wait(), self.delay)
        return web.json_response({"runId": "r"})


@pytest.fixture
async def pid_runtime(short_tmp: Path) -> AsyncIterator[PidRuntime]:
    rt = PidRuntime(short_tmp / "rt.sock")
    rt.runner = await serve_unix(rt.path, rt.handle)
    yield rt
    rt.release.set()
    await rt.runner.cleanup()


def doc_for(runtime_path: Path, **sidecar: Any) -> dict[str, Any]:
    return base_doc(
        runtime_path,
        listen=f"127.0.0.1:{free_port()}",
        admin={"listen": f"127.0.0.1:{free_port()}"},
        workers=2,
        shutdownTimeout="10s",
        **sidecar,
    )


def port_of(doc: dict[str, Any], key: str = "listen") -> int:
    value = doc["sidecar"]["admin"]["listen"] if key == "admin" else doc["sidecar"]["listen"]
    return int(value.rsplit(":", 1)[1])


def url(doc: dict[str, Any], scheme: str = "http") -> str:
    return f"{scheme}://127.0.0.1:{port_of(doc)}/hooks/agent"


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def ready(doc: dict[str, Any]) -> None:
    admin = port_of(doc, "admin")

    async def is_ready() -> bool:
        try:
            return (await asyncio.to_thread(get, admin, "/readyz"))[0] == 200
        except OSError:  # the supervisor is not listening yet
            return False

    await until(is_ready, timeout=30)


async def scrape(doc: dict[str, Any]) -> Scrape:
    status, text = await asyncio.to_thread(get, port_of(doc, "admin"), "/metrics")
    assert status == 200
    return Scrape(text)


def started(proc: SidecarProcess) -> dict[int, int]:
    """Worker index -> PID of its latest start, from the supervisor's log."""
    out: dict[int, int] = {}
    for line in proc.json_lines():
        if line.get("msg") == "worker started":
            out[line["worker"]] = line["workerPid"]
    return out


async def start(sidecar_process: Any, folder: Path, doc: dict[str, Any]) -> SidecarProcess:
    proc: SidecarProcess = await asyncio.to_thread(
        sidecar_process, write_config(folder, doc), port_of(doc, "admin")
    )
    await ready(doc)
    return proc


async def worker_scrape(pid: int) -> Scrape:
    """One worker's own metrics, from its private admin socket (named on its command line)."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    name = argv[argv.index(b"--admin-socket") + 1].decode()
    connector = aiohttp.UnixConnector(path="\0" + name)
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get("http://worker/metrics") as resp,
    ):
        return Scrape(await resp.text())


Launch = Callable[..., Awaitable[tuple[dict[str, Any], SidecarProcess]]]


@pytest.fixture
def launch(pid_runtime: PidRuntime, short_tmp: Path, sidecar_process: Any) -> Launch:
    """Start a supervisor with two workers in front of ``pid_runtime``, once it is ready:
    (its config document, the process)."""

    async def go(**sidecar: Any) -> tuple[dict[str, Any], SidecarProcess]:
        doc = doc_for(pid_runtime.path, **sidecar)
        return doc, await start(sidecar_process, short_tmp, doc)

    return go


async def spread(doc: dict[str, Any], n: int, **kwargs: Any) -> list[int]:
    """``n`` calls, each on a fresh connection (the kernel picks a worker per connection)."""
    results = await asyncio.gather(*(post(url(doc, **kwargs), BODY) for _ in range(n)))
    return [status for status, _, _ in results]


# ---------------------------------------------------------------- serving


async def test_connections_are_spread_over_the_workers_and_metrics_add_up(
    pid_runtime: PidRuntime, launch: Launch
) -> None:
    doc, proc = await launch()
    pids = started(proc)
    assert len(pids) == 2 and proc.proc is not None and proc.proc.pid not in pids.values()
    statuses = await spread(doc, 40)
    assert statuses == [200] * 40
    # 40 connections hashed over two sockets: both got some (all on one: p = 2^-39).
    assert set(pid_runtime.pids) == set(pids.values())
    # One scrape of the supervisor counts every worker's traffic.
    m = await scrape(doc)
    assert m.value(OK_AGENT[0], **OK_AGENT[1]) == 40
    assert m.value("webhook_sidecar_auth_success_total", secret="default") == 40
    assert m.value("webhook_sidecar_request_duration_seconds_count", endpoint="agent") == 40
    assert m.value("webhook_sidecar_request_duration_seconds_bucket", endpoint="agent",
                   le="+Inf") == 40  # fmt: skip
    assert m.value("webhook_sidecar_in_flight_requests") == 0
    assert m.value("webhook_sidecar_workers") == 2
    assert m.value("webhook_sidecar_worker_restarts_total") == 0
    assert m.value("webhook_sidecar_config_reloads_total", result="success") == 0
    # The same negotiation as a single process: OpenMetrics when asked for.
    request = urllib.request.Request(
        f"http://127.0.0.1:{port_of(doc, 'admin')}/metrics",
        headers={"Accept": "application/openmetrics-text; version=1.0.0"},
    )
    with await asyncio.to_thread(urllib.request.urlopen, request, timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
        text = resp.read().decode()
    assert text.endswith("# EOF\n")
    assert 'webhook_sidecar_requests_total{code="200",endpoint="agent"} 40.0' in text
    # Worker log lines say which worker wrote them; audit lines keep the docs/audit-log.md keys.
    lines = proc.json_lines()
    assert {line["worker"] for line in lines if line.get("msg") == "listening"} == {0, 1}
    audit = [line for line in lines if "requestId" in line]
    assert len(audit) == 40 and all("worker" not in line for line in audit)


async def test_tls_is_served_by_every_worker(
    pid_runtime: PidRuntime, short_tmp: Path, launch: Launch
) -> None:
    pki = short_tmp / "pki"
    write_demo_pki(pki, ["127.0.0.1"])
    doc, _ = await launch(
        tls={"certFile": str(pki / "server.pem"), "keyFile": str(pki / "server-key.pem")}
    )
    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    results = await asyncio.gather(
        *(post(url(doc, "https"), BODY, ssl_context=ctx) for _ in range(20))
    )
    assert [status for status, _, _ in results] == [200] * 20
    assert len(set(pid_runtime.pids)) == 2


# ---------------------------------------------------------------- signals


async def in_flight(
    rt: PidRuntime, doc: dict[str, Any], n: int, delay: float
) -> list[asyncio.Future[tuple[int, Any, Any]]]:
    """``n`` calls that the runtime holds for ``delay`` seconds, once all have reached it."""
    rt.delay = delay
    calls: list[asyncio.Future[tuple[int, Any, Any]]] = [
        asyncio.ensure_future(post(url(doc), BODY)) for _ in range(n)
    ]
    await until(lambda: rt.started == n)
    return calls


async def test_sigterm_drains_every_worker_without_losing_a_call(
    pid_runtime: PidRuntime, launch: Launch
) -> None:
    doc, proc = await launch()
    calls = await in_flight(pid_runtime, doc, 12, delay=3.0)
    assert len(set(pid_runtime.pids)) == 2  # calls in flight in both workers
    proc.signal(signal.SIGTERM)
    admin = port_of(doc, "admin")

    async def unready() -> bool:
        return (await asyncio.to_thread(get, admin, "/readyz"))[0] == 503

    await until(unready, timeout=2.5)  # at once, while the calls are still running
    assert not any(call.done() for call in calls)
    assert [status for status, _, _ in await asyncio.gather(*calls)] == [200] * 12
    assert await asyncio.to_thread(proc.wait) == 0
    with pytest.raises(OSError):  # nothing listens any more
        socket.create_connection(("127.0.0.1", port_of(doc)), timeout=2).close()


async def test_a_second_sigterm_cuts_calls_off_and_exits_1(
    pid_runtime: PidRuntime, launch: Launch
) -> None:
    doc, proc = await launch()
    calls = await in_flight(pid_runtime, doc, 6, delay=60)
    proc.signal(signal.SIGTERM)
    await asyncio.sleep(0.3)
    proc.signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait, 15) == 1
    for call in calls:
        call.cancel()
    await asyncio.gather(*calls, return_exceptions=True)


async def test_sighup_reloads_every_worker(pid_runtime: PidRuntime, launch: Launch) -> None:
    doc, proc = await launch()
    doc["webhooks"]["agents"]["new-agent"] = {"sessionKey": "s"}
    write_config(proc.config_path.parent, doc)
    proc.signal(signal.SIGHUP)

    def reloaded() -> set[int]:
        return {
            line["worker"]
            for line in proc.json_lines()
            if line.get("msg") == "config reloaded" and line.get("reason") == "SIGHUP"
        }

    await until(lambda: reloaded() == {0, 1})
    results = await asyncio.gather(
        *(post(url(doc), {"agent": "new-agent", "message": "m"}) for _ in range(20))
    )
    assert [status for status, _, _ in results] == [200] * 20
    assert len(set(pid_runtime.pids)) == 2
    m = await scrape(doc)
    assert m.value("webhook_sidecar_config_reloads_total", result="success") == 2  # one each


# ---------------------------------------------------------------- crashes


async def test_a_killed_worker_is_replaced_and_counters_do_not_go_back(
    pid_runtime: PidRuntime, launch: Launch
) -> None:
    doc, proc = await launch()
    before = started(proc)
    assert await spread(doc, 20) == [200] * 20
    assert (await scrape(doc)).value(*OK_AGENT[:1], **OK_AGENT[1]) == 20
    os.kill(before[0], signal.SIGKILL)
    await until(lambda: started(proc).get(0) not in (None, before[0]))
    await ready(doc)
    m = await scrape(doc)
    # The dead worker's last counts are kept: no false counter reset on the dashboard.
    assert m.value(*OK_AGENT[:1], **OK_AGENT[1]) == 20
    assert m.value("webhook_sidecar_worker_restarts_total") == 1
    assert m.value("webhook_sidecar_workers") == 2
    pid_runtime.pids.clear()
    assert await spread(doc, 30) == [200] * 30
    assert set(pid_runtime.pids) == {started(proc)[0], before[1]}
    assert (await scrape(doc)).value(*OK_AGENT[:1], **OK_AGENT[1]) == 50
    exited = [line for line in proc.json_lines() if line.get("msg") == "worker 0 exited: "
              "starting it again"]  # fmt: skip
    assert exited and exited[0]["exitCode"] == -signal.SIGKILL


@pytest.mark.slow
async def test_a_worker_that_cannot_start_again_makes_the_supervisor_exit_1(
    pid_runtime: PidRuntime, launch: Launch
) -> None:
    doc, proc = await launch()
    doc["sidecar"]["unknownKey"] = True  # from now on a new worker exits 2
    write_config(proc.config_path.parent, doc)
    os.kill(started(proc)[1], signal.SIGKILL)
    assert await asyncio.to_thread(proc.wait, 30) == 1
    messages = [line.get("msg", "") for line in proc.json_lines()]
    assert any("giving up" in m for m in messages), proc.output()
    assert "config error: sidecar.unknownKey: unknown key" in "\n".join(proc.lines)


async def test_workers_die_with_a_killed_supervisor(
    pid_runtime: PidRuntime, launch: Launch
) -> None:
    _, proc = await launch()
    pids = started(proc)
    assert proc.proc is not None
    proc.proc.kill()
    await asyncio.to_thread(proc.wait)

    def gone() -> bool:
        return not any(Path(f"/proc/{pid}").exists() for pid in pids.values())

    await until(gone)


async def test_a_taken_port_exits_1_before_any_worker_starts(
    pid_runtime: PidRuntime, short_tmp: Path
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        doc = doc_for(pid_runtime.path)
        doc["sidecar"]["listen"] = f"127.0.0.1:{busy.getsockname()[1]}"
        result = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "sidecar", "run", "-c", str(write_config(short_tmp, doc))],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    assert result.returncode == 1
    assert "worker started" not in result.stderr
    errors = [
        e["msg"] for e in map(json.loads, result.stderr.splitlines()) if e["level"] == "error"
    ]
    assert errors == [f"cannot listen on {doc['sidecar']['listen']}: address already in use"]


# ---------------------------------------------------------------- shared limits


@pytest.fixture
def redis_server() -> Any:
    with running_redis_server() as server:
        yield server


async def test_a_redis_budget_is_exact_across_workers(
    pid_runtime: PidRuntime, launch: Launch, redis_server: RedisServer
) -> None:
    budget = 5
    limits = {"backend": redis_server.url, "global": {"requests": budget, "per": "1h"}}
    doc, proc = await launch(rateLimit=limits)
    statuses = await spread(doc, 16)
    assert statuses.count(200) == budget and statuses.count(429) == 16 - budget
    assert len(pid_runtime.pids) == budget
    # Both workers answered calls; with a budget each, they would have let through
    # min(n0, 5) + min(n1, 5) > 5 of them.
    served = [
        sum((await worker_scrape(pid)).series("webhook_sidecar_requests_total").values())
        for pid in started(proc).values()
    ]
    assert sum(served) == 16 and min(served) >= 1


# ---------------------------------------------------------------- the shared stderr


@pytest.mark.slow
async def test_audit_lines_from_all_processes_stay_whole_on_a_full_pipe(
    pid_runtime: PidRuntime, short_tmp: Path
) -> None:
    doc = doc_for(pid_runtime.path)
    # Nobody reads stderr during the load: the pipe fills and every process blocks on
    # it with batches queued, the case where writes over PIPE_BUF would interleave.
    child = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "run", "-c", str(write_config(short_tmp, doc))],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        await ready(doc)
        results = await run_load(url(doc), seconds=3, concurrency=16, token=SECRET, body=BODY)
        assert {r.status for r in results} == {200}
        assert len(set(pid_runtime.pids)) == 2
        child.send_signal(signal.SIGTERM)
        _, err = await asyncio.to_thread(child.communicate, timeout=30)
    finally:
        terminate(child)
    assert child.returncode == 0
    lines = err.splitlines()
    parsed = [json.loads(line) for line in lines]  # every line whole
    audit = [line["requestId"] for line in parsed if "requestId" in line]
    assert sorted(audit) == sorted(r.request_id for r in results)
    assert len(lines) > 64 * 1024 // 300  # more than a pipe's worth: it did fill


# ---------------------------------------------------------------- metrics merging


def test_merge_adds_counters_and_histograms_and_takes_the_max_of_timestamps() -> None:
    a, b = Metrics(), Metrics()
    for m, n in ((a, 3), (b, 4)):
        for _ in range(n):
            m.observe("agent", 200, None, 0.002)
        m.tls_cert_not_after.set(100.0 * n)
    a.count_in_flight(lambda: 2)
    b.count_in_flight(lambda: 5)
    parsed = [workers.parse_metrics(generate_latest(m.registry).decode()) for m in (a, b)]
    merged = Scrape(workers.render(workers.merge(parsed)).decode())
    assert merged.value(*OK_AGENT[:1], **OK_AGENT[1]) == 7
    assert merged.value("webhook_sidecar_request_duration_seconds_count", endpoint="agent") == 7
    assert merged.value("webhook_sidecar_request_duration_seconds_bucket", endpoint="agent",
                        le="0.0025") == 7  # fmt: skip
    assert merged.value("webhook_sidecar_in_flight_requests") == 7
    assert merged.value("webhook_sidecar_tls_cert_not_after_timestamp_seconds") == 400
    # What was retired stays counted, gauges of retired workers do not.
    retired = workers.cumulative(parsed[0])
    again = Scrape(workers.render(workers.merge([retired, parsed[1]])).decode())
    assert again.value(*OK_AGENT[:1], **OK_AGENT[1]) == 7
    assert again.value("webhook_sidecar_in_flight_requests") == 5


def test_bind_conflicts_are_found_by_the_reservation() -> None:
    from sidecar.settings import Listen

    held = workers._reserve(Listen("127.0.0.1", 0))
    port = held[0].getsockname()[1]
    try:
        with socket.socket() as other, pytest.raises(OSError):
            other.bind(("127.0.0.1", port))  # no SO_REUSEPORT: refused
        again = workers._reserve(Listen("127.0.0.1", port))  # a worker's own bind: allowed
        for sock in again:
            sock.close()
    finally:
        for sock in held:
            sock.close()
