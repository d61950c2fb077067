"""Logs and the audit log (docs/audit-log.md): one line per request with the fixed keys, written off
the event loop without losing lines, and never a token, a secret or message text —
checked over everything a real process writes during an attack-heavy run."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support.clients import until
from support.common import (
    AGENT,
    OTHER_SECRET,
    SECRET,
    ListWriter,
    Runtime,
    Sidecar,
    base_doc,
    free_port,
    write_config,
)

from sidecar import logs
from sidecar.logs import AUDIT_KEYS, AuditLog, LineWriter

MESSAGE = "Quarterly-zebra-tangerine report for Gwendolyn"  # distinctive: easy to find if leaked


@pytest.fixture
def root_logging() -> Iterator[None]:
    """logs.setup() rewires the root logger; put pytest's handlers back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


class Pipe:
    """A real OS pipe as the log stream; nobody reads it until ``drain`` starts."""

    def __init__(self) -> None:
        r, w = os.pipe()
        self.reader = os.fdopen(r, "r", encoding="utf-8")
        self.stream = os.fdopen(w, "w", encoding="utf-8")
        self.lines: list[str] = []
        self._thread: threading.Thread | None = None

    def drain(self) -> None:
        def read() -> None:
            for line in self.reader:
                self.lines.append(line.rstrip("\n"))

        self._thread = threading.Thread(target=read, daemon=True)
        self._thread.start()

    def finish(self) -> list[str]:
        self.stream.close()
        assert self._thread is not None
        self._thread.join(10)
        self.reader.close()
        return self.lines


# ---------------------------------------------------------------- the writer thread


def test_writing_never_blocks_on_a_stuck_stream_and_close_loses_nothing() -> None:
    pipe = Pipe()  # 64 KiB of pipe buffer; the lines below are ~4 MB
    writer = LineWriter(pipe.stream)
    started = time.perf_counter()
    for i in range(20_000):
        writer.write(f"line {i:06d} " + "x" * 190)
    elapsed = time.perf_counter() - started
    assert elapsed < 2.0  # ~20 ms normally; a blocking write would hang here forever
    pipe.drain()
    writer.close()
    lines = pipe.finish()
    assert len(lines) == 20_000
    assert lines[0].startswith("line 000000") and lines[-1].startswith("line 019999")


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def test_lines_arriving_together_are_written_together() -> None:
    """One wake-up of the writer thread per batch, not per line: that is its CPU cost."""
    stream = CountingStream()
    writer = LineWriter(stream, linger=0.2)
    for i in range(100):
        writer.write(f"line {i}")
        time.sleep(0.0005)  # trickling in, like requests
    writer.close()
    assert stream.getvalue().splitlines() == [f"line {i}" for i in range(100)]
    assert stream.writes <= 3


class FlushedWrites(io.StringIO):
    """Records what reaches the stream between two flushes: one write(2) each."""

    def __init__(self) -> None:
        super().__init__()
        self.pending = ""
        self.flushed: list[str] = []

    def write(self, text: str) -> int:
        self.pending += text
        return super().write(text)

    def flush(self) -> None:
        if self.pending:
            self.flushed.append(self.pending)
        self.pending = ""


def test_a_shared_stream_gets_whole_lines_within_pipe_buf_per_write() -> None:
    """Several processes on one stderr (sidecar.workers): a write(2) of at most PIPE_BUF
    bytes never interleaves with another's (pipe(7)). Real processes: test_workers.py."""
    stream = FlushedWrites()
    writer = LineWriter(stream, linger=0.2, max_write=logs.PIPE_BUF)
    lines = [f"line {i} " + "x" * (i % 300) for i in range(400)]
    for line in lines:
        writer.write(line)
    writer.close()
    assert len(stream.flushed) > 1
    for chunk in stream.flushed:
        assert len(chunk.encode()) <= logs.PIPE_BUF and chunk.endswith("\n")
    assert "".join(stream.flushed).splitlines() == lines


def test_a_line_longer_than_pipe_buf_is_shortened_and_stays_json() -> None:
    trace = "Traceback (most recent call last):\n" + "  frame\n" * 2000 + "ValueError: the cause"
    line = json.dumps({"level": "error", "msg": "é" * 3000, "exception": trace})
    [chunk] = logs.whole_lines([line], logs.PIPE_BUF)
    assert len(chunk.encode()) <= logs.PIPE_BUF
    doc = json.loads(chunk)
    assert doc["truncated"] == len(line.encode())
    assert doc["exception"].endswith("ValueError: the cause")  # the end is kept
    assert doc["level"] == "error" and doc["msg"].startswith("é")
    text = "audit " + "y" * 9000
    [chunk] = logs.whole_lines([text], logs.PIPE_BUF)
    assert len(chunk.encode()) <= logs.PIPE_BUF
    assert chunk.startswith("audit yyy") and chunk.endswith(" ...[truncated 9006 bytes]\n")
    assert logs.whole_lines(["short"], logs.PIPE_BUF) == ["short\n"]


def test_lines_written_after_close_go_straight_to_the_stream() -> None:
    stream = io.StringIO()
    writer = LineWriter(stream)
    writer.write("before")
    writer.close()
    writer.write("after")
    assert stream.getvalue() == "before\nafter\n"


def test_close_gives_up_on_a_stream_that_never_drains() -> None:
    pipe = Pipe()
    writer = LineWriter(pipe.stream)
    for _ in range(2000):
        writer.write("y" * 200)
    started = time.perf_counter()
    writer.close(timeout=0.3)
    assert time.perf_counter() - started < 2.0  # a stuck log pipe cannot keep the process alive
    pipe.drain()  # unblock the thread so it can end
    pipe.finish()


def test_a_full_queue_drops_lines_and_says_so(root_logging: None) -> None:
    pipe = Pipe()
    writer, _ = logs.setup("info", "json", pipe.stream)
    writer.max_queued = 100
    for i in range(5000):
        writer.write(f"line {i}")
    assert writer.dropped > 0
    pipe.drain()
    writer.close()
    lines = pipe.finish()
    notes = [json.loads(line) for line in lines if line.startswith("{")]
    assert any(n["msg"].startswith("dropped ") and n["level"] == "error" for n in notes)
    written = [line for line in lines if line.startswith("line ")]
    assert 100 <= len(written) < 5000


# ---------------------------------------------------------------- the audit line


def test_audit_line_has_exactly_the_spec_keys_in_order() -> None:
    out = ListWriter()
    AuditLog(out).record(
        "rid-1", "10.0.0.1", "agent", "my-agent", "forwarded", 200, None, "current", 0.0123
    )
    [line] = out.lines
    entry = json.loads(line)
    assert tuple(entry) == AUDIT_KEYS
    assert entry == {
        "time": entry["time"], "requestId": "rid-1", "clientIp": "10.0.0.1", "endpoint": "agent",
        "agent": "my-agent", "outcome": "forwarded", "status": 200, "error": None,
        "secretId": "current", "durationMs": 12.3,
    }  # fmt: skip
    stamp = entry["time"]
    assert len(stamp) == 24 and stamp.endswith("Z") and stamp[10] == "T"
    assert (
        abs(
            time.mktime(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S")) - time.mktime(time.gmtime())
        )
        < 5
    )


@given(
    st.text(), st.text(), st.one_of(st.none(), st.text()), st.integers(0, 999), st.floats(0, 1e5)
)
def test_audit_json_is_valid_for_any_values(
    rid: str, ip: str, agent: str | None, status: int, dur: float
) -> None:
    out = ListWriter()
    AuditLog(out).record(rid, ip, "wake", agent, "rejected", status, "unauthorized", None, dur)
    entry = json.loads(out.lines[0])
    assert (entry["requestId"], entry["clientIp"], entry["agent"], entry["status"]) == (
        rid,
        ip,
        agent,
        status,
    )
    assert "\n" not in out.lines[0]  # one line, whatever the values hold
    assert abs(entry["durationMs"] - dur * 1000) <= 0.0005 + dur * 1e-12


def test_text_format_is_one_readable_line() -> None:
    out = ListWriter()
    AuditLog(out, "text").record(
        "r", "::1", "wake", None, "rejected", 401, "unauthorized", None, 0.001
    )
    [line] = out.lines
    assert line.startswith("audit time=")
    assert "requestId=r clientIp=::1 endpoint=wake agent=- outcome=rejected status=401" in line
    assert line.endswith("error=unauthorized secretId=- durationMs=1.000")


def test_configure_switches_level_and_format_at_once(root_logging: None) -> None:
    stream = io.StringIO()
    writer, audit = logs.setup("info", "json", stream)
    log = logging.getLogger("sidecar.test")
    log.info("first", extra={"k": 1})
    log.debug("hidden")
    audit.record("r1", "127.0.0.1", "wake", None, "rejected", 401, "unauthorized", None, 0.001)
    logs.configure("debug", "text", audit)
    log.debug("second")
    audit.record("r2", "127.0.0.1", "wake", None, "rejected", 401, "unauthorized", None, 0.001)
    writer.close()
    lines = stream.getvalue().splitlines()
    assert json.loads(lines[0])["msg"] == "first" and json.loads(lines[0])["k"] == 1
    assert json.loads(lines[1])["requestId"] == "r1"
    assert "DEBUG" in lines[2] and "sidecar.test: second" in lines[2]
    assert lines[3].startswith("audit ") and "requestId=r2" in lines[3]
    assert len(lines) == 4  # "hidden" was below the level


async def test_malformed_requests_are_logged_without_their_bytes(
    root_logging: None, sidecar: Sidecar
) -> None:
    """aiohttp quotes the offending raw line, which may be an Authorization header."""
    stream = io.StringIO()
    writer, _ = logs.setup("debug", "json", stream)
    host, port = sidecar.client.server.host, sidecar.client.server.port
    for raw in (
        f"POST /hooks/agent HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {SECRET}\x01\r\n\r\n",
        f"POST /hooks/agent HTTP/1.1\r\nX-{SECRET}: 1\x00\r\n\r\n",
        f"{SECRET} /hooks/agent HTTP/1.1\r\n\r\n",
        f"POST /hooks/agent HTTP/1.1\r\nHost: x\r\nX-Big: {SECRET * 200}\r\n\r\n",
    ):
        reader, w = await asyncio.open_connection(host, port)
        w.write(raw.encode("latin-1"))
        assert (await reader.read(100)).startswith(b"HTTP/1.")
        w.close()
    writer.close()
    text = stream.getvalue()
    assert SECRET not in text and SECRET[:16] not in text
    entries = [json.loads(line) for line in text.splitlines()]
    refused = [e for e in entries if e["msg"].startswith("refused a malformed request")]
    assert len(refused) == 4 and {e["level"] for e in refused} == {"warning"}
    assert all("exception" not in e for e in refused)


# ---------------------------------------------------------------- audit lines from the app


async def test_one_audit_line_per_request_with_what_happened(
    make_sidecar: Any, runtime: Runtime
) -> None:
    doc = base_doc(runtime.path, trustedProxies=["127.0.0.1/32"])
    del doc["webhooks"]["secret"]
    doc["webhooks"]["secrets"] = [{"id": "current", "env": "TEST_WEBHOOK_SECRET"}]
    sc = await make_sidecar(doc)
    body = {"agent": AGENT, "message": MESSAGE}
    xff = {"X-Forwarded-For": "198.51.100.23"}
    await sc.post("/hooks/agent", body, headers={**xff, "X-Request-Id": "req-ok"})
    await sc.post("/hooks/agent", body, token="nope-" * 8, headers={"X-Request-Id": "req-401"})
    await sc.post(
        "/hooks/agent", {"agent": "ghost", "message": MESSAGE}, headers={"X-Request-Id": "req-404"}
    )
    await sc.post("/hooks/agent", {"agent": AGENT}, headers={"X-Request-Id": "req-400"})
    await runtime.stop()
    await sc.post("/hooks/wake", {"agent": AGENT}, headers={"X-Request-Id": "req-503"})

    entries = {e["requestId"]: e for e in sc.audit.entries()}
    assert len(sc.audit.lines) == 5 == len(entries)
    ok = entries["req-ok"]
    assert ok["clientIp"] == "198.51.100.23"  # the resolved address, not the proxy's
    fields = ("endpoint", "agent", "outcome", "status", "error", "secretId")
    assert [ok[f] for f in fields] == ["agent", AGENT, "forwarded", 200, None, "current"]
    assert 0 < ok["durationMs"] < 10_000
    bad = entries["req-401"]
    assert (bad["agent"], bad["outcome"], bad["status"], bad["error"], bad["secretId"]) == (
        None, "rejected", 401, "unauthorized", None,
    )  # fmt: skip
    assert bad["clientIp"] == "127.0.0.1"
    # An unknown agent name is request input: not logged.
    assert (entries["req-404"]["agent"], entries["req-404"]["error"]) == (None, "agent_not_found")
    assert (entries["req-400"]["agent"], entries["req-400"]["error"]) == (None, "invalid_request")
    down = entries["req-503"]
    assert (down["outcome"], down["status"], down["error"]) == (
        "upstream_failed",
        503,
        "upstream_unavailable",
    )
    everything = "\n".join(sc.audit.lines)
    assert MESSAGE not in everything and SECRET not in everything


async def test_the_agent_is_logged_only_after_authentication(sidecar: Sidecar) -> None:
    await sidecar.post("/hooks/agent", {"agent": AGENT, "message": MESSAGE}, token=None)
    await sidecar.post("/hooks/agent", {"agent": AGENT, "message": MESSAGE}, token=OTHER_SECRET)
    assert [e["agent"] for e in sidecar.audit.entries()] == [None, None]


async def test_a_token_sent_as_request_id_is_replaced(sidecar: Sidecar) -> None:
    status, headers, body = await sidecar.post(
        "/hooks/wake", {"agent": AGENT}, headers={"X-Request-Id": SECRET}
    )
    assert status == 200 and body["requestId"] == headers["X-Request-Id"] != SECRET
    assert SECRET not in sidecar.audit.lines[0]


# ---------------------------------------------------------------- the real process under attack


class FailingRuntime:
    """A raw runtime on a Unix socket that fails in the ways the message asks for:
    ``echo500`` answers 500 echoing the request; ``garbage`` answers invalid HTTP that
    quotes the message; anything else is a normal 200."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._serve, str(self.path))

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1]) for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )  # fmt: skip
                request = head + await reader.readexactly(length)
                if b"echo500" in request:
                    writer.write(
                        b"HTTP/1.1 500 Oops\r\nContent-Length: %d\r\n\r\n%s"
                        % (len(request), request)
                    )
                elif b"garbage" in request:
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nX-Echo: "
                        + request.replace(b"\r\n", b" ")
                        + b"\x00\r\n\r\n"
                    )
                else:
                    writer.write(b'HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n{"ok":true}')
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, StopIteration):
            pass
        finally:
            writer.close()


@pytest.mark.slow
async def test_nothing_the_process_writes_holds_a_secret_or_a_message(
    short_tmp: Path, sidecar_process: Any
) -> None:
    upstream_token = "u9T" + "e4f1a7c3b5d9" * 5
    new_secret = "n3w5" + "0a9b8c7d6e5f" * 5  # only ever in the broken config of a reload
    (short_tmp / "previous").write_text(OTHER_SECRET + "\n")
    (short_tmp / "token").write_text(upstream_token + "\n")
    rt = FailingRuntime(short_tmp / "rt.sock")
    await rt.start()
    port, admin = free_port(), free_port()
    doc = base_doc(
        rt.path, listen=f"127.0.0.1:{port}", admin={"listen": f"127.0.0.1:{admin}"},
        trustedProxies=["127.0.0.1/32"], authLockout={"maxFailures": 1000},
        limits={"maxBodyBytes": 2048}, log={"level": "debug", "format": "json"},
    )  # fmt: skip
    doc["sidecar"]["upstream"]["token"] = {"file": str(short_tmp / "token")}
    del doc["webhooks"]["secret"]
    doc["webhooks"]["secrets"] = [
        {"id": "current", "env": "TEST_WEBHOOK_SECRET"},
        {"id": "previous", "file": str(short_tmp / "previous")},
    ]
    config_path = write_config(short_tmp, doc)
    proc = sidecar_process(config_path, admin)
    sent = 0  # requests that reach the sidecar's handler: each must have one audit line

    def exchange(raw: bytes) -> bytes:
        """Send raw bytes, return one complete reply (aiohttp may linger on unread bodies)."""
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(raw)
            reply = b""
            while b"\r\n\r\n" not in reply and (chunk := s.recv(65536)):
                reply += chunk
            head, _, body = reply.partition(b"\r\n\r\n")
            length = next(
                (int(line.split(b":")[1]) for line in head.split(b"\r\n")
                 if line.lower().startswith(b"content-length:")), 0,
            )  # fmt: skip
            while len(body) < length and (chunk := s.recv(65536)):
                body += chunk
            assert head.startswith(b"HTTP/1."), raw[:100]
            return head + b"\r\n\r\n" + body

    def post(
        path: str, body: Any, token: str | None = SECRET, headers: dict[str, str] | None = None
    ) -> int:
        nonlocal sent
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        h = {"Host": "x", "Connection": "close", "Content-Type": "application/json",
             "Content-Length": str(len(data)), **(headers or {})}  # fmt: skip
        if token is not None:
            h["Authorization"] = f"Bearer {token}"
        head = f"POST {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items()) + "\r\n"
        reply = exchange(head.encode("latin-1") + data)
        sent += 1
        return int(reply.split(b" ", 2)[1])

    def attack() -> list[int]:
        msg = {"agent": AGENT, "message": MESSAGE}
        codes = [
            post("/hooks/agent", msg),  # a good call
            post("/hooks/agent", msg, token=OTHER_SECRET),  # the previous secret
            post("/hooks/agent", msg, token=SECRET[:-1] + "0"),  # a near miss
            post("/hooks/agent", msg, token=SECRET + " "),
            post("/hooks/agent", msg, token=new_secret),
            post("/hooks/agent", msg, token=None, headers={"Authorization": f"Basic {SECRET}"}),
            post(f"/hooks/agent?token={SECRET}", msg),
            post(f"/hooks/agent?access_token={OTHER_SECRET}&message={MESSAGE}", msg, token=None),
            post(f"/{SECRET}", msg),
            post(
                "/hooks/agent",
                msg,
                token=None,
                headers={
                    "X-Api-Key": SECRET,
                    "Cookie": f"token={SECRET}",
                    "Proxy-Authorization": f"Bearer {SECRET}",
                    "X-Auth-Token": OTHER_SECRET,
                    "X-Request-Id": OTHER_SECRET,
                    "User-Agent": MESSAGE,
                },
            ),
            post("/hooks/agent", msg, headers={"X-Request-Id": SECRET, "X-Forwarded-For": SECRET}),
            post("/hooks/agent", msg, headers={"X-Forwarded-For": f"{MESSAGE}, 10.0.0.1"}),
            post("/hooks/agent", msg, headers={"Idempotency-Key": SECRET}),
            post("/hooks/agent", {"agent": AGENT, "message": MESSAGE * 100}),  # over maxBodyBytes
            post("/hooks/agent", {"agent": AGENT, "message": MESSAGE, SECRET: MESSAGE}),
            post("/hooks/agent", {"agent": SECRET, "message": MESSAGE}, token=OTHER_SECRET),
            post("/hooks/agent", b'{"agent": "my-agent", "message": "' + MESSAGE.encode() + b'"'),
            post("/hooks/agent", {"agent": AGENT, "message": "echo500 " + MESSAGE}),  # upstream 500
            post("/hooks/agent", {"agent": AGENT, "message": "garbage " + MESSAGE}),  # bad reply
        ]
        # Oversized and malformed framing: refused by aiohttp's parser before the handler.
        big = "POST /hooks/agent HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        big += f"Authorization: Bearer {SECRET}\r\n"
        exchange((big + f"Content-Length: 999999999\r\n\r\n{MESSAGE}").encode())
        exchange((big + f"X-Big: {SECRET * 200}\r\n\r\n").encode())
        exchange(
            (big + f"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n{MESSAGE}").encode()
        )
        exchange(
            f"POST /hooks/agent HTTP/1.1\r\nAuthorization: Bearer {SECRET}\x01\r\n\r\n".encode()
        )
        exchange((big + f"Transfer-Encoding: chunked\r\n\r\nzz\r\n{MESSAGE}\r\n0\r\n\r\n").encode())
        sent_before = sent
        codes.append(
            post("/hooks/agent", b"x" * 4096 + MESSAGE.encode())
        )  # 413 from Content-Length
        assert sent == sent_before + 1
        return codes

    codes = await asyncio.to_thread(attack)
    assert codes[:3] == [200, 200, 401]
    assert codes[-3:-1] == [502, 502] and codes[-1] == 413
    # A reload with a broken config that holds a new secret: refused, counted, not echoed.
    broken = json.loads(config_path.read_text())
    broken["webhooks"]["secrets"].append(
        {"id": "next", "value": new_secret, "notAfter": "yesterday"}
    )
    broken["sidecar"]["shutdownTimout"] = new_secret
    config_path.write_text(json.dumps(broken))
    proc.signal(signal.SIGHUP)
    await until(lambda: any("reload refused" in line for line in proc.lines))
    assert await asyncio.to_thread(post, "/hooks/wake", {"agent": AGENT}) == 200  # still serving
    proc.signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait) == 0
    await rt.stop()

    everything = "\n".join(proc.lines + proc.stdout_lines)
    assert "reload refused" in everything and "refused a malformed request" in everything
    for needle in (SECRET, OTHER_SECRET, upstream_token, new_secret, MESSAGE, "Zebra", "zebra"):
        for fragment in (needle, needle[:12], needle[-12:]):
            assert fragment not in everything, f"{fragment!r} leaked"
    audit = [e for e in proc.json_lines() if "outcome" in e]
    assert len(audit) == sent  # exactly one line per request that reached the sidecar
    assert all(tuple(e) == AUDIT_KEYS for e in audit)
    assert len({e["requestId"] for e in audit}) == sent
