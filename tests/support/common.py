"""What many tests share: the test secrets and agent, configs on disk, the reference
runtime on a real Unix socket, and the sidecar driven in-process or as a real process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Self

from aiohttp import web
from aiohttp.test_utils import TestServer

from sidecar import devruntime
from sidecar.app import PublicRunner, State

SECRET = "8f3a1c2e9b7d4f6a0c5e8b1d3f7a9c2e4b6d8f0a1c3e5b7d9f2a4c6e8b0d1f3a"


OTHER_SECRET = "1b3d5f7a9c0e2a4c6e8b0d2f4a6c8e0b1d3f5a7c9e2b4d6f8a0c1e3b5d7f9a2c"


AGENT = "my-agent"


# The example config of the seed's webhook document, as users paste it; its secret
# goes in with ``SEED_EXAMPLE % secret``.
SEED_EXAMPLE = """{
  webhooks: {
    enabled: true,
    secret: "%s",
    agents: {
      "daily-report-agent": { sessionKey: "report-session" },
      "alert-handler": { sessionKey: "alert-session" },
    },
  },
}"""


def terminate(proc: subprocess.Popen[Any], timeout: float = 10.0) -> int | None:
    """SIGTERM a child and wait for it; SIGKILL if it does not go in ``timeout``."""
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(timeout)


async def read_reply(resp: Any) -> tuple[int, Any, Any]:
    """(status, headers, the body as JSON when it is JSON, else text)."""
    text = await resp.text()
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = text
    return resp.status, resp.headers, parsed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def base_doc(socket_path: str | Path, **sidecar: Any) -> dict[str, Any]:
    """A minimal valid config document; tests change what they are about."""
    return {
        "webhooks": {
            "enabled": True,
            "secret": {"env": "TEST_WEBHOOK_SECRET"},
            "agents": {AGENT: {"sessionKey": "webhook-session"}},
        },
        "sidecar": {"upstream": {"socket": str(socket_path)}, **sidecar},
    }


def write_config(folder: Path, doc: dict[str, Any]) -> Path:
    path = folder / "config.json5"
    path.write_text(json.dumps(doc, indent=2))
    return path


class PublicTestServer(TestServer):
    """The public app served as in production (:class:`PublicRunner`, no router)."""

    async def _make_runner(self, **kwargs: Any) -> web.AppRunner:
        # No access log, as in production: it would write the URL, query and all.
        kwargs.setdefault("access_log", None)
        return PublicRunner(self.app, **kwargs)


class ListWriter:
    """Collects the lines the audit log would write to stderr."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def write(self, line: str) -> None:
        self.lines.append(line)

    def entries(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines]


async def serve_unix(path: Path, handler: Any, route: str = "/hooks/{hook}") -> web.AppRunner:
    """A small aiohttp app answering POSTs to ``route`` on a real Unix socket."""
    app = web.Application()
    app.router.add_post(route, handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.UnixSite(runner, str(path)).start()
    return runner


class Runtime:
    """The reference runtime on a real Unix socket, remembering every call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.calls: list[dict[str, Any]] = []
        self.runner: web.AppRunner | None = None

    async def start(self) -> None:
        self.runner = await devruntime.start(str(self.path), self.calls.append)

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


class Sidecar:
    """A sidecar public app on a real loopback port, with its state, audit lines and metrics."""

    def __init__(self, client: Any, state: State, audit: ListWriter) -> None:
        self.client = client
        self.state = state
        self.audit = audit

    async def post(
        self,
        path: str,
        body: Any = None,
        *,
        token: str | None = SECRET,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
        content_type: str | None = "application/json",
    ) -> tuple[int, Any, Any]:
        """POST and return (status, headers, parsed JSON body)."""
        h: dict[str, str] = {}
        if token is not None:
            h["Authorization"] = f"Bearer {token}"
        if content_type is not None:
            h["Content-Type"] = content_type
        h.update(headers or {})
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else b"")
        async with self.client.post(path, data=data, headers=h) as resp:
            return await read_reply(resp)


# The ``make_sidecar`` fixture (conftest.py): a config document in, a :class:`Sidecar` out.
MakeSidecar = Callable[..., Awaitable[Sidecar]]


class SidecarProcess:
    """``webhook-sidecar run`` as a real child process, its stderr and stdout collected
    line by line (``lines`` and ``stdout_lines``)."""

    def __init__(
        self,
        config_path: Path,
        admin_port: int,
        env: dict[str, str] | None = None,
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        self.preexec_fn = preexec_fn  # e.g. resource limits of the child
        self.config_path = config_path
        self.admin_port = admin_port
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[str] = []
        self.stdout_lines: list[str] = []
        self._readers: list[threading.Thread] = []

    def start(self, timeout: float = 15.0) -> Self:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "run", "-c", str(self.config_path)],
            stderr=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=self.env,
            preexec_fn=self.preexec_fn,
        )
        for stream, sink in ((self.proc.stderr, self.lines), (self.proc.stdout, self.stdout_lines)):
            reader = threading.Thread(target=self._read, args=(stream, sink), daemon=True)
            reader.start()
            self._readers.append(reader)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sidecar exited {self.proc.returncode}: {self.output()}")
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{self.admin_port}/healthz", timeout=1
                ):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"sidecar not healthy in {timeout}s: {self.output()}")

    @staticmethod
    def _read(stream: Any, sink: list[str]) -> None:
        for line in stream:
            sink.append(line.rstrip("\n"))

    def output(self) -> str:
        return "\n".join(self.lines[-50:])

    def json_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines if line.startswith("{")]

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout)
        for reader in self._readers:
            reader.join(timeout=5)
        for stream in (self.proc.stderr, self.proc.stdout):
            if stream is not None:
                stream.close()
        return code

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.wait()
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.wait()
