"""A route in a real ``webhook-sidecar run`` process: a GitHub delivery over TCP to the
reference runtime on a Unix socket, and rotating the route's secret by replacing its
file (the reload watches route secret files like the others)."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from support.common import Runtime, free_port, write_config
from support.senders import (
    GH_OLD_SECRET,
    GH_SECRET,
    GITHUB_PUSH,
    encode,
    github_headers,
    route,
    route_doc,
)


def post(port: int, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/hooks/github",
        body,
        {**headers, "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


async def test_rotating_the_route_secret_file(
    runtime: Runtime, short_tmp: Path, sidecar_process: Any
) -> None:
    secret_file = short_tmp / "github.secret"
    secret_file.write_text(GH_OLD_SECRET + "\n")
    spec = route("github", GH_OLD_SECRET, when="true")
    spec["secrets"] = [{"id": "gh", "file": str(secret_file)}]
    port, admin = free_port(), free_port()
    doc = route_doc(runtime.path, {"github": spec}, listen=f"127.0.0.1:{port}",
                    admin={"listen": f"127.0.0.1:{admin}"},
                    authLockout={"maxFailures": 1000})  # fmt: skip
    proc = sidecar_process(write_config(short_tmp, doc), admin)
    body = encode(GITHUB_PUSH)
    status, reply = await asyncio.to_thread(post, port, body, github_headers(body, GH_OLD_SECRET))
    assert status == 200, reply
    assert runtime.calls[-1]["route"] == "github"
    secret_file.write_text(GH_SECRET + "\n")  # the sender got a new secret: so does the route
    for _ in range(60):  # the file is polled; a reload lands within 10 s
        status, reply = await asyncio.to_thread(post, port, body, github_headers(body))
        if status == 200:
            break
        await asyncio.sleep(0.25)
    assert status == 200, reply
    status, reply = await asyncio.to_thread(post, port, body, github_headers(body, GH_OLD_SECRET))
    assert (status, reply["error"]) == (401, "signature_invalid")
    audit = [line for line in proc.json_lines() if line.get("endpoint") == "route"]
    assert audit and all(line["route"] == "github" for line in audit)
    assert GH_SECRET not in proc.output() and GH_OLD_SECRET not in proc.output()
