"""Process lifecycle: both listeners, signals, reload, graceful drain (SPEC §8).

SIGTERM: readiness turns 503 at once, the public listener stops accepting,
requests in flight finish (up to ``shutdownTimeout``), exit 0. SIGHUP: reload.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
import sys
from pathlib import Path

from aiohttp import web

from . import config, logs
from .admin import create_admin_app
from .app import State, create_app
from .metrics import Metrics

log = logging.getLogger("sidecar")


def install_uvloop() -> bool:
    """Use uvloop when it is installed: the same code, a faster event loop."""
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


def tls_context(tls: config.Tls) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if tls.min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(tls.cert_file, tls.key_file)
    if tls.client_ca_file is not None:
        ctx.load_verify_locations(tls.client_ca_file)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class Server:
    """The running sidecar: one public and one admin listener over a shared :class:`State`."""

    def __init__(self, settings: config.Settings, audit: logs.AuditLog, metrics: Metrics) -> None:
        self.state = State(settings, metrics, audit)
        self.path = settings.path
        self._stop = asyncio.Event()
        self._reloading = asyncio.Lock()
        self._public = web.AppRunner(
            create_app(self.state),
            access_log=None,
            handler_cancellation=False,  # a client hanging up must not abort a forwarded call
            # aiohttp arms this timer when a connection opens and after each response,
            # and closes the connection if no complete request head has arrived when it
            # fires; bytes trickling in do not reset it. That is exactly the header
            # timeout slowloris needs (it also bounds idle keep-alive connections).
            keepalive_timeout=settings.sidecar.limits.header_timeout,
            shutdown_timeout=settings.sidecar.shutdown_timeout,
        )
        self._admin = web.AppRunner(create_admin_app(self.state), access_log=None, shutdown_timeout=1)

    async def start(self) -> None:
        settings = self.state.settings
        s = settings.sidecar
        await self._public.setup()
        await self._admin.setup()
        ctx = tls_context(s.tls) if s.tls is not None else None
        await web.TCPSite(self._public, s.listen.host, s.listen.port, ssl_context=ctx).start()
        await web.TCPSite(self._admin, s.admin_listen.host, s.admin_listen.port).start()
        scheme = "https" if ctx else "http"
        log.info(
            "listening",
            extra={
                "public": f"{scheme}://{s.listen}",
                "admin": f"http://{s.admin_listen}",
                "upstream": s.upstream.socket or s.upstream.url,
                "protocol": s.upstream.protocol,
            },
        )

    def request_stop(self) -> None:
        if not self._stop.is_set():
            log.info("shutdown requested: draining")
            self.state.draining = True  # /readyz answers 503 from now on
            self._stop.set()

    async def reload(self) -> bool:
        """Load the config file again; keep the running config if the new one is invalid."""
        async with self._reloading:
            metrics = self.state.metrics
            if self.path is None:
                return False
            try:
                settings = await asyncio.to_thread(config.load, self.path)
            except config.ConfigError as exc:
                metrics.config_reloads.labels("error").inc()
                log.error("reload refused, keeping the running config", extra={"problems": exc.problems})
                return False
            self.state.apply(settings)
            logs.set_level(settings.sidecar.log.level)
            metrics.config_reloads.labels("success").inc()
            log.info("config reloaded", extra={"path": str(self.path)})
            return True

    async def run_until_stopped(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload()))
        try:
            await self._stop.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
        await self.stop()

    async def stop(self) -> None:
        self.state.draining = True
        await self._public.cleanup()  # stop accepting, let calls in flight finish
        await self._admin.cleanup()
        log.info("stopped")


async def serve(settings: config.Settings, audit: logs.AuditLog) -> int:
    metrics = Metrics()
    server = Server(settings, audit, metrics)
    try:
        await server.start()
    except OSError as exc:
        log.error("cannot listen: %s", exc.strerror or exc)
        with contextlib.suppress(Exception):
            await server.stop()
        return 1
    await server.run_until_stopped()
    return 0


def run(path: Path) -> int:
    """``webhook-sidecar run``: load, serve until SIGTERM, exit 0 after the drain."""
    try:
        settings = config.load(path)
    except config.ConfigError as exc:
        for problem in exc.problems:
            print(f"config error: {problem}", file=sys.stderr, flush=True)
        return 2
    writer, audit = logs.setup(settings.sidecar.log.level, settings.sidecar.log.format)
    install_uvloop()
    try:
        return asyncio.run(serve(settings, audit))
    finally:
        writer.close()
