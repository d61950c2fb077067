"""The targets' start-up: the Harness (the temp dir and every child, stopped as a
whole), the network helpers that wait for and call them, and each target
started on the server core, ready, in the order run.py starts them: the
runtime (bench/runtime.py), nginx, the aiohttp 401 floor, a private
redis-server, the sidecar variants (how to run the sidecar is found by
resolve_sidecar). prepare() puts a variant in the state its scenarios measure.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import configs
from procs import Proc, family_pids, group_pids, log, pdeathsig, proc_stat

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
PY = sys.executable


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
                preexec_fn=pdeathsig,
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
