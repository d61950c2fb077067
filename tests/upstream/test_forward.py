"""The forwarder against real runtimes on real Unix sockets and loopback TCP: success,
a dead runtime, a slow one, a busy one, a broken one, and the keep-alive race."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from support.common import AGENT, MakeSidecar, Runtime, Sidecar, base_doc, free_port

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class FakeRuntime:
    """A runtime whose behaviour each test chooses, on a real Unix socket or TCP port."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[tuple[str, Any, bytes]] = []
        self.runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.path, request.headers.copy(), await request.read()))
        return await self.handler(request)

    async def start_unix(self, path: Path) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.UnixSite(self.runner, str(path)).start()

    async def start_tcp(self, port: int) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def fake(short_tmp: Path) -> AsyncIterator[Callable[[Handler], Awaitable[FakeRuntime]]]:
    started: list[FakeRuntime] = []

    async def start(handler: Handler) -> FakeRuntime:
        rt = FakeRuntime(handler)
        await rt.start_unix(short_tmp / "fake.sock")
        started.append(rt)
        return rt

    yield start
    for rt in started:
        await rt.stop()


@contextlib.asynccontextmanager
async def raw_server(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]], path: Path
) -> AsyncIterator[None]:
    """A bare asyncio server speaking whatever bytes a test wants; every connection it
    accepted is closed on exit (Python 3.11's Server.close() leaves them open)."""
    writers: list[asyncio.StreamWriter] = []

    async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        try:
            await handler(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_unix_server(tracked, str(path))
    try:
        yield
    finally:
        server.close()
        for writer in writers:
            writer.close()
        await server.wait_closed()


def content_length(head: bytes) -> int:
    line = next(x for x in head.split(b"\r\n") if x.lower().startswith(b"content-length"))
    return int(line.split(b":")[1])


def json_reply(status: int, body: Any = None, headers: dict[str, str] | None = None) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.json_response(
            body if body is not None else {"ok": status < 300}, status=status, headers=headers
        )

    return handler


async def upstream_sidecar(make_sidecar: MakeSidecar, short_tmp: Path, **upstream: Any) -> Sidecar:
    doc = base_doc(short_tmp / "fake.sock")
    doc["sidecar"]["upstream"].update(upstream)
    return await make_sidecar(doc)


WAKE = {"agent": AGENT}


async def test_forwarded_body_is_json_with_any_message_escaped(
    make_sidecar: Any, short_tmp: Path, fake: Any
) -> None:
    """The body is spelled out by hand: byte for byte what json.dumps writes."""
    rt = await fake(json_reply(200, {"ok": True}))
    sc = await upstream_sidecar(make_sidecar, short_tmp)
    message = 'quote " backslash \\ newline \n control \x01 \u00e9 \u2028 \U0001f600 end'
    status, _, body = await sc.post("/hooks/agent", {**WAKE, "message": message})
    assert status == 200, body
    [(_, _, raw)] = rt.requests
    want = {"agent": AGENT, "message": message, "sessionKey": "webhook-session",
            "requestId": body["requestId"]}  # fmt: skip
    assert raw == json.dumps(want).encode()
    status, _, body = await sc.post("/hooks/wake", WAKE)
    assert status == 200, body
    want = {"agent": AGENT, "sessionKey": "webhook-session", "requestId": body["requestId"]}
    assert rt.requests[1][2] == json.dumps(want).encode()


async def test_forward_protocol_request_is_exactly_as_specified(
    make_sidecar: Any, short_tmp: Path, fake: Any
) -> None:
    rt = await fake(json_reply(200, {"ok": True, "runId": "r-1"}))
    (short_tmp / "token").write_text("upstream-token-value\n")
    sc = await upstream_sidecar(make_sidecar, short_tmp, token={"file": str(short_tmp / "token")})
    status, headers, body = await sc.post(
        "/hooks/agent", {**WAKE, "message": "hello"}, headers={"Idempotency-Key": "k1"}
    )
    assert status == 200 and body["runId"] == "r-1"
    [(path, sent, raw)] = rt.requests
    assert path == "/hooks/agent"
    assert json.loads(raw) == {
        "agent": AGENT,
        "message": "hello",
        "sessionKey": "webhook-session",
        "requestId": body["requestId"],
    }
    assert sent["Content-Type"] == "application/json"
    assert sent["X-Request-Id"] == body["requestId"] == headers["X-Request-Id"]
    assert sent["X-Forwarded-For"] == "127.0.0.1"
    assert sent["X-Webhook-Secret-Id"] == "default"
    assert sent["Authorization"] == "Bearer upstream-token-value"
    assert sent["Idempotency-Key"] == "k1"


async def test_any_2xx_is_success_and_run_id_is_optional(
    make_sidecar: Any, short_tmp: Path, fake: Any
) -> None:
    async def accepted(request: web.Request) -> web.StreamResponse:
        return web.Response(status=202, text="queued")

    await fake(accepted)
    sc = await upstream_sidecar(make_sidecar, short_tmp)
    status, _, body = await sc.post("/hooks/wake", WAKE)
    assert status == 200 and "runId" not in body


async def test_dead_runtime_is_503_upstream_unavailable_with_retry_after(
    make_sidecar: Any, short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sc = await upstream_sidecar(make_sidecar, short_tmp)  # nothing listens on fake.sock
    status, headers, body = await sc.post("/hooks/wake", WAKE)
    assert (status, body["error"]) == (503, "upstream_unavailable")
    assert headers["Retry-After"].isdigit()
    # The log says where it looked; the answer does not (the caller need not know).
    assert f"runtime unreachable at {short_tmp / 'fake.sock'}" in caplog.text
    assert "fake.sock" not in body["message"]
    audit = sc.audit.entries()[-1]
    assert audit["outcome"] == "upstream_failed" and audit["error"] == "upstream_unavailable"


async def test_refused_tcp_port_is_503(
    make_sidecar: Any, short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    doc = base_doc(short_tmp / "unused.sock")
    doc["sidecar"]["upstream"] = {"url": f"http://127.0.0.1:{free_port()}"}
    sc = await make_sidecar(doc)
    status, _, body = await sc.post("/hooks/wake", WAKE)
    assert (status, body["error"]) == (503, "upstream_unavailable")
    assert f"runtime unreachable at {doc['sidecar']['upstream']['url']}" in caplog.text


@pytest.mark.parametrize("runtime_status", [429, 503])
async def test_busy_runtime_is_503_with_its_retry_after(
    make_sidecar: Any, short_tmp: Path, fake: Any, runtime_status: int
) -> None:
    await fake(json_reply(runtime_status, {"error": "busy"}, {"Retry-After": "17"}))
    sc = await upstream_sidecar(make_sidecar, short_tmp)
    status, headers, body = await sc.post("/hooks/wake", WAKE)
    assert (status, body["error"], headers["Retry-After"]) == (503, "upstream_unavailable", "17")


async def test_busy_runtime_with_a_date_retry_after_gets_ours(
    make_sidecar: Any, short_tmp: Path, fake: Any
) -> None:
    await fake(json_reply(503, {}, {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}))
    sc = await upstream_sidecar(make_sidecar, short_tmp)
    _, headers, _ = await sc.post("/hooks/wake", WAKE)
    assert headers["Retry-After"] == "5"


@pytest.mark.parametrize("runtime_status", [400, 401, 404, 500, 502])
async def test_other_runtime_errors_are_502(
    make_sidecar: Any, short_tmp: Path, fake: Any, runtime_status: int
) -> None:
    await fake(json_reply(runtime_status, {"error": "internal detail that must not leak"}))
    sc = await upstream_sidecar(make_sidecar, short_tmp)
    status, _, body = await sc.post("/hooks/wake", WAKE)
    assert (status, body["error"]) == (502, "upstream_error")
    assert "internal detail" not in body["message"]


async def test_slow_runtime_is_504_after_the_timeout(
    make_sidecar: Any, short_tmp: Path, fake: Any
) -> None:
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        await release.wait()
        return web.json_response({"ok": True})

    await fake(slow)
    sc = await upstream_sidecar(make_sidecar, short_tmp, timeout="300ms")
    loop = asyncio.get_running_loop()
    started = loop.time()
    status, _, body = await sc.post("/hooks/wake", WAKE)
    elapsed = loop.time() - started
    release.set()
    assert (status, body["error"]) == (504, "upstream_timeout")
    assert 0.25 < elapsed < 5


async def test_garbage_reply_is_502(make_sidecar: Any, short_tmp: Path) -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        await writer.drain()

    async with raw_server(garbage, short_tmp / "fake.sock"):
        sc = await upstream_sidecar(make_sidecar, short_tmp)
        status, _, body = await sc.post("/hooks/wake", WAKE)
    assert (status, body["error"]) == (502, "upstream_error")


async def test_runtime_closing_without_reply_is_503(make_sidecar: Any, short_tmp: Path) -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")

    async with raw_server(hang_up, short_tmp / "fake.sock"):
        sc = await upstream_sidecar(make_sidecar, short_tmp)
        status, _, body = await sc.post("/hooks/wake", WAKE)
    assert (status, body["error"]) == (503, "upstream_unavailable")


async def test_connections_are_reused(make_sidecar: Any, short_tmp: Path) -> None:
    """Ten sequential calls over one keep-alive connection."""
    connections = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                break
            await reader.readexactly(content_length(head))
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nContent-Type: application/json\r\n\r\n"
                b'{"ok":true}'
            )

    async with raw_server(serve, short_tmp / "fake.sock"):
        sc = await upstream_sidecar(make_sidecar, short_tmp)
        for _ in range(10):
            assert (await sc.post("/hooks/wake", WAKE))[0] == 200
    assert connections == 1


EMPTY_200 = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """One whole request off a raw connection; its head."""
    head = await reader.readuntil(b"\r\n\r\n")
    await reader.readexactly(content_length(head))
    return head


async def test_a_call_the_runtime_read_is_never_sent_twice(
    make_sidecar: Any, short_tmp: Path
) -> None:
    """The runtime answers the first call, then reads the second one on the same
    keep-alive connection and closes it without replying. It may have started the
    run: the pool must not send the call again (a duplicate agent run); the caller
    gets 503 and the runtime has seen each call once."""
    heads: list[bytes] = []
    connections = 0

    async def read_then_hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        heads.append(await read_request(reader))
        if len(heads) > 1:
            writer.close()  # read it, then hang up without a byte of reply
            return
        writer.write(EMPTY_200)
        await writer.drain()
        heads.append(await read_request(reader))  # the reuse
        writer.close()

    async with raw_server(read_then_hang_up, short_tmp / "fake.sock"):
        sc = await upstream_sidecar(make_sidecar, short_tmp)
        assert (await sc.post("/hooks/wake", WAKE))[0] == 200
        status, _, body = await sc.post("/hooks/wake", WAKE)
        await asyncio.sleep(0.2)  # a retry, if there were one, would land by now
    assert (status, body["error"]) == (503, "upstream_unavailable")
    assert len(heads) == 2 and connections == 1


async def test_an_idle_connection_the_runtime_closed_is_replaced_transparently(
    make_sidecar: Any, short_tmp: Path
) -> None:
    """The runtime closes each connection soon after answering on it (its keep-alive
    ran out): nothing of the next call was written to the closed connection, so the
    pool uses a fresh one and the caller never notices."""
    connections = 0

    async def short_keep_alive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await read_request(reader)
        writer.write(EMPTY_200)
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()

    async with raw_server(short_keep_alive, short_tmp / "fake.sock"):
        sc = await upstream_sidecar(make_sidecar, short_tmp)
        for _ in range(3):
            assert (await sc.post("/hooks/wake", WAKE))[0] == 200
            await asyncio.sleep(0.2)
    assert connections == 3


async def test_tcp_upstream_works(make_sidecar: Any, short_tmp: Path) -> None:
    port = free_port()
    rt = FakeRuntime(json_reply(200, {"ok": True, "runId": "tcp-run"}))
    await rt.start_tcp(port)
    try:
        doc = base_doc(short_tmp / "unused.sock")
        doc["sidecar"]["upstream"] = {"url": f"http://127.0.0.1:{port}"}
        sc = await make_sidecar(doc)
        status, _, body = await sc.post("/hooks/wake", WAKE)
        assert (status, body["runId"]) == (200, "tcp-run")
        assert rt.requests[0][1]["Host"] == "127.0.0.1"
    finally:
        await rt.stop()


async def test_runtime_restart_is_survived(make_sidecar: Any, runtime: Runtime) -> None:
    sc = await make_sidecar(base_doc(runtime.path))
    assert (await sc.post("/hooks/wake", WAKE))[0] == 200
    await runtime.stop()
    assert (await sc.post("/hooks/wake", WAKE))[0] == 503
    await runtime.start()
    assert (await sc.post("/hooks/wake", WAKE))[0] == 200
