#!/usr/bin/env python3
"""What delivery-id dedup adds to a call, in instructions (docs/dedup.md, "Cost").

Counted, not timed: valgrind's cachegrind runs a sidecar started through
bench/dedup_switch.py (memory backend, ``--max-entries`` ids) in front of
bench/runtime.py, and one client sends it calls one at a time. Three runs, each
from a fresh process: ``--warm`` keyed calls that fill the table, then nothing
(the start-up and shutdown every run shares), ``--calls`` calls passing by the
guard (``skip-key``), or as many meeting it (``memory-key``). The difference
over the first run, per call, is what one call costs; the two runs' difference
is what dedup adds. Instruction counts do not depend on what else the machine
is doing, which throughput on a shared machine does (bench/dedup_bench.py), but
they are not exact either: work that runs by the clock (timers, the Date header)
or by how a read splits a request differs between runs, so two runs of this
script differ by up to a fifth of what dedup adds. Cache misses are counted on
cachegrind's model of this CPU, not on the machine.

    python bench/dedup_count.py                  # about 3 minutes

Needs valgrind; Linux. Reuses bench/run.py's harness.
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import secrets
import signal
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import configs  # noqa: E402
import harness  # noqa: E402
import run  # noqa: E402
from dedup_bench import keyed_headers  # noqa: E402

EVENTS = {
    "instructions": "I   refs",
    "L1 data misses": "D1  misses",
    "L1 code misses": "I1  misses",
}


def count(
    h: run.Harness, args: argparse.Namespace, ports: set[int], label: str, calls: int, switch: str
) -> dict[str, int]:
    """One fresh sidecar under cachegrind: ``args.warm`` keyed calls meeting the guard,
    then ``calls`` more with ``X-Bench-Dedup: switch``; its totals at exit."""
    port, admin = harness.free_port(ports), harness.free_port(ports)
    doc = configs.sidecar_config(
        secret=args.secret,
        listen=f"127.0.0.1:{port}",
        admin_listen=f"127.0.0.1:{admin}",
        upstream_socket=str(h.tmp / "rt.sock"),
        variant="sidecar",
    )
    doc["sidecar"]["dedup"] = {"backend": "memory", "maxEntries": args.max_entries}
    path = h.tmp / f"{label}.json5"
    path.write_text(json.dumps(doc))
    path.chmod(0o600)
    env = {"PYTHONPATH": str(BENCH.parent), "PYTHONHASHSEED": "0"}
    argv = [
        "valgrind", "--tool=cachegrind", "--cache-sim=yes",
        f"--cachegrind-out-file={h.tmp / (label + '.cg')}",
        harness.PY, str(BENCH / "dedup_switch.py"), "run", "-c", str(path),
    ]  # fmt: skip
    p = h.spawn(label, argv, cpu=args.server_cpu, env=env)  # its summary goes to p.log_path
    harness.wait_ready(p, lambda: harness.tcp_open(port), "listening port under valgrind", 300)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    for i in range(args.warm):
        _post(conn, args.secret, f"warm-{i}", "keep")
    for i in range(calls):
        _post(conn, args.secret, f"{label}-{i}", switch)
    conn.close()
    p.popen.send_signal(signal.SIGTERM)
    p.popen.wait(timeout=300)
    assert p.log_path is not None
    err = p.log_path.read_text(errors="replace")
    totals = {}
    for name, field in EVENTS.items():
        m = re.search(re.escape(field) + r":\s+([\d,]+)", err)
        if m is None:
            raise RuntimeError(f"{label}: no {field!r} in cachegrind's summary:\n{err[-2000:]}")
        totals[name] = int(m.group(1).replace(",", ""))
    return totals


def _post(conn: http.client.HTTPConnection, secret: str, key: str, switch: str) -> None:
    conn.request("POST", configs.PATH, configs.BODY.encode(), keyed_headers(secret, key, switch))
    r = conn.getresponse()
    r.read()
    if r.status != 200:
        raise RuntimeError(f"expected 200, got {r.status}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=3000, help="calls counted per run")
    ap.add_argument("--warm", type=int, default=1200, help="keyed calls first, in every run")
    ap.add_argument("--max-entries", type=int, default=1000, help="the memory bound")
    ap.add_argument("--server-cpu", default="0")
    ap.add_argument("--json", metavar="FILE", help="write the per-call figures as JSON")
    args = ap.parse_args()
    args.secret = secrets.token_hex(32)
    h = run.Harness(keep_tmp=False)
    ports: set[int] = set()
    try:
        run.start_runtime(h, args, ports)
        base = count(h, args, ports, "start-and-stop", 0, "keep")
        per_call = {}
        for label, switch in (("skip-key", "skip"), ("memory-key", "keep")):
            totals = count(h, args, ports, label, args.calls, switch)
            per_call[label] = {k: (totals[k] - base[k]) / args.calls for k in EVENTS}
            run.log(
                f"{label:11} per call: "
                + ", ".join(f"{k} {v:,.0f}" for k, v in per_call[label].items())
            )
        skip, keep = per_call["skip-key"], per_call["memory-key"]
        added = {k: keep[k] - skip[k] for k in EVENTS}
        run.log(
            "memory-key adds: "
            + ", ".join(f"{k} {added[k]:+,.0f} ({keep[k] / skip[k]:.3f}x)" for k in EVENTS)
        )
        if args.json:
            Path(args.json).write_text(json.dumps({"per_call": per_call, "added": added}, indent=2))
        return 0
    finally:
        h.stop_all()


if __name__ == "__main__":
    sys.exit(main())
