#!/usr/bin/env python3
"""The spool's targets (issue 16, docs/spool.md), measured in one run on one server core.

Every server (the sidecars, bench/runtime.py) is pinned to the server core, wrk and
bench/loadgen.py to the client core, as in bench/run.py, whose harness this reuses. The
spool files live in the harness's temp dir under /tmp; the file system is printed (fsync
must be real for the figures to mean anything). In order:

1. **throughput** (runtime up): ``direct`` (no spool: each call forwarded before the 200)
   and ``durable`` (``sidecar.spool``: each call committed with an fsync, group commit,
   then delivered in the background), the same small valid call with wrk, in alternation
   for ``--rounds`` rounds. Ratio durable/direct of requests/s, paired by round (target
   >= 0.8), the sidecar's CPU per request in the window, and per event end to end (the
   sidecar and the runtime, until the backlog the run left is delivered: the bench waits
   for it before the next run), and the accepted events per commit (one commit, one WAL
   fsync) from ``webhook_sidecar_spool_commit_duration_seconds_count``.
2. **ack latency** (runtime down: no socket at the upstream path): loadgen at a fixed
   ``--rate`` (1,000/s), open loop. p50/p99/max of the answer (target p99 <= 10 ms), and
   the events per commit.
3. **backlog** (runtime still down): the same sidecar filled through HTTP (wrk,
   bench/wrk/fill.lua) until ``--pending`` (100,000) events wait. The sidecar's VmRSS
   (target <= 80 MB), ``webhook-sidecar spool stats -c FILE --json`` wall time while it
   runs (target <= 1 s, a whole CLI process each).
4. **recovery**: SIGKILL, start again, time until a valid call is answered 200 and until
   ``/readyz`` is 200 (target <= 2 s), alternating with the same restart of the
   ``durable`` sidecar and its empty spool; the VmRSS after the restart.
5. **drain**: a runtime started on the upstream path; time from its start until nothing
   is pending (target >= 2,000 events/s), pending polled every 50 ms from the file with
   the store's own read-only connection (what ``spool stats`` reads; this checkout's
   ``sidecar.spool.store``, whichever sidecar is measured). All the events are
   in one session (the bench call names none), delivered one at a time in arrival order:
   the slowest case. The backlog sidecar's retry backoff is capped at 1 s
   (``retry.max``), so the first delivery is due at most 1 s after the runtime appears.

A run is noisy when other programs took more than 20% of the server core, or (latency)
loadgen fell more than 1 ms behind its schedule (p99): noisy runs are counted, not
dropped; read the per-round lines. Prints a table, then one JSON line
(``SPOOL_BENCH {...}``) on stdout; ``--json FILE`` writes it too. Exit 0, 3 when a run
was flagged (a status other than 200, socket errors, a sidecar died), 4 when a target
was missed, 1 on a harness error.

    python bench/spool_bench.py                  # 3 rounds x 8 s, 100,000 pending: ~3 min
    python bench/spool_bench.py --quick          # smoke test, ~30 s
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(ROOT))

import configs  # noqa: E402
from harness import (  # noqa: E402
    PY,
    Harness,
    Target,
    http_call,
    post,
    resolve_sidecar,
    start_runtime,
    start_sidecar,
    unix_open,
    wait_ready,
)
from procs import (  # noqa: E402
    CLK_TCK,
    catch_signals,
    core_times,
    cpu_ticks,
    family_pids,
    guarded,
    log,
    status_kb,
    truncate_log,
)

from sidecar.spool.store import connect, counts  # noqa: E402

TARGETS = {
    "throughput_ratio": (">=", 0.8),
    "ack_p99_ms": ("<=", 10.0),
    "rss_mb": ("<=", 80.0),
    "stats_s": ("<=", 1.0),
    "drain_per_s": (">=", 2000.0),
    "recovery_s": ("<=", 2.0),
}
COMMITS = "webhook_sidecar_spool_commit_duration_seconds_count"
NOISY_PCT = 20  # a run where other programs took more of the server core is noisy
NOISY_LAG_MS = 1.0  # as bench/run.py: the load generator fell behind its schedule


# name -> (full run, --quick); an option given on the command line wins over both.
SIZES = {
    "rounds": (3, 1),
    "duration": (8, 2),
    "latency_duration": (10.0, 2.0),
    "pending": (100_000, 5000),
    "stats_runs": (5, 3),
}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, help="rounds of alternation (3; --quick 1)")
    ap.add_argument("--duration", type=int, help="seconds per wrk run (8; --quick 2)")
    ap.add_argument(
        "--latency-duration", type=float, help="seconds per fixed-rate run (10; --quick 2)"
    )
    ap.add_argument("--rate", type=float, default=1000, help="fixed rate, runtime down (1000)")
    ap.add_argument("--pending", type=int, help="backlog size (100000; --quick 5000)")
    ap.add_argument("--stats-runs", type=int, help="spool stats calls timed (5; --quick 3)")
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--server-cpu", default="0")
    ap.add_argument("--client-cpu", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="smoke test, ~30 s")
    ap.add_argument("--sidecar-src", help="checkout to run (default: this one)")
    ap.add_argument("--sidecar-cmd", help='command to start the sidecar, e.g. "webhook-sidecar"')
    ap.add_argument("--wrk", default=shutil.which("wrk") or "/usr/bin/wrk")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    ap.add_argument("--json", metavar="FILE", help="also write the JSON result to FILE")
    args = ap.parse_args()
    for name, sizes in SIZES.items():
        if getattr(args, name) is None:
            setattr(args, name, sizes[1] if args.quick else sizes[0])
    args.server_cores = [int(c) for c in args.server_cpu.split(",")]
    return args


# ---------------------------------------------------------------------------
# readings


def scrape(t: Target) -> dict[str, float]:
    """The sidecar's /metrics (admin listener) as {'name{labels}': value}."""
    status, text = http_call(t.admin_port, "GET", "/metrics", max_bytes=None)
    if status != 200:
        raise RuntimeError(f"{t.name}: /metrics answered {status}")
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def answered_200(m: dict[str, float]) -> float:
    return sum(
        v for k, v in m.items() if k.startswith("webhook_sidecar_requests_total{") and '"200"' in k
    )


def pending(path: Path) -> int:
    """Pending events in the spool file, as ``spool stats`` reads them (store.counts on a
    read-only connection: a row the triggers keep, not a scan)."""
    conn = connect(path, readonly=True)
    try:
        return counts(conn)[0]
    finally:
        conn.close()


def wait_drained(path: Path, timeout: float) -> float:
    """Seconds until nothing is pending in ``path``."""
    t0 = time.monotonic()
    while pending(path):
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"{path}: still {pending(path)} pending after {timeout:.0f} s")
        time.sleep(0.05)
    return time.monotonic() - t0


def rss_kb(t: Target) -> tuple[int, int]:
    """(VmRSS, VmHWM) of the sidecar's processes, summed."""
    pids = t.pids()
    return sum(status_kb(p, "VmRSS") for p in pids), sum(status_kb(p, "VmHWM") for p in pids)


def filesystem(path: Path) -> dict[str, str]:
    out = subprocess.run(
        ["df", "--output=source,fstype,target", str(path)],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split("\n")[1:2]
    source, fstype, mount = [*out[0].split(), "?", "?", "?"][:3] if out else ("?", "?", "?")
    return {"path": str(path), "device": source, "type": fstype, "mount": mount}


class Others:
    """How much of the server core(s) programs other than ours took during a run: on a
    shared machine, the figures of a run where they took much are depressed (noisy)."""

    CLIENTS = ("wrk", "wrk-fill", "loadgen")

    def __init__(self, h: Harness, cores: list[int]) -> None:
        self.h, self.cores = h, cores
        self.pids = [p for x in h.procs if x.name not in self.CLIENTS for p in family_pids(x.pid)]
        self.ticks, self.times = cpu_ticks(self.pids), core_times()

    def pct(self) -> float:
        times = core_times()
        busy = sum(times[c][0] - self.times[c][0] for c in self.cores)
        total = sum(times[c][1] - self.times[c][1] for c in self.cores)
        ours = cpu_ticks(self.pids) - self.ticks
        return max(0.0, 100 * (busy - ours) / total) if total else 0.0


# ---------------------------------------------------------------------------
# loads


class Flags(list[str]):
    def check(self, what: str, statuses: dict[str, int], errors: dict[str, int]) -> None:
        bad = {k: v for k, v in statuses.items() if k != "200"}
        errs = {k: v for k, v in errors.items() if v and k != "status"}
        if bad:
            self.append(f"{what}: statuses other than 200: {bad}")
        if errs:
            self.append(f"{what}: socket errors {errs}")


def trim_logs(h: Harness) -> None:
    """The sidecars' audit logs (a line per call) emptied between runs, as bench/run.py
    does: writing them is part of the cost, keeping them is not needed."""
    for p in h.procs:
        if p.name in ("direct", "durable", "backlog"):
            truncate_log(p.log_path)


def wrk(
    h: Harness, args: argparse.Namespace, t: Target, seconds: int, secret: str
) -> dict[str, Any]:
    """One wrk run of the bench call (bench/wrk/post.lua): its BENCH_RESULT."""
    argv = wrk_argv(args, t, seconds, secret, "post.lua")
    _, out = h.run_client("wrk", argv, args.client_cpu, timeout=seconds + 30)
    trim_logs(h)
    return wrk_result(out)


def wrk_argv(
    args: argparse.Namespace, t: Target, seconds: int, secret: str, script: str
) -> list[str]:
    os.environ["WRK_POST_LUA"] = str(BENCH / "wrk" / "post.lua")  # spawn() passes it on
    return [
        args.wrk, "-t1", "-c", str(args.connections), "-d", f"{seconds}s", "--timeout", "5s",
        "-s", str(BENCH / "wrk" / script), f"http://127.0.0.1:{t.port}{configs.PATH}",
        "--", secret, "200", configs.BODY,
    ]  # fmt: skip


def wrk_result(out: bytes) -> dict[str, Any]:
    line = next((ln for ln in out.decode().splitlines() if ln.startswith("BENCH_RESULT ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result: {out[-500:]!r}")
    result: dict[str, Any] = json.loads(line[len("BENCH_RESULT ") :])
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    return result


def fill(
    h: Harness, args: argparse.Namespace, t: Target, secret: str, db: Path, want: int
) -> dict[str, Any]:
    """Calls through HTTP until ``want`` events are pending in ``db``: wrk with
    bench/wrk/fill.lua, which stops sending after as many answers as were missing; wrk
    itself sleeps out its -d, so it is ended with SIGINT (it then prints its result)."""
    os.environ["FILL_COUNT"] = str(max(1, want - pending(db)))
    p = h.spawn("wrk-fill", wrk_argv(args, t, 3600, secret, "fill.lua"), cpu=args.client_cpu,
                stdout_pipe=True)  # fmt: skip
    last, still = -1, time.monotonic()
    while p.alive():
        now = pending(db)
        if now >= want:
            break
        if now != last:
            last, still = now, time.monotonic()
        elif time.monotonic() - still > 10:
            raise RuntimeError(f"fill: stuck at {now} pending: {t.proc.log_tail(500)}")
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.kill(p.pid, signal.SIGINT)
    try:
        out, _ = p.popen.communicate(timeout=30)
    finally:
        h.stop(p)
    trim_logs(h)
    return wrk_result(out)


def loadgen(
    h: Harness, args: argparse.Namespace, t: Target, secret: str, seconds: float
) -> dict[str, Any]:
    argv = [
        PY, str(BENCH / "loadgen.py"), "--port", str(t.port), "--path", configs.PATH,
        "--token", secret, "--body", configs.BODY, "--rate", str(args.rate),
        "--duration", str(seconds), "--warmup", "1",
    ]  # fmt: skip
    p, out = h.run_client("loadgen", argv, args.client_cpu, timeout=seconds + 40)
    trim_logs(h)
    try:
        result: dict[str, Any] = json.loads(out.decode())
    except ValueError:
        raise RuntimeError(f"loadgen failed: {p.log_tail(500)}") from None
    if "error" in result:
        raise RuntimeError(f"loadgen: {result['error']}")
    return result


# ---------------------------------------------------------------------------
# processes


def kill9(h: Harness, t: Target) -> None:
    """SIGKILL the sidecar and every process of it: no shutdown, no final commit."""
    pids = t.pids()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    t.proc.popen.wait(10)
    deadline = time.monotonic() + 5
    while any(Path(f"/proc/{p}").exists() for p in pids) and time.monotonic() < deadline:
        time.sleep(0.01)
    if t.proc.popen.stdout:
        t.proc.popen.stdout.close()
    if t.proc in h.procs:
        h.procs.remove(t.proc)


def restart(
    h: Harness,
    args: argparse.Namespace,
    t: Target,
    argv: list[str],
    env: dict[str, str],
    secret: str,
) -> tuple[Target, float, float]:
    """Start ``t`` again (after :func:`kill9`); seconds from the spawn until a valid call
    is answered 200, and until ``/readyz`` is 200, each polled every 5 ms."""
    t0 = time.monotonic()
    p = h.spawn(t.name, argv, cpu=args.server_cpu, env=env)
    served = ready = None
    while served is None or ready is None:
        now = time.monotonic() - t0
        if now > 30 or not p.alive():
            raise RuntimeError(f"{t.name} did not come back in {now:.1f} s:\n{p.log_tail()}")
        if served is None:
            with contextlib.suppress(OSError):
                if post(t.port, secret, True)[0] == 200:
                    served = time.monotonic() - t0
        if ready is None:
            with contextlib.suppress(OSError):
                if http_call(t.admin_port, "GET", "/readyz")[0] == 200:
                    ready = time.monotonic() - t0
        time.sleep(0.005)
    return Target(t.name, t.port, p, note=t.note, admin_port=t.admin_port), served, ready


def spool_stats(argv: list[str], env: dict[str, str], cpu: int) -> tuple[float, dict[str, Any]]:
    """One ``webhook-sidecar spool stats -c FILE --json``, a process of its own on the
    client core: its wall time and what it printed."""
    t0 = time.monotonic()
    r = subprocess.run(
        ["taskset", "-c", str(cpu), *argv],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=60,
        check=False,
    )
    wall = time.monotonic() - t0
    if r.returncode != 0:
        raise RuntimeError(f"spool stats exited {r.returncode}: {r.stderr.strip()}")
    doc: dict[str, Any] = json.loads(r.stdout)
    return wall, doc


# ---------------------------------------------------------------------------
# the scenarios


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def throughput(
    h: Harness,
    args: argparse.Namespace,
    direct: Target,
    durable: Target,
    runtime: Target,
    durable_db: Path,
    secret: str,
    flags: Flags,
) -> dict[str, Any]:
    """Scenario 1: durable vs direct, alternating, the backlog drained between runs."""
    series: dict[str, dict[str, list[float]]] = {
        name: {"rps": [], "cpu_us": [], "e2e_us": []} for name in ("direct", "durable")
    }
    per_commit: list[float] = []
    backlog: list[int] = []
    other_pct: list[float] = []
    targets = {"direct": direct, "durable": durable}
    for rnd in range(args.rounds):
        order = ["direct", "durable"] if rnd % 2 == 0 else ["durable", "direct"]
        for name in order:
            t = targets[name]
            pids, rt_pids = t.pids(), runtime.pids()
            m0 = scrape(t) if name == "durable" else {}
            cpu0, rt0 = cpu_ticks(pids), cpu_ticks(rt_pids)
            others = Others(h, args.server_cores)
            r = wrk(h, args, t, args.duration, secret)
            cpu1 = cpu_ticks(pids)
            other_pct.append(others.pct())
            flags.check(f"throughput {name} round {rnd + 1}", r["statuses"], r["errors"])
            if name == "durable":
                m1 = scrape(t)
                commits = m1.get(COMMITS, 0) - m0.get(COMMITS, 0)
                accepted = answered_200(m1) - answered_200(m0)
                per_commit.append(accepted / commits if commits else float("nan"))
                backlog.append(pending(durable_db))
                wait_drained(durable_db, 600)
            else:
                time.sleep(0.3)  # calls still in flight upstream land
            cpu2, rt2 = cpu_ticks(pids), cpu_ticks(rt_pids)
            n = r["requests"] or 1
            s = series[name]
            s["rps"].append(r["rps"])
            s["cpu_us"].append((cpu1 - cpu0) / CLK_TCK * 1e6 / n)
            s["e2e_us"].append((cpu2 - cpu0 + rt2 - rt0) / CLK_TCK * 1e6 / n)
            extra = f"  {per_commit[-1]:.1f} events/commit, left {backlog[-1]} to deliver" if (
                name == "durable"
            ) else ""  # fmt: skip
            log(
                f"round {rnd + 1} throughput {name:8} {r['rps']:9,.0f} req/s"
                f"  sidecar {s['cpu_us'][-1]:6.1f} us/req"
                f"  end to end {s['e2e_us'][-1]:6.1f} us/event{extra}"
                f"  (others took {other_pct[-1]:.0f}% of the server core)"
            )

    def paired(key: str, num: str, den: str) -> list[float]:
        return [n / d for n, d in zip(series[num][key], series[den][key], strict=True)]

    ratios = paired("rps", "durable", "direct")
    return {
        "rps": {k: median(v["rps"]) for k, v in series.items()},
        "ratio": median(ratios),
        "ratio_per_round": [round(x, 3) for x in ratios],
        "cpu_us_per_req": {k: median(v["cpu_us"]) for k, v in series.items()},
        "cpu_ratio": median(paired("cpu_us", "direct", "durable")),
        "e2e_us_per_event": {k: median(v["e2e_us"]) for k, v in series.items()},
        "e2e_ratio": median(paired("e2e_us", "direct", "durable")),
        "events_per_commit": median(per_commit),
        "left_to_deliver": backlog,
        "others_max_pct": max(other_pct),
        "noisy_runs": sum(x > NOISY_PCT for x in other_pct),
        "series": series,
    }


def ack_latency(
    h: Harness, args: argparse.Namespace, t: Target, secret: str, flags: Flags
) -> dict[str, Any]:
    """Scenario 2: fixed rate, runtime down."""
    runs = []
    for rnd in range(args.rounds):
        m0 = scrape(t)
        others = Others(h, args.server_cores)
        r = loadgen(h, args, t, secret, args.latency_duration)
        m1 = scrape(t)
        flags.check(f"latency round {rnd + 1}", r["statuses"], r["errors"])
        commits = m1.get(COMMITS, 0) - m0.get(COMMITS, 0)
        accepted = answered_200(m1) - answered_200(m0)
        lat = r["latency_ms"]
        run = {
            "p50_ms": lat["p50"],
            "p99_ms": lat["p99"],
            "max_ms": lat["max"],
            "sched_p99_ms": r["latency_sched_ms"]["p99"],
            "lag_p99_ms": r["send_lag_ms"]["p99"],
            "rate": r["rate_achieved"],
            "events_per_commit": accepted / commits if commits else float("nan"),
            "others_pct": others.pct(),
        }
        runs.append(run)
        log(
            f"round {rnd + 1} ack latency at {run['rate']:,.0f}/s: p50 {run['p50_ms']:.2f} ms"
            f"  p99 {run['p99_ms']:.2f}  max {run['max_ms']:.2f}"
            f"  (from due time p99 {run['sched_p99_ms']:.2f}, generator lag p99"
            f" {run['lag_p99_ms']:.2f})  {run['events_per_commit']:.2f} events/commit"
            f"  (others took {run['others_pct']:.0f}% of the server core)"
        )
    return {
        "rate": args.rate,
        **{k: median([r[k] for r in runs]) for k in runs[0]},
        "worst_p99_ms": max(r["p99_ms"] for r in runs),
        "worst_max_ms": max(r["max_ms"] for r in runs),
        "others_max_pct": max(r["others_pct"] for r in runs),
        "noisy_runs": sum(
            r["others_pct"] > NOISY_PCT or r["lag_p99_ms"] > NOISY_LAG_MS for r in runs
        ),
        "runs": runs,
    }


def main() -> int:
    args = parse_args()
    for tool in (args.wrk, "taskset"):
        if not shutil.which(tool):
            log(f"error: {tool} not found")
            return 1
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, {args.client_cpu})  # the harness itself off the server core
    catch_signals()
    h = Harness(args.keep_tmp)
    secret = secrets.token_hex(32)
    ports: set[int] = set()
    flags = Flags()

    def body() -> int:
        fs = filesystem(h.tmp)
        log(f"temp dir {h.tmp} on {fs['device']} ({fs['type']}, mounted at {fs['mount']})")
        cmd, env, how = resolve_sidecar(args, h.tmp)
        if cmd is None:
            raise RuntimeError(f"cannot start the sidecar: {how}")
        log(f"sidecar: {how}")
        runtime = start_runtime(h, args, ports)
        down_sock = h.tmp / "down.sock"  # nothing listens there until the drain
        durable_db, backlog_db = h.tmp / "durable.db", h.tmp / "backlog.db"

        def config(spool: dict[str, Any] | None, upstream: Path | None = None) -> Any:
            def make(**where: str) -> dict[str, Any]:
                doc = configs.sidecar_config(secret=secret, variant="sidecar", **where)
                if spool is not None:
                    doc["sidecar"]["spool"] = spool
                if upstream is not None:
                    doc["sidecar"]["upstream"] = {"socket": str(upstream)}
                return doc

            return make

        direct = start_sidecar(h, args, ports, "direct", cmd, env, config(None))
        durable = start_sidecar(
            h, args, ports, "durable", cmd, env,
            config({"path": str(durable_db), "maxEvents": 10_000_000}),
        )  # fmt: skip
        # Retries at most 1 s apart while the runtime is down, so that the drain's first
        # delivery is due within a second of the runtime's start (the default max is 5 min).
        backlog_spool = {
            "path": str(backlog_db),
            "maxEvents": 10_000_000,
            "retry": {"initial": "100ms", "max": "1s"},
        }
        backlog = start_sidecar(
            h, args, ports, "backlog", cmd, env, config(backlog_spool, down_sock)
        )
        for t in (direct, durable, backlog):
            log(f"  {t.name:8} 127.0.0.1:{t.port} pid {t.proc.pid}  {t.note}")

        log(f"warm-up: {min(2, args.duration)} s each")
        for t in (direct, durable):
            wrk(h, args, t, min(2, args.duration), secret)
        wait_drained(durable_db, 600)
        rss_idle = rss_kb(durable)[0]

        log("\n1. throughput, runtime up: durable accepts vs direct mode")
        tput = throughput(h, args, direct, durable, runtime, durable_db, secret, flags)

        log(f"\n2. ack latency at {args.rate:g}/s, runtime down (no socket at {down_sock})")
        lat = ack_latency(h, args, backlog, secret, flags)

        log(f"\n3. backlog of {args.pending:,} events, runtime down")
        have = pending(backlog_db)
        t0 = time.monotonic()
        if have < args.pending:
            r = fill(h, args, backlog, secret, backlog_db, args.pending)
            flags.check("fill", r["statuses"], r["errors"])
        fill_s = time.monotonic() - t0
        n_pending = pending(backlog_db)
        log(f"filled through HTTP (wrk): {n_pending:,} pending, {fill_s:.1f} s")
        time.sleep(2)  # the gauges' refresh (1 s), a collection, settle
        rss, hwm = rss_kb(backlog)
        stats_argv = [*cmd, "spool", "stats", "-c", str(h.tmp / "backlog.json5"), "--json"]
        stats_walls, stats_doc = [], {}
        for _ in range(args.stats_runs):
            wall, stats_doc = spool_stats(stats_argv, env, args.client_cpu)
            stats_walls.append(wall)
        log(
            f"sidecar VmRSS {rss / 1024:.1f} MiB (peak {hwm / 1024:.1f}; idle after the"
            f" throughput runs, empty spool: {rss_idle / 1024:.1f})"
        )
        log(
            f"spool stats --json: median {median(stats_walls):.3f} s, max {max(stats_walls):.3f}"
            f" s over {len(stats_walls)}: {json.dumps(stats_doc)}"
        )

        log("\n4. recovery after SIGKILL (backlog vs the empty durable spool, alternating)")
        rec: dict[str, dict[str, list[float]]] = {
            name: {"served": [], "ready": []} for name in ("empty", "backlog")
        }
        argv_of = {
            "empty": [*cmd, "run", "-c", str(h.tmp / "durable.json5")],
            "backlog": [*cmd, "run", "-c", str(h.tmp / "backlog.json5")],
        }
        live = {"empty": durable, "backlog": backlog}
        rss_after: list[int] = []
        for rnd in range(args.rounds):
            for name in ("empty", "backlog") if rnd % 2 == 0 else ("backlog", "empty"):
                kill9(h, live[name])
                live[name], served, ready = restart(h, args, live[name], argv_of[name], env, secret)
                rec[name]["served"].append(served)
                rec[name]["ready"].append(ready)
                if name == "backlog":
                    time.sleep(1.5)  # the delivery loop has read its window
                    rss_after.append(rss_kb(live[name])[0])
                log(
                    f"round {rnd + 1} restart {name:7}: first 200 after {served:.3f} s,"
                    f" /readyz 200 after {ready:.3f} s"
                )
        backlog = live["backlog"]
        left = pending(backlog_db)

        log(f"\n5. drain: runtime started at {down_sock}")
        rt_argv = [PY, str(BENCH / "runtime.py"), "--socket", str(down_sock)]
        t0 = time.monotonic()
        rt2 = h.spawn("runtime-drain", rt_argv, cpu=args.server_cpu)
        others = Others(h, args.server_cores)
        wait_ready(rt2, lambda: unix_open(down_sock), "listening socket", 15)
        up_s = time.monotonic() - t0
        first = None
        while True:
            now = pending(backlog_db)
            if first is None and now < left:
                first = time.monotonic() - t0
            if now == 0:
                break
            if time.monotonic() - t0 > 900 or not backlog.proc.alive():
                raise RuntimeError(f"drain: {now} still pending after {time.monotonic() - t0} s")
            time.sleep(0.05)
        drain_s = time.monotonic() - t0
        _, after_doc = spool_stats(stats_argv, env, args.client_cpu)
        if after_doc["pending"] != 0:
            flags.append(f"drain: spool stats says {after_doc['pending']} pending")
        first = first or drain_s
        drain = {
            "events": left,
            "seconds": drain_s,
            "per_s": left / drain_s,
            "runtime_listening_s": up_s,
            "first_delivery_s": first,
            "per_s_from_first": left / max(1e-9, drain_s - first),
            "others_pct": others.pct(),
        }
        log(
            f"{left:,} events in {drain_s:.2f} s from the runtime's start: {drain['per_s']:,.0f}"
            f"/s (runtime listening after {up_s:.2f} s, first delivery after {first:.2f} s:"
            f" {drain['per_s_from_first']:,.0f}/s from there; others took"
            f" {drain['others_pct']:.0f}% of the server core)"
        )
        for name, t in (("direct", direct), ("durable", live["empty"]), ("backlog", backlog)):
            if not t.proc.alive():
                flags.append(f"{name} died")

        result = {
            "filesystem": fs,
            "args": {
                k: getattr(args, k)
                for k in ("rounds", "duration", "latency_duration", "rate", "pending", "quick")
            },
            "throughput": {k: v for k, v in tput.items() if k != "series"},
            "ack_latency": {k: v for k, v in lat.items() if k != "runs"},
            "backlog": {
                "pending": n_pending,
                "filled_by": "http (wrk, bench/wrk/fill.lua)",
                "fill_s": fill_s,
                "rss_mb": rss / 1024,
                "hwm_mb": hwm / 1024,
                "rss_after_restart_mb": median([x / 1024 for x in rss_after]),
                "rss_idle_empty_mb": rss_idle / 1024,
                "stats_s": median(stats_walls),
                "stats_max_s": max(stats_walls),
                "stats": stats_doc,
            },
            "recovery": {
                "backlog_served_s": median(rec["backlog"]["served"]),
                "backlog_ready_s": median(rec["backlog"]["ready"]),
                "empty_served_s": median(rec["empty"]["served"]),
                "empty_ready_s": median(rec["empty"]["ready"]),
                "worst_s": max(rec["backlog"]["served"] + rec["backlog"]["ready"]),
                "pending": left,
            },
            "drain": drain,
            "flags": list(flags),
        }
        measured = {
            "throughput_ratio": tput["ratio"],
            "ack_p99_ms": lat["p99_ms"],
            "rss_mb": max(rss, *rss_after) / 1024,
            "stats_s": max(stats_walls),
            "drain_per_s": drain["per_s"],
            "recovery_s": max(
                result["recovery"]["backlog_served_s"], result["recovery"]["backlog_ready_s"]
            ),
        }
        result["targets"] = {
            k: {"measured": round(v, 4), "target": f"{op} {goal:g}", "met": _met(v, op, goal)}
            for k, v in measured.items()
            for op, goal in [TARGETS[k]]
        }
        report(result)
        line = json.dumps(result, separators=(",", ":"))
        print("SPOOL_BENCH " + line, flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        if flags:
            return 3
        return 0 if all(t["met"] for t in result["targets"].values()) else 4

    return guarded(body, h.stop_all)


def _met(value: float, op: str, goal: float) -> bool:
    return value >= goal if op == ">=" else value <= goal


def report(r: dict[str, Any]) -> None:
    t, lat, b, rec, d = r["throughput"], r["ack_latency"], r["backlog"], r["recovery"], r["drain"]
    fs = r["filesystem"]
    rows: list[tuple[str, str, str]] = [
        (
            "durable / direct throughput",
            f"{t['ratio']:.2f}x ({t['rps']['durable']:,.0f} vs {t['rps']['direct']:,.0f} req/s;"
            f" per round {t['ratio_per_round']}; {t['noisy_runs']} noisy run(s))",
            "throughput_ratio",
        ),
        (
            "  sidecar CPU per request",
            f"durable {t['cpu_us_per_req']['durable']:.1f} us, direct"
            f" {t['cpu_us_per_req']['direct']:.1f} us (cpu-based {t['cpu_ratio']:.2f}x)",
            "",
        ),
        (
            "  CPU per event end to end",
            f"durable {t['e2e_us_per_event']['durable']:.1f} us, direct"
            f" {t['e2e_us_per_event']['direct']:.1f} us ({t['e2e_ratio']:.2f}x; sidecar +"
            " runtime, delivery included)",
            "",
        ),
        ("  events per commit (fsync)", f"{t['events_per_commit']:.1f}", ""),
        (
            f"ack latency at {lat['rate']:g}/s, runtime down",
            f"p50 {lat['p50_ms']:.2f} ms, p99 {lat['p99_ms']:.2f} ms, max {lat['max_ms']:.2f} ms"
            f" (worst p99 {lat['worst_p99_ms']:.2f}); {lat['events_per_commit']:.2f}"
            f" events/commit; {lat['noisy_runs']} noisy run(s)",
            "ack_p99_ms",
        ),
        (
            f"RSS, {b['pending']:,} pending",
            f"{b['rss_mb']:.1f} MiB (after restart {b['rss_after_restart_mb']:.1f}; empty"
            f" {b['rss_idle_empty_mb']:.1f})",
            "rss_mb",
        ),
        (
            "spool stats --json wall time",
            f"median {b['stats_s']:.3f} s, max {b['stats_max_s']:.3f} s",
            "stats_s",
        ),
        (
            f"recovery after SIGKILL, {rec['pending']:,} pending",
            f"first 200 {rec['backlog_served_s']:.2f} s, /readyz {rec['backlog_ready_s']:.2f} s"
            f" (empty spool: {rec['empty_served_s']:.2f} / {rec['empty_ready_s']:.2f} s)",
            "recovery_s",
        ),
        (
            "drain to a fast runtime",
            f"{d['per_s']:,.0f} events/s ({d['events']:,} in {d['seconds']:.1f} s from its"
            f" start; {d['per_s_from_first']:,.0f}/s from the first delivery)",
            "drain_per_s",
        ),
    ]
    print(f"spool on {fs['path']}: {fs['device']} ({fs['type']})")
    print(f"{'measure':38} {'result':88} target")
    for name, text, key in rows:
        goal = ""
        if key:
            tg = r["targets"][key]
            goal = f"{tg['target']}: {'met' if tg['met'] else 'NOT MET'}"
        print(f"{name:38} {text:88} {goal}")
    for flag in r["flags"]:
        print(f"FLAGGED: {flag}")


if __name__ == "__main__":
    sys.exit(main())
