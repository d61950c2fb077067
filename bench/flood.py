"""Connection flood: can an attacker's idle connections starve an allowlisted caller?

Starts bench/runtime.py and a real sidecar (``--sidecar-src``, default this
checkout) on loopback, with ``allowIps: ["127.0.0.1/32"]`` and
``limits.maxConnections: --max-connections``. Then, for ``--duration`` seconds:

- the attacker, from 127.0.0.2, keeps ``--attackers`` connections open (default
  2x maxConnections) and sends nothing on them, reopening any the sidecar closes
  (at most ``--max-opens`` connects in all, so the flood is bounded);
- the caller, from 127.0.0.1, makes valid calls, each on a new connection
  (``--callers`` at a time), and counts the 200s.

With ``--attacker-allowed`` the attacker's address is in allowIps too, so what
protects the caller is ``maxConnectionsPerIp`` rather than the accept-time
allowlist check.

Prints one JSON object: calls made, answered 200, the ratio, connects the
attacker made, and the sidecar's log lines during the flood other than the
audit lines of the caller's calls (total and per second: the refusal log is
rate-limited, docs/connections.md). Loopback only.

    python bench/flood.py                      # this checkout
    python bench/flood.py --sidecar-src /work/main
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
CALLER, ATTACKER = "127.0.0.1", "127.0.0.2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, proc: subprocess.Popen[Any], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} not up within {timeout}s")


async def attacker(port: int, n: int, until: float, max_opens: int) -> int:
    """Keep ``n`` idle connections open from ATTACKER; returns how many connects it made."""
    opens = 0
    held: list[asyncio.StreamWriter] = []
    watchers: set[asyncio.Task[None]] = set()
    while time.monotonic() < until and opens < max_opens:
        held = [w for w in held if not w.is_closing() and not w.transport.is_closing()]
        want = min(n - len(held), max_opens - opens)
        for _ in range(want):
            opens += 1
            with contextlib.suppress(OSError):
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", port, local_addr=(ATTACKER, 0)
                )
                held.append(writer)
                task = asyncio.ensure_future(_notice_close(reader, writer))
                watchers.add(task)
                task.add_done_callback(watchers.discard)
        await asyncio.sleep(0.05)
    for w in held:
        w.close()
    for task in watchers:
        task.cancel()
    return opens


async def _notice_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        await reader.read(1)
    writer.close()


async def caller(port: int, request: bytes, until: float) -> tuple[int, int]:
    calls = ok = 0
    while time.monotonic() < until:
        calls += 1
        try:
            async with asyncio.timeout(5):
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", port, local_addr=(CALLER, 0)
                )
                writer.write(request)
                line = await reader.readline()
                writer.close()
            ok += line.startswith(b"HTTP/1.1 200")
        except (OSError, TimeoutError):
            pass
    return calls, ok


async def flood(args: argparse.Namespace, port: int, secret: str, log: list[str]) -> dict[str, Any]:
    body = json.dumps({"agent": "my-agent", "message": "flood"}).encode()
    request = (
        f"POST /hooks/agent HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {secret}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode() + body
    lines_before = len(log)
    started = time.monotonic()
    until = started + args.duration
    attack = asyncio.ensure_future(attacker(port, args.attackers, until, args.max_opens))
    await asyncio.sleep(1.0)  # let the attacker fill what it can first
    results = await asyncio.gather(*(caller(port, request, until) for _ in range(args.callers)))
    opens = await attack
    elapsed = time.monotonic() - started
    calls = sum(c for c, _ in results)
    ok = sum(o for _, o in results)
    # Audit lines (one per answered call) are not what is measured: the log lines the
    # flood itself causes are.
    lines = sum('"outcome":' not in line for line in log[lines_before:])
    return {
        "calls": calls,
        "answered_200": ok,
        "answered_ratio": round(ok / calls, 4) if calls else None,
        "attacker_connects": opens,
        "log_lines": lines,
        "log_lines_per_s": round(lines / elapsed, 2),
        "seconds": round(elapsed, 1),
    }


def _collect(stream: Any, sink: list[str]) -> None:
    for line in stream:
        sink.append(line)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sidecar-src", default=str(REPO))
    ap.add_argument("--max-connections", type=int, default=128)
    ap.add_argument("--attackers", type=int, help="idle connections (default 2x max)")
    ap.add_argument("--attacker-allowed", action="store_true")
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--callers", type=int, default=4)
    ap.add_argument("--max-opens", type=int, default=20000)
    args = ap.parse_args()
    args.duration = min(args.duration, 60.0)
    args.attackers = args.attackers or 2 * args.max_connections
    secret = secrets.token_hex(32)
    with tempfile.TemporaryDirectory(prefix="flood-", dir="/tmp") as tmp:
        rt_sock = Path(tmp) / "rt.sock"
        rt_port, port, admin = free_port(), free_port(), free_port()
        allow = ["127.0.0.1/32"] + (["127.0.0.2/32"] if args.attacker_allowed else [])
        doc = {
            "webhooks": {"secret": secret, "agents": {"my-agent": {}}},
            "sidecar": {
                "listen": f"127.0.0.1:{port}",
                "admin": {"listen": f"127.0.0.1:{admin}"},
                "upstream": {"socket": str(rt_sock)},
                "allowIps": allow,
                "authLockout": {"maxFailures": 10**6},
                "limits": {"maxConnections": args.max_connections, "headerTimeout": "30s"},
            },
        }
        (Path(tmp) / "config.json5").write_text(json.dumps(doc))
        runtime = subprocess.Popen(
            [
                PY,
                str(REPO / "bench" / "runtime.py"),
                "--socket",
                str(rt_sock),
                "--port",
                str(rt_port),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        env = {**os.environ, "PYTHONPATH": args.sidecar_src}
        sidecar = subprocess.Popen(
            [PY, "-m", "sidecar", "run", "-c", str(Path(tmp) / "config.json5")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=tmp,
        )
        log: list[str] = []
        threading.Thread(target=_collect, args=(sidecar.stderr, log), daemon=True).start()
        try:
            wait_http(f"http://127.0.0.1:{admin}/healthz", sidecar)
            result = asyncio.run(flood(args, port, secret, log))
        finally:
            sidecar.terminate()
            runtime.terminate()
            sidecar.wait(20)
            runtime.wait(20)
    result.update(
        sidecar_src=args.sidecar_src,
        max_connections=args.max_connections,
        attackers=args.attackers,
        attacker_allowed=args.attacker_allowed,
        tracebacks=sum("Traceback" in line for line in log),
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
