"""The real process: ``webhook-sidecar run`` with its listeners, signals and exit codes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from support.common import AGENT, SECRET, Runtime, base_doc, free_port, write_config


def post(
    port: int, path: str, body: dict[str, Any], token: str = SECRET
) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def process_doc(runtime_path: Path, port: int, admin: int) -> dict[str, Any]:
    return base_doc(
        runtime_path, listen=f"127.0.0.1:{port}", admin={"listen": f"127.0.0.1:{admin}"}
    )


async def test_run_serves_hooks_and_admin_on_separate_ports(
    runtime: Runtime, short_tmp: Path, sidecar_process: Any
) -> None:
    port, admin = free_port(), free_port()
    proc = sidecar_process(write_config(short_tmp, process_doc(runtime.path, port, admin)), admin)
    # urllib blocks: run it in a thread so the runtime (on this loop) can answer.
    import asyncio

    status, body = await asyncio.to_thread(
        post, port, "/hooks/agent", {"agent": AGENT, "message": "hi"}
    )
    assert (status, body["status"]) == (200, "ok")
    assert await asyncio.to_thread(get, admin, "/healthz") == (200, '{"status": "ok"}')
    status, text = await asyncio.to_thread(get, admin, "/readyz")
    assert status == 200, text
    assert (await asyncio.to_thread(get, port, "/metrics"))[0] == 404  # never on the public port
    assert (await asyncio.to_thread(get, admin, "/hooks/agent"))[0] in (404, 405)
    proc.signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait) == 0
    lines = "\n".join(proc.lines)
    assert SECRET not in lines and "hi" not in [e.get("msg") for e in proc.json_lines()]


async def test_readyz_is_503_when_the_runtime_is_down(
    short_tmp: Path, sidecar_process: Any
) -> None:
    import asyncio

    port, admin = free_port(), free_port()
    sidecar_process(
        write_config(short_tmp, process_doc(short_tmp / "none.sock", port, admin)), admin
    )
    status, text = await asyncio.to_thread(get, admin, "/readyz")
    assert status == 503 and "upstream" in json.loads(text)["reason"]
    status, body = await asyncio.to_thread(post, port, "/hooks/wake", {"agent": AGENT})
    assert (status, body["error"]) == (503, "upstream_unavailable")


def test_bad_config_exits_2_naming_the_key(short_tmp: Path) -> None:
    doc = base_doc(short_tmp / "x.sock")
    doc["webhooks"]["agents"][AGENT]["sessionKey"] = 5
    path = write_config(short_tmp, doc)
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "run", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "webhooks.agents.my-agent.sessionKey: must be a string" in result.stderr


def test_missing_config_file_exits_2(short_tmp: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "run", "-c", str(short_tmp / "nope.json5")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2 and "cannot read config file" in result.stderr


@pytest.mark.parametrize("taken", ["public", "admin"])
async def test_taken_port_exits_1_naming_the_address(
    runtime: Runtime, short_tmp: Path, taken: str
) -> None:
    import asyncio
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        ports = (port, free_port()) if taken == "public" else (free_port(), port)
        path = write_config(short_tmp, process_doc(runtime.path, *ports))
        result = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "sidecar", "run", "-c", str(path)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 1
    errors = [
        e["msg"] for e in map(json.loads, result.stderr.splitlines()) if e["level"] == "error"
    ]
    assert errors == [f"cannot listen on 127.0.0.1:{port}: address already in use"]


async def test_headers_trickling_in_are_cut_off_at_header_timeout(
    runtime: Runtime, short_tmp: Path, sidecar_process: Any
) -> None:
    """Slowloris: a request head sent a byte at a time never completes; the connection
    is closed once limits.headerTimeout has passed, not kept open by the trickle."""
    import asyncio

    port, admin = free_port(), free_port()
    doc = process_doc(runtime.path, port, admin)
    doc["sidecar"]["limits"] = {"headerTimeout": "1s"}
    sidecar_process(write_config(short_tmp, doc), admin)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    loop = asyncio.get_running_loop()
    started = loop.time()
    closed_after = None
    for byte in b"POST /hooks/wake HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200:
        try:
            writer.write(bytes([byte]))
            await writer.drain()
            if await asyncio.wait_for(reader.read(1), 0.1) == b"":
                closed_after = loop.time() - started
                break
        except TimeoutError:
            continue
        except ConnectionError:
            closed_after = loop.time() - started
            break
    writer.close()
    assert closed_after is not None, "the trickling connection was never closed"
    assert 0.9 < closed_after < 5


async def test_client_hanging_up_mid_body_is_audited_not_an_internal_error(
    runtime: Runtime, short_tmp: Path, sidecar_process: Any
) -> None:
    import asyncio

    port, admin = free_port(), free_port()
    proc = sidecar_process(write_config(short_tmp, process_doc(runtime.path, port, admin)), admin)
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /hooks/agent HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + SECRET.encode() + b'\r\nContent-Length: 500\r\n\r\n{"agent"'
    )
    await writer.drain()
    await asyncio.sleep(0.3)
    writer.close()
    for _ in range(50):
        audit = [e for e in proc.json_lines() if "outcome" in e]
        if audit:
            break
        await asyncio.sleep(0.1)
    [entry] = audit
    assert (entry["status"], entry["error"]) == (400, "invalid_request")
    assert not [e for e in proc.json_lines() if e.get("level") == "error"]
    assert runtime.calls == []


# Frees 32 blocks of 1 MiB pinned between live ones, after an 8 MiB block was freed
# (which raises glibc's dynamic mmap threshold above 1 MiB when untuned). Prints how
# much of the 32 MiB the process still holds.
_ALLOCATOR_PROBE = """
import sys
from sidecar.process.tuning import tune_allocator
print(tune_allocator() if sys.argv[1] == "tuned" else False)

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

big = b"x" * (8 << 20)
del big
before = rss()
blocks, pins = [], []
for _ in range(32):  # each block followed by a live 64 KiB one: no freed block is at the top
    blocks.append(b"x" * (1 << 20))
    pins.append(b"y" * (64 << 10))
del blocks
print((rss() - before) // (1 << 20))
"""


@pytest.mark.parametrize("mode", ["tuned", "untuned"])
def test_tuned_allocator_gives_freed_tables_back(mode: str) -> None:
    """tune_allocator() fixes glibc's mmap threshold: big freed blocks leave the
    process's RSS instead of staying as heap holes (what bench/soak.py saw as growth)."""
    out = subprocess.run(
        [sys.executable, "-c", _ALLOCATOR_PROBE, mode],
        capture_output=True, text=True, timeout=60, check=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")},
    ).stdout.split()  # fmt: skip
    applied, kept_mib = out[0] == "True", int(out[1])
    if mode == "tuned":
        assert applied
        assert kept_mib < 4
    else:
        assert kept_mib > 24  # the effect the tuning exists for is real on this libc


def test_an_operators_malloc_setting_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    from sidecar.process.tuning import tune_allocator

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert tune_allocator() is False
