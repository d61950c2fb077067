#!/usr/bin/env python3
"""What delivery-id dedup adds to a call (docs/dedup.md): throughput side by side.

Two sidecars pinned to the server core, in front of bench/runtime.py (pinned
there too): one with the default ``memory`` dedup backend, one with a private
redis-server (also on the server core) as its backend. wrk on the client core
sends the small agent call, in alternation for ``--rounds`` rounds:

- ``memory-nokey``: no Idempotency-Key: the dedup guard returns at once (the
  baseline);
- ``memory-key``: a fresh Idempotency-Key on every call (bench/wrk/dedup.lua):
  each is claimed, forwarded and remembered in the memory store;
- ``redis-key``: the same against the Redis backend (two round trips a call:
  the claim script, then SET done).

The ratios are ``memory-key / memory-nokey`` and ``redis-key / memory-nokey``,
paired by round, medians printed. A keyed call also has its header validated
by the body guard and forwarded upstream, so the figure bounds the dedup cost
from above. The target (issue 15) is memory-key >= 0.95 x memory-nokey.

    python bench/dedup_bench.py                  # 3 rounds x 8 s
    python bench/dedup_bench.py --rounds 2 --duration 5

Needs wrk, taskset, redis-server; Linux. Reuses bench/run.py's harness.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import configs  # noqa: E402
import run  # noqa: E402

SCENARIOS = ("memory-nokey", "memory-key", "redis-key")


def wrk(
    h: run.Harness, args: argparse.Namespace, target: run.Target, keyed: bool, tag: str
) -> tuple[float, float]:
    """One wrk run: requests per second, and the sidecar's CPU microseconds per request
    (less sensitive than throughput to other load on a shared machine). Every answer
    must be 200."""
    lua = BENCH / "wrk" / ("dedup.lua" if keyed else "post.lua")
    argv = [
        args.wrk, "-t1", "-c", str(args.connections), "-d", f"{args.duration}s",
        "--timeout", "5s", "-s", str(lua), f"http://127.0.0.1:{target.port}{configs.PATH}",
        "--", args.secret, "200", configs.BODY,
    ]  # fmt: skip
    os.environ["WRK_POST_LUA"] = str(BENCH / "wrk" / "post.lua")
    os.environ["DEDUP_PREFIX"] = tag  # spawn() passes the environment on
    pids = target.pids()
    ticks = run.cpu_ticks(pids)
    _, out = h.run_client("wrk", argv, args.client_cpu, timeout=args.duration + 30)
    line = next((ln for ln in out.decode().splitlines() if ln.startswith("BENCH_RESULT ")), None)
    cpu_s = (run.cpu_ticks(pids) - ticks) / run.CLK_TCK
    if line is None:
        raise RuntimeError(f"wrk printed no result: {out[-500:]!r}")
    result: dict[str, Any] = json.loads(line[len("BENCH_RESULT ") :])
    if result["unexpected"] or not result["requests"]:
        raise RuntimeError(f"not every answer was 200: {result['statuses']}")
    rps = result["requests"] / (result["duration_us"] / 1e6)
    return rps, cpu_s * 1e6 / result["requests"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=8, help="seconds per wrk run")
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--server-cpu", default="0")
    ap.add_argument("--client-cpu", type=int, default=1)
    ap.add_argument("--sidecar-src", help="checkout to run (default: this one)")
    ap.add_argument("--sidecar-cmd", help=argparse.SUPPRESS)
    ap.add_argument("--wrk", default=shutil.which("wrk") or "/usr/bin/wrk")
    ap.add_argument("--json", metavar="FILE", help="write every run and the ratios as JSON")
    args = ap.parse_args()
    args.secret = secrets.token_hex(32)
    h = run.Harness(keep_tmp=False)
    ports: set[int] = set()
    try:
        cmd, env, how = run.resolve_sidecar(args, h.tmp)
        if cmd is None:
            raise RuntimeError(f"cannot start the sidecar: {how}")
        run.start_runtime(h, args, ports)
        redis_url = run.start_redis(h, args, ports)

        def config(backend: str) -> Any:
            def make(**where: str) -> dict[str, Any]:
                doc = configs.sidecar_config(secret=args.secret, variant="sidecar", **where)
                doc["sidecar"]["dedup"] = {"backend": backend}
                return doc

            return make

        memory = run.start_sidecar(h, args, ports, "dedup-memory", cmd, env, config("memory"))
        redis = run.start_sidecar(h, args, ports, "dedup-redis", cmd, env, config(redis_url))
        where = {"memory-nokey": memory, "memory-key": memory, "redis-key": redis}
        runs: dict[str, list[float]] = {s: [] for s in SCENARIOS}
        cpu: dict[str, list[float]] = {s: [] for s in SCENARIOS}
        for rnd in range(args.rounds):
            order = SCENARIOS[rnd % 3 :] + SCENARIOS[: rnd % 3]  # rotate: no fixed first
            for scenario in order:
                keyed = scenario != "memory-nokey"
                rps, us = wrk(h, args, where[scenario], keyed, f"r{rnd}{scenario}")
                runs[scenario].append(rps)
                cpu[scenario].append(us)
                run.log(f"round {rnd + 1} {scenario:13} {rps:10,.0f} req/s {us:8.1f} us CPU/req")

        def paired(series: dict[str, list[float]], s: str) -> float:
            base = series["memory-nokey"]
            return statistics.median(k / b for k, b in zip(series[s], base, strict=True))

        ratios = {s: paired(runs, s) for s in ("memory-key", "redis-key")}
        cpu_ratios = {s: paired(cpu, s) for s in ("memory-key", "redis-key")}
        run.log("")
        for s in SCENARIOS:
            run.log(
                f"{s:13} median {statistics.median(runs[s]):10,.0f} req/s"
                f" {statistics.median(cpu[s]):8.1f} us CPU/req"
            )
        for s in ("memory-key", "redis-key"):
            run.log(
                f"{s:10} / memory-nokey: throughput {ratios[s]:.3f}, sidecar CPU per request"
                f" {cpu_ratios[s]:.3f}" + ("  (target: throughput >= 0.95)" if s[0] == "m" else "")
            )
        if args.json:
            out = {"runs": runs, "cpu_us": cpu, "ratios": ratios, "cpu_ratios": cpu_ratios}
            Path(args.json).write_text(json.dumps(out, indent=2))
        return 0
    finally:
        h.stop_all()


if __name__ == "__main__":
    sys.exit(main())
