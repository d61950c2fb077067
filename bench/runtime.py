"""A minimal, fast stand-in for an agent runtime speaking the forward protocol.

It answers every request with 200 {"ok":true,"runId":"r1"} and keeps the
connection alive, so that whatever sits in front of it (the sidecar, nginx)
is what gets measured. It listens on a Unix socket (the sidecar's and nginx's
upstream) and on a loopback TCP port (the "direct" target for wrk), in one
process on one event loop, so every target shares the same runtime CPU cost.

It parses requests with httptools (llhttp) on a bare asyncio Protocol, with
uvloop when importable. It does not look at the body.

`GET /__bench/stats` returns {"posts": N, "marked": M}: the number of POSTs
received so far, and of those whose body contained --count-marker. The
harness reads it around each scenario to check that valid calls were really
forwarded and refused ones (whose body carries the marker) never were.

    python bench/runtime.py --socket /tmp/x/rt.sock --port 18001
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time

import httptools

BODY = b'{"ok":true,"runId":"r1"}'
HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: application/json\r\n"
    b"Content-Length: " + str(len(BODY)).encode() + b"\r\n"
)
RESP_KEEP = HEAD + b"\r\n" + BODY
RESP_CLOSE = HEAD + b"Connection: close\r\n\r\n" + BODY
RESP_BAD = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"

STATS_PATH = b"/__bench/stats"


class Stats:
    work = 0.0  # seconds of CPU to burn per POST (--work-us)
    posts = 0
    marked = 0
    marker = b""
    dumped = 0
    dump_limit = 0


class RuntimeProtocol(asyncio.Protocol):
    __slots__ = ("body", "closing", "headers", "parser", "transport", "url")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] | None = None
        self.body: list[bytes] | None = None
        self.closing = False

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.closing = True
            self.transport.write(RESP_BAD)
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True

    # httptools callbacks -------------------------------------------------
    def on_message_begin(self) -> None:
        self.url = b""
        if Stats.dumped < Stats.dump_limit:
            self.headers = []
            self.body = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.headers is not None:
            self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        if Stats.marker and Stats.marker in body:
            Stats.marked += 1
        if self.body is not None:
            self.body.append(body)

    def on_message_complete(self) -> None:
        if self.closing:
            return
        method = self.parser.get_method()
        if method == b"POST":
            Stats.posts += 1
            if Stats.work:
                _burn(Stats.work)
            resp_keep, resp_close = RESP_KEEP, RESP_CLOSE
        elif self.url == STATS_PATH:
            body = json.dumps({"posts": Stats.posts, "marked": Stats.marked}).encode()
            head = (
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                % len(body)
            )
            resp_keep = head + b"\r\n" + body
            resp_close = head + b"Connection: close\r\n\r\n" + body
        else:
            resp_keep, resp_close = RESP_KEEP, RESP_CLOSE
        if self.headers is not None:
            self._dump(method)
        if self.parser.should_keep_alive():
            self.transport.write(resp_keep)
        else:
            self.closing = True
            self.transport.write(resp_close)
            self.transport.close()

    def _dump(self, method: bytes) -> None:
        Stats.dumped += 1
        rec = {
            "method": method.decode("latin-1"),
            "path": self.url.decode("latin-1"),
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in self.headers or []],
            "body": b"".join(self.body or []).decode("utf-8", "replace"),
        }
        print(json.dumps(rec), file=sys.stderr, flush=True)
        self.headers = None
        self.body = None


def _burn(seconds: float) -> None:
    """Keep the CPU busy, as a runtime doing real work on each call would."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


async def serve(socket_path: str | None, host: str, port: int | None) -> None:
    loop = asyncio.get_running_loop()
    servers = []
    if socket_path:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket_path)
        servers.append(await loop.create_unix_server(RuntimeProtocol, socket_path, backlog=1024))
    if port is not None:
        servers.append(
            await loop.create_server(RuntimeProtocol, host, port, reuse_address=True, backlog=1024)
        )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    print(f"runtime: listening socket={socket_path} tcp={host}:{port}", file=sys.stderr, flush=True)
    await stop.wait()
    for s in servers:
        s.close()
    if socket_path:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket_path)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--socket", help="Unix socket path to listen on")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, help="loopback TCP port to listen on")
    ap.add_argument(
        "--dump",
        type=int,
        default=0,
        metavar="N",
        help="print the first N requests (headers and body) as JSON lines on stderr",
    )
    ap.add_argument(
        "--count-marker",
        default="",
        metavar="TEXT",
        help="count the requests whose body contains TEXT (see /__bench/stats)",
    )
    ap.add_argument(
        "--work-us",
        type=float,
        default=0,
        metavar="US",
        help="burn US microseconds of CPU per POST: a slower runtime, e.g. one like the "
        "issue's reference setup (~14,400 req/s reached directly; 60 gave 12,800 here)",
    )
    args = ap.parse_args()
    if not args.socket and args.port is None:
        ap.error("give --socket and/or --port")
    Stats.dump_limit = args.dump
    Stats.marker = args.count_marker.encode()
    Stats.work = args.work_us / 1e6
    try:
        import uvloop
    except ImportError:
        uvloop = None
    if uvloop is not None:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve(args.socket, args.host, args.port))
    else:
        asyncio.run(serve(args.socket, args.host, args.port))


if __name__ == "__main__":
    main()
