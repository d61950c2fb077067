#!/usr/bin/env python3
"""Memory soak: does the sidecar's memory stay bounded under many client addresses?

Starts the fast runtime (bench/runtime.py) and one sidecar with every guard on
(configs.soak_config: allowIps, trustedProxies 127.0.0.1 so X-Forwarded-For
names the client, per-IP/global/agent rate limits, authLockout,
maxConcurrent), both pinned to the server core as in bench/run.py, then drives
it for --minutes with wrk (bench/wrk/soak.lua, on the client core): nearly
every call from a new address, IPv4 and IPv6, millions in all; a mix of valid
calls, bad tokens (lockout records), repeated bad tokens (locks) and calls over
a rate limit. Every --sample seconds it reads the sidecar's VmRSS and VmHWM and
its /metrics; bench/soak_probe.py, which the sidecar runs under, reports the
sizes of its lockout and limiter tables.

    python bench/soak.py                    # 10 minutes
    python bench/soak.py --minutes 0.15     # smoke test (CI)
    python bench/soak.py --tracemalloc      # + where the memory went (slower)

Verdict: "bounded" when the RSS grew by less than --noise-mb (1 MB) over the
second half of the soak (a least-squares line through the samples, so one
outlier does not decide) and the peak is at most --peak-mb (60 MB, issue 8).
Soaks shorter than 2 minutes get no verdict. See bench/README.md.

Exit status: 0 bounded (or too short to judge), 4 not bounded, 3 the run is
flagged (unexpected statuses, socket errors, the sidecar died, counts that do
not add up), 1 harness error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import re
import secrets
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import configs  # noqa: E402
import harness  # noqa: E402
import procs  # noqa: E402
from report import fmt, table  # noqa: E402

LUA = BENCH / "wrk" / "soak.lua"
EXPECTED_STATUSES = {"200", "401", "403", "429"}
MIN_VERDICT_S = 120
log = procs.log


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--minutes", type=float, default=10, help="soak length (default 10)")
    ap.add_argument("--sample", type=float, default=5, help="seconds between samples")
    ap.add_argument("--probe-every", type=float, default=15, help="seconds between table probes")
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="wrk threads")
    ap.add_argument("--noise-mb", type=float, default=1.0, help="growth within noise (MB)")
    ap.add_argument("--peak-mb", type=float, default=60.0, help="peak RSS goal (MB)")
    ap.add_argument("--tracemalloc", action="store_true", help="trace allocations in the sidecar")
    ap.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for the sidecar, e.g. MALLOC_MMAP_THRESHOLD_=131072 (repeatable)",
    )
    ap.add_argument("--json", metavar="FILE", help="write the samples and the summary as JSON")
    ap.add_argument("--server-cpu", type=int, default=0)
    ap.add_argument("--client-cpu", type=int, default=1)
    ap.add_argument("--sidecar-src", help="checkout whose ./sidecar package to run")
    ap.add_argument("--sidecar-cmd", help="command to start the sidecar (no table probe then)")
    ap.add_argument("--wrk", default=shutil.which("wrk") or "/usr/bin/wrk")
    ap.add_argument("--nice", type=int, default=0)
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (config, logs)")
    return ap.parse_args(argv)


# --------------------------------------------------------------------------
# sampling

METRIC = re.compile(r"^webhook_sidecar_(requests|rejections)_total\{([^}]*)\} ([0-9.e+]+)$")


def scrape(admin_port: int) -> dict[str, dict[str, int]]:
    """Requests by status code and rejections by reason, from the sidecar's /metrics."""
    st, text = harness.http_call(admin_port, "GET", "/metrics", max_bytes=None)
    return parse_metrics(text if st == 200 else "")


def parse_metrics(text: str) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {"requests": {}, "rejections": {}}
    for line in text.splitlines():
        m = METRIC.match(line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
        key = labels.get("code") if m.group(1) == "requests" else labels.get("reason")
        if key is not None:
            d = out[m.group(1)]
            d[key] = d.get(key, 0) + int(float(m.group(3)))
    return out


def last_probe(path: Path) -> dict[str, Any] | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        return dict(json.loads(path.read_text().splitlines()[-1]))
    return None


class Sampler:
    """Samples the sidecar: memory, /metrics, the probe's last line, and how the
    server core was shared since the previous sample (a stall with the core
    taken by other programs is the shared machine, not the sidecar)."""

    def __init__(self, target: harness.Target, runtime: harness.Target, probe_path: Path, cpu: int):
        self.target, self.probe_path, self.cpu = target, probe_path, cpu
        self.pids = [target.proc.pid, runtime.proc.pid]
        self.t0 = time.monotonic()
        self.last = self._cpu()

    def _cpu(self) -> tuple[int, tuple[int, int, int]]:
        return procs.cpu_ticks(self.pids), procs.core_times().get(self.cpu, (0, 0, 0))

    def __call__(self) -> dict[str, Any]:
        pid = self.target.proc.pid
        s: dict[str, Any] = {
            "t": round(time.monotonic() - self.t0, 1),
            "rss_kb": procs.status_kb(pid, "VmRSS"),
            "hwm_kb": procs.status_kb(pid, "VmHWM"),
        }
        ours0, (busy0, total0, _) = self.last
        self.last = ours, (busy, total, _) = self._cpu()
        if total > total0:
            s["core_ours_pct"] = round(100 * (ours - ours0) / (total - total0), 1)
            s["core_other_pct"] = round(100 * (busy - busy0 - ours + ours0) / (total - total0), 1)
        with contextlib.suppress(OSError):
            s["metrics"] = scrape(self.target.admin_port)
        s["tables"] = last_probe(self.probe_path)
        return s


# --------------------------------------------------------------------------
# analysis


def rss_at(samples: list[dict[str, Any]], t: float) -> int | None:
    if not samples or samples[-1]["t"] < t:
        return None
    return int(min(samples, key=lambda s: abs(s["t"] - t))["rss_kb"])


PROBED = ("heap_used_mb", "heap_free_mb", "objects", "blocks", "lockout_records", "limiter_buckets")


def probe_change(half: list[dict[str, Any]]) -> dict[str, float]:
    """How the probe's figures moved over the second half: where RSS growth went
    (heap in use: data; heap free but kept: the allocator; objects: a leak)."""
    probed = [s["tables"] for s in half if s.get("tables")]
    if len(probed) < 2:
        return {}
    first, last = probed[0], probed[-1]
    return {k: round(last[k] - first[k], 2) for k in PROBED if k in first and k in last}


def analyse(samples: list[dict[str, Any]], noise_mb: float, peak_mb: float) -> dict[str, Any]:
    """RSS at minute 1, max, end; the growth over the second half; the verdict."""
    mb = [s["rss_kb"] / 1024 for s in samples]
    span = samples[-1]["t"] if samples else 0.0
    half = [s for s in samples if s["t"] >= span / 2]
    slope = None
    if len(half) >= 3:
        fit = statistics.linear_regression(
            [s["t"] / 60 for s in half], [s["rss_kb"] / 1024 for s in half]
        )
        slope = fit.slope
    growth = None if slope is None else slope * (span / 2) / 60
    peak = max([s["hwm_kb"] for s in samples], default=0) / 1024
    at_1min = rss_at(samples, 60)
    out: dict[str, Any] = {
        "duration_s": span,
        "second_half_probe": probe_change(half),
        "rss_start_mb": round(mb[0], 1) if mb else None,
        "rss_1min_mb": None if at_1min is None else round(at_1min / 1024, 1),
        "rss_max_mb": round(max(mb), 1) if mb else None,
        "rss_end_mb": round(mb[-1], 1) if mb else None,
        "peak_hwm_mb": round(peak, 1),
        "last_half_slope_mb_per_min": None if slope is None else round(slope, 3),
        "last_half_growth_mb": None if growth is None else round(growth, 2),
        "noise_mb": noise_mb,
        "peak_goal_mb": peak_mb,
    }
    if span < MIN_VERDICT_S or growth is None:
        out["verdict"] = f"too short for a verdict ({span:.0f} s < {MIN_VERDICT_S} s)"
        out["bounded"] = None
        return out
    problems = []
    if growth >= noise_mb:
        problems.append(f"grew {growth:.2f} MB over the second half (>= {noise_mb:g} MB)")
    if peak > peak_mb:
        problems.append(f"peak {peak:.1f} MB > {peak_mb:g} MB")
    out["bounded"] = not problems
    out["verdict"] = (
        "NOT BOUNDED: " + "; ".join(problems)
        if problems
        else f"bounded: {growth:+.2f} MB over the second half, peak {peak:.1f} MB"
    )
    return out


def check(result: dict[str, Any], final: dict[str, Any], posts: int) -> list[str]:
    """What makes the run's figures suspect."""
    flags = []
    odd = {k: v for k, v in result["statuses"].items() if k not in EXPECTED_STATUSES}
    if odd:
        flags.append(f"unexpected statuses {odd}")
    errs = {k: v for k, v in result["errors"].items() if v and k != "status"}
    if errs:
        # A timeout is a call unanswered for 5 s: a stall (see other%: a shared core?).
        flags.append(f"socket errors {errs}")
    ok = final.get("metrics", {}).get("requests", {}).get("200")
    if ok is not None and abs(posts - ok) > 8:
        flags.append(f"the runtime got {posts} calls, the sidecar answered {ok} with 200")
    for k in EXPECTED_STATUSES:
        if not result["statuses"].get(k):
            flags.append(f"no {k} at all: the mix did not exercise what it should")
    return flags


# --------------------------------------------------------------------------
# report


def done_requests(s: dict[str, Any]) -> int | None:
    reqs = s.get("metrics", {}).get("requests")
    return sum(reqs.values()) if reqs else None  # None: that scrape failed


def minute_rows(samples: list[dict[str, Any]], span: float) -> list[list[str]]:
    rows = []
    prev: dict[str, Any] | None = None
    for at in sorted({*range(0, int(span) + 1, 60), int(span)}):
        s = min(samples, key=lambda x: abs(x["t"] - at))
        tb = s.get("tables") or {}

        def n(key: str, tb: dict[str, Any] = tb) -> str:
            return f"{tb[key]:,}" if key in tb else "-"

        heap = (
            f"{tb['heap_used_mb'] / 1.048576:.1f}/{tb['heap_free_mb'] / 1.048576:.1f}"
            if "heap_used_mb" in tb
            else "-"
        )
        rate, other = "-", "-"
        if prev is not None:
            window = [x for x in samples if prev["t"] < x["t"] <= s["t"]]
            counted = [x for x in window if done_requests(x) is not None]
            d0 = done_requests(prev)
            if counted and d0 is not None:
                last = counted[-1]
                rate = f"{((done_requests(last) or 0) - d0) / (last['t'] - prev['t']):,.0f}"
            shares = [x["core_other_pct"] for x in window if "core_other_pct" in x]
            if shares:
                other = f"{statistics.mean(shares):.0f}"
        rows.append(
            [
                f"{s['t']:.0f} s",
                f"{s['rss_kb'] / 1024:.1f}",
                f"{s['hwm_kb'] / 1024:.1f}",
                heap,
                "/".join(n(k) for k in ("lockout_records", "lockout_locks", "limiter_buckets")),
                n("log_queue"),
                n("objects"),
                f"{tb['blocks'] / 1000:,.0f}" if "blocks" in tb else "-",
                rate,
                other,
            ]
        )
        if done_requests(s) is not None:
            prev = s
    return rows


def report(
    summ: dict[str, Any], result: dict[str, Any], samples: list[dict[str, Any]], flags: list[str]
) -> str:
    out: list[str] = []
    w = out.append
    m = summ["memory"]
    secs = result["duration_us"] / 1e6
    w("")
    w(
        f"== soak: {result['requests']:,} requests in {secs:.0f} s "
        f"({result['requests'] / secs:,.0f}/s), {summ['addresses']:,} distinct client addresses"
    )
    cpu = summ["cpu_pct"]
    w(f"   cpu: sidecar {cpu['sidecar']}%, runtime {cpu['runtime']}% of the server core")
    w("   statuses: " + ", ".join(f"{k} {v:,}" for k, v in sorted(result["statuses"].items())))
    w("   kinds:    " + ", ".join(f"{k} {v:,}" for k, v in sorted(result["kinds"].items())))
    rej = samples[-1].get("metrics", {}).get("rejections", {}) if samples else {}
    w("   refusals (/metrics): " + ", ".join(f"{k} {v:,}" for k, v in sorted(rej.items())))
    w("")
    w("== a row a minute. MiB: rss, hwm, heap: glibc malloc's main arena in use/free but kept")
    w("   (big tables live there, small objects in CPython's own arenas: blocks, in thousands);")
    w("   tables: lockout records/locks/limiter buckets; queue: audit lines waiting; objects:")
    w("   gc-tracked; req/s and other% (server core time taken by other programs) in the minute")
    out += table(
        [
            "at",
            "rss",
            "hwm",
            "heap used/free",
            "tables",
            "queue",
            "objects",
            "blocks",
            "req/s",
            "other%",
        ],
        minute_rows(samples, m["duration_s"]),
    )
    w("")
    w(
        f"== memory: rss at 1 min {fmt(m['rss_1min_mb'], '.1f')} MiB, max "
        f"{m['rss_max_mb']} MiB, end {m['rss_end_mb']} MiB, peak (VmHWM) {m['peak_hwm_mb']} MiB"
    )
    slope = m["last_half_slope_mb_per_min"]
    w(
        f"   second half: {fmt(slope, '+.3f')} MiB/min (least squares), "
        f"{fmt(m['last_half_growth_mb'], '+.2f')} MiB over {m['duration_s'] / 2:.0f} s"
    )
    if m["second_half_probe"]:
        w(
            "   over the second half, probe: "
            + ", ".join(f"{k} {v:+,}" for k, v in m["second_half_probe"].items())
        )
    w(f"   verdict: {m['verdict']}")
    w("")
    if flags:
        w(f"== FLAGGED: {'; '.join(flags)}")
    else:
        w("== statuses as expected; the runtime got exactly the calls answered 200")
    return "\n".join(out)


# --------------------------------------------------------------------------
# main


def start(
    h: harness.Harness, args: argparse.Namespace, secret: str
) -> tuple[harness.Target, harness.Target, Path, str]:
    """The runtime and the sidecar, under the table probe when it is a Python sidecar."""
    ports: set[int] = set()
    runtime = harness.start_runtime(h, args, ports)
    cmd, env, how = harness.resolve_sidecar(args, h.tmp)
    if cmd is None:
        raise RuntimeError(f"no runnable sidecar: {how}")
    probe_path = h.tmp / "probe.jsonl"
    if cmd[1:] == ["-m", "sidecar"]:
        cmd = [cmd[0], str(BENCH / "soak_probe.py"), str(probe_path), str(args.probe_every), "--"]
    env = {**env, **dict(kv.split("=", 1) for kv in args.env)}
    if args.tracemalloc:
        env["PYTHONTRACEMALLOC"] = "1"
    make = functools.partial(configs.soak_config, secret=secret)
    target = harness.start_sidecar(h, args, ports, "sidecar-soak", cmd, env, make)
    return runtime, target, probe_path, how


def preflight(target: harness.Target, secret: str, bad: str) -> None:
    """A valid call, a bad token and a disallowed address, each from its own address."""
    for addr, token, want in (
        ("198.51.100.1", secret, 200),
        ("198.51.100.2", bad, 401),
        ("224.0.0.1", secret, 403),
    ):
        hdr = {
            "Content-Type": "application/json",
            "Authorization": f"Bearer {token}",
            "X-Forwarded-For": addr,
        }
        st, body = harness.http_call(target.port, "POST", configs.PATH, hdr, configs.BODY)
        if st != want:
            raise RuntimeError(f"preflight from {addr}: {st}, want {want}: {body[:200]}")


def soak(h: harness.Harness, args: argparse.Namespace) -> int:
    secret, bad = secrets.token_hex(32), secrets.token_hex(32)
    runtime, target, probe_path, how = start(h, args, secret)
    log(f"sidecar: {how}; pid {target.proc.pid}, {target.note}")
    preflight(target, secret, bad)
    secs = max(1, round(args.minutes * 60))
    argv = [args.wrk, "-t", str(args.threads), "-c", str(args.connections), "-d", f"{secs}s"]
    argv += ["--timeout", "5s", "-s", str(LUA), f"http://127.0.0.1:{target.port}{configs.PATH}"]
    argv += ["--", secret, bad, configs.THROTTLED_AGENT, str(args.threads)]
    log(f"soak: {secs} s, wrk -t{args.threads} -c{args.connections}, sample every {args.sample} s")
    sample = Sampler(target, runtime, probe_path, args.server_cpu)
    t0 = sample.t0
    cpu0 = procs.cpu_ticks([target.proc.pid]), procs.cpu_ticks([runtime.proc.pid])
    samples = [sample()]
    wrk = h.spawn("wrk", argv, cpu=args.client_cpu, stdout_pipe=True, log_name="wrk.log")
    next_log = 60.0 if secs >= 120 else 0.0
    while wrk.popen.poll() is None and time.monotonic() - t0 < secs + 30:
        time.sleep(min(args.sample, max(0.1, secs + 1 - (time.monotonic() - t0))))
        s = sample()
        samples.append(s)
        procs.truncate_log(target.proc.log_path)
        if not target.proc.alive():
            break
        if s["t"] >= next_log:
            done = sum(s.get("metrics", {}).get("requests", {}).values())
            log(
                f"  {s['t']:6.0f} s  rss {s['rss_kb'] / 1024:.1f} MiB  hwm "
                f"{s['hwm_kb'] / 1024:.1f} MiB  {done:,} requests  tables {s['tables']}"
            )
            next_log += 60.0 if secs >= 120 else args.sample
    out, _ = wrk.popen.communicate(timeout=30)
    wall = time.monotonic() - t0
    cpu = [
        round(100 * (procs.cpu_ticks([p]) - c0) / procs.CLK_TCK / wall, 1)
        for p, c0 in zip((target.proc.pid, runtime.proc.pid), cpu0, strict=True)
    ]
    h.stop(wrk)
    time.sleep(0.5)  # calls in flight land before the last sample
    final = sample()
    samples.append(final)
    line = next(
        (x for x in out.decode("utf-8", "replace").splitlines() if x.startswith("SOAK_RESULT ")),
        None,
    )
    if line is None:
        raise RuntimeError(f"no SOAK_RESULT from wrk (exit {wrk.popen.returncode})")
    result = json.loads(line[len("SOAK_RESULT ") :])
    # Both counts include the preflight's valid call.
    posts = int(json.loads(harness.http_call(runtime.port, "GET", "/__bench/stats")[1])["posts"])
    flags = check(result, final, posts)
    if not target.proc.alive():
        flags.append(f"the sidecar died (status {target.proc.popen.returncode})")
    addrs = result["addresses"]
    summ = {
        "memory": analyse(samples, args.noise_mb, args.peak_mb),
        "addresses": addrs["fresh"] + addrs["hammer"] + addrs["hot"],
        "runtime_posts": posts,
        # Share of a core: the sidecar near 100 - runtime means the server core was the limit.
        "cpu_pct": {"sidecar": cpu[0], "runtime": cpu[1]},
        "flags": flags,
    }
    print(report(summ, result, samples, flags), flush=True)
    top = Path(str(probe_path) + ".top")
    if top.exists():
        print("\n== tracemalloc: " + top.read_text(), flush=True)
    if args.json:
        doc = {
            "args": vars(args),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
            "result": result,
            "summary": summ,
            "samples": samples,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
        log(f"wrote {args.json}")
    if flags:
        return 3
    return 4 if summ["memory"]["bounded"] is False else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for tool in (args.wrk, "taskset"):
        if not shutil.which(tool):
            log(f"error: {tool} not found")
            return 1
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, {args.client_cpu})
    procs.catch_signals()
    h = harness.Harness(args.keep_tmp, args.nice)
    return procs.guarded(lambda: soak(h, args), h.stop_all)


if __name__ == "__main__":
    sys.exit(main())
