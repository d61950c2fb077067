#!/usr/bin/env python3
"""What delivery-id dedup adds to a call (docs/dedup.md): throughput side by side.

Sidecars pinned to the server core, in front of bench/runtime.py (pinned there
too): ``--instances`` processes with the default ``memory`` dedup backend, as many
of the same tree with the dedup guard left out of its chains (bench/nodedup.py),
and one with a private redis-server (also on the server core) as its backend.
wrk on the client core sends the small agent call, in alternation, for
``--rounds`` rounds:

- ``nodedup-key``: a fresh Idempotency-Key on every call (bench/wrk/dedup.lua),
  validated and forwarded upstream but never claimed: the baseline;
- ``memory-key``: the same calls with memory dedup: each key claimed, forwarded,
  remembered. Each memory process is filled to its bound (``--max-entries``,
  100,000 by default, the contract's) before the first round, so every measured
  claim also evicts the id completed longest ago: the steady state of a busy
  sidecar, and its most expensive;
- ``redis-key``: the same against the Redis backend (a claim script, then a
  completion script; concurrent calls share a pipeline for each);
- ``memory-nokey``: no Idempotency-Key (the dedup guard returns at once);
- ``memory-other``: a fresh value in a header the sidecar ignores: the same bytes
  as a keyed call, to show the load generator's per-call work costs nothing here.

Why several processes of each: two processes of the same tree and config, started
one after the other, differ by up to 5% in throughput for as long as they run
(where their memory landed: address layout, hash seed), which is as large as
what this bench looks for. A round's figure for a scenario is the mean over its
processes; the ratios are over ``nodedup-key``, paired by round, medians printed:
throughput, and the sidecar's CPU time per request, which other load on a shared
machine disturbs less. The target (issue 15): memory-key >= 0.95 x nodedup-key.

    python bench/dedup_bench.py                  # 3 processes each, 3 rounds x 5 s
    python bench/dedup_bench.py --rounds 5 --instances 4

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
import procs  # noqa: E402
import run  # noqa: E402


def wrk(
    h: run.Harness,
    args: argparse.Namespace,
    target: run.Target,
    header: str | None,
    tag: str,
) -> tuple[float, float]:
    """One wrk run, a fresh ``header`` value on every call (None: bench/wrk/post.lua's
    fixed call): requests per second, and the sidecar's CPU microseconds per request
    (less sensitive than throughput to other load on a shared machine). Every answer
    must be 200."""
    lua = BENCH / "wrk" / ("post.lua" if header is None else "dedup.lua")
    argv = [
        args.wrk, "-t1", "-c", str(args.connections), "-d", f"{args.duration}s",
        "--timeout", "5s", "-s", str(lua), f"http://127.0.0.1:{target.port}{configs.PATH}",
        "--", args.secret, "200", configs.BODY,
    ]  # fmt: skip
    os.environ["WRK_POST_LUA"] = str(BENCH / "wrk" / "post.lua")
    os.environ["DEDUP_PREFIX"] = tag  # spawn() passes the environment on
    os.environ["DEDUP_HEADER"] = header or ""
    pids = target.pids()
    ticks = procs.cpu_ticks(pids)
    _, out = h.run_client("wrk", argv, args.client_cpu, timeout=args.duration + 30)
    line = next((ln for ln in out.decode().splitlines() if ln.startswith("BENCH_RESULT ")), None)
    cpu_s = (procs.cpu_ticks(pids) - ticks) / procs.CLK_TCK
    if line is None:
        raise RuntimeError(f"wrk printed no result: {out[-500:]!r}")
    result: dict[str, Any] = json.loads(line[len("BENCH_RESULT ") :])
    if result["unexpected"] or not result["requests"]:
        raise RuntimeError(f"not every answer was 200: {result['statuses']}")
    rps = result["requests"] / (result["duration_us"] / 1e6)
    return rps, cpu_s * 1e6 / result["requests"]


def fill(h: run.Harness, args: argparse.Namespace, target: run.Target) -> None:
    """Keyed calls until the memory table is at its bound, with room to spare."""
    sent, rnd = 0, 0
    while sent < 1.2 * args.max_entries:
        rnd += 1
        quick = argparse.Namespace(**{**vars(args), "duration": 2})
        rps, _ = wrk(h, quick, target, "Idempotency-Key", f"fill{target.port}-{rnd}")
        sent += int(rps * 2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    ap.add_argument("--instances", type=int, default=3, help="processes per variant")
    ap.add_argument("--max-entries", type=int, default=100_000, help="the memory bound")
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
        launcher = [*cmd[:-2], str(BENCH / "nodedup.py")] if cmd[-2:] == ["-m", "sidecar"] else []
        if not launcher:
            raise RuntimeError(f"the baseline needs a source tree (python -m sidecar): {how}")
        run.start_runtime(h, args, ports)
        redis_url = run.start_redis(h, args, ports)

        def config(backend: str) -> Any:
            def make(**where: str) -> dict[str, Any]:
                doc = configs.sidecar_config(secret=args.secret, variant="sidecar", **where)
                doc["sidecar"]["dedup"] = {"backend": backend, "maxEntries": args.max_entries}
                return doc

            return make

        def start(name: str, argv: list[str], backend: str) -> run.Target:
            return run.start_sidecar(h, args, ports, name, argv, env, config(backend))

        n = range(1, args.instances + 1)
        memory = [start(f"dedup-memory{i}", cmd, "memory") for i in n]
        nodedup = [start(f"nodedup{i}", launcher, "memory") for i in n]
        redis = [start("dedup-redis", cmd, redis_url)]
        for target in memory:
            fill(h, args, target)
        key, other = "Idempotency-Key", "X-Bench-Other"
        # name -> (its processes, the header given a fresh value on every call)
        scenarios: dict[str, tuple[list[run.Target], str | None]] = {
            "nodedup-key": (nodedup, key),
            "memory-key": (memory, key),
            "redis-key": (redis, key),
            "memory-nokey": (memory, None),
            "memory-other": (memory, other),
        }
        names = list(scenarios)
        # One run per (scenario, process), the keyed pair interleaved process by process.
        plan = [(name, i) for i in range(args.instances) for name in names[:2]]
        plan += [(name, i) for name in names[2:] for i in range(len(scenarios[name][0]))]
        runs: dict[str, list[float]] = {s: [] for s in names}
        cpu: dict[str, list[float]] = {s: [] for s in names}
        per_process: dict[str, list[list[float]]] = {
            s: [[] for _ in scenarios[s][0]] for s in names
        }
        for rnd in range(args.rounds):
            shift = (rnd * 2) % len(plan)
            done: dict[str, list[tuple[float, float]]] = {s: [] for s in names}
            for name, i in plan[shift:] + plan[:shift]:  # rotate: no fixed first
                target, header = scenarios[name][0][i], scenarios[name][1]
                rps, us = wrk(h, args, target, header, f"r{rnd}{name}{i}")
                done[name].append((rps, us))
                per_process[name][i].append(rps)
                run.log(
                    f"round {rnd + 1} {name:13} #{i + 1} {rps:10,.0f} req/s {us:6.1f} us CPU/req"
                )
            for name in names:
                runs[name].append(statistics.fmean(r for r, _ in done[name]))
                cpu[name].append(statistics.fmean(u for _, u in done[name]))

        def paired(series: dict[str, list[float]], num: str, den: str) -> float:
            pairs = zip(series[num], series[den], strict=True)
            return statistics.median(n / d for n, d in pairs)

        run.log("")
        for name in names:
            spread = " ".join(f"{statistics.median(p):,.0f}" for p in per_process[name])
            run.log(
                f"{name:13} median {statistics.median(runs[name]):10,.0f} req/s"
                f" {statistics.median(cpu[name]):6.1f} us CPU/req   by process: {spread}"
            )
        ratios: dict[str, dict[str, float]] = {}
        for num in names[1:]:
            pair = f"{num} / nodedup-key"
            ratios[pair] = {
                "throughput": paired(runs, num, "nodedup-key"),
                "cpu": paired(cpu, num, "nodedup-key"),
            }
            run.log(
                f"{pair:28} throughput {ratios[pair]['throughput']:.3f},"
                f" sidecar CPU per request {ratios[pair]['cpu']:.3f}"
            )
        run.log("target (issue 15): memory-key throughput >= 0.95 x nodedup-key")
        if args.json:
            out = {"runs": runs, "cpu_us": cpu, "by_process": per_process, "ratios": ratios}
            Path(args.json).write_text(json.dumps(out, indent=2))
        return 0
    finally:
        h.stop_all()


if __name__ == "__main__":
    sys.exit(main())
