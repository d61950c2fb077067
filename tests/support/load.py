"""Bounded load for the slow-client and fault tests: every call's outcome and latency.

``run_load`` keeps ``concurrency`` callers busy for ``seconds`` against a real
sidecar and returns one :class:`Result` per call: its status and error code,
its ``Retry-After`` and how long it took, or the transport error it met. Loads
are bounded in count and time and target loopback only.

``RuntimeProcess`` is the reference runtime as its own process (``webhook-sidecar
dev-runtime``), so a test can kill and restart it; every call it admitted is read
back from its stdout. Run as a script, this module is a flood in a process of its
own (so the flood's CPU is not the test loop's), printing a JSON summary.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

TIMEOUT = 30.0
_ids = itertools.count()
_run = os.urandom(3).hex()  # two processes (a flood and the test) never share an id


@dataclass(frozen=True)
class Result:
    status: int  # 0: no HTTP response (refused, reset, timed out)
    code: str | None  # the docs/http-api.md error code, "ok", or the transport error's name
    retry_after: str | None
    latency: float
    # The id the sidecar gave the call (its X-Request-Id answer): the runtime's calls
    # and the audit lines carry it. The one sent is adopted only from a trusted proxy.
    request_id: str
    at: float = 0.0  # time.monotonic() when it finished


async def call(
    session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]
) -> Result:
    """One POST with a fresh X-Request-Id; a transport error becomes ``status=0``."""
    request_id = f"load-{next(_ids)}-{_run}"
    started = time.perf_counter()
    try:
        async with session.post(
            url, data=body, headers={**headers, "X-Request-Id": request_id}
        ) as resp:
            raw = await resp.read()
            try:
                parsed = json.loads(raw)
            except ValueError:
                parsed = {}
            code = parsed.get("error", parsed.get("status")) if isinstance(parsed, dict) else None
            return Result(
                resp.status,
                code,
                resp.headers.get("Retry-After"),
                time.perf_counter() - started,
                resp.headers.get("X-Request-Id", request_id),
                time.monotonic(),
            )
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        latency = time.perf_counter() - started
        return Result(0, type(exc).__name__, None, latency, request_id, time.monotonic())


async def run_load(
    url: str,
    *,
    seconds: float,
    concurrency: int = 4,
    token: str,
    body: dict[str, Any],
    source: str | None = None,
    max_calls: int = 100_000,
    keepalive: bool = True,
    timeout: float = TIMEOUT,
) -> list[Result]:
    """``concurrency`` callers posting ``body`` for ``seconds`` (at most ``max_calls``)."""
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    data = json.dumps(body).encode()
    results: list[Result] = []
    deadline = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(
        local_addr=(source, 0) if source else None, limit=concurrency, force_close=not keepalive
    )
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)
    ) as session:

        async def worker() -> None:
            while time.monotonic() < deadline and len(results) < max_calls:
                result = await call(session, url, data, headers)
                results.append(result)
                if result.status == 0:
                    await asyncio.sleep(0.01)  # a refused port must not become a busy loop

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(p) - 1]


def summary(results: list[Result]) -> dict[str, Any]:
    """Counts per (status, code) and latency percentiles in milliseconds."""
    counts: dict[str, int] = {}
    for r in results:
        key = f"{r.status} {r.code}"
        counts[key] = counts.get(key, 0) + 1
    latencies = [r.latency for r in results]
    return {
        "calls": len(results),
        "counts": counts,
        "p50_ms": round(percentile(latencies, 50) * 1000, 2),
        "p99_ms": round(percentile(latencies, 99) * 1000, 2),
        "max_ms": round(max(latencies, default=0) * 1000, 2),
    }


class RuntimeProcess:
    """``webhook-sidecar dev-runtime`` as a child process, restartable; it prints one JSON
    line per call it admitted, collected in ``calls`` across restarts."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self.proc: subprocess.Popen[str] | None = None
        self.calls: list[dict[str, Any]] = []
        self._readers: list[threading.Thread] = []

    def start(self, timeout: float = 15.0) -> None:
        if self.socket_path.exists():
            self.socket_path.unlink()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "dev-runtime", "--socket", str(self.socket_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        reader = threading.Thread(target=self._read, args=(self.proc,), daemon=True)
        reader.start()
        self._readers.append(reader)
        deadline = time.monotonic() + timeout
        while not self.socket_path.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("dev-runtime did not start")
            time.sleep(0.02)

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("{"):
                self.calls.append(json.loads(line))

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        for reader in self._readers:
            reader.join(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _main() -> int:
    parser = argparse.ArgumentParser(description="a bounded flood from one source address")
    parser.add_argument("--url", required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--source")
    parser.add_argument("--token", default="not-the-secret")
    args = parser.parse_args()
    assert args.url.startswith(("http://127.", "https://127.")), "loopback only"
    results = asyncio.run(
        run_load(
            args.url,
            seconds=args.seconds,
            concurrency=args.concurrency,
            token=args.token,
            body={"agent": "my-agent"},
            source=args.source,
        )
    )
    print(json.dumps(summary(results)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
