"""A tiny raw HTTP/1.1 client for the adversarial tests: exact bytes out, parsed responses in.

aiohttp's client (like every well-behaved client) refuses to send what these tests
need: two ``Content-Length`` headers, bare LF line ends, folded headers, control
bytes in a token, an absolute-form target. This one writes whatever bytes it is
given on a fresh TCP connection and parses what comes back: status, headers and a
``Content-Length`` body, any number of responses (pipelining), skipping 1xx.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

CRLF = b"\r\n"


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""

    def header(self, name: str) -> str | None:
        values = self.all(name)
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def json(self) -> Any:
        return json.loads(self.body)


def request(
    target: bytes | str = b"/hooks/agent",
    headers: Iterable[tuple[bytes | str, bytes | str]] = (),
    body: bytes = b"",
    *,
    method: bytes | str = b"POST",
    version: bytes = b"HTTP/1.1",
    length: bool = True,
    eol: bytes = CRLF,
) -> bytes:
    """One request as bytes. ``Content-Length`` is added from ``body`` when ``length``."""

    def b(value: bytes | str) -> bytes:
        return value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")

    lines = [b(method) + b" " + b(target) + b" " + version, b"Host: 127.0.0.1"]
    lines += [b(k) + b": " + b(v) for k, v in headers]
    if length:
        lines.append(b"Content-Length: %d" % len(body))
    return eol.join(lines) + eol + eol + body


def chunked(*chunks: bytes) -> bytes:
    """A chunked body: each chunk, then the last (zero) chunk."""
    return b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"


class _Incomplete(Exception):
    pass


def _parse_one(buf: bytes, head: bool = False) -> tuple[RawResponse, int]:
    """The first complete response in ``buf`` and its length; _Incomplete otherwise."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        raise _Incomplete
    lines = buf[:end].decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = [tuple(h.split(":", 1)) for h in lines[1:]]
    headers = [(k.strip(), v.strip()) for k, v in headers]
    resp = RawResponse(status, headers)  # type: ignore[arg-type]
    start = end + 4
    if 100 <= status < 200 or head:
        return resp, start
    length = int(resp.header("Content-Length") or 0)
    if len(buf) < start + length:
        raise _Incomplete
    resp.body = buf[start : start + length]
    return resp, start + length


async def exchange(
    port: int,
    data: bytes | Iterable[bytes],
    *,
    expect: int | None = None,
    timeout: float = 10.0,
    host: str = "127.0.0.1",
    source: str | None = None,
    head: bool = False,
) -> tuple[list[RawResponse], bool]:
    """Write ``data`` (or each part of it in turn) on a new connection; read responses
    until ``expect`` final ones arrived, the server closed, or ``timeout`` passed.

    Returns (responses, closed): whether the server closed the connection. ``head``:
    the requests were HEAD, so no body follows any response."""
    reader, writer = await asyncio.open_connection(
        host, port, local_addr=(source, 0) if source else None
    )
    parts = [data] if isinstance(data, bytes) else list(data)
    responses: list[RawResponse] = []
    closed = False
    buf = b""
    try:
        for part in parts:
            writer.write(part)
            await writer.drain()
        async with asyncio.timeout(timeout):
            while expect is None or len(responses) < expect:
                chunk = await reader.read(65536)
                if not chunk:
                    closed = True
                    break
                buf += chunk
                while True:
                    try:
                        resp, used = _parse_one(buf, head)
                    except _Incomplete:
                        break
                    buf = buf[used:]
                    if resp.status >= 200:
                        responses.append(resp)
    except TimeoutError:
        pass  # the connection stayed open: ``closed`` stays False
    except ConnectionError:  # reset: the server closed with our bytes unread
        closed = True
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return responses, closed
