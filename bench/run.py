#!/usr/bin/env python3
"""webhook-sidecar benchmark harness.

Starts the fast runtime (bench/runtime.py), nginx, the aiohttp 401 floor
(bench/floor401.py) and the sidecar variants (bench/configs.py), all pinned
to the server core, then runs the scenarios in alternation for N rounds with
wrk (closed loop, 32 connections) and bench/loadgen.py (open loop, fixed
rate), both pinned to the client core, and prints medians, side-by-side
ratios, latency, CPU per request and peak RSS. See bench/README.md.

    python bench/run.py                      # 3 rounds x 10 s per scenario
    python bench/run.py --quick              # smoke test
    python bench/run.py --only direct,nginx,floor401 --json out.json
    python bench/run.py --sidecar-src /path/to/checkout

Exit status: 0 all runs clean, 3 some run was flagged (unexpected statuses,
socket errors, calls not forwarded, generator lag), 1 harness failure,
130 interrupted. Every process it started is stopped on the way out.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import http.client
import json
import os
import platform
import resource
import secrets
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

import configs  # noqa: E402

PY = sys.executable
LUA = BENCH / "wrk" / "post.lua"
CLK_TCK = os.sysconf("SC_CLK_TCK")
SIDECAR_TARGETS = tuple(configs.SIDECAR_VARIANTS)
LOG_HEAD_BYTES = 64 * 1024


def log(msg: str = "") -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# processes


def _pdeathsig() -> None:
    # If the harness dies without cleaning up (SIGKILL), its children get
    # SIGTERM from the kernel. Survives exec (taskset -> the real program).
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path | None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, n: int = 4000) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - n))
            return f.read().decode("utf-8", "replace")


def proc_stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
    except OSError:
        return None
    return s[s.rfind(")") + 2 :].split()  # [0]=state [1]=ppid [2]=pgrp ... [11]=utime [12]=stime


def group_pids(pgid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = proc_stat(int(d))
            if st and int(st[2]) == pgid:
                out.append(int(d))
    return out


def family_pids(pgid: int) -> list[int]:
    """The process group and every descendant of it: sidecar workers (sidecar.workers)
    run in a session of their own, so that a signal to the group reaches them once."""
    stats = {int(d): proc_stat(int(d)) for d in os.listdir("/proc") if d.isdigit()}
    found = {pid for pid, st in stats.items() if st and int(st[2]) == pgid}
    while True:
        more = {pid for pid, st in stats.items() if st and int(st[1]) in found} - found
        if not more:
            return sorted(found)
        found |= more


def cpu_ticks(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        st = proc_stat(pid)
        if st:
            total += int(st[11]) + int(st[12])
    return total


def status_kb(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def core_times() -> dict[int, tuple[int, int, int]]:
    """cpu N -> (busy, total, steal) jiffies."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                parts = line.split()
                vals = [int(x) for x in parts[1:]]
                idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
                steal = vals[7] if len(vals) > 7 else 0
                total = sum(vals[:8])
                out[int(parts[0][3:])] = (total - idle, total, steal)
    return out


class Harness:
    """Owns the temp dir and every child; stop_all() leaves nothing behind."""

    def __init__(self, keep_tmp: bool, nice: int = 0) -> None:
        # Short path: Unix socket paths are limited to 108 bytes.
        self.tmp = Path(tempfile.mkdtemp(prefix="wsb-", dir="/tmp"))
        self.keep_tmp = keep_tmp
        self.nice = nice
        self.procs: list[Proc] = []

    def spawn(
        self,
        name: str,
        argv: list[str],
        *,
        cpu: int | str | None,
        env: dict[str, str] | None = None,
        log_name: str | None = None,
        stdout_pipe: bool = False,
    ) -> Proc:
        if cpu is not None:
            argv = ["taskset", "-c", str(cpu), *argv]
            if self.nice:
                argv = ["nice", "-n", str(self.nice), *argv]
        log_path = self.tmp / (log_name or f"{name}.log")
        with open(log_path, "ab") as logf:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if stdout_pipe else logf,
                stderr=logf,
                cwd=self.tmp,  # not the repo: `python -m sidecar` must not pick up ./sidecar
                env={**os.environ, **(env or {})},
                start_new_session=True,  # own process group: stopped as a whole
                preexec_fn=_pdeathsig,
            )
        p = Proc(name, popen, log_path)
        self.procs.append(p)
        return p

    def run_client(
        self, name: str, argv: list[str], cpu: int, timeout: float
    ) -> tuple[Proc, bytes]:
        """Run a load generator to its end; its stdout (empty if it overran ``timeout``)."""
        p = self.spawn(name, argv, cpu=cpu, stdout_pipe=True, log_name=f"{name}.log")
        try:
            out, _ = p.popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            out = b""
        finally:
            self.stop(p)
        return p, out

    def stop(self, p: Proc, timeout: float = 5.0) -> None:
        pgid = p.pid
        members = group_pids(pgid)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)
        try:
            p.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.popen.wait(2)
        # Children that outlived their leader (e.g. an nginx worker).
        deadline = time.monotonic() + timeout
        for pid in members:
            if pid == pgid:
                continue
            while proc_stat(pid) is not None and time.monotonic() < deadline:
                time.sleep(0.05)
            st = proc_stat(pid)
            if st is not None and int(st[2]) == pgid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if p.popen.stdout:
            p.popen.stdout.close()
        if p in self.procs:
            self.procs.remove(p)

    def stop_all(self) -> None:
        for p in reversed(list(self.procs)):
            try:
                self.stop(p)
            except Exception as e:  # keep going: stop the others
                log(f"warning: stopping {p.name} (pid {p.pid}): {e}")
        if self.keep_tmp:
            log(f"temp dir kept: {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


# --------------------------------------------------------------------------
# network helpers


def free_port(taken: set[int]) -> int:
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in taken:
            taken.add(port)
            return port


def wait_ready(p: Proc, check: Any, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not p.alive():
            raise RuntimeError(
                f"{p.name} exited (status {p.popen.returncode}) before {what}:\n{p.log_tail()}"
            )
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{p.name}: no {what} after {timeout:.0f}s:\n{p.log_tail()}")


def tcp_open(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True


def unix_open(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        s.connect(str(path))
        return True


def http_call(
    port: int,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: str | None = None,
    max_bytes: int | None = 2000,
) -> tuple[int, str]:
    """One call on a new connection: (status, the first ``max_bytes`` of the body;
    None: all of it)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.read(max_bytes).decode("utf-8", "replace")
    finally:
        conn.close()


# --------------------------------------------------------------------------
# targets


@dataclass
class Target:
    name: str
    port: int
    proc: Proc
    note: str = ""
    rss_start_kb: int = 0
    log_head: str = ""
    admin_port: int = 0

    def pids(self) -> list[int]:
        return family_pids(self.proc.pid)


def resolve_sidecar(
    args: argparse.Namespace, tmp: Path
) -> tuple[list[str] | None, dict[str, str], str]:
    """How to start the sidecar: (argv prefix, extra env, description or reason)."""
    if args.sidecar_cmd:
        return shlex.split(args.sidecar_cmd), {}, f"--sidecar-cmd {args.sidecar_cmd}"
    probe = (
        "import importlib.util as u, sys, sidecar; "
        "sys.exit(0 if u.find_spec('sidecar.__main__') else 3)"
    )
    reasons = []
    srcs = [Path(args.sidecar_src).resolve()] if args.sidecar_src else [REPO]
    for src in srcs:
        pkg = src / "sidecar"
        if not (pkg / "__main__.py").exists():
            reasons.append(f"{pkg}: no __main__.py (not written yet?)")
            continue
        env = {
            "PYTHONPATH": os.pathsep.join(filter(None, [str(src), os.environ.get("PYTHONPATH")]))
        }
        r = subprocess.run(
            [PY, "-c", probe], cwd=tmp, env={**os.environ, **env}, capture_output=True, text=True
        )
        if r.returncode == 0:
            return [PY, "-m", "sidecar"], env, f"{PY} -m sidecar  (PYTHONPATH={src})"
        reasons.append(
            f"{pkg}: import failed: {r.stderr.strip().splitlines()[-1:] or r.returncode}"
        )
    if not args.sidecar_src:
        script = Path(PY).parent / "webhook-sidecar"
        found = str(script) if script.exists() else shutil.which("webhook-sidecar")
        if found:
            return [found], {}, found
        reasons.append("no webhook-sidecar console script next to the interpreter or on PATH")
        r = subprocess.run([PY, "-c", probe], cwd=tmp, capture_output=True, text=True)
        if r.returncode == 0:
            return [PY, "-m", "sidecar"], {}, f"{PY} -m sidecar (installed)"
        reasons.append(f"`import sidecar` fails in {PY}")
    return None, {}, "; ".join(reasons)


def start_runtime(
    h: Harness, args: argparse.Namespace, ports: set[int], work_us: float = 0.0
) -> Target:
    """The bench runtime on the server core; ``work_us`` of CPU burnt per call."""
    sock = h.tmp / "rt.sock"
    port = free_port(ports)
    p = h.spawn(
        "runtime",
        [
            PY,
            str(BENCH / "runtime.py"),
            "--socket",
            str(sock),
            "--port",
            str(port),
            "--count-marker",
            configs.REFUSED_MARK,
            "--work-us",
            str(work_us),
        ],
        cpu=args.server_cpu,
    )
    wait_ready(p, lambda: unix_open(sock) and tcp_open(port), "listening socket", 15)
    work = f", {work_us:g} us of work per call" if work_us else ""
    note = f"bench/runtime.py, unix {sock} + tcp {port}{work}"
    return Target("direct", port, p, note=note)


def start_floor(h: Harness, args: argparse.Namespace, ports: set[int]) -> Target:
    port = free_port(ports)
    p = h.spawn(
        "floor401", [PY, str(BENCH / "floor401.py"), "--port", str(port)], cpu=args.server_cpu
    )
    wait_ready(p, lambda: tcp_open(port), "listening port", 15)
    return Target("floor401", port, p, note="bench/floor401.py")


def start_nginx(h: Harness, args: argparse.Namespace, ports: set[int], secret: str) -> Target:
    port = free_port(ports)
    for d in ("ngx-body", "ngx-proxy", "ngx-fastcgi", "ngx-uwsgi", "ngx-scgi"):
        (h.tmp / d).mkdir(exist_ok=True)
    conf = h.tmp / "nginx.conf"
    conf.write_text(
        configs.nginx_conf(
            tmp=str(h.tmp),
            port=port,
            upstream_socket=str(h.tmp / "rt.sock"),
            secret=secret,
            cpu=args.server_cores[0],
            run_as_root=configs.is_root(),
        )
    )
    base = [args.nginx, "-p", str(h.tmp), "-c", str(conf), "-e", str(h.tmp / "nginx-error.log")]
    t = subprocess.run([*base, "-t", "-q"], capture_output=True, text=True, cwd=h.tmp)
    if t.returncode != 0:
        raise RuntimeError(f"nginx -t failed:\n{t.stderr}")
    p = h.spawn("nginx", base, cpu=args.server_cpu)
    wait_ready(p, lambda: tcp_open(port), "listening port", 15)
    return Target("nginx", port, p, note=f"{args.nginx}, config {conf}")


def start_redis(h: Harness, args: argparse.Namespace, ports: set[int]) -> str:
    """A private redis-server on the server core, for the Redis limiter variant."""
    port = free_port(ports)
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    argv += ["--appendonly", "no", "--dir", str(h.tmp)]
    p = h.spawn("redis", argv, cpu=args.server_cpu)
    wait_ready(p, lambda: tcp_open(port), "redis port", 15)
    return f"redis://127.0.0.1:{port}/0"


def start_sidecar(
    h: Harness,
    args: argparse.Namespace,
    ports: set[int],
    variant: str,
    cmd: list[str],
    env: dict[str, str],
    make_config: Callable[..., dict[str, Any]],
) -> Target:
    """A sidecar named ``variant`` whose config is ``make_config(listen=,
    admin_listen=, upstream_socket=)``, up and ready (or said why not)."""
    port, admin = free_port(ports), free_port(ports)
    cfg = make_config(
        listen=f"127.0.0.1:{port}",
        admin_listen=f"127.0.0.1:{admin}",
        upstream_socket=str(h.tmp / "rt.sock"),
    )
    path = h.tmp / f"{variant}.json5"
    path.write_text(json.dumps(cfg, indent=2) + "\n")
    path.chmod(0o600)
    chk = subprocess.run(
        [*cmd, "check-config", "-c", str(path)],
        cwd=h.tmp,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    if chk.returncode != 0:
        out = (chk.stdout + chk.stderr).strip()
        log(
            f"  {variant}: check-config exited {chk.returncode}; trying to run it anyway:\n"
            + "\n".join("    " + line for line in out.splitlines()[-20:])
        )
    p = h.spawn(variant, [*cmd, "run", "-c", str(path)], cpu=args.server_cpu, env=env)
    wait_ready(p, lambda: tcp_open(port), "listening port", 30)

    def ready() -> bool:
        return http_call(admin, "GET", "/readyz")[0] == 200

    try:
        wait_ready(p, ready, "200 from admin /readyz", 15)
    except RuntimeError as e:
        if not p.alive():
            raise
        log(f"  warning: {variant}: {str(e).splitlines()[0]} (measuring anyway)")
    if p.log_path:
        shutil.copyfile(p.log_path, h.tmp / f"{variant}.startup.log")
    return Target(
        variant,
        port,
        p,
        note=f"{shlex.join(cmd)} run -c {path}; admin 127.0.0.1:{admin}",
        admin_port=admin,
    )


def post(port: int, token: str, forwards: bool) -> tuple[int, str]:
    """One call like the benchmark's: BODY, or BODY_REFUSED for a call that must be refused."""
    return http_call(
        port,
        "POST",
        configs.PATH,
        {"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
        configs.BODY if forwards else configs.BODY_REFUSED,
    )


def error_code(body: str) -> str | None:
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    return doc.get("error") if isinstance(doc, dict) else None


def prepare(t: Target, v: configs.Variant, bad: str) -> None:
    """Put a sidecar in the state its scenarios measure (sidecar-locked: its lockout
    tripped for 127.0.0.1), before the preflight and the warm-up."""
    for i in range(v.prepare_bad_calls):
        st, body = post(t.port, bad, forwards=False)
        if st != 401:
            raise RuntimeError(f"preparing: bad token {i + 1} got {st}, not 401: {body[:200]}")


# --------------------------------------------------------------------------
# scenarios


@dataclass
class Scenario:
    name: str
    target: str
    kind: str  # "wrk" | "rate"
    good_token: bool
    expect: configs.Expect = configs.OK
    # The ratios it enters as the numerator: (denominator scenario, goal or None).
    vs: tuple[tuple[str, float | None], ...] = ()

    @property
    def forwards(self) -> bool:
        """Its calls must reach the runtime (and carry BODY); the others must not
        (and carry BODY_REFUSED, which the runtime counts)."""
        return self.expect.status == 200


# Ratios between targets that are not sidecar variants (those are in configs.py).
# floor401-refuse/nginx is the ceiling of any aiohttp server on this core: a bare
# handler answering 401 to a request it does not read, against nginx's whole valid
# call (proxying to the runtime included). Below 0.75, no aiohttp-based proxy can
# reach issue 8's sidecar/nginx goal, whatever its guards cost.
BASE_RATIOS = (
    ("nginx", "direct", None),
    ("nginx-refuse", "floor401-refuse", None),
    ("floor401-refuse", "nginx", None),
)


def all_scenarios() -> tuple[list[Scenario], list[Scenario]]:
    unauthorized = configs.UNAUTHORIZED_401
    thr = [
        Scenario("direct", "direct", "wrk", True),
        Scenario("floor401-refuse", "floor401", "wrk", False, unauthorized),
        Scenario("nginx", "nginx", "wrk", True),
        Scenario("nginx-refuse", "nginx", "wrk", False, unauthorized),
    ]
    lat = [Scenario("lat-direct", "direct", "rate", True)]
    for name, v in configs.SIDECAR_VARIANTS.items():
        for ld in v.loads:
            good = ld.token == "good"
            thr.append(Scenario(name + ld.suffix, name, "wrk", good, ld.expect, ld.vs))
    # nginx's latency right after the default sidecar's, as before.
    lat_names = [n for n, v in configs.SIDECAR_VARIANTS.items() if v.latency]
    lat += [Scenario(f"lat-{n}", n, "rate", True) for n in lat_names[:1]]
    lat.append(Scenario("lat-nginx", "nginx", "rate", True))
    lat += [Scenario(f"lat-{n}", n, "rate", True) for n in lat_names[1:]]
    return thr, lat


def select(scns: list[Scenario], only: list[str] | None, skip: list[str]) -> list[Scenario]:
    out = []
    for s in scns:
        keys = {s.name, s.target, "latency" if s.kind == "rate" else "throughput"}
        if only and not keys & set(only):
            continue
        if keys & set(skip):
            continue
        out.append(s)
    return out


@dataclass
class Run:
    scenario: str
    round: int
    data: dict[str, Any] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)  # wrong answers: the figures are suspect
    noise: list[str] = field(default_factory=list)  # measured under interference


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
            if t and t.proc.log_path and t.proc.log_path.exists():
                with contextlib.suppress(OSError):
                    if t.proc.log_path.stat().st_size > LOG_HEAD_BYTES:
                        os.truncate(t.proc.log_path, 0)


# --------------------------------------------------------------------------
# reporting


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


# --------------------------------------------------------------------------
# main


def versions(args: argparse.Namespace) -> dict[str, str]:
    v = {"python": sys.version.split()[0], "platform": platform.platform()}
    for mod in ("aiohttp", "uvloop", "httptools"):
        try:
            v[mod] = __import__(mod).__version__
        except Exception:
            v[mod] = "not importable"
    with contextlib.suppress(Exception):
        v["nginx"] = subprocess.run(
            [args.nginx, "-v"], capture_output=True, text=True
        ).stderr.strip()
    with contextlib.suppress(Exception):
        v["wrk"] = subprocess.run(
            [args.wrk, "-v"], capture_output=True, text=True
        ).stdout.splitlines()[0]
    return v


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--duration", type=float, default=10, help="seconds per throughput run (default 10)"
    )
    ap.add_argument(
        "--latency-duration", type=float, help="seconds per fixed-rate run (default: --duration)"
    )
    ap.add_argument("--rounds", type=int, default=3, help="rounds of alternation (default 3)")
    ap.add_argument(
        "--quick", action="store_true", help="smoke test: 3 s per scenario, 1 round, 1 s warm-up"
    )
    ap.add_argument(
        "--only", help="comma list of scenario or target names, or 'throughput'/'latency'"
    )
    ap.add_argument("--skip", default="", help="comma list, same names as --only")
    ap.add_argument("--json", metavar="FILE", help="write every run and the summary as JSON")
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument(
        "--threads", type=int, default=1, help="wrk threads (default 1: wrk has one core)"
    )
    ap.add_argument(
        "--rate", type=float, default=500, help="fixed rate for the latency runs (req/s)"
    )
    ap.add_argument(
        "--warmup", type=float, default=2, help="seconds of unrecorded load per target first"
    )
    ap.add_argument(
        "--runtime-work-us",
        type=float,
        default=0,
        help="CPU the runtime burns per call (default 0: as fast as it goes). The issue's "
        "reference runtime answered ~14,400 req/s directly: --runtime-work-us 60 gave 12,800 here",
    )
    ap.add_argument(
        "--server-cpu",
        default="0",
        help="core for the servers (default 0), or a taskset list such as 0,1 to measure "
        "sidecar-workers2 on both cores (the client core is then shared with wrk)",
    )
    ap.add_argument("--client-cpu", type=int, default=1)
    ap.add_argument(
        "--sidecar-src", help="checkout whose ./sidecar package to run (default: this repo)"
    )
    ap.add_argument("--sidecar-cmd", help='command to start the sidecar, e.g. "webhook-sidecar"')
    ap.add_argument("--nginx", default=shutil.which("nginx") or "/usr/sbin/nginx")
    ap.add_argument("--wrk", default=shutil.which("wrk") or "/usr/bin/wrk")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    ap.add_argument(
        "--nice",
        type=int,
        default=0,
        help="run servers and load generators at this niceness (e.g. -10, as root): steadier "
        "figures on a busy machine, at the expense of everything else running there",
    )
    args = ap.parse_args()
    if args.quick:
        args.duration, args.rounds, args.warmup = 3, 1, 1
    if args.latency_duration is None:
        args.latency_duration = args.duration
    args.only = [x.strip() for x in args.only.split(",") if x.strip()] if args.only else None
    try:
        args.server_cores = [int(c) for c in args.server_cpu.split(",")]
    except ValueError:
        ap.error(f"--server-cpu: not a core or a comma list of cores: {args.server_cpu!r}")
    args.skip = [x.strip() for x in args.skip.split(",") if x.strip()]
    return args


class Interrupted(Exception):
    pass


def _on_signal(signum: int, frame: Any) -> None:
    raise Interrupted(signal.Signals(signum).name)


def main() -> int:
    args = parse_args()
    ncpu = os.cpu_count() or 1
    if args.client_cpu in args.server_cores or max(*args.server_cores, args.client_cpu) >= ncpu:
        log(f"warning: server cpu {args.server_cpu}, client cpu {args.client_cpu}, {ncpu} cpus")
    for tool in (args.wrk, "taskset"):
        if not shutil.which(tool):
            log(f"error: {tool} not found")
            return 1
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, {args.client_cpu})  # keep the harness itself off the server core

    thr, lat = all_scenarios()
    scns = select(thr + lat, args.only, args.skip)
    needed = {s.target for s in scns}
    if not scns:
        log("error: --only/--skip left no scenario")
        return 1

    # SIGINT too: a shell starting us in the background may have set it to "ignore".
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    h = Harness(args.keep_tmp, args.nice)
    secret = secrets.token_hex(32)
    bad = secrets.token_hex(32)
    ports: set[int] = set()
    targets: dict[str, Target] = {}
    skipped: dict[str, str] = {}
    runs: list[Run] = []
    rc = 0
    try:
        log(f"temp dir {h.tmp}")
        runtime = start_runtime(h, args, ports, args.runtime_work_us)
        targets["direct"] = runtime
        if "nginx" in needed:
            targets["nginx"] = start_nginx(h, args, ports, secret)
        if "floor401" in needed:
            targets["floor401"] = start_floor(h, args, ports)
        wanted_sc = [v for v in SIDECAR_TARGETS if v in needed]
        if wanted_sc:
            cmd, env, how = resolve_sidecar(args, h.tmp)
            if cmd is None:
                for v in wanted_sc:
                    skipped[v] = (
                        f"no runnable sidecar ({how}). Point the harness at one with "
                        "--sidecar-src CHECKOUT or --sidecar-cmd CMD."
                    )
            else:
                log(f"sidecar: {how}")
                redis_url = None
                if configs.NEEDS_REDIS & set(wanted_sc):
                    redis_url = start_redis(h, args, ports)
                for v in wanted_sc:
                    make = functools.partial(
                        configs.sidecar_config, secret=secret, variant=v, redis_url=redis_url
                    )
                    try:
                        targets[v] = start_sidecar(h, args, ports, v, cmd, env, make)
                        prepare(targets[v], configs.SIDECAR_VARIANTS[v], bad)
                    except Exception as e:
                        skipped[v] = f"did not start: {e}"
        for name, why in skipped.items():
            log(f"SKIPPING {name}: {why}")
        scns = [s for s in scns if s.target in targets]
        if not scns:
            log("error: nothing left to measure")
            return 1
        for t in targets.values():
            t.rss_start_kb = sum(status_kb(p, "VmRSS") for p in t.pids())
            log(f"  {t.name:16} 127.0.0.1:{t.port}  pid {t.proc.pid}  {t.note}")

        # Preflight: one call per scenario, so a misconfiguration shows up before
        # minutes of load.
        for sc in [x for x in thr if x.target in targets]:
            st, body = post(targets[sc.target].port, secret if sc.good_token else bad, sc.forwards)
            got = (st, error_code(body) if sc.expect.code else None)
            want = (sc.expect.status, sc.expect.code)
            mark = "ok" if got == want else f"UNEXPECTED (want {want[0]} {want[1] or ''})"
            kind = "good" if sc.good_token else "bad "
            log(f"  preflight {sc.name:22} {kind} token -> {st} {mark}  {body[:100]}")

        bench = Bench(args, h, targets, runtime, secret, bad)
        if args.warmup > 0:
            log(f"warm-up: {args.warmup:g} s per target")
            for s in [x for x in scns if x.kind == "wrk"]:
                bench.measure(s, 0, args.warmup)

        thr_s = [s for s in scns if s.kind == "wrk"]
        lat_s = [s for s in scns if s.kind == "rate"]
        for rnd in range(1, args.rounds + 1):
            # Rotate the order each round so no scenario always follows the same one.
            order = (
                thr_s[(rnd - 1) % len(thr_s) :] + thr_s[: (rnd - 1) % len(thr_s)] if thr_s else []
            )
            order += (
                lat_s[(rnd - 1) % len(lat_s) :] + lat_s[: (rnd - 1) % len(lat_s)] if lat_s else []
            )
            for s in order:
                dur = args.duration if s.kind == "wrk" else args.latency_duration
                r = bench.measure(s, rnd, dur)
                runs.append(r)
                d = r.data
                if s.kind == "wrk":
                    lu = d.get("latency_us", {})
                    desc = (
                        f"{fmt(d.get('rps')):>9} req/s  p50 {fmt(lu.get('p50'), ',')}us"
                        f"  p99 {fmt(lu.get('p99'), ',')}us  statuses {d.get('statuses')}"
                        f"  cpu {fmt(d.get('cpu_us_per_req'), '.1f')}us/req"
                    )
                else:
                    lm = d.get("latency_ms", {})
                    desc = (
                        f"p50 {fmt(lm.get('p50'), '.3f')} ms  p99 {fmt(lm.get('p99'), '.3f')} ms  "
                        f"at {fmt(d.get('rate_achieved'))}/s  statuses {d.get('statuses')}"
                    )
                other = pair(d.get("server_core_other_pct"), d.get("client_core_other_pct"))
                log(
                    f"round {rnd}/{args.rounds} {s.name:24} {desc}  other% s/c {other}"
                    + (f"  FLAGGED: {'; '.join(r.flags)}" if r.flags else "")
                    + (f"  noisy: {'; '.join(r.noise)}" if r.noise else "")
                )

        summ = summarize(runs, scns, targets)
        print_report(summ, runs, args, skipped)
        if any(r.flags for r in runs):
            rc = 3
        if args.json:
            doc = {
                "args": {k: v for k, v in vars(args).items()},
                "versions": versions(args),
                "targets": {n: {"port": t.port, "note": t.note} for n, t in targets.items()},
                "skipped": skipped,
                "runs": [
                    {
                        "scenario": r.scenario,
                        "round": r.round,
                        "flags": r.flags,
                        "noise": r.noise,
                        **r.data,
                    }
                    for r in runs
                ],
                "summary": summ,
            }
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
            log(f"wrote {args.json}")
    except (KeyboardInterrupt, Interrupted) as e:
        log(f"\ninterrupted ({e or 'SIGINT'}): stopping everything")
        rc = 130
    except Exception as e:
        log(f"error: {e}")
        rc = 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
        h.stop_all()
    return rc


if __name__ == "__main__":
    sys.exit(main())
