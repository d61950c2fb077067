"""``webhook-sidecar demo``: the reference runtime and the sidecar in one process.

A fresh secret, an agent ``my-agent`` with the seed's session settings, the
runtime on a temporary Unix socket, the sidecar on 127.0.0.1:PORT; it prints
the secret, curl commands ready to paste, and each call the runtime receives.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

from . import config, devruntime, logs
from .metrics import Metrics
from .process.server import Server
from .process.tuning import install_uvloop
from .secrets import generate_secret
from .settings import Settings


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_taken(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def write_config(folder: Path, port: int, admin_port: int, secret: str) -> Path:
    (folder / "secret").write_text(secret + "\n")
    (folder / "secret").chmod(0o600)
    doc = {
        "webhooks": {
            "enabled": True,
            "secrets": [{"id": "demo", "file": "secret"}],
            "agents": {
                "my-agent": {"sessionKey": "webhook-session", "allowRequestSessionKey": True}
            },
        },
        "sidecar": {
            "listen": f"127.0.0.1:{port}",
            "admin": {"listen": f"127.0.0.1:{admin_port}"},
            "upstream": {"socket": str(folder / "rt.sock")},
            "log": {"level": "warning", "format": "text"},
        },
    }
    path = folder / "config.json5"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def show_call(entry: dict[str, Any]) -> None:
    fields = {k: v for k, v in entry.items() if v is not None and k != "time"}
    print("runtime received: " + json.dumps(fields), flush=True)


async def _demo(settings: Settings, audit: logs.AuditLog, secret: str) -> int:
    upstream_socket = settings.sidecar.upstream.socket
    assert upstream_socket is not None
    runtime = await devruntime.start(upstream_socket, show_call)
    server = Server(settings, audit, Metrics())
    try:
        await server.start()
        base = f"http://{settings.sidecar.listen}"
        print(f"\nwebhook-sidecar demo: {base} -> reference runtime on {upstream_socket}")
        print(f"admin (metrics, health): http://{settings.sidecar.admin_listen}/metrics\n")
        print(f"secret (id 'demo'): {secret}")
        # The config it runs, to copy from (deleted when the demo stops).
        print(f"config: {settings.path}\n")
        print("Try these (wake; agent with its fixed session; agent with its own session key):\n")
        for line in curl_examples(base, secret):
            print(f"  {line}\n")
        print("Each call the runtime receives is printed below. Ctrl-C stops both.\n", flush=True)
        await server.run_until_stopped()
    finally:
        await runtime.cleanup()
    return 0


def run(port: int) -> int:
    if not 0 < port < 65536:
        print(f"demo: --port must be 1-65535, not {port}", file=sys.stderr)
        return 2
    if _port_taken(port):
        print(
            f"demo: port {port} on 127.0.0.1 is already in use; pick another with --port N",
            file=sys.stderr,
        )
        return 1
    with tempfile.TemporaryDirectory(prefix="whs-") as tmp:
        secret = generate_secret()
        settings = config.load(write_config(Path(tmp), port, _free_port(), secret))
        writer, audit = logs.setup("warning", "text")
        install_uvloop()
        try:
            return asyncio.run(_demo(settings, audit, secret))
        except OSError as exc:
            print(f"demo: cannot start: {exc.strerror or exc}", file=sys.stderr)
            return 1
        finally:
            writer.close()


def curl_examples(base_url: str, secret: str) -> list[str]:
    """The seed's calls, ready to paste."""
    auth = shlex.quote(f"Authorization: Bearer {secret}")
    json_type = "'Content-Type: application/json'"

    def curl(path: str, body: str) -> str:
        return f"curl -sS -X POST {base_url}{path} -H {auth} -H {json_type} -d {shlex.quote(body)}"

    return [
        curl("/hooks/wake", '{"agent": "my-agent"}'),
        curl(
            "/hooks/agent",
            '{"agent": "my-agent", "message": "Deployed v1.2.3 to production, check the service"}',
        ),
        curl(
            "/hooks/agent",
            '{"agent": "my-agent", "message": "Order 1234 failed to ship", '
            '"sessionKey": "order-1234"}',
        ),
    ]
