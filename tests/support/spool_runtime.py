"""A runtime for the spool's tests: a real aiohttp server on a Unix socket that records
every delivery (path, Idempotency-Key, body) and answers as the test says: ``ok``,
a fixed status (with an optional ``Retry-After``), ``stall`` (never answers in time),
``flap`` (every other call fails with 503), or is ``down`` (not listening)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from support.clients import listening_doc
from support.common import SidecarProcess, serve_unix, write_config


class RecordingRuntime:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.calls: list[dict[str, Any]] = []  # every request received, answered or not
        self.delivered: list[dict[str, Any]] = []  # those answered 2xx
        self.mode = "ok"
        self.status = 200
        self.retry_after: str | None = None
        self.runner: web.AppRunner | None = None
        self._flip = False
        self._release = asyncio.Event()  # ends every stall (at stop)

    async def start(self) -> None:
        self._release = asyncio.Event()
        self.runner = await serve_unix(self.path, self._handle)

    async def stop(self) -> None:
        self._release.set()
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        self.path.unlink(missing_ok=True)

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        call = {
            "path": request.path,
            "key": request.headers.get("Idempotency-Key"),
            "auth": request.headers.get("Authorization"),
            "body": json.loads(body),
            "time": time.time(),
        }
        self.calls.append(call)
        status = self.status
        if self.mode == "stall":
            await self._release.wait()
            return web.json_response({"error": "stalled"}, status=503)
        if self.mode == "flap":
            self._flip = not self._flip
            status = 503 if self._flip else 200
        headers = {"Retry-After": self.retry_after} if self.retry_after else {}
        if 200 <= status < 300:
            self.delivered.append(call)
            return web.json_response({"ok": True}, status=status)
        return web.json_response({"error": "no"}, status=status, headers=headers)

    def keys_of(self, request_id: str) -> set[str | None]:
        """Every Idempotency-Key a call (by its requestId) was delivered with."""
        return {c["key"] for c in self.calls if c["body"].get("requestId") == request_id}


def spool_doc(folder: Path, **spool: Any) -> dict[str, Any]:
    """A config with its own ports and a spool at ``folder/spool.db`` retrying fast."""
    spool.setdefault("path", str(folder / "spool.db"))
    spool.setdefault("retry", {"initial": "100ms", "max": "500ms"})
    return listening_doc(folder / "rt.sock", spool=spool)


class SpoolSidecar(SidecarProcess):
    """A real ``webhook-sidecar run`` with a spool, and what the tests ask of it."""

    def __init__(
        self,
        folder: Path,
        doc: dict[str, Any],
        env: dict[str, str] | None = None,
        preexec_fn: Callable[[], None] | None = None,
    ):
        self.doc = doc
        self.folder = folder
        admin = int(doc["sidecar"]["admin"]["listen"].rsplit(":", 1)[1])
        super().__init__(write_config(folder, doc), admin, env, preexec_fn)

    @property
    def url(self) -> str:
        return f"http://{self.doc['sidecar']['listen']}"

    def admin(self, path: str) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}") as r:
                data = r.read()
                status = r.status
        except urllib.error.HTTPError as err:
            data, status = err.read(), err.code
        text = data.decode()
        return status, json.loads(text) if path != "/metrics" else text

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``webhook-sidecar spool ARGS -c CONFIG`` as a real process."""
        return spool_cli(self.config_path, *args)


def spool_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "spool", *args, "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
