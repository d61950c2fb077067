"""Public API replies (sidecar/responses.py), checked on the wire.

``JsonReply`` writes its head by hand instead of going through ``web.Response``,
so the framework's own response is the oracle: for every request shape that
changes the reply's framing (HTTP/1.0 or 1.1, keep-alive or close, HEAD), both
are served by a real aiohttp server on loopback and must agree on the status
line, every header but ``Date`` and ``Server``, the body and whether the
connection stays open.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web
from support.rawhttp import RawResponse, exchange, request

from sidecar.call import Answer, Reject
from sidecar.responses import answer_response, error_response, ok_response

RATE_LIMITED = Reject(429, "rate_limited", "slow down", {"Retry-After": "3"})
HEADERS = {"RateLimit": '"ip";r=1;t=0'}


def framework_reply(
    status: int, body: bytes, request_id: str, extra: dict[str, str]
) -> web.Response:
    """What aiohttp itself would answer with the same status, headers and body."""
    headers = {"Content-Type": "application/json", "X-Request-Id": request_id, **extra}
    return web.Response(status=status, body=body, headers=headers)


REPLIES: dict[str, Callable[[], web.StreamResponse]] = {
    "/ok": lambda: ok_response("hook:a", "rid-1", "r1", HEADERS),
    "/ok-framework": lambda: framework_reply(
        200,
        json.dumps(
            {
                "status": "ok",
                "session": "hook:a",
                "queued": True,
                "requestId": "rid-1",
                "runId": "r1",
            }
        ).encode(),
        "rid-1",
        HEADERS,
    ),
    "/err": lambda: error_response(RATE_LIMITED, "rid-2"),
    "/err-framework": lambda: framework_reply(
        429,
        json.dumps(
            {
                "status": "error",
                "error": "rate_limited",
                "message": "slow down",
                "requestId": "rid-2",
            }
        ).encode(),
        "rid-2",
        {"Retry-After": "3"},
    ),
}


@pytest.fixture
async def serve() -> AsyncIterator[
    Callable[[Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]], Awaitable[int]]
]:
    """Serve a handler on aiohttp's low-level server (as the public listener does)."""
    runners: list[web.ServerRunner] = []

    async def start(handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]) -> int:
        runner = web.ServerRunner(web.Server(handler), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        return int(runner.addresses[0][1])

    yield start
    for runner in runners:
        await runner.cleanup()


async def by_path(req: web.BaseRequest) -> web.StreamResponse:
    return REPLIES[req.path]()


def comparable(resp: RawResponse) -> tuple[int, list[tuple[str, str]], bytes]:
    headers = sorted((k.lower(), v) for k, v in resp.headers if k.lower() not in ("date", "server"))
    return resp.status, headers, resp.body


SHAPES = {
    "1.1 keep-alive": dict(version=b"HTTP/1.1", headers=()),
    "1.1 close": dict(version=b"HTTP/1.1", headers=(("Connection", "close"),)),
    "1.0": dict(version=b"HTTP/1.0", headers=()),
    "1.0 keep-alive": dict(version=b"HTTP/1.0", headers=(("Connection", "keep-alive"),)),
}


@pytest.mark.parametrize("method", ["POST", "HEAD"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("path", ["/ok", "/err"])
async def test_the_reply_frames_exactly_as_the_framework_would(
    serve: Callable[..., Awaitable[int]], path: str, shape: str, method: str
) -> None:
    port = await serve(by_path)
    got = {}
    stays_open = shape.endswith("keep-alive")
    for target in (path, path + "-framework"):
        # Twice on a connection that should stay open: the second reply shows it did.
        # Once on one that should close: the server closing ends the exchange.
        one = request(target, method=method, **SHAPES[shape])  # type: ignore[arg-type]
        data, expect = (one + one, 2) if stays_open else (one, None)
        replies, closed = await exchange(
            port, data, expect=expect, timeout=5, head=method == "HEAD"
        )
        got[target] = ([comparable(r) for r in replies], closed)
    ours, framework = got[path], got[path + "-framework"]
    assert ours == framework
    assert len(ours[0]) == (2 if stays_open else 1)
    assert ours[1] is not stays_open
    first = ours[0][0]
    if method == "HEAD":
        assert first[2] == b""  # no body, but the GET's Content-Length (RFC 9110 §9.3.2)
        assert int(dict(first[1])["content-length"]) > 0


async def test_status_line_date_and_no_server_header(serve: Callable[..., Awaitable[int]]) -> None:
    port = await serve(by_path)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request("/err", version=b"HTTP/1.0"))
    raw = await reader.read()  # HTTP/1.0 without keep-alive: the server closes
    writer.close()
    head = raw.split(b"\r\n\r\n", 1)[0].decode()
    lines = head.split("\r\n")
    assert lines[0] == "HTTP/1.0 429 Too Many Requests"
    names = [line.split(":", 1)[0].lower() for line in lines[1:]]
    assert "server" not in names  # the framework and its version stay private
    date = next(line for line in lines if line.lower().startswith("date:"))
    assert re.fullmatch(r"Date: \w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d GMT", date)


def test_ok_body_is_byte_for_byte_json_dumps() -> None:
    """The hand-spelled success body, for values json.dumps has to escape."""
    for session, run_id in [('quo"te\\back', 'ru"n\n\u00e9'), ("\u2028", "\ud800"), ("a", None)]:
        want: dict[str, object] = {
            "status": "ok",
            "session": session,
            "queued": True,
            "requestId": "rid-1",
        }
        if run_id is not None:
            want["runId"] = run_id
        assert ok_response(session, "rid-1", run_id, None)._reply == json.dumps(want).encode()


async def test_a_client_that_stops_reading_holds_the_server_back(
    serve: Callable[..., Awaitable[int]],
) -> None:
    """Back-pressure: pipelined requests from a client that reads nothing must not pile
    replies up in the server's memory. The handler notes the transport's buffer each
    time: it stays near the transport's high-water mark instead of growing without end."""
    buffered: list[int] = []
    handled = 0

    async def handler(req: web.BaseRequest) -> web.StreamResponse:
        nonlocal handled
        handled += 1
        assert req.transport is not None
        buffered.append(req.transport.get_write_buffer_size())
        return error_response(Reject(401, "unauthorized", "x" * 4000), "rid")

    port = await serve(handler)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock)
    total = 3000  # ~12 MB of replies if nothing held the server back
    writer.write(request("/x") * total)
    for _ in range(50):  # let the server run until it is stuck on the unread replies
        await asyncio.sleep(0.05)
    stuck_at = handled
    assert 0 < stuck_at < total, "the server never waited for the client"
    assert max(buffered) > 0  # the buffer did fill: the wait was exercised
    assert max(buffered) < 1024 * 1024
    received, tail, status_line = 0, b"", b"HTTP/1.1 401 "
    async with asyncio.timeout(30):  # reading again lets every reply through
        while received < total:
            data = await reader.read(1 << 20)
            assert data
            data = tail + data  # a status line may straddle two reads
            received += data.count(status_line)
            tail = data[-(len(status_line) - 1) :]
    assert handled == total
    writer.close()


def test_answer_is_a_200_with_its_fields_and_the_request_id() -> None:
    reply = answer_response(Answer("ignored", {"ignored": True}), "rid-1")
    assert reply.status == 200
    assert json.loads(reply._reply) == {"status": "ok", "ignored": True, "requestId": "rid-1"}


def test_bare_answer_is_exactly_its_fields() -> None:
    """Slack's url_verification wants exactly {"challenge": ...} back."""
    reply = answer_response(Answer("challenge", {"challenge": "3eZbrw1a"}, bare=True), "rid-2")
    assert json.loads(reply._reply) == {"challenge": "3eZbrw1a"}
