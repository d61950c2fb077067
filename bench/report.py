"""The report: the runs summarised (medians, side-by-side ratios, added latency,
memory per target) as the JSON's "summary", and printed as tables.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from typing import Any

from harness import Target
from procs import status_kb
from scenarios import BASE_RATIOS, Run, Scenario


def med(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x: float | None, spec: str = ",.0f") -> str:
    return "-" if x is None else format(x, spec)


def summarize(runs: list[Run], scns: list[Scenario], targets: dict[str, Target]) -> dict[str, Any]:
    by: dict[str, list[Run]] = {}
    for r in runs:
        by.setdefault(r.scenario, []).append(r)
    summ: dict[str, Any] = {
        "throughput": {},
        "latency": {},
        "ratios": {},
        "added_latency_ms": {},
        "memory_kb": {},
    }
    for s in scns:
        rs = by.get(s.name, [])
        if not rs:
            continue
        if s.kind == "wrk":
            summ["throughput"][s.name] = {
                "rps_median": med([r.data.get("rps") for r in rs]),
                "rps_all": [r.data.get("rps") for r in rs],
                "p50_ms": med(
                    [r.data["latency_us"]["p50"] / 1e3 for r in rs if "latency_us" in r.data]
                ),
                "p99_ms": med(
                    [r.data["latency_us"]["p99"] / 1e3 for r in rs if "latency_us" in r.data]
                ),
                "cpu_us_per_req": med([r.data.get("cpu_us_per_req") for r in rs]),
                "runtime_cpu_us_per_req": med([r.data.get("runtime_cpu_us_per_req") for r in rs]),
                "server_core_busy_pct": med([r.data.get("server_core_busy_pct") for r in rs]),
                "client_core_busy_pct": med([r.data.get("client_core_busy_pct") for r in rs]),
                "server_core_other_pct": med([r.data.get("server_core_other_pct") for r in rs]),
                "client_core_other_pct": med([r.data.get("client_core_other_pct") for r in rs]),
                "flagged_runs": sum(1 for r in rs if r.flags),
                "noisy_runs": sum(1 for r in rs if r.noise),
            }
        else:

            def lat(r: Run, k: str, p: str) -> float | None:
                return r.data.get(k, {}).get(p)

            summ["latency"][s.name] = {
                "p50_ms": med([lat(r, "latency_ms", "p50") for r in rs]),
                "p99_ms": med([lat(r, "latency_ms", "p99") for r in rs]),
                "p999_ms": med([lat(r, "latency_ms", "p999") for r in rs]),
                "sched_p99_ms": med([lat(r, "latency_sched_ms", "p99") for r in rs]),
                "send_lag_p99_ms": med([lat(r, "send_lag_ms", "p99") for r in rs]),
                "rate": med([r.data.get("rate_achieved") for r in rs]),
                "server_core_other_pct": med([r.data.get("server_core_other_pct") for r in rs]),
                "client_core_other_pct": med([r.data.get("client_core_other_pct") for r in rs]),
                "flagged_runs": sum(1 for r in rs if r.flags),
                "noisy_runs": sum(1 for r in rs if r.noise),
            }

    def paired(num: str, den: str, key: str, invert: bool = False) -> list[float]:
        out = []
        for rn in by.get(num, []):
            for rd in by.get(den, []):
                if rd.round == rn.round:
                    a, b = rn.data.get(key), rd.data.get(key)
                    if a and b:
                        out.append(b / a if invert else a / b)
        return out

    def cpu_total(name: str) -> float | None:
        t = summ["throughput"].get(name)
        if not t or t["cpu_us_per_req"] is None:
            return None
        return t["cpu_us_per_req"] + (t["runtime_cpu_us_per_req"] or 0)

    ratio_defs = [(s.name, den, goal) for s in scns for den, goal in s.vs]
    ratio_defs += BASE_RATIOS
    for num, den, target in ratio_defs:
        tn, td = summ["throughput"].get(num), summ["throughput"].get(den)
        if not tn or not td or not tn["rps_median"] or not td["rps_median"]:
            continue
        pr = paired(num, den, "rps")
        cn, cd = cpu_total(num), cpu_total(den)
        summ["ratios"][f"{num}/{den}"] = {
            "ratio": tn["rps_median"] / td["rps_median"],
            "per_round": pr,
            "cpu_ratio": (cd / cn) if cn and cd else None,
            "target": target,
            "pass": None if target is None else tn["rps_median"] / td["rps_median"] >= target,
        }
    for v in [s.target for s in scns if s.kind == "rate" and s.target != "direct"]:
        per = []
        for rv in by.get(f"lat-{v}", []):
            for rd in by.get("lat-direct", []):
                if rd.round == rv.round and rv.data.get("latency_ms") and rd.data.get("latency_ms"):
                    per.append(
                        {
                            p: rv.data["latency_ms"][p] - rd.data["latency_ms"][p]
                            for p in ("p50", "p99", "p999")
                        }
                    )
        if per:
            summ["added_latency_ms"][f"{v}-direct"] = {
                "p50": med([x["p50"] for x in per]),
                "p99": med([x["p99"] for x in per]),
                "p999": med([x["p999"] for x in per]),
                "per_round_p99": [x["p99"] for x in per],
            }
    target_of = {s.name: s.target for s in scns}
    for name, t in targets.items():
        pids = t.pids()
        served = sum(
            (r.data.get("requests") or r.data.get("answered_all") or 0)
            for r in runs
            if target_of.get(r.scenario) == name
        )
        now = sum(status_kb(p, "VmRSS") for p in pids)
        summ["memory_kb"][name] = {
            "rss_after_start": t.rss_start_kb,
            "rss_now": now,
            "peak": sum(status_kb(p, "VmHWM") for p in pids),
            "processes": len(pids),
            "requests_measured": served,
            # Growth per 1000 requests: steady growth across rounds is a leak.
            "kb_per_1k_requests": round((now - t.rss_start_kb) / (served / 1000), 1)
            if served
            else None,
            "rss_after_each_run": [
                r.data.get("rss_after_kb") for r in runs if target_of.get(r.scenario) == name
            ],
        }
    return summ


def table(head: list[str], rows: list[list[str]]) -> list[str]:
    """Left-align the first column, right-align the others."""
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def line(r: list[str]) -> str:
        cells = [r[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)
        ]
        return "  ".join(cells).rstrip()

    return [line(head)] + [line(r) for r in rows]


def pair(a: float | None, b: float | None) -> str:
    return f"{fmt(a)}/{fmt(b)}"


def fmt_span(xs: list[float], spec: str) -> str:
    return f"{format(min(xs), spec)}..{format(max(xs), spec)}" if xs else "-"


Column = tuple[str, Callable[[str, dict[str, Any]], str]]


def section(out: list[str], title: list[str], columns: list[Column], items: dict[str, Any]) -> None:
    """One report table: a blank line, the title lines, a row per item (name, summary)."""
    if not items:
        return
    out += ["", *title]
    rows = [[cell(name, it) for _, cell in columns] for name, it in items.items()]
    out += table([head for head, _ in columns], rows)


def _name(name: str, _: dict[str, Any]) -> str:
    return name


def _num(key: str, spec: str) -> Callable[[str, dict[str, Any]], str]:
    return lambda _, t: fmt(t[key], spec)


def _pair(key: str) -> Callable[[str, dict[str, Any]], str]:
    return lambda _, t: pair(t[f"server_core_{key}_pct"], t[f"client_core_{key}_pct"])


def _runs(_: str, t: dict[str, Any]) -> str:
    return f"{t['flagged_runs']}/{t['noisy_runs']}"


def _span(key: str) -> Callable[[str, dict[str, Any]], str]:
    return lambda _, t: fmt_span([x for x in t[key] if x], ",.0f")


def _verdict(_: str, r: dict[str, Any]) -> str:
    if r["target"] is None:
        return ""
    return f">= {r['target']}: {'PASS' if r['pass'] else 'FAIL'}"


def print_report(
    summ: dict[str, Any], runs: list[Run], args: argparse.Namespace, skipped: dict[str, str]
) -> None:
    out: list[str] = []
    w = out.append
    secs = max(1, round(args.duration))
    section(
        out,
        [
            f"== throughput: wrk -t{args.threads} -c{args.connections} -d{secs}s, median of "
            f"{args.rounds} round(s); servers on cpu {args.server_cpu}, wrk on cpu "
            f"{args.client_cpu}"
        ],
        [
            ("scenario", _name),
            ("req/s", _num("rps_median", ",.0f")),
            ("min..max", _span("rps_all")),
            ("p50 ms", _num("p50_ms", ".2f")),
            ("p99 ms", _num("p99_ms", ".2f")),
            ("cpu us/req", _num("cpu_us_per_req", ".1f")),
            ("+runtime", _num("runtime_cpu_us_per_req", ".1f")),
            ("busy% s/c", _pair("busy")),
            ("other% s/c", _pair("other")),
            ("flag/noisy", _runs),
        ],
        summ["throughput"],
    )
    section(
        out,
        [
            "== ratios of median req/s (per-round: the same round's side-by-side pairs; cpu-based:",
            "   server+runtime cpu us/req of the denominator / of the numerator, less noise-prone)",
        ],
        [
            ("ratio", _name),
            ("req/s", _num("ratio", ".3f")),
            ("per-round", lambda _, r: fmt_span(r["per_round"], ".3f")),
            ("cpu-based", _num("cpu_ratio", ".3f")),
            ("target", _verdict),
        ],
        summ["ratios"],
    )
    section(
        out,
        [
            f"== latency at a fixed {args.rate:g} req/s (bench/loadgen.py, open loop, "
            f"{args.latency_duration:g} s), ms, median of rounds"
        ],
        [
            ("scenario", _name),
            ("p50", _num("p50_ms", ".3f")),
            ("p99", _num("p99_ms", ".3f")),
            ("p99.9", _num("p999_ms", ".3f")),
            ("sched p99", _num("sched_p99_ms", ".3f")),
            ("lag p99", _num("send_lag_p99_ms", ".3f")),
            ("rate", _num("rate", ",.0f")),
            ("other% s/c", _pair("other")),
            ("flag/noisy", _runs),
        ],
        summ["latency"],
    )
    section(
        out,
        ["== added latency, ms: median over rounds of (target - direct) in the same round"],
        [
            ("added", _name),
            ("p50", _num("p50", "+.3f")),
            ("p99", _num("p99", "+.3f")),
            ("p99.9", _num("p999", "+.3f")),
            ("p99 per round", lambda _, a: ", ".join(f"{x:+.3f}" for x in a["per_round_p99"])),
        ],
        summ["added_latency_ms"],
    )
    section(
        out,
        [
            "== memory, MiB: VmRSS after start, at the end, peak VmHWM (whole process group);",
            "   KiB/1k req: (end - start) per 1000 requests measured (warm-ups not counted)",
        ],
        [
            ("target", _name),
            ("start", lambda _, m: f"{m['rss_after_start'] / 1024:.1f}"),
            ("end", lambda _, m: f"{m['rss_now'] / 1024:.1f}"),
            ("peak", lambda _, m: f"{m['peak'] / 1024:.1f}"),
            ("processes", lambda _, m: str(m["processes"])),
            ("KiB/1k req", _num("kb_per_1k_requests", ".1f")),
        ],
        summ["memory_kb"],
    )
    for name, why in skipped.items():
        w(f"SKIPPED {name}: {why}")
    noisy = [r for r in runs if r.noise]
    if noisy:
        w("")
        w(f"== NOISY RUNS ({len(noisy)}): measured under interference (prefer cpu-based ratios)")
        for r in noisy:
            w(f"  round {r.round} {r.scenario}: " + "; ".join(r.noise))
    flagged = [r for r in runs if r.flags]
    w("")
    if flagged:
        w(f"== FLAGGED RUNS ({len(flagged)}): not as expected; their figures are suspect")
        for r in flagged:
            w(f"  round {r.round} {r.scenario}: " + "; ".join(r.flags))
    else:
        w("== all runs answered with the expected statuses; forwarding checks passed")
    print("\n".join(out), flush=True)
