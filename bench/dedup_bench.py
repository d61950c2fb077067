#!/usr/bin/env python3
"""What delivery-id dedup adds to a call (docs/dedup.md): throughput side by side.

Sidecars pinned to the server core, in front of bench/runtime.py (pinned there
too), each started through bench/dedup_switch.py, so one process serves both
sides of a ratio: ``--instances`` processes with the default ``memory`` dedup
backend, and one with a private redis-server (also on the server core) as its
backend. wrk on the client core sends the small agent call, each run ``--duration``
seconds, for ``--rounds`` rounds:

- ``skip-key``: a fresh Idempotency-Key on every call, which passes by the dedup
  guard (``X-Bench-Dedup: skip``): validated and forwarded upstream, never
  claimed. The baseline, in every process;
- ``memory-key``: the same calls meeting the guard (``X-Bench-Dedup: keep``): each
  key claimed, forwarded, remembered. Each memory process is filled to its bound
  (``--max-entries``, 100,000 by default, the contract's) before the first
  round, so every measured claim also evicts the id completed longest ago: the
  steady state of a busy sidecar, and its most expensive;
- ``redis-key``: the same against the Redis backend (a claim script, then a
  completion script; concurrent calls share a pipeline for each);
- ``memory-nokey``: no Idempotency-Key (the dedup guard returns at once);
- ``memory-other``: a fresh value in a header the sidecar ignores instead of the
  key: nothing claimed, nothing forwarded.

Why one process for both sides: two processes of the same tree and config,
started one after the other, differ by up to 5% in throughput for as long as they
run (where their memory landed: address layout, hash seed), which is as large as
what this bench looks for. Why short runs in a rotating order: the machine's
speed drifts by more than that within a minute; a ratio is taken between runs of
the same process in the same round, seconds apart. Each (process, round) gives
one ratio per scenario over its ``skip-key`` run: throughput, and the sidecar's
CPU time per request (which other load on a shared machine disturbs less); the
medians are printed, overall and by process. The target (issue 15): memory-key
>= 0.95 x skip-key.

    python bench/dedup_bench.py                  # 3 + 1 processes, 6 rounds x 2 s
    python bench/dedup_bench.py --rounds 10 --instances 4

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import configs  # noqa: E402
import harness  # noqa: E402
import procs  # noqa: E402
import run  # noqa: E402

SWITCH_HEADER = "X-Bench-Dedup"  # read by bench/dedup_switch.py
KEY = "Idempotency-Key"


@dataclass(frozen=True)
class Scenario:
    header: str  # the header given a fresh value on every call ("": none)
    switch: str  # "keep": the call meets the dedup guard; "skip": it passes by
    backend: str  # which processes: "memory" or "redis"


BASELINE = "skip-key"
SKIP_KEY = Scenario(KEY, "skip", "")  # the baseline, run in every process
SCENARIOS = {
    "memory-key": Scenario(KEY, "keep", "memory"),
    "memory-nokey": Scenario("", "keep", "memory"),
    "memory-other": Scenario("X-Bench-Other", "keep", "memory"),
    "redis-key": Scenario(KEY, "keep", "redis"),
}


def wrk(
    h: run.Harness,
    args: argparse.Namespace,
    target: run.Target,
    scenario: Scenario,
    tag: str,
) -> tuple[float, float]:
    """One wrk run of ``scenario`` (bench/wrk/dedup.lua): requests per second, and
    the sidecar's CPU microseconds per request (less sensitive than throughput to
    other load on a shared machine). Every answer must be 200."""
    argv = [
        args.wrk, "-t1", "-c", str(args.connections), "-d", f"{args.duration}s",
        "--timeout", "5s", "-s", str(BENCH / "wrk" / "dedup.lua"),
        f"http://127.0.0.1:{target.port}{configs.PATH}", "--", args.secret, "200", configs.BODY,
    ]  # fmt: skip
    # For the lua script: spawn() passes the environment on.
    os.environ["WRK_POST_LUA"] = str(BENCH / "wrk" / "post.lua")
    os.environ["DEDUP_PREFIX"] = tag
    os.environ["DEDUP_HEADER"] = scenario.header
    os.environ["DEDUP_SWITCH"] = scenario.switch
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


def keyed_headers(secret: str, key: str, switch: str) -> dict[str, str]:
    """The headers of one keyed call outside wrk (bench/dedup_count.py sends them too)."""
    return {
        "Authorization": f"Bearer {secret}",
        "Content-Type": "application/json",
        KEY: key,
        SWITCH_HEADER: switch,
    }


def check_switch(args: argparse.Namespace, target: run.Target) -> None:
    """A key sent twice is answered as a duplicate when the call meets the guard, and
    forwarded twice when it passes by: else the ratios would measure nothing."""
    for switch, duplicate in (("keep", True), ("skip", False)):
        headers = keyed_headers(args.secret, f"check-{switch}-{target.port}", switch)
        answers = [harness.http_call(target.port, "POST", configs.PATH, headers, configs.BODY)]
        answers.append(harness.http_call(target.port, "POST", configs.PATH, headers, configs.BODY))
        statuses = [status for status, _ in answers]
        if (
            statuses != [200, 200]
            or (json.loads(answers[1][1]).get("duplicate") is True) != duplicate
        ):
            raise RuntimeError(f"{target.name}: X-Bench-Dedup: {switch} did not work: {answers}")


def fill(h: run.Harness, args: argparse.Namespace, target: run.Target) -> None:
    """Keyed calls until the memory table is at its bound, with room to spare."""
    sent, rnd = 0, 0
    quick = argparse.Namespace(**{**vars(args), "duration": 2})
    while sent < 1.2 * args.max_entries:
        rnd += 1
        rps, _ = wrk(h, quick, target, SCENARIOS["memory-key"], f"fill{target.port}-{rnd}")
        sent += int(rps * 2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--duration", type=int, default=2, help="seconds per wrk run")
    ap.add_argument("--instances", type=int, default=3, help="memory-backend processes")
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
        if cmd[-2:] != ["-m", "sidecar"]:
            raise RuntimeError(f"the switch needs a source tree (python -m sidecar): {how}")
        launcher = [*cmd[:-2], str(BENCH / "dedup_switch.py")]
        run.start_runtime(h, args, ports)
        redis_url = run.start_redis(h, args, ports)

        def start(name: str, backend: str) -> run.Target:
            def make(**where: str) -> dict[str, Any]:
                doc = configs.sidecar_config(secret=args.secret, variant="sidecar", **where)
                doc["sidecar"]["dedup"] = {"backend": backend, "maxEntries": args.max_entries}
                return doc

            return run.start_sidecar(h, args, ports, name, launcher, env, make)

        processes = [
            (f"memory{i}", "memory", start(f"dedup-memory{i}", "memory"))
            for i in range(1, args.instances + 1)
        ] + [("redis", "redis", start("dedup-redis", redis_url))]
        for _, backend, target in processes:
            check_switch(args, target)
            if backend == "memory":
                fill(h, args, target)
        # ratios[scenario][process] -> one (throughput ratio, CPU us added) per round
        ratios: dict[str, dict[str, list[tuple[float, float]]]] = {
            name: {p: [] for p, backend, _ in processes if backend == sc.backend}
            for name, sc in SCENARIOS.items()
        }
        runs: dict[str, list[tuple[float, float]]] = {n: [] for n in [BASELINE, *SCENARIOS]}
        for rnd in range(args.rounds):
            for pname, backend, target in processes:
                names = [BASELINE] + [n for n, sc in SCENARIOS.items() if sc.backend == backend]
                shift = rnd % len(names)  # no scenario always first, or always last
                order = names[shift:] + names[:shift]
                if rnd // len(names) % 2:
                    order.reverse()
                got: dict[str, tuple[float, float]] = {}
                for name in order:
                    sc = SCENARIOS.get(name, SKIP_KEY)
                    got[name] = wrk(h, args, target, sc, f"r{rnd}{pname}{name}")
                    runs[name].append(got[name])
                    rps, us = got[name]
                    run.log(
                        f"round {rnd + 1} {pname:8} {name:13} {rps:10,.0f} req/s"
                        f" {us:6.1f} us CPU/req"
                    )
                base_rps, base_us = got[BASELINE]
                for name in names[1:]:
                    rps, us = got[name]
                    ratios[name][pname].append((rps / base_rps, us - base_us))

        def median(pairs: list[tuple[float, float]], i: int) -> float:
            return statistics.median(p[i] for p in pairs)

        run.log("")
        summary: dict[str, dict[str, Any]] = {}
        for name, by_process in ratios.items():
            every = [r for rs in by_process.values() for r in rs]
            summary[name] = {
                "throughput": median(every, 0),
                "cpu_us_added": median(every, 1),
                "by_process": {p: median(rs, 0) for p, rs in by_process.items()},
            }
            spread = " ".join(f"{r:.3f}" for r in summary[name]["by_process"].values())
            run.log(
                f"{name + ' / ' + BASELINE:26} throughput {summary[name]['throughput']:.3f}"
                f"  sidecar CPU {summary[name]['cpu_us_added']:+5.1f} us/call"
                f"   by process: {spread}"
            )
        base_us = statistics.median(us for _, us in runs[BASELINE])
        run.log(f"{BASELINE} itself: {base_us:.1f} us of sidecar CPU per call (median)")
        run.log("target (issue 15): memory-key throughput >= 0.95 x skip-key")
        if args.json:
            # "pairs": every (throughput ratio, CPU us added), by scenario and process:
            # what to pool over several runs.
            out = {"runs": runs, "ratios": summary, "pairs": ratios, "baseline_cpu_us": base_us}
            Path(args.json).write_text(json.dumps(out, indent=2))
        return 0
    finally:
        h.stop_all()


if __name__ == "__main__":
    sys.exit(main())
