"""One measured run of a scenario: wrk (closed loop) or bench/loadgen.py (open
loop, fixed rate) on the client core against a target, with the CPU it cost,
how the cores were shared, the runtime's count of the calls forwarded, and
the flags (wrong answers) and noise (interference) found in it.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from typing import Any

import configs
from harness import BENCH, PY, Harness, Target, http_call
from procs import CLK_TCK, core_times, cpu_ticks, status_kb, truncate_log
from report import fmt
from scenarios import SIDECAR_TARGETS, Run, Scenario

LUA = BENCH / "wrk" / "post.lua"


def hint(statuses: dict[str, int]) -> str:
    if "429" in statuses:
        return (
            " (authLockout or a rate limit tripped: see bench/configs.py;"
            " a lockout also refuses the later runs)"
        )
    if "503" in statuses or "502" in statuses:
        return " (upstream trouble: is the runtime up? see the target's log with --keep-tmp)"
    return ""


class Bench:
    def __init__(
        self,
        args: argparse.Namespace,
        h: Harness,
        targets: dict[str, Target],
        runtime: Target,
        secret: str,
        bad: str,
    ) -> None:
        self.args, self.h, self.targets, self.runtime = args, h, targets, runtime
        self.secret, self.bad = secret, bad

    def runtime_stats(self) -> tuple[int, int]:
        """(POSTs received, POSTs carrying the refusal runs' marker)."""
        d = json.loads(http_call(self.runtime.port, "GET", "/__bench/stats")[1])
        return int(d["posts"]), int(d["marked"])

    def settled_stats(self) -> tuple[int, int]:
        """The runtime's counts once calls still in flight in a proxy have landed
        (unchanged for 0.3 s, 5 s at most), so that they count in their own run."""
        last, stable = self.runtime_stats(), 0
        for _ in range(50):
            time.sleep(0.1)
            now = self.runtime_stats()
            stable = stable + 1 if now == last else 0
            last = now
            if stable >= 3:
                break
        return last

    def measure(self, s: Scenario, rnd: int, duration: float) -> Run:
        t = self.targets[s.target]
        token = self.secret if s.good_token else self.bad
        srv_pids = t.pids()
        rt_pids = self.runtime.pids() if s.target != "direct" else []
        posts0, marked0 = self.runtime_stats()
        body = configs.BODY if s.forwards else configs.BODY_REFUSED
        cpu0, rt0, cores0, t0 = (
            cpu_ticks(srv_pids),
            cpu_ticks(rt_pids),
            core_times(),
            time.monotonic(),
        )
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN), resource.getrusage(resource.RUSAGE_SELF)
        if s.kind == "wrk":
            data, flags = self._wrk(t, token, body, s.expect, duration)
        else:
            data, flags = self._rate(t, token, body, s.expect.status, duration)
        wall = time.monotonic() - t0
        cpu1, rt1, cores1 = cpu_ticks(srv_pids), cpu_ticks(rt_pids), core_times()
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN), resource.getrusage(resource.RUSAGE_SELF)
        # CPU seconds our own processes spent on each core during the run;
        # the rest of the core's busy time is other load on this shared machine.
        ours = {
            "server": (cpu1 - cpu0 + rt1 - rt0) / CLK_TCK,
            "client": sum(
                b.ru_utime + b.ru_stime - a.ru_utime - a.ru_stime
                for a, b in zip(ru0, ru1, strict=True)
            ),
        }
        posts, marked = self.settled_stats()
        posts, marked = posts - posts0, marked - marked0
        run = Run(s.name, rnd, data, flags)
        if not t.proc.alive():
            flags.append(f"{t.name} died (status {t.proc.popen.returncode})")
        answered = data.get("requests") if s.kind == "wrk" else data.get("answered_all")
        answered = answered or 0
        ok = data.get("statuses", {}).get("200", 0)
        if s.kind == "rate":
            ok = data.get("completed", 0) - data.get("unexpected", 0) if s.forwards else 0
        data["forwarded"] = posts
        if s.forwards and not ok <= posts - marked <= answered + self.args.connections + 64:
            flags.append(f"runtime got {posts} calls for {ok} answered 200")
        if marked:
            flags.append(f"{marked} refused calls reached the runtime")
        if answered:
            srv_us = (cpu1 - cpu0) / CLK_TCK * 1e6 / answered
            rt_us = (rt1 - rt0) / CLK_TCK * 1e6 / answered
            data["cpu_us_per_req"] = round(srv_us, 2)
            data["runtime_cpu_us_per_req"] = round(rt_us, 2)
        server, client = self.args.server_cores, [self.args.client_cpu]
        for label, cpus in (("server", server), ("client", client)):
            if all(cpu in cores0 and cpu in cores1 for cpu in cpus):
                busy, total, steal = (
                    sum(cores1[cpu][i] - cores0[cpu][i] for cpu in cpus) for i in range(3)
                )
                data[f"{label}_core_busy_pct"] = round(100 * busy / total, 1) if total else None
                data[f"{label}_core_steal_pct"] = round(100 * steal / total, 1) if total else None
                other = busy / CLK_TCK - ours[label]
                data[f"{label}_core_other_pct"] = (
                    max(0.0, round(100 * other * CLK_TCK / total, 1)) if total else None
                )
        data["rss_after_kb"] = sum(status_kb(p, "VmRSS") for p in srv_pids)
        data["wall_s"] = round(wall, 2)
        stotal = sum(
            cores1.get(cpu, (0, 0, 0))[1] - cores0.get(cpu, (0, 0, 0))[1] for cpu in server
        )
        if stotal:
            data["server_core_ours_pct"] = round(100 * ours["server"] * CLK_TCK / stotal, 1)
        if s.kind == "wrk" and data.get("server_core_ours_pct", 100) < 80:
            got = data["server_core_ours_pct"]
            if (data.get("client_core_busy_pct") or 0) >= 95 and (
                data.get("client_core_other_pct") or 0
            ) < 20:
                run.noise.append(f"client-bound: wrk saturated its core, the server used {got}%")
            else:
                run.noise.append(
                    f"the server got {got}% of its core (others "
                    f"{fmt(data.get('server_core_other_pct'))}%, client core others "
                    f"{fmt(data.get('client_core_other_pct'))}%): req/s understated"
                )
        if s.kind == "rate":
            run.noise += data.pop("_noise", [])
        self._truncate_logs()
        return run

    def _wrk(
        self, t: Target, token: str, body: str, expect: configs.Expect, duration: float
    ) -> tuple[dict[str, Any], list[str]]:
        a = self.args
        secs = max(1, round(duration))
        argv = [
            a.wrk,
            "-t",
            str(a.threads),
            "-c",
            str(a.connections),
            "-d",
            f"{secs}s",
            "--timeout",
            "5s",
            "--latency",
            "-s",
            str(LUA),
            f"http://127.0.0.1:{t.port}{configs.PATH}",
            "--",
            token,
            str(expect.status),
            body,
            *([expect.code] if expect.code else []),
        ]
        p, out = self.h.run_client("wrk", argv, a.client_cpu, timeout=secs + 30)
        flags: list[str] = []
        line = next(
            (
                ln
                for ln in out.decode("utf-8", "replace").splitlines()
                if ln.startswith("BENCH_RESULT ")
            ),
            None,
        )
        if line is None:
            return {"error": "no BENCH_RESULT from wrk"}, [
                f"wrk failed (exit {p.popen.returncode}): {p.log_tail(500)}"
            ]
        d = json.loads(line[len("BENCH_RESULT ") :])
        d["rps"] = round(d["requests"] / (d["duration_us"] / 1e6), 1) if d["duration_us"] else 0.0
        if d["unexpected"]:
            flags.append(
                f"{d['unexpected']} responses not {expect.status}: {d['statuses']}"
                + hint(d["statuses"])
            )
        if d.get("wrong_code"):
            flags.append(f"{d['wrong_code']} {expect.status} responses without {expect.code!r}")
        errs = {k: v for k, v in d["errors"].items() if v and k != "status"}
        if errs:
            flags.append(f"socket errors {errs}")
        if d["counted"] != d["requests"]:
            flags.append(f"wrk counted {d['requests']} requests but {d['counted']} statuses")
        if not d["requests"]:
            flags.append("no request completed")
        return d, flags

    def _rate(
        self, t: Target, token: str, body: str, expect: int, duration: float
    ) -> tuple[dict[str, Any], list[str]]:
        a = self.args
        argv = [
            PY,
            str(BENCH / "loadgen.py"),
            "--port",
            str(t.port),
            "--path",
            configs.PATH,
            "--token",
            token,
            "--body",
            body,
            "--expect",
            str(expect),
            "--rate",
            str(a.rate),
            "--duration",
            str(duration),
            "--warmup",
            "1",
        ]
        p, out = self.h.run_client("loadgen", argv, a.client_cpu, timeout=duration + 40)
        try:
            d = json.loads(out.decode())
        except ValueError:
            return {"error": "no result from loadgen"}, [
                f"loadgen failed (exit {p.popen.returncode}): {p.log_tail(500)}"
            ]
        flags: list[str] = []
        noise: list[str] = []
        d["_noise"] = noise
        if "error" in d:
            return d, [f"loadgen: {d['error']}"]
        if d["unexpected"]:
            flags.append(
                f"{d['unexpected']} responses not {expect}: {d['statuses']}" + hint(d["statuses"])
            )
        if d["errors"]:
            flags.append(f"errors {d['errors']}")
        if d["rate_achieved"] < 0.97 * a.rate:
            noise.append(f"rate achieved {d['rate_achieved']}/s < target {a.rate}/s")
        lag = d.get("send_lag_ms", {}).get("p99", 0)
        if lag > 1.0:
            noise.append(f"generator send lag p99 {lag:.2f} ms (its core was taken)")
        return d, flags

    def _truncate_logs(self) -> None:
        # The sidecar's audit log is one JSON line per request (the cost of
        # writing it is measured; keeping it is not needed): start_sidecar
        # copied the startup lines aside, the rest is emptied between runs.
        for name in SIDECAR_TARGETS:
            t = self.targets.get(name)
            if t:
                truncate_log(t.proc.log_path)
