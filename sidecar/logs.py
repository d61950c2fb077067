"""Logging and the audit log: JSON lines on stderr, written off the event loop.

Every line goes through one writer thread, so a slow or blocked stderr (a full
pipe to a log shipper) never stalls request handling and lines never interleave.
Lines queued when the process stops are written before it exits (:meth:`LineWriter.close`).

The audit log (docs/audit-log.md) is one line per request with fixed keys; it never holds
a token or message text because it is built only from the fields named here.
aiohttp's own report of a malformed request quotes the raw request bytes (which
may hold a bearer token); :class:`MalformedRequestFilter` cuts it to the error's class.
"""

from __future__ import annotations

import atexit
import json
import logging
import queue
import select
import sys
import threading
import time
from datetime import UTC, datetime
from typing import IO, Protocol

from aiohttp.http_exceptions import HttpProcessingError

AUDIT_KEYS = (
    "time", "requestId", "clientIp", "endpoint", "agent", "outcome", "status", "error",
    "secretId", "durationMs",
)  # fmt: skip
# About 30 MB of lines. Past this, stderr has stopped draining: lines are dropped
# and counted rather than growing memory until the pod is OOM-killed.
MAX_QUEUED_LINES = 100_000
# The writer waits this long after a line before writing, so one wake-up of its
# thread writes a batch: woken per line it cost ~20 µs of CPU per request
# (futex, GIL hand-over, write), batched ~1 µs. Lines reach stderr ≤10 ms later.
LINGER_SECONDS = 0.01
_BATCH = 512
# With several worker processes on one stderr pipe, a write(2) of at most PIPE_BUF
# bytes is the largest that POSIX guarantees lands whole, never interleaved with
# another process's write (pipe(7)). Each write is then a whole number of lines
# within it, and a longer line is shortened (:func:`fit`).
PIPE_BUF = select.PIPE_BUF
_STD_ATTRS = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}
_quote = json.encoder.encode_basestring_ascii  # the C encoder; its output is pure ASCII
_json = json.JSONEncoder(ensure_ascii=True, separators=(",", ":")).encode

log = logging.getLogger("sidecar.logs")


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Lines(Protocol):
    """Where lines go: a :class:`LineWriter`, or a list in tests."""

    def write(self, line: str) -> None: ...


class LineWriter:
    """A thread that writes queued lines to a stream in batches.

    :meth:`write` never blocks: it appends to an in-memory queue (bounded by
    ``max_queued``; past it lines are dropped and the number is logged once
    stderr drains again). The thread writes what gathered in ``linger`` seconds
    after the first line at once.
    """

    def __init__(
        self,
        stream: IO[str] | None = None,
        max_queued: int = MAX_QUEUED_LINES,
        linger: float = LINGER_SECONDS,
        max_write: int | None = None,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.max_write = max_write  # bytes per write, whole lines only (several writers)
        self.max_queued = max_queued
        self.dropped = 0  # approximate under threads; exact from the event loop
        self.linger = linger
        self._queue: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._closed = False
        self._lock = threading.Lock()  # serialises the stream between the thread and close()
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._thread.start()

    def write(self, line: str) -> None:
        if self._closed:  # shutting down: nobody is waiting on the loop any more
            self._write([line])
        elif self._queue.qsize() < self.max_queued:
            self._queue.put(line)
        else:
            self.dropped += 1

    def _write(self, batch: list[str]) -> None:
        chunks = (
            ["\n".join(batch) + "\n"]
            if self.max_write is None
            else whole_lines(batch, self.max_write)
        )
        with self._lock:
            try:
                for chunk in chunks:  # flushed one by one: one write(2) each
                    self.stream.write(chunk)
                    self.stream.flush()
            except (OSError, ValueError):
                pass  # stderr is gone; nothing left to tell

    def _run(self) -> None:
        get, get_nowait = self._queue.get, self._queue.get_nowait
        while True:
            line = get()
            if line is not None and self.linger and self._queue.qsize() < _BATCH:
                time.sleep(self.linger)  # let a batch gather: one wake-up, one write
            batch: list[str] = []
            while line is not None:
                batch.append(line)
                if len(batch) >= _BATCH:
                    break
                try:
                    line = get_nowait()
                except queue.Empty:
                    break
            if batch:
                self._write(batch)
            if self.dropped:
                dropped, self.dropped = self.dropped, 0
                log.error("dropped %d log lines: stderr is not keeping up", dropped)
            if line is None:
                return

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued, then stop. Later lines are written directly.

        Waits at most ``timeout`` for a blocked stderr, so a stuck log pipe cannot
        keep the process from exiting.
        """
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            return
        rest: list[str] = []
        while True:  # lines another thread queued after the None
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                rest.append(line)
        if rest:
            self._write(rest)


def whole_lines(lines: list[str], limit: int) -> list[str]:
    """``lines`` joined into chunks of whole lines, each at most ``limit`` bytes as
    UTF-8 (a longer line is shortened by :func:`fit` first)."""
    chunks: list[str] = []
    parts: list[str] = []
    size = 0
    for line in lines:
        n = len(line) + 1 if line.isascii() else len(line.encode()) + 1
        if n > limit:
            line = fit(line, limit)
            n = len(line.encode()) + 1
        if size + n > limit:
            chunks.append("".join(parts))
            parts, size = [], 0
        parts.append(line + "\n")
        size += n
    if parts:
        chunks.append("".join(parts))
    return chunks


def fit(line: str, limit: int) -> str:
    """``line`` shortened to less than ``limit`` bytes. A JSON object stays valid JSON:
    its long strings are cut to a common length (a traceback keeps its end, where the
    error is) and ``"truncated"`` gives the original size. Anything else is cut at the end."""
    size = len(line.encode())
    try:
        doc = json.loads(line)
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        doc["truncated"] = size
        for _ in range(4):  # escapes make the first cut approximate
            over = len(json.dumps(doc)) - (limit - 1)  # ASCII: characters are bytes
            if over <= 0:
                return json.dumps(doc)
            sizes = {k: len(json.dumps(v)) for k, v in doc.items() if isinstance(v, str)}
            cap = _common_cap(sorted(sizes.values()), sum(sizes.values()) - over - 64)
            for key, encoded in sizes.items():
                if encoded > cap:
                    value = doc[key]
                    keep = len(value) * max(0, cap - 5) // encoded
                    cut = value[len(value) - keep :] if key == "exception" else value[:keep]
                    doc[key] = "..." + cut if key == "exception" else cut + "..."
    marker = f" ...[truncated {size} bytes]"
    return line.encode()[: limit - 1 - len(marker)].decode(errors="ignore") + marker


def _common_cap(sizes: list[int], budget: int) -> int:
    """The largest cap with ``sum(min(size, cap)) <= budget`` (``sizes`` ascending)."""
    for i, n in enumerate(sizes):
        rest = len(sizes) - i
        if n * rest > budget:
            return max(0, budget // rest)
        budget -= n
    return sizes[-1] if sizes else 0


class _Handler(logging.Handler):
    def __init__(self, writer: LineWriter, fmt: str) -> None:
        super().__init__()
        self.writer = writer
        self.json = fmt == "json"

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = {k: v for k, v in vars(record).items() if k not in _STD_ATTRS}
            message = record.getMessage()
            if record.exc_info:
                fields["exception"] = logging.Formatter().formatException(record.exc_info)
            if self.json:
                line = json.dumps(
                    {"time": _iso(record.created), "level": record.levelname.lower(),
                     "logger": record.name, "msg": message, **fields},
                    default=str,
                )  # fmt: skip
            else:
                extra = " ".join(f"{k}={v}" for k, v in fields.items())
                line = (
                    f"{_iso(record.created)} {record.levelname:<7} {record.name}: {message} {extra}"
                )
            self.writer.write(line.rstrip())
        except Exception:
            self.handleError(record)


class MalformedRequestFilter(logging.Filter):
    """aiohttp logs a request its parser refuses with the raw bytes around the error
    (``Invalid header value char: b'Authorization: Bearer <token>\\x01'``). Keep the
    address and the error's class, drop the bytes (docs/http-api.md: raw bytes are never logged)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            remote = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
            record.msg = "refused a malformed request from %s: %s (%s)"
            record.args = (remote, type(exc).__name__, exc.code)
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


class AuditLog:
    """One line per request with the docs/audit-log.md keys, nothing else.

    Built by hand rather than with ``json.dumps``: the keys are fixed and this
    runs once per request (about 1.5 µs instead of 11). Every string goes
    through the C JSON string encoder, so any value is escaped correctly.
    """

    def __init__(self, writer: Lines, fmt: str = "json") -> None:
        self.writer = writer
        self.json = fmt == "json"
        self._second = -1
        self._second_text = ""

    def _time(self) -> str:
        ms = time.time_ns() // 1_000_000
        second, ms = divmod(ms, 1000)
        if second != self._second:
            self._second_text = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
            self._second = second
        return f"{self._second_text}.{ms:03d}Z"

    def record(
        self,
        request_id: str,
        client_ip: str,
        endpoint: str,
        agent: str | None,
        outcome: str,
        status: int,
        error: str | None,
        secret_id: str | None,
        duration: float,
        extra: dict[str, object] | None = None,
    ) -> None:
        """``endpoint``, ``outcome`` and ``error`` are names from this package (docs/http-api.md's
        codes): written as they are. Everything else goes through the JSON encoder.
        ``extra``: keys beyond the fixed ones (route, deliveryId, ...: docs/audit-log.md),
        appended after them."""
        ms = f"{duration * 1000:.3f}"
        if self.json:
            q = _quote
            err = "null" if error is None else f'"{error}"'
            more = "" if not extra else "".join(f",{q(k)}:{_json(v)}" for k, v in extra.items())
            self.writer.write(
                f'{{"time":"{self._time()}","requestId":{q(request_id)},'
                f'"clientIp":{q(client_ip)},"endpoint":"{endpoint}",'
                f'"agent":{"null" if agent is None else q(agent)},"outcome":"{outcome}",'
                f'"status":{status},"error":{err},'
                f'"secretId":{"null" if secret_id is None else q(secret_id)},"durationMs":{ms}'
                f"{more}}}"
            )
        else:
            values = (self._time(), request_id, client_ip, endpoint, agent, outcome, status,
                      error, secret_id, ms)  # fmt: skip
            pairs = [*zip(AUDIT_KEYS, values, strict=True), *(extra or {}).items()]
            text = " ".join(f"{k}={'-' if v is None else v}" for k, v in pairs)
            self.writer.write("audit " + text)


def setup(
    level: str = "info",
    fmt: str = "json",
    stream: IO[str] | None = None,
    *,
    shared: bool = False,
) -> tuple[LineWriter, AuditLog]:
    """Route all logging through one writer thread; returns it and the audit log on it.

    ``shared``: other processes write to the same stream (``sidecar.workers``), so
    every write is whole lines within ``PIPE_BUF`` bytes. The writer is also closed
    at interpreter exit, so queued lines are never lost on a path that forgets to close it.
    """
    writer = LineWriter(stream, max_write=PIPE_BUF if shared else None)
    atexit.register(writer.close)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(_Handler(writer, fmt))
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").disabled = True
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, MalformedRequestFilter) for f in server_log.filters):
        server_log.addFilter(MalformedRequestFilter())
    return writer, AuditLog(writer, fmt)


def configure(level: str, fmt: str, audit: AuditLog | None = None) -> None:
    """Apply ``sidecar.log`` from a reloaded config: level and format take effect at once."""
    root = logging.getLogger()
    root.setLevel(level.upper())
    for handler in root.handlers:
        if isinstance(handler, _Handler):
            handler.json = fmt == "json"
    if audit is not None:
        audit.json = fmt == "json"


def set_level(level: str) -> None:
    logging.getLogger().setLevel(level.upper())
