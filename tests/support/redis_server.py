"""A real ``redis-server`` for tests: its own loopback port, temp dir, no persistence.

Never a system Redis: each server is started here and stopped by its PID. It
can be stopped and started again on the same port, which is how tests take
the shared limiter's backend away mid-test and give it back.

Without the binary (Debian package ``redis-server``) tests skip locally, and
fail under ``CI=true``, where a skip would hide that nothing was tested.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.common import free_port, terminate


def redis_server_binary() -> str:
    """The path of ``redis-server``; skips (or fails under CI) when it is missing."""
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.access("/usr/bin/redis-server", os.X_OK) else None
    )
    if found is None:
        message = "redis-server is not installed (Debian package redis-server)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found


class RedisServer:
    """One redis-server process on 127.0.0.1:``port``."""

    def __init__(self, binary: str, folder: Path) -> None:
        self.binary = binary
        self.folder = folder
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        self.proc = subprocess.Popen(
            [
                self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", str(self.folder),
                "--logfile", str(self.folder / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited {self.proc.returncode}: {self.log()}")
            if self.ping():
                return self
            time.sleep(0.02)
        raise RuntimeError(f"redis-server not answering in {timeout}s: {self.log()}")

    def ping(self) -> bool:
        return self.command("PING") == b"+PONG\r\n"

    def command(self, *args: str) -> bytes | None:
        """One command in RESP over a plain socket; the raw reply, or None if unreachable."""
        payload = f"*{len(args)}\r\n" + "".join(f"${len(a)}\r\n{a}\r\n" for a in args)
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as conn:
                conn.sendall(payload.encode())
                return conn.recv(65536)
        except OSError:
            return None

    def stop(self) -> None:
        """SIGTERM by PID, wait; the port is then refused until :meth:`start`."""
        if self.proc is not None:
            terminate(self.proc)

    def log(self) -> str:
        try:
            return (self.folder / "redis.log").read_text()[-2000:]
        except OSError:
            return ""


@contextlib.contextmanager
def running_redis_server() -> Iterator[RedisServer]:
    """A fresh redis-server (for a fixture), stopped at the end."""
    binary = redis_server_binary()
    folder = Path(tempfile.mkdtemp(prefix="whs-redis-", dir="/tmp"))
    server = RedisServer(binary, folder)
    try:
        yield server.start()
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)
