"""A minimal pooled HTTP/1.1 client for one local upstream (Unix socket or loopback TCP).

The forwarder is the hot path. aiohttp's ``ClientSession`` costs about 2.5x the
CPU per call of a bare keep-alive connection, because it is built for the open
internet (cookies, redirects, proxies, many hosts). The runtime is one trusted
peer next to us, so this client writes a prebuilt request and parses the reply
with llhttp (``httptools``), reusing idle connections LIFO.

Idle connections are dropped after ``idle_timeout`` (below OpenClaw's 5 s
keep-alive), and one the runtime closed while idle is never reused. A call is
sent again on a fresh connection only when not one byte of it was written to the
old one (the connection was found closed before the write). Once the request is
written, a connection that closes without a reply is an error for the caller,
never a second send: the runtime may have read the request and started the
agent run, and a retry would run it twice (docs/upstream.md).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httptools

MAX_RESPONSE_BYTES = 1 << 20


class UpstreamConnectError(ConnectionError):
    """The runtime could not be reached (no socket, refused, reset before replying)."""


class _NotSent(UpstreamConnectError):
    """The connection was closed before one byte of the request was written."""


class UpstreamProtocolError(ConnectionError):
    """The runtime's reply was not valid HTTP or was too large."""


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    headers: dict[bytes, bytes]  # lower-cased names; the last value of a repeated header
    body: bytes


class _Connection(asyncio.Protocol):
    """One keep-alive connection; at most one request in flight."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[Response] | None = None
        self.closed = False
        self.idle_since = 0.0
        self._headers: dict[bytes, bytes] = {}
        self._body: list[bytes] = []
        self._size = 0

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamProtocolError("unexpected protocol upgrade"))
        except httptools.HttpParserError as exc:
            self._fail(UpstreamProtocolError(f"invalid HTTP reply: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(UpstreamConnectError("connection closed by the runtime"))

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.lower()] = value

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > MAX_RESPONSE_BYTES:
            self._fail(UpstreamProtocolError("reply body too large"))
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        waiter = self.waiter
        response = Response(self.parser.get_status_code(), self._headers, b"".join(self._body))
        if not self.parser.should_keep_alive():
            self.close()
        if waiter is not None and not waiter.done():
            waiter.set_result(response)

    # ours
    def _fail(self, exc: Exception) -> None:
        waiter = self.waiter
        self.close()
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    async def exchange(self, request: bytes) -> Response:
        assert self.transport is not None
        if self.closed or self.transport.is_closing():
            raise _NotSent("connection closed before the request was written")
        self._headers = {}
        self._body = []
        self._size = 0
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        try:
            return await self.waiter
        finally:
            self.waiter = None


Connector = Callable[
    [Callable[[], _Connection]], Awaitable[tuple[asyncio.BaseTransport, _Connection]]
]


class Pool:
    """Idle keep-alive connections to one upstream, reused most-recent first."""

    def __init__(
        self,
        connect: Connector,
        *,
        idle_timeout: float = 4.0,
        max_idle: int = 64,
    ) -> None:
        self._connect = connect
        self.idle_timeout = idle_timeout
        self.max_idle = max_idle
        self._idle: list[_Connection] = []
        self._closed = False

    @classmethod
    def unix(cls, path: str, **kwargs: float) -> Pool:
        loop = asyncio.get_running_loop()
        return cls(lambda factory: loop.create_unix_connection(factory, path), **kwargs)  # type: ignore[arg-type]

    @classmethod
    def tcp(cls, host: str, port: int, **kwargs: float) -> Pool:
        loop = asyncio.get_running_loop()
        return cls(lambda factory: loop.create_connection(factory, host, port), **kwargs)  # type: ignore[arg-type]

    async def _new(self) -> _Connection:
        try:
            _, conn = await self._connect(_Connection)
        except OSError as exc:
            raise UpstreamConnectError(exc.strerror or type(exc).__name__) from None
        return conn

    def _take_idle(self) -> _Connection | None:
        idle = self._idle
        horizon = time.monotonic() - self.idle_timeout
        while idle:
            conn = idle.pop()
            if not conn.closed and conn.idle_since > horizon:
                return conn
            conn.close()
        return None

    async def request(self, raw: bytes) -> Response:
        """Send one request (complete bytes) and return the reply. No timeout of its own:
        callers wrap it in one, and a cancelled exchange closes its connection."""
        conn = self._take_idle()
        if conn is not None:
            try:
                return await self._exchange(conn, raw)
            except _NotSent:
                pass  # nothing reached the runtime: safe to send on a fresh connection
        return await self._exchange(await self._new(), raw)

    async def _exchange(self, conn: _Connection, raw: bytes) -> Response:
        try:
            response = await conn.exchange(raw)
        except BaseException:
            conn.close()
            raise
        if not conn.closed and not self._closed and len(self._idle) < self.max_idle:
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:
            conn.close()
        return response

    async def probe(self) -> None:
        """Open and close one connection: does the upstream accept connections?"""
        conn = await self._new()
        conn.close()

    def close(self) -> None:
        self._closed = True
        for conn in self._idle:
            conn.close()
        self._idle.clear()
