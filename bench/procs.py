"""Processes the bench starts, and what they cost: one child process (Proc), the
/proc readings behind the CPU and RSS figures (process groups and their
descendants, CPU ticks, VmRSS/VmHWM, each core's busy and steal time), the
audit-log truncation between runs, and the signal that interrupts a run.
Used by bench/harness.py, bench/measure.py, bench/report.py and bench/soak.py.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")
# The sidecar's audit log is one JSON line per request: emptied between runs
# once past this size (the start-up lines were copied aside).
LOG_HEAD_BYTES = 64 * 1024


def log(msg: str = "") -> None:
    print(msg, file=sys.stderr, flush=True)


def pdeathsig() -> None:
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


def truncate_log(path: Path | None) -> None:
    """Empty a sidecar's log once it is past LOG_HEAD_BYTES: the cost of writing
    the audit log is measured, keeping it is not needed."""
    with contextlib.suppress(OSError):
        if path and path.stat().st_size > LOG_HEAD_BYTES:
            os.truncate(path, 0)


class Interrupted(Exception):
    pass


def on_signal(signum: int, frame: Any) -> None:
    raise Interrupted(signal.Signals(signum).name)


SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def catch_signals() -> None:
    """SIGINT, SIGTERM and SIGHUP raise :class:`Interrupted`, so a bench stops every
    child it started (SIGINT too: a shell starting us in the background may have set it
    to "ignore")."""
    for sig in SIGNALS:
        signal.signal(sig, on_signal)


def guarded(body: Callable[[], int], stop_all: Callable[[], None]) -> int:
    """``body()``'s exit code; 130 when interrupted, 1 on an error (logged). Whatever
    happens, ``stop_all()`` runs, with the signals ignored: a second Ctrl-C must not
    cut the cleanup short."""
    try:
        return body()
    except (KeyboardInterrupt, Interrupted) as e:
        log(f"\ninterrupted ({e or 'SIGINT'}): stopping everything")
        return 130
    except Exception as e:
        log(f"error: {e}")
        return 1
    finally:
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        stop_all()
