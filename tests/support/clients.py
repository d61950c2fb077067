"""Clients for the security tests: HTTP from a chosen loopback source address (to be a
trusted proxy or an untrusted peer), over plain TCP or TLS, and an in-process server."""

from __future__ import annotations

import asyncio
import inspect
import json
import ssl
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp

from sidecar import config
from sidecar.logs import AuditLog
from sidecar.metrics import Metrics
from sidecar.process.server import Server
from support.common import AGENT, SECRET, ListWriter, base_doc, free_port, read_reply, write_config

WAKE = {"agent": AGENT}


def listening_doc(runtime_path: Path, **sidecar: Any) -> dict[str, Any]:
    """``base_doc`` with its own loopback ports, for a whole ``Server``."""
    return base_doc(
        runtime_path,
        listen=f"127.0.0.1:{free_port()}",
        admin={"listen": f"127.0.0.1:{free_port()}"},
        shutdownTimeout="2s",
        **sidecar,
    )


def public_url(doc: dict[str, Any], scheme: str = "http", path: str = "/hooks/wake") -> str:
    return f"{scheme}://{doc['sidecar']['listen']}{path}"


def public_port(doc: dict[str, Any]) -> int:
    return int(doc["sidecar"]["listen"].rsplit(":", 1)[1])


async def until(predicate: Callable[[], Any], timeout: float = 10.0) -> float:
    """Poll ``predicate`` (sync or async) until it is true; how long it took. Generous
    bounds, not sleeps: the machine is shared."""
    start = time.monotonic()
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return time.monotonic() - start
        assert time.monotonic() - start < timeout, "not within the time limit"
        await asyncio.sleep(0.05)


async def post(
    url: str,
    body: Any = WAKE,
    *,
    token: str | None = SECRET,
    headers: dict[str, str] | None = None,
    source: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> tuple[int, Any, Any]:
    """One POST on a fresh connection, from ``source`` when given; (status, headers, body)."""
    h = {"Content-Type": "application/json", **(headers or {})}
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    connector = aiohttp.TCPConnector(
        local_addr=(source, 0) if source else None, ssl=ssl_context if ssl_context else False
    )
    timeout = aiohttp.ClientTimeout(total=15)
    async with (
        aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
        session.post(url, data=json.dumps(body), headers=h) as resp,
    ):
        return await read_reply(resp)


def client_context(
    ca: Path, cert: Path | None = None, key: Path | None = None, *, max_version: str | None = None
) -> ssl.SSLContext:
    """A TLS client that trusts only ``ca``, optionally presenting a client certificate."""
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    if max_version == "1.2":
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    return ctx


async def peer_certificate_serial(port: int, ctx: ssl.SSLContext) -> int:
    """Shake hands on a new connection and return the serial of the certificate served."""
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        writer.close()
        await writer.wait_closed()
    from cryptography import x509

    return int(x509.load_der_x509_certificate(der).serial_number)


@asynccontextmanager
async def running_server(
    folder: Path, doc: dict[str, Any], *, watch_interval: float = 0.2
) -> AsyncIterator[tuple[Server, ListWriter]]:
    """``Server`` (both listeners, TLS, reload, the file watcher) in this process."""
    settings = config.load(write_config(folder, doc))
    audit = ListWriter()
    server = Server(settings, AuditLog(audit), Metrics(), watch_interval=watch_interval)
    await server.start()
    try:
        yield server, audit
    finally:
        await server.stop()


class ProjectedVolume:
    """A folder laid out the way the kubelet writes a ConfigMap or Secret volume
    (pkg/volume/util/atomic_writer.go): each file is a symlink ``name -> ..data/name``,
    ``..data`` is a symlink to a timestamped folder, and an update writes a new folder
    and renames a new ``..data`` link over the old one, in one step."""

    def __init__(self, folder: Path, files: dict[str, bytes]) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.generation = 0
        self.update(files)
        for name in files:
            (folder / name).symlink_to(Path("..data") / name)

    def update(self, files: dict[str, bytes]) -> None:
        self.generation += 1
        data = self.folder / "..data"
        old = data.resolve() if data.is_symlink() else None
        stamp = self.folder / f"..2026_01_01_00_00_00.{self.generation:09d}"
        stamp.mkdir(mode=0o755)
        for name, content in files.items():
            (stamp / name).write_bytes(content)
        tmp = self.folder / "..data_tmp"
        tmp.symlink_to(stamp.name)
        tmp.rename(data)
        if old is not None:
            for child in old.iterdir():
                child.unlink()
            old.rmdir()
