"""The public listener's front door: who may open a connection, decided at ``accept()``.

The HTTP checks of docs/http-api.md run after aiohttp has read a request, but a
connection costs a file descriptor and a slot of ``maxConnections`` from the
moment it is accepted: ~1,000 idle connections from an address outside
``allowIps`` would fill the cap and lock every allowed caller out before the
allowlist ever ran. So this module accepts connections itself (the cheapest
layer there is) and, before one byte is read, closes with a reset a connection:

1. whose peer is in neither ``allowIps`` nor ``trustedProxies`` (when
   ``allowIps`` is set; the 403 ``ip_not_allowed`` remains for the address a
   trusted proxy names in ``X-Forwarded-For``);
2. beyond ``limits.maxConnections`` open ones (the process's bound, which TLS
   handshakes in progress count toward);
3. beyond ``limits.maxConnectionsPerIp`` open ones from the same peer address
   (trusted proxies exempt), counted as
   ``rejections_total{reason="too_many_connections"}``.

The rest go to aiohttp through ``loop.connect_accepted_socket``, with the TLS
handshake bounded by ``headerTimeout``. Limits are read from the current settings
on every accept, so a reload changes them. Refusals never log a traceback and
are logged at most once per reason per second (:class:`RefusalLog`).

The listening sockets are made here too: ``[::]`` is dual stack (``IPV6_V6ONLY``
off), and an IPv4 peer reaching it as ``::ffff:a.b.c.d`` is matched as
``a.b.c.d``. docs/connections.md is the user's side of all this.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_runner import BaseRunner, BaseSite

from ..guards.clientip import in_networks, parse_address
from ..metrics import Metrics
from ..settings import IPAddress, Settings

log = logging.getLogger("sidecar.connections")

# Errors of accept() that mean "out of descriptors or memory": accepting again at
# once would spin, so the listener pauses like asyncio's own (one second).
_RESOURCE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
ACCEPT_PAUSE = 1.0
ACCEPTS_PER_WAKE = 128  # fairness with the connections already open
_RST = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset, no TIME_WAIT


class RefusalLog:
    """At most one warning per reason per ``every`` seconds, carrying how many
    refusals of that reason the previous lines did not report: a flood of refused
    connections costs a bounded number of log lines (docs/connections.md)."""

    def __init__(self, every: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.every = every
        self.clock = clock
        self._last: dict[str, float] = {}
        self._unreported: dict[str, int] = {}

    def refused(self, reason: str, message: str, **extra: Any) -> None:
        now = self.clock()
        if now - self._last.get(reason, -self.every) < self.every:
            self._unreported[reason] = self._unreported.get(reason, 0) + 1
            return
        self._last[reason] = now
        suppressed = self._unreported.pop(reason, 0)
        log.warning(
            "%s (and %d more like it since the last line)",
            message,
            suppressed,
            extra={"reason": reason, "suppressed": suppressed, **extra},
        )


@lru_cache(maxsize=4096)
def _peer_address(host: str) -> IPAddress | None:
    return parse_address(host)  # ::ffff:a.b.c.d comes back as a.b.c.d


@dataclass(slots=True)
class _Slot:
    """One admitted connection's place in the counts, released exactly once."""

    addr: IPAddress | None
    handler: RequestHandler | None = None
    released: bool = False


class Gate:
    """Admission and counting for the public connections of one process."""

    def __init__(
        self,
        server: web.Server,
        settings: Callable[[], Settings],
        metrics: Metrics,
        ssl_context: Any = None,
    ) -> None:
        self.server = server
        self.settings = settings
        self.metrics = metrics
        self.ssl_context = ssl_context
        self.open = 0
        self.per_ip: dict[IPAddress | None, int] = {}
        self.log = RefusalLog()
        self._slots: dict[RequestHandler, _Slot] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        lost = server.connection_lost

        def connection_lost(handler: RequestHandler, exc: BaseException | None = None) -> None:
            slot = self._slots.pop(handler, None)
            if slot is not None:
                self._release(slot)
            lost(handler, exc)

        server.connection_lost = connection_lost  # type: ignore[method-assign]

    def admit(self, conn: socket.socket, peer: Any) -> None:
        """Judge a just-accepted socket: refuse it (reset) or hand it to aiohttp."""
        s = self.settings().sidecar
        limits = s.limits
        addr = _peer_address(peer[0]) if isinstance(peer, tuple) else None
        trusted = addr is not None and in_networks(addr, s.trusted_proxies)
        if (
            s.allow_ips is not None
            and not trusted
            and (addr is None or not in_networks(addr, s.allow_ips))
        ):
            self._refuse(conn, "ip_not_allowed", "connection from outside allowIps refused")
            return
        if self.open >= limits.max_connections:
            self._refuse(
                conn,
                "max_connections",
                "maxConnections reached: connection refused",
                maxConnections=limits.max_connections,
            )
            return
        if not trusted and self.per_ip.get(addr, 0) >= limits.max_connections_per_ip:
            self.metrics.rejected("too_many_connections")
            self._refuse(
                conn,
                "too_many_connections",
                "maxConnectionsPerIp reached: connection refused",
                clientIp=str(addr),
                maxConnectionsPerIp=limits.max_connections_per_ip,
            )
            return
        slot = _Slot(addr)
        self.open += 1
        self.per_ip[addr] = self.per_ip.get(addr, 0) + 1
        self._start(conn, slot, limits.header_timeout)

    def _start(self, conn: socket.socket, slot: _Slot, handshake_timeout: float) -> None:
        loop = asyncio.get_running_loop()

        def factory() -> RequestHandler:
            handler = self.server()
            slot.handler = handler
            self._slots[handler] = slot
            return handler

        conn.setblocking(False)
        if self.ssl_context is None:
            coro = loop.connect_accepted_socket(factory, conn)
        else:  # the handshake counts toward the caps above and must finish in time
            coro = loop.connect_accepted_socket(
                factory, conn, ssl=self.ssl_context, ssl_handshake_timeout=handshake_timeout
            )
        task = loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._started(t, slot))

    def _started(self, task: asyncio.Task[Any], slot: _Slot) -> None:
        self._tasks.discard(task)
        if task.cancelled() or task.exception() is not None:
            # Handshake failed or timed out: asyncio closed the socket; no traceback.
            if slot.handler is not None:
                self._slots.pop(slot.handler, None)
            self._release(slot)
            if not task.cancelled():
                exc = task.exception()
                reason = "handshake_timeout" if isinstance(exc, TimeoutError) else "handshake"
                self.log.refused(
                    reason, f"TLS handshake failed: {type(exc).__name__}", error=type(exc).__name__
                )

    def _release(self, slot: _Slot) -> None:
        if slot.released:
            return
        slot.released = True
        self.open -= 1
        left = self.per_ip.get(slot.addr, 1) - 1
        if left:
            self.per_ip[slot.addr] = left
        else:
            self.per_ip.pop(slot.addr, None)

    def _refuse(self, conn: socket.socket, reason: str, message: str, **extra: Any) -> None:
        with contextlib.suppress(OSError):  # the peer already reset it: just close
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST)
        conn.close()
        self.log.refused(reason, message, **extra)

    def cancel_handshakes(self) -> None:
        for task in list(self._tasks):
            task.cancel()


def listening_sockets(
    host: str, port: int, *, reuse_port: bool, backlog: int
) -> list[socket.socket]:
    """Bound, listening, non-blocking sockets for ``host:port``: one per address the
    name resolves to, ``::`` with ``IPV6_V6ONLY`` off so it takes IPv4 too."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    seen: set[tuple[int, Any]] = set()
    wildcard_v6 = any(info[0] == socket.AF_INET6 and info[4][0] == "::" for info in infos)
    out: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in infos:
            if (family, address) in seen:
                continue
            seen.add((family, address))
            if wildcard_v6 and family == socket.AF_INET and address[0] == "0.0.0.0":
                continue  # the dual-stack [::] socket takes these already
            sock = socket.socket(family, kind, proto)
            out.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                dual = address[0] == "::"
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dual else 1)
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
    except OSError:
        for sock in out:
            sock.close()
        raise
    return out


class _Listener:
    """Accepts on the listening sockets and passes each connection to the gate; the
    ``asyncio.Server`` stand-in :class:`GatedSite` keeps (``close``, ``sockets``)."""

    def __init__(self, sockets: list[socket.socket], gate: Gate) -> None:
        self.sockets = sockets
        self.gate = gate
        self._loop = asyncio.get_running_loop()
        self._closed = False
        for sock in sockets:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def _accept(self, sock: socket.socket) -> None:
        for _ in range(ACCEPTS_PER_WAKE):
            try:
                conn, peer = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _RESOURCE_ERRNOS:
                    self.gate.log.refused(
                        "accept_failed",
                        f"cannot accept connections: {exc.strerror}; pausing",
                    )
                    self._loop.remove_reader(sock.fileno())
                    self._loop.call_later(ACCEPT_PAUSE, self._resume, sock)
                    return
                continue  # ECONNABORTED and the like: that one connection is gone
            try:
                self.gate.admit(conn, peer)
            except Exception:  # never let one connection stop the listener
                conn.close()
                log.exception("admitting a connection failed")

    def _resume(self, sock: socket.socket) -> None:
        if not self._closed:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for sock in self.sockets:
            self._loop.remove_reader(sock.fileno())
            sock.close()
        self.gate.cancel_handshakes()

    async def wait_closed(self) -> None:
        return None


class GatedSite(BaseSite):
    """aiohttp's ``TCPSite`` with :class:`Gate` in front: the same runner, stop and
    drain, but this module accepts the connections."""

    __slots__ = ("_gate", "_host", "_port", "_reuse_port")

    def __init__(
        self, runner: BaseRunner, host: str, port: int, gate: Gate, *, reuse_port: bool = False
    ) -> None:
        super().__init__(runner, ssl_context=gate.ssl_context, backlog=1024)
        self._gate = gate
        self._host = host
        self._port = port
        self._reuse_port = reuse_port

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        sockets = listening_sockets(
            self._host, self._port, reuse_port=self._reuse_port, backlog=self._backlog
        )
        self._server = _Listener(sockets, self._gate)  # type: ignore[assignment]
