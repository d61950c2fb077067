"""Logging and the audit log: JSON lines on stderr, written off the event loop.

Every line goes through one writer thread, so a slow or blocked stderr (a full
pipe to a log shipper) never stalls request handling and lines never interleave.
The audit log (SPEC §7) is one line per request with fixed keys; it never holds
a token or message text because it is built only from the fields named here.
"""

from __future__ import annotations

import json
import logging
import queue
import sys
import threading
import time
from datetime import UTC, datetime
from typing import IO, Any

from aiohttp.http_exceptions import HttpProcessingError

AUDIT_KEYS = (
    "time", "requestId", "clientIp", "endpoint", "agent", "outcome", "status", "error",
    "secretId", "durationMs",
)  # fmt: skip
_STD_ATTRS = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class LineWriter:
    """A thread that writes queued lines to a stream in batches."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self._queue: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._thread.start()

    def write(self, line: str) -> None:
        self._queue.put(line)

    def _run(self) -> None:
        get = self._queue.get
        while True:
            line = get()
            batch = []
            while line is not None:
                batch.append(line)
                if len(batch) >= 512:
                    break
                try:
                    line = self._queue.get_nowait()
                except queue.Empty:
                    line = ""
                    break
            if batch:
                try:
                    self.stream.write("\n".join(batch) + "\n")
                    self.stream.flush()
                except (OSError, ValueError):
                    pass  # stderr is gone; nothing left to tell
            if line is None:
                return

    def close(self) -> None:
        """Write what is queued, then stop."""
        self._queue.put(None)
        self._thread.join(timeout=5)


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
                line = f"{_iso(record.created)} {record.levelname:<7} {record.name}: {message} {extra}"
            self.writer.write(line.rstrip())
        except Exception:
            self.handleError(record)


class AuditLog:
    """One line per request with the SPEC §7 keys, nothing else."""

    def __init__(self, writer: LineWriter, fmt: str = "json") -> None:
        self.writer = writer
        self.json = fmt == "json"

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
    ) -> None:
        entry: dict[str, Any] = {
            "time": _iso(time.time()),
            "requestId": request_id,
            "clientIp": client_ip,
            "endpoint": endpoint,
            "agent": agent,
            "outcome": outcome,
            "status": status,
            "error": error,
            "secretId": secret_id,
            "durationMs": round(duration * 1000, 3),
        }
        if self.json:
            self.writer.write(json.dumps(entry))
        else:
            self.writer.write("audit " + " ".join(f"{k}={v}" for k, v in entry.items()))


def setup(level: str = "info", fmt: str = "json", stream: IO[str] | None = None) -> tuple[LineWriter, AuditLog]:
    """Route all logging through one writer thread; returns it and the audit log on it."""
    writer = LineWriter(stream)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(_Handler(writer, fmt))
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").disabled = True
    logging.getLogger("aiohttp.server").addFilter(_without_raw_request)
    return writer, AuditLog(writer, fmt)


def _without_raw_request(record: logging.LogRecord) -> bool:
    """aiohttp logs a request it could not parse at error level with the parser's message,
    which quotes the raw bytes around the fault — a bearer token in a header with a bad
    byte, or the whole request when its lines end in a bare LF. Keep the line (who, which
    status, which kind of fault), drop the bytes (SPEC §3: raw bytes are never logged).
    It is the client's fault, so a warning, not an error."""
    exc = record.exc_info[1] if record.exc_info else None
    if isinstance(exc, HttpProcessingError):
        if not logging.getLogger().isEnabledFor(logging.WARNING):
            return False
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.msg = "refused a malformed request from %s"
        record.status = exc.code
        record.fault = type(exc).__name__
        record.exc_info = record.exc_text = None
    return True


def set_level(level: str) -> None:
    logging.getLogger().setLevel(level.upper())
