"""What metrics and the audit log cost per request: the same app with the real
Metrics/AuditLog pair and with no-op stand-ins, driven by wrk in alternation.

    python tools/observability_cost.py [--rounds 5] [--seconds 8] [--connections 32]

The sidecar process is pinned to one core (``taskset``), wrk and a minimal
runtime to the other, so the sidecar's core is the bottleneck. For each run it
reports requests/s and the sidecar's CPU time per request (from
/proc/PID/stat), which is less sensitive to a busy machine than throughput.
The "on" variant writes its audit lines through the real writer thread to
/dev/null, so formatting and the writes are counted.

Internal modes (started by the script itself): ``runtime`` and ``serve``.
"""
# A developer tool: it runs taskset and wrk from PATH, and its secret is a throwaway.
# ruff: noqa: S105, S603, S607

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SECRET = "8f3a1c2e9b7d4f6a0c5e8b1d3f7a9c2e4b6d8f0a1c3e5b7d9f2a4c6e8b0d1f3a"
REPLY = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 24\r\n\r\n"
    b'{"ok":true,"runId":"r1"}'
)
WRK_SCRIPT = f"""
wrk.method = "POST"
wrk.body = '{{"agent": "my-agent", "message": "Deployed v1.2.3 to production, check the service"}}'
wrk.headers["Authorization"] = "Bearer {SECRET}"
wrk.headers["Content-Type"] = "application/json"
"""


# ---------------------------------------------------------------- the runtime


class _Runtime(asyncio.Protocol):
    """Answers each request 200 as soon as its end arrives; keep-alive."""

    def connection_made(self, transport: Any) -> None:
        import httptools

        self.transport = transport
        self.parser = httptools.HttpRequestParser(self)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        self.transport.write(REPLY)


async def _serve_runtime(path: str) -> None:
    server = await asyncio.get_running_loop().create_unix_server(_Runtime, path)
    async with server:
        await server.serve_forever()


# ---------------------------------------------------------------- the sidecar


class NullMetrics:
    """The Metrics interface app.handle() uses, doing nothing."""

    def count_in_flight(self, source: Any) -> None: ...
    def configure(self, settings: Any) -> None: ...
    def observe(self, endpoint: str, status: int, code: str | None, seconds: float) -> None: ...
    def observe_upstream(self, endpoint: str, seconds: float) -> None: ...
    def authenticated(self, secret_id: str) -> None: ...


class NullAudit:
    def record(self, *args: Any) -> None: ...


async def _serve_sidecar(variant: str, config_path: str) -> None:
    from aiohttp import web

    from sidecar import config, logs
    from sidecar.app import State, create_app
    from sidecar.metrics import Metrics

    settings = config.load(config_path)
    # Log lines and audit lines go through the real writer thread, to /dev/null.
    _, audit = logs.setup("warning", "json", open(os.devnull, "w"))  # noqa: SIM115
    metrics = Metrics(process=True) if variant in ("on", "metrics") else NullMetrics()
    audit_log = audit if variant in ("on", "audit") else NullAudit()
    state = State(settings, metrics, audit_log)  # type: ignore[arg-type]
    runner = web.AppRunner(create_app(state), access_log=None, handler_cancellation=False)
    await runner.setup()
    listen = settings.sidecar.listen
    await web.TCPSite(runner, listen.host, listen.port).start()
    print("ready", flush=True)
    await asyncio.Event().wait()


# ---------------------------------------------------------------- the driver


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(variant: str, folder: Path, sock: str, args: argparse.Namespace) -> tuple[float, float]:
    port = _free_port()
    doc = {
        "webhooks": {"secret": SECRET, "agents": {"my-agent": {"sessionKey": "s"}}},
        "sidecar": {
            "listen": f"127.0.0.1:{port}",
            "admin": {"listen": f"127.0.0.1:{_free_port()}"},
            "upstream": {"socket": sock},
        },
    }
    config_path = folder / f"{variant}.json5"
    config_path.write_text(json.dumps(doc))
    script = Path(__file__).resolve()
    proc = subprocess.Popen(
        [
            "taskset",
            "-c",
            args.sidecar_core,
            sys.executable,
            str(script),
            "serve",
            variant,
            str(config_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        url = f"http://127.0.0.1:{port}/hooks/agent"
        wrk = [
            "taskset",
            "-c",
            args.load_core,
            "wrk",
            "-t1",
            f"-c{args.connections}",
            "-s",
            str(folder / "post.lua"),
        ]
        subprocess.run([*wrk, "-d2s", url], capture_output=True, check=True)  # warm-up
        before = _cpu_seconds(proc.pid)
        out = subprocess.run(
            [*wrk, f"-d{args.seconds}s", url], capture_output=True, text=True, check=True
        ).stdout
        cpu = _cpu_seconds(proc.pid) - before
        requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
        if "Non-2xx" in out:
            raise SystemExit(f"{variant}: non-2xx answers:\n{out}")
        return requests / args.seconds, cpu / requests * 1e6
    finally:
        proc.terminate()
        proc.wait()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "runtime":
        import uvloop

        uvloop.run(_serve_runtime(sys.argv[2]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        import uvloop

        uvloop.run(_serve_sidecar(sys.argv[2], sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--sidecar-core", default="1")
    parser.add_argument(
        "--breakdown", action="store_true", help="also run metrics only and audit only"
    )
    parser.add_argument("--load-core", default="0")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="obs-") as tmp:
        folder = Path(tmp)
        (folder / "post.lua").write_text(WRK_SCRIPT)
        sock = str(folder / "rt.sock")
        runtime = subprocess.Popen(
            ["taskset", "-c", args.load_core, sys.executable, __file__, "runtime", sock]
        )
        try:
            while not os.path.exists(sock):
                time.sleep(0.05)
            variants = ["off", "on"] + (["metrics", "audit"] if args.breakdown else [])
            results: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
            for n in range(args.rounds):
                for variant in variants if n % 2 == 0 else variants[::-1]:
                    rps, cpu_us = _run(variant, folder, sock, args)
                    results[variant].append((rps, cpu_us))
                    print(
                        f"round {n + 1} {variant:>7}: {rps:6.0f} req/s {cpu_us:6.1f} µs CPU/req",
                        flush=True,
                    )
        finally:
            runtime.terminate()
            runtime.wait()
    rps = {v: statistics.median(r for r, _ in results[v]) for v in results}
    cpu = {v: statistics.median(c for _, c in results[v]) for v in results}
    # Paired per round (the two runs sit next to each other in time), so a machine
    # whose load drifts between rounds moves both sides of each ratio together.
    pairs = zip(results["on"], results["off"], strict=True)
    paired = statistics.median(on[1] / off[1] for on, off in pairs)
    print(
        f"median throughput: off {rps['off']:.0f} req/s, on {rps['on']:.0f} req/s, "
        f"on/off = {rps['on'] / rps['off']:.3f}"
    )
    print(
        f"median CPU per request: off {cpu['off']:.1f} µs, on {cpu['on']:.1f} µs "
        f"(+{cpu['on'] - cpu['off']:.1f} µs); median paired on/off = {paired:.3f}"
    )
    for variant in variants[2:]:
        print(f"  {variant} only: {cpu[variant]:.1f} µs (+{cpu[variant] - cpu['off']:.1f} µs)")


if __name__ == "__main__":
    main()
