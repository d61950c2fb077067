"""Open-loop, fixed-rate HTTP load generator (wrk has no fixed rate).

Request i is due at start + i/rate whatever happened to earlier ones (open
loop): a slow server cannot slow the generator down and hide its own
latency. Requests go over a pool of pre-opened keep-alive connections; when
every connection is busy, a due request waits in a queue (counted as
"queued"), and a new connection is opened up to --max-conns.

Two latencies are recorded per request:
  latency        completion - the moment the bytes were written (service time)
  latency_sched  completion - the moment the request was due (includes any
                 queueing and the generator's own send lag: the
                 coordinated-omission-free view)
and send_lag = write time - due time, which shows whether the generator kept
its schedule (its p99 should stay well under a millisecond; the harness
flags it otherwise). Latencies of the first --warmup seconds are dropped.

The schedule is kept by sleeping until about 1 ms before the next due time
and then polling the loop (asyncio.sleep(0)): the event loops' timers are
millisecond-grained, polling is what gives microsecond-level send times. It
therefore keeps its core busy; run it pinned to the client core.

Prints one JSON object on stdout.

    python bench/loadgen.py --port 18001 --token HEX --rate 500 --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import json
import math
import sys
import time

import httptools

perf = time.perf_counter


class Conn(asyncio.Protocol):
    def __init__(self, gen: Gen) -> None:
        self.gen = gen
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.due = 0.0
        self.sent = 0.0
        self.busy = False
        self.dead = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.gen.errors["parse"] += 1
            self._kill()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.dead:
            self.dead = True
            self.gen.lost(self)

    def on_message_complete(self) -> None:
        done = perf()
        status = self.parser.get_status_code()
        keep = self.parser.should_keep_alive()
        self.busy = False
        if not keep:
            self.dead = True
        self.gen.complete(self, status, done)
        if not keep:
            self._kill()
            self.gen.lost(self)

    def send(self, due: float) -> None:
        self.busy = True
        self.due = due
        self.sent = perf()
        assert self.transport is not None
        self.transport.write(self.gen.request)

    def _kill(self) -> None:
        if self.transport is not None:
            self.transport.close()


class Gen:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        body = args.body.encode()
        auth = (
            b"" if args.token == "-" else b"Authorization: Bearer " + args.token.encode() + b"\r\n"
        )
        self.request = (
            f"POST {args.path} HTTP/1.1\r\nHost: {args.host}:{args.port}\r\n".encode()
            + b"Content-Type: application/json\r\n"
            + auth
            + b"Content-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )
        self.idle: list[Conn] = []
        self.conns: set[Conn] = set()
        self.opening = 0
        self.tasks: set[asyncio.Future[None]] = set()
        self.pending: collections.deque[float] = collections.deque()
        self.samples: list[tuple[float, float, float, int]] = []
        self.statuses: collections.Counter[int] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()
        self.queued = 0
        self.in_flight = 0
        self.answered_all = 0  # warm-up included
        self.record_from = 0.0
        self.stopping = False
        self.all_done: asyncio.Event | None = None

    async def open_conn(self) -> None:
        # self.opening was counted by the caller, synchronously, so that a burst
        # of dispatches cannot schedule more than --max-conns connections.
        loop = asyncio.get_running_loop()
        try:
            _, conn = await loop.create_connection(
                lambda: Conn(self), self.args.host, self.args.port
            )
        except OSError:
            self.errors["connect"] += 1
            return
        finally:
            self.opening -= 1
        self.conns.add(conn)  # type: ignore[arg-type]
        self.release(conn)  # type: ignore[arg-type]

    def release(self, conn: Conn) -> None:
        if self.pending:
            conn.send(self.pending.popleft())
        else:
            self.idle.append(conn)

    def dispatch(self, due: float) -> None:
        self.in_flight += 1
        while self.idle:
            conn = self.idle.pop()
            if not conn.dead:
                conn.send(due)
                return
        self.queued += 1
        self.pending.append(due)
        self._maybe_open()

    def _maybe_open(self) -> None:
        if len(self.conns) + self.opening < self.args.max_conns:
            self.opening += 1
            task = asyncio.ensure_future(self.open_conn())
            self.tasks.add(task)  # keep a reference until it is done
            task.add_done_callback(self.tasks.discard)

    def complete(self, conn: Conn, status: int, done: float) -> None:
        self.in_flight -= 1
        self.answered_all += 1
        if conn.due >= self.record_from:
            self.samples.append((conn.due, conn.sent, done, status))
            self.statuses[status] += 1
        if self.stopping and self.in_flight == 0 and self.all_done is not None:
            self.all_done.set()
        if not conn.dead:
            self.release(conn)

    def lost(self, conn: Conn) -> None:
        self.conns.discard(conn)
        if conn.busy:
            conn.busy = False
            self.in_flight -= 1
            self.errors["reset"] += 1
            if self.stopping and self.in_flight == 0 and self.all_done is not None:
                self.all_done.set()
        if not self.stopping and self.pending:
            self._maybe_open()

    async def run(self) -> dict[str, object]:
        a = self.args
        for _ in range(a.conns):
            self.opening += 1
            await self.open_conn()
        if not self.conns:
            return {"error": f"cannot connect to {a.host}:{a.port}"}
        gc.collect()
        gc.disable()
        interval = 1.0 / a.rate
        total = round(a.rate * (a.duration + a.warmup))
        start = perf() + 0.02
        self.record_from = start + a.warmup
        i = 0
        while i < total:
            now = perf()
            while i < total and start + i * interval <= now:
                self.dispatch(start + i * interval)
                i += 1
            if i < total:
                delay = start + i * interval - perf()
                await asyncio.sleep(delay - 0.0012 if delay > 0.002 else 0)
        end = start + total * interval
        self.stopping = True
        self.all_done = asyncio.Event()
        if self.in_flight > 0:
            try:
                await asyncio.wait_for(self.all_done.wait(), a.timeout)
            except TimeoutError:
                self.errors["timeout"] += self.in_flight
        gc.enable()
        for c in list(self.conns):
            c._kill()
        return self.report(end)

    def report(self, end: float) -> dict[str, object]:
        a = self.args
        s = self.samples
        lat = sorted((d - t) * 1e3 for _, t, d, _ in s)
        lat_sched = sorted((d - due) * 1e3 for due, _, d, _ in s)
        lag = sorted((t - due) * 1e3 for due, t, _, _ in s)
        window = end - self.record_from
        unexpected = sum(v for k, v in self.statuses.items() if k != a.expect)
        return {
            "rate_target": a.rate,
            "rate_achieved": round(len(s) / window, 1) if window > 0 else 0.0,
            "duration_s": round(window, 3),
            "completed": len(s),
            "answered_all": self.answered_all,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "expected": a.expect,
            "unexpected": unexpected,
            "errors": dict(self.errors),
            "queued": self.queued,
            "connections": len(self.conns),
            "latency_ms": summarize(lat),
            "latency_sched_ms": summarize(lat_sched),
            "send_lag_ms": summarize(lag),
        }


def pct(sorted_vals: list[float], p: float) -> float:
    if not sorted_vals:
        return float("nan")
    k = max(0, min(len(sorted_vals) - 1, math.ceil(p / 100.0 * len(sorted_vals)) - 1))
    return sorted_vals[k]


def summarize(vals: list[float]) -> dict[str, float]:
    if not vals:
        return {}
    return {
        "mean": round(sum(vals) / len(vals), 4),
        "p50": round(pct(vals, 50), 4),
        "p90": round(pct(vals, 90), 4),
        "p99": round(pct(vals, 99), 4),
        "p999": round(pct(vals, 99.9), 4),
        "max": round(vals[-1], 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--path", default="/hooks/agent")
    ap.add_argument("--token", default="-", help='bearer token ("-": no Authorization header)')
    ap.add_argument("--body", default='{"agent":"my-agent","message":"hello"}')
    ap.add_argument("--expect", type=int, default=200, help="expected status")
    ap.add_argument("--rate", type=float, default=500.0, help="requests per second")
    ap.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds sent but not recorded")
    ap.add_argument("--conns", type=int, default=8, help="connections opened up front")
    ap.add_argument("--max-conns", type=int, default=64)
    ap.add_argument("--timeout", type=float, default=5.0, help="wait for stragglers at the end")
    args = ap.parse_args()
    if args.rate <= 0 or args.duration <= 0:
        ap.error("--rate and --duration must be positive")

    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        result = runner.run(Gen(args).run())
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    sys.exit(0 if "error" not in result else 1)


if __name__ == "__main__":
    main()
