"""The real OpenClaw gateway, directly (no sidecar): the helper works, and the
gateway behaves the way the sidecar's ``protocol: "openclaw"`` relies on.

One gateway for the whole module (~10 s start, ~1 GB RSS). Each test pins one
observed fact; docs/openclaw.md explains them. When one of these
fails after an openclaw upgrade, the sidecar's upstream code needs a look.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from support import openclaw

RUN_ID_LEN = 36  # a UUID


@pytest.fixture(scope="module")
def gateway() -> Iterator[openclaw.Gateway]:
    with openclaw.gateway_for_tests() as gw:
        port, marker = gw.port, gw.marker
        yield gw
    # The helper's promise: nothing of this gateway keeps running.
    assert openclaw.marked_pids(marker) == []
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


@dataclass
class Raw:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    @property
    def content_type(self) -> str:
        return self.header("Content-Type") or ""

    def json(self) -> Any:
        return json.loads(self.body)


async def raw_post(
    gw: openclaw.Gateway,
    path: str,
    body: bytes | dict[str, object],
    headers: list[tuple[str, str]] | None = None,
    *,
    auth: bool = True,
) -> Raw:
    """One request on a fresh connection, headers exactly as given (duplicates too)."""
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: 127.0.0.1:{gw.port}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
    ]
    if auth:
        lines.append(f"Authorization: Bearer {gw.hooks_token}")
    lines += [f"{k}: {v}" for k, v in headers or []]
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        await writer.drain()
        return await asyncio.wait_for(_read_response(reader), 30)
    finally:
        writer.close()
        await writer.wait_closed()


async def _read_response(reader: asyncio.StreamReader) -> Raw:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    _version, status, reason = head[0].split(" ", 2)
    headers = [(k, v) for k, _, v in (h.partition(": ") for h in head[1:] if h)]
    resp = Raw(int(status), reason, headers, b"")
    length = resp.header("Content-Length")
    resp.body = await reader.readexactly(int(length)) if length else b""
    return resp


def wake_body(**extra: object) -> dict[str, object]:
    return {"text": "Webhook wake for my-agent", "mode": "now", **extra}


def agent_body(
    session: str, message: str = "hello from the test", **extra: object
) -> dict[str, object]:
    # Exactly what docs/upstream.md makes the sidecar send.
    return {
        "message": message,
        "agentId": "main",
        "sessionKey": f"hook:{session}",
        "sessionMode": "persistent",
        "name": "Webhook",
        **extra,
    }


pytestmark = pytest.mark.openclaw


# ---------------------------------------------------------------------------
# The helper itself
# ---------------------------------------------------------------------------


def test_install_is_cached_and_marked(gateway: openclaw.Gateway) -> None:
    started = time.monotonic()
    again = openclaw.ensure_installed(gateway.install.cache_dir)
    assert time.monotonic() - started < 1.0
    assert again == gateway.install
    for prefix, package, version in (
        (gateway.install.entry.parents[2], "openclaw", openclaw.OPENCLAW_VERSION),
        (gateway.install.node.parents[3], openclaw.install._node_package(), openclaw.NODE_VERSION),
    ):
        marker = json.loads((prefix / ".installed.json").read_text())
        assert (marker["package"], marker["version"]) == (package, version)


def test_config_is_private_and_loopback(gateway: openclaw.Gateway) -> None:
    config = json.loads(gateway.config_path.read_text())
    assert config["gateway"]["bind"] == "loopback"
    assert config["hooks"]["allowedSessionKeyPrefixes"] == ["hook:"]
    assert config["hooks"]["allowRequestSessionKey"] is True
    assert gateway.config_path.stat().st_mode & 0o077 == 0
    assert gateway.startup_seconds is not None and gateway.startup_seconds < 90


def test_all_gateway_processes_are_tracked(gateway: openclaw.Gateway) -> None:
    pids = gateway.processes()
    assert gateway.pid in pids and len(pids) >= 2

    def session_of(pid: int) -> int:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[3])

    # The spawn broker calls setsid: killing the process group alone would
    # miss it, which is why stop() also reaps by the environment marker.
    assert any(session_of(pid) != session_of(gateway.pid) for pid in pids)


@pytest.mark.parametrize("tamper", ["no-marker", "wrong-version", "missing-entry"])
def test_half_finished_install_is_not_taken_as_complete(tmp_path: Path, tamper: str) -> None:
    prefix = tmp_path / "openclaw-x"
    pkg = prefix / "node_modules" / "openclaw"
    pkg.mkdir(parents=True)
    (pkg / "package.json").write_text(json.dumps({"version": "1.2.3"}))
    entry = pkg / "openclaw.mjs"
    entry.write_text("")
    (prefix / ".installed.json").write_text(json.dumps({"package": "openclaw", "version": "1.2.3"}))
    assert openclaw.install._is_complete(prefix, "openclaw", "1.2.3", entry)
    if tamper == "no-marker":
        (prefix / ".installed.json").unlink()
    elif tamper == "wrong-version":
        (pkg / "package.json").write_text(json.dumps({"version": "1.2.4"}))
    else:
        entry.unlink()
    assert not openclaw.install._is_complete(prefix, "openclaw", "1.2.3", entry)


# ---------------------------------------------------------------------------
# /hooks/wake
# ---------------------------------------------------------------------------


async def test_wake_spec_body_is_accepted(gateway: openclaw.Gateway) -> None:
    async with aiohttp.ClientSession() as session:
        for body in (wake_body(), wake_body(agentId="main")):
            async with session.post(
                gateway.url + "/hooks/wake", json=body, headers=gateway.auth_headers()
            ) as resp:
                assert resp.status == 200
                assert resp.content_type == "application/json"
                data = await resp.json()
                assert data["ok"] is True and data["mode"] == "now"
                # "coalesced" when the same wake is already the newest pending event
                assert data["eventOutcome"] in {"queued", "coalesced"}


async def test_wake_text_reaches_the_model(gateway: openclaw.Gateway) -> None:
    marker = f"wake-{uuid.uuid4().hex}"
    resp = await raw_post(gateway, "/hooks/wake", wake_body(text=marker, agentId="main"))
    assert resp.status == 200
    assert gateway.model is not None
    req = await asyncio.to_thread(gateway.model.wait_for, marker, 60)
    assert f"] {marker}" in "\n".join(req.texts())  # "System: [<time>] <text>"


async def test_wake_ignores_agent_only_fields(gateway: openclaw.Gateway) -> None:
    for extra in ({"sessionMode": "persistent"}, {"name": "Webhook"}, {"bogus": 1}):
        resp = await raw_post(gateway, "/hooks/wake", wake_body(agentId="main", **extra))
        assert resp.status == 200, extra


async def test_wake_errors_are_json(gateway: openclaw.Gateway) -> None:
    resp = await raw_post(gateway, "/hooks/wake", wake_body(agentId="nope"))
    assert (resp.status, resp.json()) == (400, {"ok": False, "error": 'unknown agentId "nope"'})
    assert resp.content_type == "application/json; charset=utf-8"
    resp = await raw_post(gateway, "/hooks/wake", {"mode": "now"})
    assert (resp.status, resp.json()) == (400, {"ok": False, "error": "text required"})


# ---------------------------------------------------------------------------
# /hooks/agent
# ---------------------------------------------------------------------------


async def test_agent_spec_body_is_admitted_under_hook_session(gateway: openclaw.Gateway) -> None:
    session_name = f"order-{uuid.uuid4().hex[:12]}"
    message = f"agent message {uuid.uuid4().hex}"
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            gateway.url + "/hooks/agent",
            json=agent_body(session_name, message),
            headers=gateway.auth_headers(),
        ) as resp,
    ):
        assert resp.status == 200
        assert resp.content_type == "application/json"
        data = await resp.json()
    assert set(data) == {"ok", "runId"} and data["ok"] is True
    assert len(data["runId"]) == RUN_ID_LEN

    run = await asyncio.to_thread(gateway.wait_for_hook_run, data["runId"], 60)
    assert run.status == "ok"
    assert run.source_path == "/hooks/agent"
    assert run.agent_id == "main" and run.name == "Webhook"
    assert run.logical_session_key == f"hook:{session_name}"
    assert run.session_key == f"agent:main:hook:{session_name}"

    row = await asyncio.to_thread(gateway.wait_for_session, f"hook:{session_name}")
    assert row.session_id == run.session_id
    assert row.external_source == "webhook"

    assert gateway.model is not None
    req = await asyncio.to_thread(gateway.model.wait_for, message, 30)
    text = "\n".join(req.texts("user"))
    assert "EXTERNAL_UNTRUSTED_CONTENT" in text and "Task: Webhook" in text
    assert f"session=agent:main:hook:{session_name}" in text


async def test_persistent_session_keeps_context(gateway: openclaw.Gateway) -> None:
    session_name = f"persist-{uuid.uuid4().hex[:12]}"
    first, second = (f"turn-{i}-{uuid.uuid4().hex}" for i in (1, 2))
    runs = []
    for message in (first, second):
        resp = await raw_post(gateway, "/hooks/agent", agent_body(session_name, message))
        assert resp.status == 200
        run_id = resp.json()["runId"]
        runs.append(await asyncio.to_thread(gateway.wait_for_hook_run, run_id, 60))
    assert runs[0].session_id == runs[1].session_id
    assert gateway.model is not None
    req = await asyncio.to_thread(gateway.model.wait_for, second, 30)
    assert req.contains(first)  # the earlier turn is in the context


async def test_stored_session_key_is_lower_cased(gateway: openclaw.Gateway) -> None:
    session_name = f"MiXeD-{uuid.uuid4().hex[:8]}"
    resp = await raw_post(gateway, "/hooks/agent", agent_body(session_name))
    assert resp.status == 200
    run = await asyncio.to_thread(gateway.wait_for_hook_run, resp.json()["runId"], 60)
    assert run.logical_session_key == f"hook:{session_name}"
    assert run.session_key == f"agent:main:hook:{session_name.lower()}"


@pytest.mark.slow
async def test_busy_persistent_session_gives_503_after_15_seconds(
    gateway: openclaw.Gateway,
) -> None:
    # Runs on one session key are serialized through completion: while a run
    # is busy (here: a slow model), the next request for that key waits for
    # admission for 15 s and then gets 503. Another key is admitted at once.
    # The sidecar's 20 s openclaw timeout must stay above those 15 s.
    assert gateway.model is not None
    session_name = f"busy-{uuid.uuid4().hex[:8]}"
    with gateway.model.slowed(60):
        first = await raw_post(gateway, "/hooks/agent", agent_body(session_name, "first"))
        assert first.status == 200
        await asyncio.to_thread(gateway.model.wait_for, "first", 30)  # the run is busy now
        started = time.monotonic()
        second, other = await asyncio.gather(
            raw_post(gateway, "/hooks/agent", agent_body(session_name, "second")),
            raw_post(gateway, "/hooks/agent", agent_body(f"{session_name}-other", "other")),
        )
        waited = time.monotonic() - started
    assert other.status == 200
    assert second.status == 503
    assert second.content_type == "application/json; charset=utf-8"
    data = second.json()
    assert data["ok"] is False
    assert data["error"] == "hook agent run did not start before admission timeout"
    assert len(data["runId"]) == RUN_ID_LEN
    assert 14.0 <= waited <= 18.0


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (agent_body("x", agentId="nope"), 'unknown agentId "nope"'),
        ({**agent_body("x"), "sessionKey": "other:x"}, "sessionKey must start with one of: hook:"),
        (
            {k: v for k, v in agent_body("x").items() if k != "sessionKey"},
            "sessionKey is required when sessionMode is persistent",
        ),
        (agent_body("x", sessionMode="sticky"), "sessionMode must be isolated or persistent"),
        ({k: v for k, v in agent_body("x").items() if k != "message"}, "message required"),
    ],
)
async def test_agent_policy_errors_are_json_400(
    gateway: openclaw.Gateway, body: dict[str, object], error: str
) -> None:
    resp = await raw_post(gateway, "/hooks/agent", body)
    assert resp.status == 400
    assert resp.content_type == "application/json; charset=utf-8"
    assert resp.json() == {"ok": False, "error": error}


async def test_session_prefix_check_is_case_insensitive(gateway: openclaw.Gateway) -> None:
    resp = await raw_post(
        gateway, "/hooks/agent", {**agent_body("x"), "sessionKey": f"HOOK:{uuid.uuid4().hex[:8]}"}
    )
    assert resp.status == 200


async def test_idempotency_key_replays_the_run(gateway: openclaw.Gateway) -> None:
    session_name = f"idem-{uuid.uuid4().hex[:8]}"
    key = f"idem-{uuid.uuid4().hex}"
    body = agent_body(session_name)
    one = await raw_post(gateway, "/hooks/agent", body, [("Idempotency-Key", key)])
    two = await raw_post(gateway, "/hooks/agent", body, [("Idempotency-Key", key)])
    other = await raw_post(
        gateway, "/hooks/agent", {**body, "message": "changed"}, [("Idempotency-Key", key)]
    )
    plain = await raw_post(gateway, "/hooks/agent", body)
    ids = [r.json()["runId"] for r in (one, two, other, plain)]
    assert ids[0] == ids[1]
    assert len({ids[0], ids[2], ids[3]}) == 3
    # keys over 256 characters are ignored, not refused
    long_key = [("Idempotency-Key", "k" * 300)]
    a = await raw_post(gateway, "/hooks/agent", body, long_key)
    b = await raw_post(gateway, "/hooks/agent", body, long_key)
    assert a.status == b.status == 200
    assert a.json()["runId"] != b.json()["runId"]


# ---------------------------------------------------------------------------
# Authentication and request hygiene
# ---------------------------------------------------------------------------


async def test_missing_or_wrong_token_is_plain_text_401(gateway: openclaw.Gateway) -> None:
    for headers in (
        [],
        [("Authorization", "Bearer wrong-token")],
        [("Authorization", f"Basic {gateway.hooks_token}")],
    ):
        resp = await raw_post(gateway, "/hooks/agent", agent_body("x"), headers, auth=False)
        assert (resp.status, resp.body) == (401, b"Unauthorized"), headers
        assert resp.content_type == "text/plain; charset=utf-8"
        assert resp.header("WWW-Authenticate") is None


async def test_bearer_scheme_is_case_insensitive(gateway: openclaw.Gateway) -> None:
    resp = await raw_post(
        gateway,
        "/hooks/wake",
        wake_body(),
        [("Authorization", f"bearer {gateway.hooks_token}")],
        auth=False,
    )
    assert resp.status == 200


async def test_duplicated_authorization_first_one_wins(gateway: openclaw.Gateway) -> None:
    # The gateway does not refuse two Authorization headers (Node keeps the
    # first): the sidecar must send exactly one.
    good, bad = f"Bearer {gateway.hooks_token}", "Bearer wrong-token"
    resp = await raw_post(
        gateway,
        "/hooks/wake",
        wake_body(),
        [("Authorization", good), ("Authorization", bad)],
        auth=False,
    )
    assert resp.status == 200
    resp = await raw_post(
        gateway,
        "/hooks/wake",
        wake_body(),
        [("Authorization", bad), ("Authorization", good)],
        auth=False,
    )
    assert resp.status == 401


@pytest.mark.parametrize(
    "header",
    [
        ("X-Forwarded-For", "127.0.0.1"),
        ("Forwarded", "for=127.0.0.1"),
        ("X-Real-IP", "127.0.0.1"),
        ("X-Forwarded-Proto", "http"),
        ("X-Forwarded-Host", "example"),
    ],
)
async def test_forwarding_headers_are_refused(
    gateway: openclaw.Gateway, header: tuple[str, str]
) -> None:
    resp = await raw_post(gateway, "/hooks/agent", agent_body("x"), [header])
    assert resp.status == 403
    assert resp.content_type == "application/json; charset=utf-8"
    assert resp.json()["error"]["type"] == "proxy_attribution_required"


async def test_token_query_parameter_is_plain_text_400(gateway: openclaw.Gateway) -> None:
    resp = await raw_post(gateway, f"/hooks/wake?token={gateway.hooks_token}", wake_body())
    assert resp.status == 400
    assert resp.content_type == "text/plain; charset=utf-8"
    assert b"query parameters are not allowed" in resp.body


async def test_unknown_path_and_method(gateway: openclaw.Gateway) -> None:
    resp = await raw_post(gateway, "/hooks/unknown", wake_body())
    assert (resp.status, resp.body, resp.content_type) == (
        404,
        b"Not Found",
        "text/plain; charset=utf-8",
    )
    resp = await raw_post(gateway, "/hooks/unknown", wake_body(), auth=False)
    assert resp.status == 401  # auth comes before path resolution
    async with aiohttp.ClientSession() as session, session.get(gateway.url + "/hooks/wake") as get:
        assert get.status == 405
        assert get.headers["Allow"] == "POST"
        assert get.content_type == "text/plain"
        assert await get.text() == "Method Not Allowed"


async def test_content_type_is_not_enforced(gateway: openclaw.Gateway) -> None:
    resp = await raw_post(gateway, "/hooks/wake", wake_body(), [("Content-Type", "text/plain")])
    assert resp.status == 200


async def test_body_limit_is_256_kib(gateway: openclaw.Gateway) -> None:
    limit = 262_144
    overhead = len(json.dumps(wake_body(text="")).encode())
    at_limit = json.dumps(wake_body(text="a" * (limit - overhead))).encode()
    assert len(at_limit) == limit
    resp = await raw_post(gateway, "/hooks/wake", at_limit)
    assert resp.status == 200
    resp = await raw_post(gateway, "/hooks/wake", at_limit[:-2] + b'a"}')
    assert resp.status == 413
    assert resp.json() == {"ok": False, "error": "payload too large"}
    assert resp.header("Connection") == "close"


async def test_readyz(gateway: openclaw.Gateway) -> None:
    async with aiohttp.ClientSession() as session, session.get(gateway.url + "/readyz") as resp:
        assert resp.status == 200
        data = await resp.json()
    assert data["ready"] is True and data["failing"] == []


@pytest.mark.slow
async def test_keep_alive_idle_connections_close_after_about_six_seconds(
    gateway: openclaw.Gateway,
) -> None:
    body = json.dumps(wake_body()).encode()
    request = (
        f"POST /hooks/wake HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {gateway.hooks_token}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body

    async def idle_until_closed() -> float:
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        try:
            writer.write(request)
            resp = await _read_response(reader)
            assert resp.header("Keep-Alive") == "timeout=5"
            start = time.monotonic()
            assert await asyncio.wait_for(reader.read(1), 15) == b""
            return time.monotonic() - start
        finally:
            writer.close()

    async def reuse_after(idle: float) -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        try:
            writer.write(request)
            await _read_response(reader)
            await asyncio.sleep(idle)
            writer.write(request)
            return (await _read_response(reader)).status
        finally:
            writer.close()

    closed_after, reused = await asyncio.gather(idle_until_closed(), reuse_after(4.0))
    assert reused == 200
    # Keep-Alive says 5 s; Node adds a 1 s grace before it closes.
    assert 5.0 <= closed_after <= 7.5


# ---------------------------------------------------------------------------
# Token rotation and the failed-auth throttle (these change gateway state)
# ---------------------------------------------------------------------------


async def test_hooks_token_hot_reload(gateway: openclaw.Gateway) -> None:
    old, new = gateway.hooks_token, os.urandom(32).hex()
    pid = gateway.pid
    seconds = await asyncio.to_thread(gateway.set_hooks_token, new)
    assert seconds < 5
    assert gateway.pid == pid and gateway.is_running()  # no restart
    resp = await raw_post(gateway, "/hooks/wake", wake_body())  # uses the new token
    assert resp.status == 200
    resp = await raw_post(
        gateway, "/hooks/wake", wake_body(), [("Authorization", f"Bearer {old}")], auth=False
    )
    assert resp.status == 401


async def test_failed_auth_throttle_and_reset(gateway: openclaw.Gateway) -> None:
    # Start from a clean count: a success resets it.
    assert (await raw_post(gateway, "/hooks/wake", wake_body())).status == 200
    wrong = [("Authorization", "Bearer wrong-token")]
    statuses = [
        (await raw_post(gateway, "/hooks/wake", wake_body(), wrong, auth=False)).status
        for _ in range(21)
    ]
    assert statuses == [401] * 20 + [429]
    throttled = await raw_post(gateway, "/hooks/wake", wake_body(), wrong, auth=False)
    assert (throttled.status, throttled.body) == (429, b"Too Many Requests")
    assert throttled.header("Retry-After") == "60"
    assert throttled.content_type == "text/plain; charset=utf-8"
    # A valid token still works while throttled, and resets the count.
    assert (await raw_post(gateway, "/hooks/wake", wake_body())).status == 200
    again = await raw_post(gateway, "/hooks/wake", wake_body(), wrong, auth=False)
    assert again.status == 401


def test_invalid_config_reload_is_refused_and_old_config_kept(gateway: openclaw.Gateway) -> None:
    def break_hooks(config: dict[str, Any]) -> None:
        config["hooks"]["bogus"] = 1  # hooks accepts no unknown keys
        config["hooks"]["token"] = "never-applied-" + "x" * 40

    with pytest.raises(ValueError, match='Unrecognized key: "bogus"'):
        gateway.update_config(break_hooks)
    assert gateway.is_running()
    assert gateway.token_accepted(gateway.hooks_token)
    gateway.write_config(gateway.build_config())  # a valid file again for later readers
