"""Each guard's share of a valid call's CPU time: the per-module cost table.

Runs the sidecar in this process (the ``sidecar-guards`` bench variant: every
guard on) in front of bench/runtime.py, both pinned to one core, drives it
with wrk from the other core, and times every stage of each request with
``perf_counter_ns``: each guard, the forwarder's request building and reply
parsing, the response, metrics and the audit line. The timing wrappers are
added here, never in the product; they cost a little themselves, counted in
"wrappers". What is left of the process's CPU time per request is aiohttp and
the event loop (HTTP parsing, socket reads and writes, task switching).

    python bench/guard_costs.py                 # valid calls, 10 s
    python bench/guard_costs.py --refuse        # bad token: the refusal path
    python bench/guard_costs.py --sidecar-src /path/to/checkout

Needs wrk, taskset, uvloop; Linux (CPU affinity).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import configs  # noqa: E402
from harness import free_port  # noqa: E402

COSTS: dict[str, int] = defaultdict(int)
_ns = time.perf_counter_ns


def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a sync callable, or an async guard's synchronous part plus its awaitable."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = _ns()
        try:
            result = fn(*args, **kwargs)
        finally:  # a guard that refuses raises: its time counts too
            COSTS[name] += _ns() - start
        if result is not None and hasattr(result, "__await__"):
            return _timed_await(name, result)
        return result

    return wrapper


async def _timed_await(name: str, awaitable: Any) -> Any:
    # Wall time of the awaited part: for the body guard the bytes are already there
    # (one readany), so it is CPU; waits on the runtime are timed separately.
    start = _ns()
    try:
        return await awaitable
    finally:
        COSTS[name] += _ns() - start


def instrument() -> None:
    from sidecar import app, logs, metrics, responses
    from sidecar.upstream import forward, pool

    original = app.pipeline

    def pipeline(*args: Any) -> list[Any]:
        guards = original(*args)
        return [timed("guard " + _guard_name(g), g) for g in guards]

    app.pipeline = pipeline
    for name in ("ok_response", "error_response"):
        setattr(app, name, timed("response " + name, getattr(responses, name)))
    reply = responses.JsonReply
    reply.prepare = timed("response write (head, send syscall)", reply.prepare)  # type: ignore[method-assign]
    fwd = forward.Forwarder
    fwd.build = timed("forward build (request bytes)", fwd.build)  # type: ignore[method-assign]
    fwd.reply = timed("forward reply (parse runId)", fwd.reply)  # type: ignore[method-assign]
    request = pool.Pool.request

    async def send(self: Any, raw: bytes) -> Any:
        start = _ns()
        try:
            return await request(self, raw)
        finally:
            COSTS["~ upstream round trip (wall, not CPU)"] += _ns() - start

    pool.Pool.request = send  # type: ignore[method-assign]
    m = metrics.Metrics
    for name in ("observe", "observe_upstream", "authenticated"):
        setattr(m, name, timed("metrics", getattr(m, name)))
    logs.AuditLog.record = timed("audit log line", logs.AuditLog.record)  # type: ignore[method-assign]


def _guard_name(guard: Any) -> str:
    qual = getattr(guard, "__qualname__", type(guard).__name__).split(".<locals>")[0]
    return f"{guard.__module__.rsplit('.', 1)[-1]}.{qual}"


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


async def run(args: argparse.Namespace, tmp: Path) -> None:
    from sidecar import config, logs
    from sidecar.metrics import Metrics
    from sidecar.process import server

    secret = secrets.token_hex(32)
    sock = tmp / "rt.sock"
    runtime = subprocess.Popen(
        ["taskset", "-c", str(args.server_cpu), sys.executable, str(HERE / "runtime.py"),
         "--socket", str(sock)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        while not sock.exists():
            await asyncio.sleep(0.05)
        doc = configs.sidecar_config(
            secret=secret, listen="127.0.0.1:0", admin_listen="127.0.0.1:0",
            upstream_socket=str(sock), variant=args.variant,
        )  # fmt: skip
        ports: set[int] = set()
        port = free_port(ports)
        doc["sidecar"]["listen"] = f"127.0.0.1:{port}"
        doc["sidecar"]["admin"]["listen"] = f"127.0.0.1:{free_port(ports)}"
        path = tmp / "sidecar.json"
        path.write_text(json.dumps(doc))
        settings = config.load(path)
        writer, audit = logs.setup("warning", "json", open(os.devnull, "w"))  # noqa: SIM115
        srv = server.Server(settings, audit, Metrics())
        await srv.start()
        token = secret if not args.refuse else "x" * 64
        expect = "401" if args.refuse else "200"
        url = f"http://127.0.0.1:{port}{configs.PATH}"

        async def wrk(seconds: float) -> dict[str, Any]:
            proc = await asyncio.create_subprocess_exec(
                "taskset", "-c", str(args.client_cpu), "wrk", "-t1", f"-c{args.connections}",
                f"-d{seconds}s", "-s", str(HERE / "wrk" / "post.lua"), url, "--", token, expect,
                stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, _ = await proc.communicate()
            line = next(x for x in out.decode().splitlines() if x.startswith("BENCH_RESULT"))
            result: dict[str, Any] = json.loads(line.split(" ", 1)[1])
            return result

        await wrk(2)  # warm-up
        COSTS.clear()
        before = cpu_seconds()
        result = await wrk(args.duration)
        cpu = cpu_seconds() - before
        await srv.stop()
        writer.close()
    finally:
        runtime.terminate()
        runtime.wait()
    report(result, cpu, args)


def report(result: dict[str, Any], cpu: float, args: argparse.Namespace) -> None:
    n = result["requests"]
    total_us = cpu / n * 1e6
    rows = sorted(((k, v / n / 1e3) for k, v in COSTS.items()), key=lambda kv: -kv[1])
    measured = sum(us for k, us in rows if not k.startswith("~"))
    calls = sum(1 for k in COSTS if not k.startswith("~"))
    wrappers = calls * 0.15  # ~150 ns per timing wrapper (two perf_counter_ns and a dict add)
    kind = "refusals (bad token)" if args.refuse else "valid calls"
    print(f"{args.variant}, {kind}: {n} requests in {args.duration} s, statuses "
          f"{result.get('statuses')}; sidecar process CPU {total_us:.1f} us/request")  # fmt: skip
    print(f"{'stage':48} {'us/req':>7} {'share':>6}")
    for k, us in rows:
        share = "" if k.startswith("~") else f"{us / total_us * 100:5.1f}%"
        print(f"{k:48} {us:7.2f} {share:>6}")
    rest = total_us - measured - wrappers
    print(f"{'timing wrappers (estimate)':48} {wrappers:7.2f} {wrappers / total_us * 100:5.1f}%")
    print(
        f"{'aiohttp + event loop + kernel (the rest)':48} {rest:7.2f} {rest / total_us * 100:5.1f}%"
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--variant", default="sidecar-guards", choices=list(configs.SIDECAR_VARIANTS))
    ap.add_argument("--refuse", action="store_true", help="send a bad token (401 path)")
    ap.add_argument("--server-cpu", type=int, default=0)
    ap.add_argument("--client-cpu", type=int, default=1)
    ap.add_argument("--sidecar-src", type=Path, default=HERE.parent)
    args = ap.parse_args()
    sys.path.insert(0, str(args.sidecar_src))
    os.sched_setaffinity(0, {args.server_cpu})
    instrument()
    import uvloop

    with tempfile.TemporaryDirectory(prefix="wsb-costs-") as tmp:
        uvloop.run(run(args, Path(tmp)))


if __name__ == "__main__":
    main()
