"""Several worker processes on one public port (``sidecar.workers`` > 1, Linux).

One Python process serves about one core (the GIL). With ``workers: N`` the
``webhook-sidecar run`` process becomes a small supervisor and starts N copies
of the single-process server (:mod:`sidecar.server`), each on its own event loop:

- Public port: every worker opens its own listening socket on it with
  ``SO_REUSEPORT``, and the kernel spreads new connections over them by a hash
  of the addresses (socket(7)). One shared accept queue would wake every worker
  per connection and let the quickest take most of them (the "thundering herd"
  nginx's ``accept_mutex`` and ``reuseport`` exist for). A worker that dies
  takes its socket with it, so new connections go to the others until it is
  back. The supervisor binds the port first, without listening: a taken port
  fails before any worker starts (exit 1), and the port stays ours between
  restarts (a bound socket that does not listen receives no connections).
- Admin port: only the supervisor listens on ``sidecar.admin.listen``. Each
  worker serves its own admin app on a private abstract Unix socket; the
  supervisor's ``/metrics`` scrapes them all and adds them up (one coherent
  view, one scrape target), ``/readyz`` is 200 only when every running worker
  is ready. Counters stay monotonic when a worker is replaced: the last counts
  scraped from it are kept and added to its successor's.
- Signals: SIGTERM/SIGINT drain every worker (docs/lifecycle.md; a second one is passed
  on too and makes them cut off calls, exit 1); SIGHUP reloads every worker.
  Each worker also watches the files itself.
- Crashes: a worker that exits is started again, after 0.1 s, doubling with each
  exit within ``STABLE_SECONDS`` of its start. Five such exits in a row mean it
  cannot run (a config that became invalid, a broken upstream library): the
  supervisor drains the others and exits 1, so the orchestrator sees it.
- Workers die with the supervisor: PR_SET_PDEATHSIG sends them SIGTERM (a
  drain) if it is killed. They run in their own process group, so a Ctrl-C in
  a terminal reaches the supervisor only and is passed on once.
- Logs: every process writes whole lines to the shared stderr, at most
  PIPE_BUF bytes per write, so lines never interleave (:mod:`sidecar.logs`).

What stays per worker: the memory rate-limit buckets, ``maxConcurrent``, the
auth lockout table and ``limits.maxConnections`` (``check-config`` warns). The
supervisor's ``POST /admin/unlock`` is passed on to every worker's lockout table.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import json
import logging
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.aiohttp import make_aiohttp_handler
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from .. import config, logs
from ..admin import FANOUT_HEADER, BadUnlock, bad_unlock, log_unlock, unlock_key
from ..settings import Listen, Settings
from .server import ListenError, serve, start_site
from .startup import log_startup
from .tuning import install_uvloop, tune_allocator

log = logging.getLogger("sidecar.workers")

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2
RESTART_DELAY = 0.1  # the first restart; doubled for each quick exit in a row
MAX_RESTART_DELAY = 10.0
STABLE_SECONDS = 10.0  # a worker that ran this long before exiting did not "fail to start"
MAX_QUICK_EXITS = 5
START_TIMEOUT = 30.0  # for every worker to answer on its admin socket
ASK_TIMEOUT = 2.0  # a worker's /metrics or /readyz
STOP_GRACE = 10.0  # past the workers' own drain deadline, then SIGKILL
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


# ----------------------------------------------------------------------------- metrics


class Family(NamedTuple):
    name: str
    type: str
    documentation: str
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]


Families = dict[str, Family]

CUMULATIVE = {"counter", "histogram", "summary"}
# Gauges whose sum over the workers is the sidecar's value; other gauges (timestamps,
# limits, info) are the same in every worker, or their newest value is wanted: max.
SUMMED_GAUGES = {
    "webhook_sidecar_in_flight_requests",
    "process_resident_memory_bytes",
    "process_virtual_memory_bytes",
    "process_open_fds",
}


def parse_metrics(text: str) -> Families:
    """Prometheus text, as prometheus_client's own parser reads it."""
    return {
        f.name: Family(
            f.name,
            f.type,
            f.documentation,
            {(s.name, tuple(sorted(s.labels.items()))): s.value for s in f.samples},
        )
        for f in text_string_to_metric_families(text)
    }


def merge(sources: Iterable[Families]) -> Families:
    """Counters and histograms added up; gauges added up or their max (see SUMMED_GAUGES)."""
    out: Families = {}
    for families in sources:
        for name, family in families.items():
            mine = out.setdefault(name, Family(name, family.type, family.documentation, {}))
            add = family.type in CUMULATIVE or name in SUMMED_GAUGES
            for key, value in family.samples.items():
                if key not in mine.samples:
                    mine.samples[key] = value
                elif add:
                    mine.samples[key] += value
                else:
                    mine.samples[key] = max(mine.samples[key], value)
    return out


def cumulative(families: Families) -> Families:
    return {n: f for n, f in families.items() if f.type in CUMULATIVE}


class _Exposed:
    """A collector over already merged families (for ``generate_latest``)."""

    def __init__(self, families: Families) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        for family in self.families.values():
            metric = Metric(family.name, family.documentation, family.type)
            for (sample, labels), value in family.samples.items():
                metric.add_sample(sample, dict(labels), value)
            yield metric


def render(families: Families) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Exposed(families))
    return generate_latest(registry)


def _metrics_handler(
    fetch: Callable[[], Awaitable[Families]],
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """prometheus_client's own aiohttp handler (OpenMetrics negotiation, gzip, as on a
    single process) over families ``fetch`` gathers from the workers first."""
    exposed = _Exposed({})
    registry = CollectorRegistry(auto_describe=False)
    registry.register(exposed)
    serve = make_aiohttp_handler(registry)

    async def handler(request: web.Request) -> web.StreamResponse:
        exposed.families = await fetch()
        return await serve(request)

    return handler


# ----------------------------------------------------------------------------- supervisor


@dataclasses.dataclass
class Worker:
    index: int
    socket: str  # its admin app: an abstract Unix socket (no file, no cleanup)
    proc: asyncio.subprocess.Process | None = None
    started: float = 0.0
    quick_exits: int = 0
    last: Families = dataclasses.field(default_factory=dict)  # its last scrape

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None


def _reserve(listen: Listen) -> list[socket.socket]:
    """Bind the public address with SO_REUSEPORT, without listening (see the module doc).
    The same options as asyncio's ``create_server``, or the workers could not join."""
    held: list[socket.socket] = []
    port = listen.port
    try:
        infos = socket.getaddrinfo(
            listen.host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            held.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((address[0], port, *address[2:]))
            port = sock.getsockname()[1]  # port 0: the one the kernel chose, for all
    except OSError as exc:
        for sock in held:
            sock.close()
        raise ListenError(listen, exc) from exc
    return held


class Supervisor:
    """Starts, watches, signals and drains the workers; serves the admin listener."""

    def __init__(self, settings: Settings) -> None:
        assert settings.path is not None
        self.settings = settings
        self.path = settings.path
        tag = f"{os.getpid()}-{secrets.token_hex(4)}"
        n = settings.sidecar.workers
        self.workers = [Worker(i, f"\0webhook-sidecar-{tag}-{i}") for i in range(n)]
        self.port = settings.sidecar.listen.port
        self.held: list[socket.socket] = []
        self.serving = False  # every worker answered once: /readyz may say 200
        self.draining = False
        self.gave_up = False
        self.restarts = 0
        self.unlocks = 0  # operators' POST /admin/unlock, each passed on to every worker
        self.retired: Families = {}  # counts of workers that were replaced
        self._stop = asyncio.Event()
        self._watchers: list[asyncio.Task[None]] = []
        self._admin: web.AppRunner | None = None

    # -- lifecycle

    async def run(self) -> int:
        s = self.settings.sidecar
        try:
            self.held = _reserve(s.listen)
            self.port = self.held[0].getsockname()[1]
            await self._start_admin()
        except OSError as exc:  # a ListenError names the address
            log.error("%s", exc.strerror or exc)
            return await self._close(EXIT_FAILURE)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self._signal_all, signal.SIGHUP)
        for worker in self.workers:
            await self._spawn(worker)
        code = await self._started()
        if code is not None:  # a worker could not start: no point in the others
            self.draining = True
            self._signal_all(signal.SIGTERM)
            await self._wait_all()
            return await self._close(code)
        log.info(
            "workers listening",
            extra={
                "workers": len(self.workers),
                "pids": [w.proc.pid for w in self.workers if w.proc is not None],
                "public": str(dataclasses.replace(s.listen, port=self.port)),
                "admin": f"http://{s.admin_listen}",
            },
        )
        self._watchers = [asyncio.ensure_future(self._watch(w)) for w in self.workers]
        self.serving = True
        await self._stop.wait()
        return await self._drain()

    async def _spawn(self, worker: Worker) -> None:
        worker.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sidecar", "_worker", "-c", str(self.path),
            "--index", str(worker.index), "--port", str(self.port),
            "--admin-socket", worker.socket.removeprefix("\0"),
            "--supervisor", str(os.getpid()),
            stdin=asyncio.subprocess.DEVNULL,
            start_new_session=True,  # a terminal's Ctrl-C is ours to pass on, once
        )  # fmt: skip
        worker.started = time.monotonic()
        log.info("worker started", extra={"worker": worker.index, "workerPid": worker.proc.pid})
        if self.draining:  # a stop came while it was starting
            worker.proc.send_signal(signal.SIGTERM)

    async def _started(self) -> int | None:
        """Wait until every worker answers on its admin socket; the exit code of the
        first one that exits instead (2 for a config error), None when all are up."""
        deadline = time.monotonic() + START_TIMEOUT
        pending = list(self.workers)
        while pending and time.monotonic() < deadline and not self.draining:
            for worker in list(pending):
                assert worker.proc is not None
                if worker.proc.returncode is not None:
                    code = worker.proc.returncode
                    log.error("worker %d exited %d while starting: stopping", worker.index, code)
                    return EXIT_CONFIG if code == EXIT_CONFIG else EXIT_FAILURE
                if (await self._ask(worker, "/healthz"))[0] == 200:
                    pending.remove(worker)
            await asyncio.sleep(0.05)
        if pending and not self.draining:
            log.error("workers %s did not start within %gs", [w.index for w in pending],
                      START_TIMEOUT)  # fmt: skip
            return EXIT_FAILURE
        return None

    async def _watch(self, worker: Worker) -> None:
        """Start ``worker`` again whenever it exits, until the drain."""
        while True:
            assert worker.proc is not None
            code = await worker.proc.wait()
            if self.draining:
                return
            ran = time.monotonic() - worker.started
            worker.quick_exits = worker.quick_exits + 1 if ran < STABLE_SECONDS else 1
            self.restarts += 1
            self.retired = merge([self.retired, cumulative(worker.last)])
            worker.last = {}
            if worker.quick_exits >= MAX_QUICK_EXITS:
                log.error(
                    "worker %d exited %d times in a row within %gs of starting: giving up",
                    worker.index, worker.quick_exits, STABLE_SECONDS,
                    extra={"exitCode": code},
                )  # fmt: skip
                self.gave_up = True
                self.request_stop()
                return
            delay = min(MAX_RESTART_DELAY, RESTART_DELAY * 2 ** (worker.quick_exits - 1))
            log.error(
                "worker %d exited: starting it again", worker.index,
                extra={"workerPid": worker.proc.pid, "exitCode": code, "ranSeconds": round(ran, 3),
                       "restartIn": delay},
            )  # fmt: skip
            await asyncio.sleep(delay)
            if self.draining:
                return
            await self._spawn(worker)

    def request_stop(self) -> None:
        """First SIGTERM: drain every worker. Second: passed on, they cut calls off."""
        if not self.draining:
            log.info("shutdown requested: draining the workers")
            self.draining = True  # /readyz answers 503 from now on
            self._stop.set()
        else:
            log.warning("second stop signal: passing it on to the workers")
        self._signal_all(signal.SIGTERM)

    def _signal_all(self, sig: int) -> None:
        for worker in self.workers:
            if worker.running:
                assert worker.proc is not None
                with contextlib.suppress(ProcessLookupError):
                    worker.proc.send_signal(sig)

    async def _wait_all(self, timeout: float | None = None) -> bool:
        waits = [asyncio.ensure_future(w.proc.wait()) for w in self.workers if w.proc is not None]
        if not waits:
            return True
        _, pending = await asyncio.wait(waits, timeout=timeout)
        for task in pending:
            task.cancel()
        return not pending

    async def _drain(self) -> int:
        for sock in self.held:  # the port is free once the workers let go of it
            sock.close()
        timeout = self.settings.sidecar.shutdown_timeout + STOP_GRACE
        clean = await self._wait_all(timeout)
        if not clean:
            log.error("workers still running %gs after the stop signal: killing them", timeout)
            for worker in self.workers:
                if worker.running:
                    assert worker.proc is not None
                    worker.proc.kill()
            await self._wait_all()
        for task in self._watchers:
            task.cancel()
        codes = [w.proc.returncode for w in self.workers if w.proc is not None]
        # A worker that got SIGTERM before it set up its handlers had nothing in flight.
        ok = clean and not self.gave_up and all(c in (0, -signal.SIGTERM) for c in codes)
        log.info("stopped", extra={"workerExitCodes": codes})
        return await self._close(EXIT_OK if ok else EXIT_FAILURE)

    async def _close(self, code: int) -> int:
        for sock in self.held:
            sock.close()
        if self._admin is not None:
            await self._admin.cleanup()
        return code

    # -- admin listener

    async def _ask(
        self, worker: Worker, path: str, post: dict[str, str] | None = None
    ) -> tuple[int, str]:
        """GET ``path`` from a worker's admin app (or POST ``post`` as JSON, marked as the
        supervisor's fan-out); (0, reason) when it does not answer."""
        if not worker.running:
            return 0, "not running"
        try:
            async with (
                aiohttp.ClientSession(
                    connector=aiohttp.UnixConnector(path=worker.socket),
                    timeout=aiohttp.ClientTimeout(total=ASK_TIMEOUT),
                ) as session,
                session.request(
                    "GET" if post is None else "POST",
                    f"http://worker{path}",
                    json=post,
                    headers=None if post is None else {FANOUT_HEADER: "1"},
                ) as resp,
            ):
                return resp.status, await resp.text()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return 0, f"not answering ({type(exc).__name__})"

    async def _start_admin(self) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", _metrics_handler(self._gather_metrics))
        app.router.add_post("/admin/unlock", self._unlock)
        self._admin = web.AppRunner(app, access_log=None, shutdown_timeout=1)
        await self._admin.setup()
        a = self.settings.sidecar.admin_listen
        await start_site(web.TCPSite(self._admin, a.host, a.port), a)

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, request: web.Request) -> web.Response:
        def unavailable(reason: str) -> web.Response:
            return web.json_response({"status": "unavailable", "reason": reason}, status=503)

        if self.draining:
            return unavailable("shutting down")
        if not self.serving:
            return unavailable("workers starting")
        running = [w for w in self.workers if w.running]
        if not running:
            return unavailable("no worker is running")
        answers = await asyncio.gather(*(self._ask(w, "/readyz") for w in running))
        for worker, (status, text) in zip(running, answers, strict=True):
            if status != 200:
                reason = text
                with contextlib.suppress(ValueError, AttributeError):
                    reason = json.loads(text).get("reason", text)
                return unavailable(f"worker {worker.index}: {reason}")
        return web.json_response({"status": "ok", "workers": len(running)})

    async def _unlock(self, request: web.Request) -> web.Response:
        """The lockout table is per worker: release the address in every running one
        (a worker started later begins with an empty table). Logged and counted once."""
        try:
            key = await unlock_key(request)
        except BadUnlock as exc:
            return bad_unlock(exc)
        running = [w for w in self.workers if w.running]
        answers = await asyncio.gather(
            *(self._ask(w, "/admin/unlock", {"address": key}) for w in running)
        )
        unlocked, missed = False, []
        for worker, (status, text) in zip(running, answers, strict=True):
            if status == 200:
                unlocked = unlocked or json.loads(text).get("unlocked") is True
            else:
                missed.append(worker.index)
        self.unlocks += 1
        log_unlock(key, unlocked)
        if missed:
            log.error("unlock %s: workers %s did not answer", key, missed)
            return web.json_response(
                {"status": "error", "error": "workers_unavailable", "unlocked": unlocked,
                 "message": f"workers {missed} did not answer; try again"},
                status=503,
            )  # fmt: skip
        return web.json_response({"status": "ok", "unlocked": unlocked})

    async def _gather_metrics(self) -> Families:
        running = [w for w in self.workers if w.running]
        answers = await asyncio.gather(*(self._ask(w, "/metrics") for w in running))
        for worker, (status, text) in zip(running, answers, strict=True):
            if status == 200:  # otherwise its previous scrape stands in
                worker.last = parse_metrics(text)
        families = merge([self.retired, *(w.last for w in self.workers)])
        families.update(self._own_metrics(len(running)))
        return families

    def _own_metrics(self, running: int) -> Families:
        p = "webhook_sidecar_"
        return {
            p + "workers": Family(
                p + "workers", "gauge", "Worker processes running (sidecar.workers).",
                {(p + "workers", ()): float(running)},
            ),
            p + "unlocks": Family(  # counted here: a worker does not count a fan-out
                p + "unlocks", "counter", "Addresses released from the auth lockout by an "
                "operator (POST /admin/unlock).",
                {(p + "unlocks_total", ()): float(self.unlocks)},
            ),
            p + "worker_restarts": Family(
                p + "worker_restarts", "counter", "Worker processes that exited and were "
                "started again.", {(p + "worker_restarts_total", ()): float(self.restarts)},
            ),
        }  # fmt: skip


def supervise(settings: Settings) -> int:
    """``webhook-sidecar run`` with ``sidecar.workers`` > 1: supervise the workers until
    SIGTERM; 0 after a clean drain, 1 otherwise, 2 when a worker found the config bad."""
    writer, _ = logs.setup(settings.sidecar.log.level, settings.sidecar.log.format, shared=True)
    log_startup(settings)  # once, here: the workers do not repeat it
    try:
        return asyncio.run(Supervisor(settings).run())
    finally:
        writer.close()


# ----------------------------------------------------------------------------- worker


def _die_with(supervisor: int) -> bool:
    """Ask the kernel for SIGTERM when the supervisor goes; False if it already went."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    return os.getppid() == supervisor


class _WorkerField(logging.Filter):
    """Adds ``"worker": index`` to every log line (not to audit lines: docs/audit-log.md keys)."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.index
        return True


def run_worker(path: Path, index: int, port: int, admin_socket: str, supervisor: int) -> int:
    """One worker: the single-process server on the shared port (``SO_REUSEPORT``),
    its admin app on ``admin_socket`` (an abstract Unix socket name, without the NUL)."""
    if not _die_with(supervisor):
        return EXIT_FAILURE
    try:
        settings = config.load(path)
    except config.ConfigError as exc:
        for problem in exc.problems:
            print(f"config error: {problem}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    listen = dataclasses.replace(settings.sidecar.listen, port=port)
    settings = dataclasses.replace(
        settings, sidecar=dataclasses.replace(settings.sidecar, listen=listen)
    )
    s = settings.sidecar
    writer, audit = logs.setup(s.log.level, s.log.format, shared=True)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_WorkerField(index))
    install_uvloop()
    tune_allocator()
    try:
        return asyncio.run(serve(settings, audit, admin_socket="\0" + admin_socket))
    finally:
        writer.close()
