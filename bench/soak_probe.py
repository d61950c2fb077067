"""Run the sidecar with a thread that reports the size of its state tables.

    python bench/soak_probe.py OUT EVERY -- run -c CONFIG

is ``python -m sidecar run -c CONFIG`` (the same process: the module runs as
``__main__``), plus a daemon thread that every EVERY seconds appends one JSON
line to OUT:

- the number of lockout records and locks and of memory-limiter buckets (the
  instances are found with ``gc.get_objects()``), and of audit lines queued
  for stderr (up to 100 000 may wait);
- ``objects``: how many objects the garbage collector tracks, ``blocks``: the
  allocated blocks of CPython's small-object allocator (both grow when Python
  objects accumulate);
- glibc's ``mallinfo2()``: ``heap_used_mb`` (bytes malloc handed out, mmapped
  blocks included), ``heap_free_mb`` (free but still held by the process: RSS
  that is fragmentation, not data);
- with tracemalloc running (``PYTHONTRACEMALLOC=1`` in the environment) the
  traced memory, and in OUT + ".top" the 25 allocation sites that grew most
  since the first probe.

bench/soak.py reads OUT: it tells whether the tables stay at their caps while
RSS is sampled, and where the memory went if RSS grows.
"""

from __future__ import annotations

import ctypes
import gc
import json
import runpy
import sys
import threading
import time
import tracemalloc
from typing import Any

from sidecar.guards.lockout import LockoutTable
from sidecar.limiter.memory import MemoryLimiter
from sidecar.logs import LineWriter


def tables() -> dict[str, int]:
    """Sizes of every lockout table, memory limiter and log queue in this process."""
    out = {"lockout_records": 0, "lockout_locks": 0, "limiter_buckets": 0, "log_queue": 0}
    objects = gc.get_objects()
    for obj in objects:
        if isinstance(obj, LockoutTable):
            out["lockout_locks"] += len(obj.locks)
            out["lockout_records"] += len(obj) - len(obj.locks)
        elif isinstance(obj, MemoryLimiter):
            out["limiter_buckets"] += len(obj)
        elif isinstance(obj, LineWriter):
            out["log_queue"] += obj._queue.qsize()
    out["objects"] = len(objects)
    out["blocks"] = sys.getallocatedblocks()
    return out


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd",
            "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
        )
    ]  # fmt: skip


def malloc_stats() -> dict[str, float]:
    """glibc's view: bytes in use (heap and mmapped) and free bytes it keeps; {} elsewhere."""
    try:
        fn = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):  # not glibc, or glibc < 2.33
        return {}
    fn.restype = _Mallinfo2
    m = fn()
    return {
        "heap_used_mb": round((m.uordblks + m.hblkhd) / 1e6, 2),
        "heap_free_mb": round(m.fordblks / 1e6, 2),
    }


def probe(out: str, every: float) -> None:
    first: tracemalloc.Snapshot | None = None
    start = time.monotonic()
    while True:
        time.sleep(every)
        rec: dict[str, Any] = {"t": round(time.monotonic() - start, 1), **tables()}
        rec.update(malloc_stats())
        if tracemalloc.is_tracing():
            rec["traced_mb"] = round(tracemalloc.get_traced_memory()[0] / 1e6, 2)
            snap = tracemalloc.take_snapshot()
            if first is None:
                first = snap
            else:
                top = snap.compare_to(first, "lineno")[:25]
                with open(out + ".top", "w") as f:
                    f.write(f"t={rec['t']}s: growth since t={every:g}s, by line\n")
                    f.writelines(f"{stat}\n" for stat in top)
        with open(out, "a") as f:
            f.write(json.dumps(rec) + "\n")


def main() -> None:
    if len(sys.argv) < 4 or sys.argv[3] != "--":
        sys.exit(__doc__)
    out, every = sys.argv[1], float(sys.argv[2])
    sys.argv = ["webhook-sidecar", *sys.argv[4:]]
    if sys.argv[1:2] == ["run"]:
        threading.Thread(target=probe, args=(out, every), name="soak-probe", daemon=True).start()
    runpy.run_module("sidecar", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
