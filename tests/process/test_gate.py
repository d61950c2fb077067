"""Connection hardening against a real ``webhook-sidecar run`` process (docs/connections.md):
the accept-time checks (allowIps, maxConnections with TLS handshakes, maxConnectionsPerIp),
the handshake deadline, the refusal log's rate limit, dual stack and the open-file limit.

127.0.0.1 is the allowlisted caller, 127.0.0.2 and up are the other peers: all on lo."""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from support.clients import client_context, listening_doc, public_port
from support.common import AGENT, SECRET, Runtime, free_port, write_config
from support.rawhttp import exchange, request
from support.scrape import Scrape

from sidecar.certs import write_demo_pki

pytestmark = pytest.mark.slow

AUTH = ("Authorization", f"Bearer {SECRET}")
JSON_TYPE = ("Content-Type", "application/json")
BODY = json.dumps({"agent": AGENT, "message": "hi"}).encode()
CALL = request(headers=[AUTH, JSON_TYPE], body=BODY)
ATTACKER, OTHER, PROXY = "127.0.0.2", "127.0.0.3", "127.0.0.4"


def start(sidecar_process: Any, folder: Path, doc: dict[str, Any]) -> tuple[Any, int]:
    admin = int(doc["sidecar"]["admin"]["listen"].rsplit(":", 1)[1])
    return sidecar_process(write_config(folder, doc), admin), public_port(doc)


async def served(port: int, source: str = "127.0.0.1", host: str = "127.0.0.1") -> bool:
    """Does a valid call on a new connection from ``source`` get its 200?"""
    try:
        responses, _ = await exchange(port, CALL, expect=1, timeout=5, host=host, source=source)
    except (ConnectionError, TimeoutError):
        return False
    return bool(responses) and responses[0].status == 200


async def open_idle(
    port: int, n: int, source: str, host: str = "127.0.0.1"
) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """``n`` connections that send nothing (a refused connect is left out)."""
    out = []
    for _ in range(n):
        with contextlib.suppress(ConnectionError):
            out.append(await asyncio.open_connection(host, port, local_addr=(source, 0)))
    return out


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    """Does the server close (FIN or reset) this silent connection within ``seconds``?"""
    try:
        return await asyncio.wait_for(reader.read(1), seconds) == b""
    except ConnectionError:
        return True
    except TimeoutError:
        return False


def close_all(conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]) -> None:
    for _, writer in conns:
        writer.close()


def scrape(admin_port: int) -> Scrape:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5) as r:
        return Scrape(r.read().decode())


def log_lines(proc: Any, message: str) -> list[dict[str, Any]]:
    return [e for e in proc.json_lines() if message in e.get("msg", "")]


# ---------------------------------------------------------------- allowIps at accept


async def test_a_peer_outside_allow_ips_is_closed_before_a_byte_is_read(
    runtime: Runtime, short_tmp: Path, sidecar_process: Any
) -> None:
    doc = listening_doc(runtime.path, allowIps=["127.0.0.1/32"], limits={"headerTimeout": "30s"})
    _, port = start(sidecar_process, short_tmp, doc)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(ATTACKER, 0))
    except ConnectionError:
        pass  # reset before this (loaded) client even saw the connect complete: closed too
    else:
        assert await closed_within(reader, 3)  # not the 30 s header timeout: at accept
        writer.close()
    # A complete, valid request from there gets no HTTP answer at all (no 403 body):
    # the connection never reached aiohttp.
    with contextlib.suppress(ConnectionError):
        responses, closed = await exchange(port, CALL, timeout=5, source=ATTACKER)
        assert responses == [] and closed
    assert runtime.calls == []
    assert await served(port)


async def test_the_403_stays_for_an_address_a_trusted_proxy_names(
    runtime: Runtime, short_tmp: Path, sidecar_process: Any
) -> None:
    doc = listening_doc(runtime.path, allowIps=["127.0.0.1/32"], trustedProxies=[f"{PROXY}/32"])
    _, port = start(sidecar_process, short_tmp, doc)
    forwarded = request(headers=[AUTH, JSON_TYPE, ("X-Forwarded-For", "198.51.100.7")], body=BODY)
    [resp], _ = await exchange(port, forwarded, expect=1, source=PROXY)
    assert (resp.status, resp.json()["error"]) == (403, "ip_not_allowed")
    ok = request(headers=[AUTH, JSON_TYPE, ("X-Forwarded-For", "127.0.0.1")], body=BODY)
    [resp], _ = await exchange(port, ok, expect=1, source=PROXY)
    assert resp.status == 200


async def test_idle_connections_from_outside_the_allowlist_cannot_starve_a_caller(
    runtime: Runtime, short_tmp: Path, sidecar_process: Any
) -> None:
    """The attack of issue 14: 2x maxConnections idle connections from a peer outside
    allowIps used to fill the cap; every call from the allowlisted caller must succeed."""
    doc = listening_doc(
        runtime.path,
        allowIps=["127.0.0.1/32"],
        limits={"maxConnections": 16, "headerTimeout": "30s"},
    )
    _, port = start(sidecar_process, short_tmp, doc)
    attackers = await open_idle(port, 32, ATTACKER)
    try:
        results = [await served(port) for _ in range(20)]
    finally:
        close_all(attackers)
    assert results == [True] * 20


# ---------------------------------------------------------------- per-address cap


async def test_max_connections_per_ip_closes_the_extra_one_trusted_proxies_exempt(
    runtime: Runtime, short_tmp: Path, sidecar_process: Any
) -> None:
    doc = listening_doc(
        runtime.path,
        trustedProxies=[f"{PROXY}/32"],
        limits={"maxConnectionsPerIp": 4, "headerTimeout": "30s"},
    )
    admin = int(doc["sidecar"]["admin"]["listen"].rsplit(":", 1)[1])
    proc, port = start(sidecar_process, short_tmp, doc)
    hog = await open_idle(port, 4, OTHER)
    proxy = await open_idle(port, 6, PROXY)
    try:
        assert len(hog) == 4
        assert not await served(port, OTHER)  # the fifth from one address: reset
        assert await served(port)  # another address is not affected
        assert await served(port, PROXY)  # the proxy holds 6 already: exempt
        count = scrape(admin).value(
            "webhook_sidecar_rejections_total", reason="too_many_connections"
        )
        assert count >= 1
        hog[0][1].close()
        deadline = time.monotonic() + 10
        while not await served(port, OTHER):  # a freed slot is that address's again
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
    finally:
        close_all(hog + proxy)
    assert log_lines(proc, "maxConnectionsPerIp reached")
    assert "Traceback" not in "\n".join(proc.lines)


async def test_header_timeout_runs_from_accept_and_between_kept_alive_requests(
    runtime: Runtime, short_tmp: Path, sidecar_process: Any
) -> None:
    doc = listening_doc(runtime.path, limits={"headerTimeout": "1s"})
    _, port = start(sidecar_process, short_tmp, doc)
    [(silent, silent_w)] = await open_idle(port, 1, OTHER)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(CALL)
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        await reader.readexactly(length)  # the whole response: what is left is the close
        started = time.monotonic()
        # 1 s each; the bounds leave room for a loaded machine, and without the
        # timeout neither connection would ever be closed.
        assert await closed_within(silent, 8)  # never sent a byte
        assert await closed_within(reader, 8)  # idle after its response
        assert time.monotonic() - started < 8
    finally:
        writer.close()
        silent_w.close()


# ---------------------------------------------------------------- TLS handshakes


@pytest.fixture
def pki(short_tmp: Path) -> Path:
    out = short_tmp / "pki"
    write_demo_pki(out, ["localhost", "127.0.0.1"])
    return out


async def tls_served(port: int, ctx: ssl.SSLContext) -> bool:
    try:
        async with asyncio.timeout(5):
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
            writer.write(CALL)
            await writer.drain()
            line = await reader.readline()
            writer.close()
    except (ConnectionError, TimeoutError, ssl.SSLError, OSError):
        return False
    return line.startswith(b"HTTP/1.1 200")


async def test_tls_handshakes_count_toward_max_connections_and_time_out(
    runtime: Runtime, short_tmp: Path, sidecar_process: Any, pki: Path
) -> None:
    doc = listening_doc(
        runtime.path,
        tls={"certFile": str(pki / "server.pem"), "keyFile": str(pki / "server-key.pem")},
        limits={"maxConnections": 3, "headerTimeout": "1s"},
    )
    proc, port = start(sidecar_process, short_tmp, doc)
    ctx = client_context(pki / "ca.pem")
    assert await tls_served(port, ctx)
    silent = await open_idle(port, 3, OTHER)  # TCP only: never a ClientHello
    assert len(silent) == 3
    assert not await tls_served(port, ctx)  # the cap is full of handshakes
    started = time.monotonic()
    for reader, _ in silent:  # headerTimeout bounds the handshake (default was 60 s)
        assert await closed_within(reader, 5)
    assert time.monotonic() - started < 5
    close_all(silent)
    assert await tls_served(port, ctx)
    assert "Traceback" not in "\n".join(proc.lines)


# ---------------------------------------------------------------- the refusal log


async def test_refusals_are_logged_once_per_second_with_the_count_of_the_rest(
    runtime: Runtime, short_tmp: Path, sidecar_process: Any
) -> None:
    doc = listening_doc(runtime.path, allowIps=["127.0.0.1/32"])
    proc, port = start(sidecar_process, short_tmp, doc)
    started = time.monotonic()
    n = 0
    while time.monotonic() - started < 2.0:
        for conn in await open_idle(port, 20, ATTACKER):
            conn[1].close()
        n += 20
    await asyncio.sleep(1.1)
    close_all(await open_idle(port, 1, ATTACKER))  # the line after the flood reports the rest
    n += 1
    await asyncio.sleep(0.5)
    lines = log_lines(proc, "connection from outside allowIps refused")
    elapsed = time.monotonic() - started
    assert 2 <= len(lines) <= elapsed + 1, len(lines)
    # Every refusal is accounted for (a connect the client gave up on may not have
    # reached accept() on a loaded machine).
    assert 0.9 * n <= sum(1 + e["suppressed"] for e in lines) <= n
    assert all(e["level"] == "warning" and "exception" not in e for e in lines)
    assert "Traceback" not in "\n".join(proc.lines)


# ---------------------------------------------------------------- dual stack


async def test_listen_on_v6_wildcard_takes_ipv4_matched_as_ipv4(
    runtime: Runtime, short_tmp: Path, sidecar_process: Any
) -> None:
    port = free_port()
    doc = listening_doc(runtime.path, allowIps=["127.0.0.1/32"])
    doc["sidecar"]["listen"] = f"[::]:{port}"
    proc, _ = start(sidecar_process, short_tmp, doc)
    assert await served(port)  # IPv4 reaches [::], and matches the IPv4 allowlist entry
    assert not await served(port, source="::1", host="::1")  # ::1 is not in allowIps
    await asyncio.sleep(0.5)  # the audit line is written off the event loop
    entries = [json.loads(x) for x in proc.stdout_lines + proc.lines if x.startswith("{")]
    audit = [e for e in entries if "clientIp" in e]
    assert audit and {e["clientIp"] for e in audit} == {"127.0.0.1"}, proc.output()


# ---------------------------------------------------------------- open files


def test_the_open_file_limit_is_raised_to_the_hard_limit(
    runtime: Runtime, short_tmp: Path, sidecar_process: Any
) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    doc = listening_doc(runtime.path)
    admin = int(doc["sidecar"]["admin"]["listen"].rsplit(":", 1)[1])
    low = (256, hard)
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "run", "-c", str(write_config(short_tmp, doc))],
        stderr=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, low),
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{admin}/healthz", timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.05)
        limits = Path(f"/proc/{proc.pid}/limits").read_text()
        [line] = [x for x in limits.splitlines() if x.startswith("Max open files")]
        assert line.split()[3:5] == [str(hard), str(hard)]
    finally:
        proc.terminate()
        proc.wait(20)


def test_a_max_connections_the_limit_cannot_hold_is_refused(
    runtime: Runtime, short_tmp: Path
) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    doc = listening_doc(runtime.path, limits={"maxConnections": hard})  # 2x that is needed
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "run", "-c", str(write_config(short_tmp, doc))],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert f"config error: sidecar.limits.maxConnections: {hard} needs up to" in result.stderr
    assert f"the open-file limit is {hard}" in result.stderr
