"""Slow and abusive clients against a real ``webhook-sidecar run`` process: header and
body trickles cut at ``limits.headerTimeout`` / ``limits.bodyTimeout``, the connection
cap (``limits.maxConnections``, sidecar/process/gate.py), and a flood of bad tokens from
one address measured against valid calls from another."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from support.clients import listening_doc, public_port
from support.common import AGENT, SECRET, Runtime, write_config
from support.load import RuntimeProcess, run_load, summary
from support.rawhttp import RawResponse, exchange, request

pytestmark = pytest.mark.slow

AUTH = ("Authorization", f"Bearer {SECRET}")
JSON_TYPE = ("Content-Type", "application/json")
BODY = json.dumps({"agent": AGENT, "message": "slow"}).encode()
SUPPORT = Path(__file__).resolve().parents[1] / "support"


def process_doc(runtime_path: Path, **limits: Any) -> dict[str, Any]:
    return listening_doc(runtime_path, limits=limits)


def start(sidecar_process: Any, folder: Path, doc: dict[str, Any]) -> tuple[Any, int]:
    admin = int(doc["sidecar"]["admin"]["listen"].rsplit(":", 1)[1])
    return sidecar_process(write_config(folder, doc), admin), public_port(doc)


async def trickle(
    port: int, head: bytes, body: bytes, gap: float
) -> tuple[RawResponse | None, float]:
    """Send ``head`` at once, then ``body`` a byte every ``gap`` seconds until a response
    arrives or the body ends; (the response, seconds from the head to it)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)
    await writer.drain()
    started = time.monotonic()
    buf = b""
    try:
        for i in range(len(body) + 1):
            if i < len(body):
                writer.write(body[i : i + 1])
                await writer.drain()
            try:
                chunk = await asyncio.wait_for(reader.read(65536), gap if i < len(body) else 15)
            except TimeoutError:
                continue
            if not chunk:
                break
            buf += chunk
            if b"\r\n\r\n" in buf:
                length = int(buf.split(b"Content-Length: ", 1)[1].split(b"\r\n", 1)[0])
                while len(buf.split(b"\r\n\r\n", 1)[1]) < length:
                    buf += await asyncio.wait_for(reader.read(65536), 5)
                break
    except ConnectionError:
        pass
    finally:
        writer.close()
    elapsed = time.monotonic() - started
    if b"\r\n\r\n" not in buf:
        return None, elapsed
    head_text, payload = buf.split(b"\r\n\r\n", 1)
    lines = head_text.decode("latin-1").split("\r\n")
    headers = [tuple(x.strip() for x in line.split(":", 1)) for line in lines[1:]]
    return RawResponse(int(lines[0].split()[1]), headers, payload), elapsed  # type: ignore[arg-type]


def assert_timeout_408(resp: RawResponse | None) -> None:
    assert resp is not None, "no response"
    body = resp.json()
    assert (resp.status, body["error"]) == (408, "request_timeout"), body
    assert body["requestId"] == resp.header("X-Request-Id")


# ---------------------------------------------------------------- slow bodies


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_body_trickling_in_gets_408_at_body_timeout(
    runtime: Runtime, short_tmp: Path, sidecar_process: Any, framing: str
) -> None:
    """A byte every 50 ms does not reset the clock: bodyTimeout bounds the whole body."""
    _, port = start(sidecar_process, short_tmp, process_doc(runtime.path, bodyTimeout="1s"))
    if framing == "chunked":
        head = request(headers=[AUTH, JSON_TYPE, ("Transfer-Encoding", "chunked")], length=False)
        body = b"".join(b"1\r\n%s\r\n" % BODY[i : i + 1] for i in range(len(BODY)))
    else:
        head = request(headers=[AUTH, JSON_TYPE, ("Content-Length", str(len(BODY)))], length=False)
        body = BODY * 2
    resp, elapsed = await trickle(port, head, body, gap=0.05)
    assert_timeout_408(resp)
    assert 0.9 < elapsed < 5
    assert runtime.calls == []


async def test_a_stalled_body_gets_408(
    runtime: Runtime, short_tmp: Path, sidecar_process: Any
) -> None:
    _, port = start(sidecar_process, short_tmp, process_doc(runtime.path, bodyTimeout="1s"))
    data = request(headers=[AUTH, JSON_TYPE, ("Content-Length", "500")], length=False) + BODY[:10]
    started = time.monotonic()
    [resp], _ = await exchange(port, data, expect=1, timeout=10)
    assert_timeout_408(resp)
    assert 0.9 < time.monotonic() - started < 5
    assert runtime.calls == []


async def test_a_slow_body_without_a_token_is_refused_at_once(
    runtime: Runtime, short_tmp: Path, sidecar_process: Any
) -> None:
    """Authentication comes before the body: an anonymous trickle costs no body wait."""
    _, port = start(sidecar_process, short_tmp, process_doc(runtime.path, bodyTimeout="5s"))
    head = request(headers=[JSON_TYPE, ("Content-Length", "500")], length=False)
    resp, elapsed = await trickle(port, head, BODY, gap=0.2)
    assert resp is not None and resp.status == 401
    assert elapsed < 3


# ---------------------------------------------------------------- slowloris


async def test_slowloris_connections_are_cut_and_do_not_block_valid_calls(
    runtime: Runtime, short_tmp: Path, sidecar_process: Any
) -> None:
    _, port = start(sidecar_process, short_tmp, process_doc(runtime.path, headerTimeout="1s"))
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    for _ in range(50):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /hooks/agent HTTP/1.1\r\nHost: x\r\n")
        held.append((reader, writer))
    started = time.monotonic()

    async def keep_trickling(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> float:
        while time.monotonic() - started < 10:
            try:
                writer.write(b"X-Slow: a\r\n")
                await writer.drain()
                if await asyncio.wait_for(reader.read(1), 0.2) == b"":
                    break
            except TimeoutError:
                continue
            except ConnectionError:
                break
        writer.close()
        return time.monotonic() - started

    trickles = [asyncio.create_task(keep_trickling(r, w)) for r, w in held]
    [resp], _ = await exchange(port, request(headers=[AUTH, JSON_TYPE], body=BODY), expect=1)
    assert resp.status == 200  # served while 50 slow heads are open
    cut_after = await asyncio.gather(*trickles)
    assert max(cut_after) < 5, "a trickling head outlived headerTimeout"
    assert len(runtime.calls) == 1


# ---------------------------------------------------------------- connection cap


async def open_idle(port: int, n: int) -> list[asyncio.StreamWriter]:
    """Open ``n`` connections and send nothing; those the cap resets so fast that the
    connect itself fails are left out."""
    writers = []
    for _ in range(n):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except ConnectionResetError:
            continue
        writers.append(writer)
    return writers


async def served(port: int) -> bool:
    """Does a valid call on a new connection get its 200?"""
    try:
        responses, _ = await exchange(
            port, request(headers=[AUTH, JSON_TYPE], body=BODY), expect=1, timeout=5
        )
    except ConnectionError:
        return False
    return bool(responses) and responses[0].status == 200


async def test_connections_beyond_max_connections_are_reset_until_one_closes(
    runtime: Runtime, short_tmp: Path, sidecar_process: Any
) -> None:
    doc = process_doc(runtime.path, maxConnections=8, headerTimeout="30s")
    proc, port = start(sidecar_process, short_tmp, doc)
    idle = await open_idle(port, 8)
    assert not await served(port)  # the ninth connection is reset before it is read
    assert runtime.calls == []
    for writer in idle[:2]:
        writer.close()
    deadline = time.monotonic() + 10
    while not await served(port):
        assert time.monotonic() < deadline, "a freed slot was never reused"
        await asyncio.sleep(0.05)
    assert len(runtime.calls) == 1
    # The cap is read on every accept: a reload that raises it lets more in at once.
    doc["sidecar"]["limits"]["maxConnections"] = 50
    write_config(short_tmp, doc)
    more = await open_idle(port, 10)
    proc.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while not await served(port):
        assert time.monotonic() < deadline, "the raised cap did not take effect"
        await asyncio.sleep(0.1)
    for writer in idle[2:] + more:
        writer.close()
    assert "maxConnections reached: connection refused" in "\n".join(proc.lines)


# ---------------------------------------------------------------- flood


@pytest.mark.parametrize("lockout", ["on", "off"])
async def test_a_bad_token_flood_from_one_address_does_not_starve_another(
    short_tmp: Path, sidecar_process: Any, lockout: str
) -> None:
    """127.0.0.2 floods bad tokens (16 callers, keep-alive): locked out after 10 (``on``),
    or never, so every flood call walks the token comparison (``off``); 127.0.0.3 makes
    valid calls before and during the flood. Every valid call succeeds; the latency
    figures are printed (README "Guarantees" quotes a run)."""
    runtime = RuntimeProcess(short_tmp / "rt.sock")
    runtime.start()
    doc = process_doc(runtime.socket_path)
    if lockout == "off":
        doc["sidecar"]["authLockout"] = {"maxFailures": 10**6}
    try:
        _, port = start(sidecar_process, short_tmp, doc)
        url = f"http://127.0.0.1:{port}/hooks/agent"
        valid = {"agent": AGENT, "message": "valid"}
        baseline = await run_load(
            url, seconds=3, concurrency=2, token=SECRET, body=valid, source="127.0.0.3"
        )
        flood = subprocess.Popen(
            [sys.executable, str(SUPPORT / "load.py"), "--url", url, "--seconds", "6",
             "--concurrency", "16", "--source", "127.0.0.2"],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        await asyncio.sleep(1.5)  # the flood is running and its address locked out
        during = await run_load(
            url, seconds=3, concurrency=2, token=SECRET, body=valid, source="127.0.0.3"
        )
        out, _ = await asyncio.to_thread(flood.communicate, timeout=30)
        flooded = json.loads(out)
    finally:
        runtime.stop()
    figures = {"baseline": summary(baseline), "during_flood": summary(during), "flood": flooded}
    print(f"\nflood figures (lockout {lockout}):", json.dumps(figures))
    assert all(r.status == 200 for r in baseline + during), figures
    refused = {"on": {"401 unauthorized": 10}, "off": {"429 locked_out": 0}}[lockout]
    assert set(flooded["counts"]) <= {"401 unauthorized", "429 locked_out"}, figures
    for key, count in refused.items():
        assert flooded["counts"].get(key, 0) == count, figures
    assert figures["during_flood"]["p99_ms"] < 2000, figures
    assert len(runtime.calls) == len(baseline) + len(during)
