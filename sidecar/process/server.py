"""Process lifecycle: both listeners, signals, reload, graceful drain (docs/lifecycle.md).

SIGTERM (or SIGINT): readiness turns 503 at once, the public listener stops
accepting, requests in flight finish, exit 0. Calls still running when
``shutdownTimeout`` passes are cut off (audited, their connections closed) and
the exit is still 0: the drain went as configured. A second SIGTERM cuts them
off at once and exits 1, because calls were abandoned on request. The admin
listener stays up until the public one is gone, so probes see the 503.
SIGHUP: reload.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal

from aiohttp import web

from .. import logs, tls
from ..admin import create_admin_app
from ..app import PublicRunner, State, create_app
from ..metrics import Metrics
from ..settings import Settings
from .gate import Gate, GatedSite
from .reload import POLL_INTERVAL, Reloader

log = logging.getLogger("sidecar")

AIOHTTP_SHUTDOWN_BACKSTOP = 3600.0
# After cutting calls off, how long to wait for their connections to close.
CUT_OFF_GRACE = 5.0
EXIT_OK, EXIT_ABANDONED = 0, 1


class ListenError(OSError):
    """A listener could not open; the message names the address (docs/operations.md)."""

    def __init__(self, address: object, exc: OSError) -> None:
        # asyncio's strerror repeats the address ("error while attempting to bind on ..."):
        # the errno's own text is the reason.
        reason = os.strerror(exc.errno) if exc.errno else exc.strerror or str(exc)
        super().__init__(exc.errno, f"cannot listen on {address}: {reason[:1].lower()}{reason[1:]}")


async def start_site(site: web.BaseSite, address: object) -> None:
    """``site.start()``, raising :class:`ListenError` naming ``address`` if it cannot listen."""
    try:
        await site.start()
    except OSError as exc:
        raise ListenError(address, exc) from exc


class Server:
    """The running sidecar: one public and one admin listener over a shared :class:`State`."""

    def __init__(
        self,
        settings: Settings,
        audit: logs.AuditLog,
        metrics: Metrics,
        *,
        watch_interval: float = POLL_INTERVAL,
    ) -> None:
        self.state = State(settings, metrics, audit)
        self.path = settings.path
        self._stop = asyncio.Event()
        self._hurry = asyncio.Event()  # a second SIGTERM: stop waiting for calls in flight
        self._tasks: set[asyncio.Task[bool]] = set()
        s = settings.sidecar
        # Built here, so a bad certificate fails before anything listens (raises TlsError).
        self.tls = tls.ServingTls(tls.load(s.tls)) if s.tls is not None else None
        self.reloader = Reloader(self.state, self.path, self.tls, self._applied)
        public = create_app(self.state)
        public.cleanup_ctx.append(self.reloader.watching(watch_interval))
        self._public = PublicRunner(
            public,
            access_log=None,
            handler_cancellation=False,  # a client hanging up must not abort a forwarded call
            # aiohttp arms this timer when a connection opens and after each response,
            # and closes the connection if no complete request head has arrived when it
            # fires; bytes trickling in do not reset it. That is exactly the header
            # timeout slowloris needs (it also bounds idle keep-alive connections).
            keepalive_timeout=settings.sidecar.limits.header_timeout,
            # aiohttp waits this long, then cancels request bodies and waits as long
            # again: stop() keeps the deadline itself, so this is only a backstop.
            shutdown_timeout=AIOHTTP_SHUTDOWN_BACKSTOP,
        )
        self._admin = web.AppRunner(
            create_admin_app(self.state), access_log=None, shutdown_timeout=1
        )

    async def start(self, *, reuse_port: bool = False, admin_socket: str | None = None) -> None:
        """Listen. A worker of :mod:`sidecar.workers` shares the public port with the
        other workers (``reuse_port``) and serves its admin app to the supervisor
        only, on a private Unix socket (``admin_socket``)."""
        settings = self.state.settings
        s = settings.sidecar
        if self.tls is not None:
            self.state.metrics.tls_cert_not_after.set(self.tls.not_after)
        else:  # no certificate: no gauge, rather than a 0 that "expired in 1970" alerts fire on
            self.state.metrics.registry.unregister(self.state.metrics.tls_cert_not_after)
        await self._public.setup()
        public = self._public.server
        assert public is not None
        await self._admin.setup()
        ctx = self.tls.context if self.tls is not None else None
        # Accept-time checks (allowIps, maxConnections, maxConnectionsPerIp, the TLS
        # handshake's deadline) before aiohttp sees a connection: docs/connections.md.
        gate = Gate(public, lambda: self.state.settings, self.state.metrics, ctx)
        await start_site(
            GatedSite(self._public, s.listen.host, s.listen.port, gate, reuse_port=reuse_port),
            s.listen,
        )
        if admin_socket is not None:
            await web.UnixSite(self._admin, admin_socket).start()
        else:
            admin = s.admin_listen
            await start_site(web.TCPSite(self._admin, admin.host, admin.port), admin)
        scheme = "https" if ctx else "http"
        log.info(
            "listening",
            extra={
                "public": f"{scheme}://{s.listen}",
                "admin": "(the supervisor's)" if admin_socket else f"http://{s.admin_listen}",
                "upstream": s.upstream.socket or s.upstream.url,
                "protocol": s.upstream.protocol,
            },
        )

    def request_stop(self) -> None:
        """First SIGTERM: drain. Second: stop waiting for calls in flight."""
        if not self._stop.is_set():
            log.info(
                "shutdown requested: draining",
                extra={"inFlight": len(self.state.calls), "timeout": self._drain_timeout()},
            )
            self.state.draining = True  # /readyz answers 503 from now on
            self._stop.set()
        elif not self._hurry.is_set():
            log.warning("second stop signal: cutting off calls in flight")
            self._hurry.set()

    def _drain_timeout(self) -> float:
        return self.state.settings.sidecar.shutdown_timeout

    async def reload(self) -> bool:
        """Load the config file again; keep the running config if the new one is invalid."""
        return await self.reloader.reload()

    def _applied(self, settings: Settings) -> None:
        """What a reload changes outside the request path."""
        log_settings = settings.sidecar.log
        logs.configure(log_settings.level, log_settings.format, self.state.audit)

    def _reload_on_signal(self) -> None:
        task = asyncio.ensure_future(self.reload())
        self._tasks.add(task)  # the loop keeps only a weak reference to tasks
        task.add_done_callback(self._tasks.discard)

    async def run_until_stopped(self) -> int:
        """Serve until SIGTERM/SIGINT, then drain; returns the exit code."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self._reload_on_signal)
        try:
            await self._stop.wait()
            return await self.stop()  # the handlers stay: a second signal hurries the drain
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)

    async def stop(self) -> int:
        """Drain: stop accepting, let calls in flight finish until the deadline or a
        second signal, then close the admin listener last. Returns the exit code."""
        self.state.draining = True
        drain = asyncio.ensure_future(self._public.cleanup())  # stops accepting at once
        hurry = asyncio.ensure_future(self._hurry.wait())
        try:
            await asyncio.wait(
                {drain, hurry}, timeout=self._drain_timeout(), return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            hurry.cancel()
        hurried = self._hurry.is_set() and not drain.done()
        code = EXIT_ABANDONED if hurried else EXIT_OK
        if not drain.done():
            cut = self.state.cut_off()
            log.warning(
                "drain %s: cut off %d call(s) still in flight",
                "hurried by a second signal" if hurried else "deadline passed",
                cut,
                extra={"timeout": self._drain_timeout()},
            )
            await asyncio.wait({drain}, timeout=CUT_OFF_GRACE)
        if drain.done() and not drain.cancelled() and drain.exception() is not None:
            log.error("error while draining", exc_info=drain.exception())
        await self._admin.cleanup()
        log.info("stopped")
        return code


async def serve(
    settings: Settings, audit: logs.AuditLog, *, admin_socket: str | None = None
) -> int:
    """Serve until SIGTERM; returns the exit code. With ``admin_socket``, this is one
    worker of several (:mod:`sidecar.process.workers`)."""
    metrics = Metrics(process=True)
    try:
        server = Server(settings, audit, metrics)
    except tls.TlsError as exc:  # the files changed between the config check and now
        log.error("config error: sidecar.tls: %s", exc)
        return 2
    try:
        await server.start(reuse_port=admin_socket is not None, admin_socket=admin_socket)
    except OSError as exc:  # a ListenError names the address
        log.error("%s", exc.strerror or exc)
        with contextlib.suppress(Exception):
            await server.stop()
        return 1
    return await server.run_until_stopped()
