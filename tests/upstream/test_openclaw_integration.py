"""The sidecar in front of a REAL OpenClaw gateway (npm ``openclaw@2026.9.6``).

One gateway for the whole module (installed once into the test cache, ~10-25 s
to start, ~1 GB), configured as the README's "In front of a real OpenClaw
gateway" says: ``allowRequestSessionKey: true``, ``allowedSessionKeyPrefixes:
["hook:"]``, ``allowedAgentIds: ["main"]`` (a second agent, ``ops``, exists but
is not allowed). Its model is the helper's stub, so agent runs complete and the
tests can see on the gateway's side what arrived: its run records (runId, agent,
session), its session table and the text its model was sent.

Locally these tests are skipped without npm (or with OPENCLAW_SKIP=1); with
``CI`` set they fail instead. The tests that change the gateway (token rotation,
shutdown) come last, in file order.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support import openclaw
from support.common import SECRET, MakeSidecar, Sidecar, free_port, write_config

from sidecar.admin import create_admin_app

pytestmark = [pytest.mark.openclaw, pytest.mark.slow]

AGENT = "my-agent"  # -> the gateway's agent "main"
OPS = "ops-agent"  # -> the gateway's agent "ops", which hooks.allowedAgentIds leaves out
RUN_WAIT = 60.0


@pytest.fixture(scope="module")
def gateway() -> Iterator[openclaw.Gateway]:
    with openclaw.gateway_for_tests(agents=("main", "ops"), allowed_agent_ids=("main",)) as gw:
        yield gw


def sidecar_doc(gw: openclaw.Gateway, token_file: Path, **sidecar: Any) -> dict[str, Any]:
    """The README's sidecar config for a gateway on ``gw.url``."""
    return {
        "webhooks": {
            "enabled": True,
            "secret": {"env": "TEST_WEBHOOK_SECRET"},
            "agents": {
                AGENT: {
                    "agentId": "main",
                    "sessionKey": "webhook-session",
                    "sessionKeyPrefixes": ["order-"],
                    "wakeText": f"wake-{uuid.uuid4().hex}",
                },
                OPS: {"agentId": "ops"},
            },
        },
        "sidecar": {
            "upstream": {"url": gw.url, "protocol": "openclaw", "token": {"file": str(token_file)}},
            **sidecar,
        },
    }


@pytest.fixture
def token_file(short_tmp: Path, gateway: openclaw.Gateway) -> Path:
    path = short_tmp / "openclaw-hooks-token"
    path.write_text(gateway.hooks_token + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
async def sc(make_sidecar: MakeSidecar, gateway: openclaw.Gateway, token_file: Path) -> Sidecar:
    return await make_sidecar(sidecar_doc(gateway, token_file))


def start_process(
    sidecar_process: Any, gw: openclaw.Gateway, token_file: Path, folder: Path
) -> tuple[Any, int, int]:
    """``webhook-sidecar run`` with the README's config; returns it, its public and admin port."""
    port, admin_port = free_port(), free_port()
    doc = sidecar_doc(gw, token_file, listen=f"127.0.0.1:{port}")
    doc["sidecar"]["admin"] = {"listen": f"127.0.0.1:{admin_port}"}
    return sidecar_process(write_config(folder, doc), admin_port), port, admin_port


def marker(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex}"


async def run_of(gw: openclaw.Gateway, run_id: str) -> openclaw.HookRun:
    return await asyncio.to_thread(gw.wait_for_hook_run, run_id, RUN_WAIT)


async def model_saw(gw: openclaw.Gateway, needle: str) -> str:
    assert gw.model is not None
    request = await asyncio.to_thread(gw.model.wait_for, needle, RUN_WAIT)
    return "\n".join(request.texts())


def model_texts(gw: openclaw.Gateway) -> str:
    assert gw.model is not None
    return "\n".join(text for req in gw.model.requests for text in req.texts())


# --------------------------------------------------------------------------- accepted calls


async def test_wake_is_200_and_its_text_reaches_the_agent(
    sc: Sidecar, gateway: openclaw.Gateway
) -> None:
    status, _, body = await sc.post("/hooks/wake", {"agent": AGENT})
    assert status == 200, body
    assert body["status"] == "ok" and "runId" not in body  # the gateway's wake has no runId
    wake_text = sc.state.settings.webhooks.agents[AGENT].wake_text
    seen = await model_saw(gateway, wake_text)
    assert f"] {wake_text}" in seen  # "System: [<time>] <text>" in the main session's turn


async def test_agent_call_runs_in_the_agents_hook_session(
    sc: Sidecar, gateway: openclaw.Gateway
) -> None:
    message = marker("deploy")
    status, _, body = await sc.post("/hooks/agent", {"agent": AGENT, "message": message})
    assert status == 200, body
    assert body["session"] == "webhook-session" and len(body["runId"]) == 36

    run = await run_of(gateway, body["runId"])
    assert (run.status, run.agent_id, run.name) == ("ok", "main", "Webhook")
    assert run.logical_session_key == "hook:webhook-session"
    assert run.session_key == "agent:main:hook:webhook-session"
    row = await asyncio.to_thread(gateway.wait_for_session, "hook:webhook-session")
    assert row.external_source == "webhook"  # marked as external, untrusted content

    seen = await model_saw(gateway, message)
    assert "EXTERNAL_UNTRUSTED_CONTENT" in seen and "Task: Webhook" in seen
    assert "session=agent:main:hook:webhook-session" in seen


async def test_per_request_session_key_arrives_under_hook_prefix(
    sc: Sidecar, gateway: openclaw.Gateway
) -> None:
    session = f"order-{uuid.uuid4().hex[:10]}"
    first, second = marker("first"), marker("second")
    runs = []
    for message in (first, second):
        status, _, body = await sc.post(
            "/hooks/agent", {"agent": AGENT, "message": message, "sessionKey": session}
        )
        assert status == 200, body
        assert body["session"] == session
        runs.append(await run_of(gateway, body["runId"]))
    assert {r.logical_session_key for r in runs} == {f"hook:{session}"}
    assert runs[0].session_id == runs[1].session_id  # persistent: one conversation
    row = await asyncio.to_thread(gateway.wait_for_session, f"hook:{session}")
    assert row.session_id == runs[1].session_id
    seen = await model_saw(gateway, second)
    assert first in seen  # the earlier turn is in the context


async def test_mixed_case_session_key_is_sent_as_the_gateway_stores_it(
    sc: Sidecar, gateway: openclaw.Gateway
) -> None:
    session = f"order-MiXeD-{uuid.uuid4().hex[:6]}"
    status, _, body = await sc.post(
        "/hooks/agent", {"agent": AGENT, "message": marker("case"), "sessionKey": session}
    )
    assert status == 200 and body["session"] == session
    run = await run_of(gateway, body["runId"])
    assert run.logical_session_key == f"hook:{session.lower()}"
    assert run.session_key == f"agent:main:hook:{session.lower()}"


async def test_same_idempotency_key_twice_starts_one_run(
    sc: Sidecar, gateway: openclaw.Gateway
) -> None:
    """The sidecar answers the repeat itself (docs/dedup.md): 200 duplicate, not sent
    again, so the gateway holds one run for the key; a call without a key is a new run."""
    call = {
        "agent": AGENT,
        "message": marker("idem"),
        "sessionKey": f"order-{uuid.uuid4().hex[:8]}",
    }
    key = {"Idempotency-Key": marker("key")}
    one = await sc.post("/hooks/agent", call, headers=key)
    two = await sc.post("/hooks/agent", call, headers=key)
    other = await sc.post("/hooks/agent", call)  # no key: a new run
    assert one[0] == two[0] == other[0] == 200
    assert two[2]["duplicate"] is True and "runId" not in two[2]
    assert one[2]["runId"] != other[2]["runId"]
    await run_of(gateway, other[2]["runId"])
    runs = [r.run_id for r in gateway.hook_runs()]
    assert runs.count(one[2]["runId"]) == 1 and runs.count(other[2]["runId"]) == 1


async def test_client_forwarding_headers_are_not_passed_on(
    sc: Sidecar, gateway: openclaw.Gateway
) -> None:
    # The gateway answers 403 to any of these; the sidecar must not pass them on.
    headers = {
        "X-Forwarded-For": "203.0.113.7",
        "Forwarded": "for=203.0.113.7",
        "X-Real-IP": "203.0.113.7",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "example.org",
    }
    status, _, body = await sc.post(
        "/hooks/agent", {"agent": AGENT, "message": "hi"}, headers=headers
    )
    assert status == 200, body
    await run_of(gateway, body["runId"])


async def test_large_non_ascii_message_the_sidecar_accepts_is_accepted(
    make_sidecar: Any, gateway: openclaw.Gateway, token_file: Path
) -> None:
    doc = sidecar_doc(
        gateway, token_file, limits={"maxBodyBytes": 250_000, "maxMessageChars": 250_000}
    )
    sidecar = await make_sidecar(doc)
    message = "€" * 80_000  # 240,000 bytes as UTF-8; the gateway takes at most 262,144
    raw = json.dumps(
        {"agent": AGENT, "message": message, "sessionKey": f"order-{uuid.uuid4().hex[:8]}"},
        ensure_ascii=False,
    ).encode()
    status, _, body = await sidecar.post("/hooks/agent", raw=raw)
    assert status == 200, body
    await run_of(gateway, body["runId"])


# --------------------------------------------------------------------------- refused calls


async def test_what_the_sidecar_refuses_never_reaches_the_gateway(
    sc: Sidecar, gateway: openclaw.Gateway
) -> None:
    refused: list[tuple[int, str, dict[str, Any]]] = []

    async def refuse(expected: int, code: str, **post: Any) -> None:
        status, _, body = await sc.post("/hooks/agent", **post)
        assert (status, body["error"]) == (expected, code), body
        refused.append((status, code, post))

    def call(**extra: Any) -> dict[str, Any]:
        return {"agent": AGENT, "message": marker("refused"), **extra}

    await refuse(401, "unauthorized", body=call(), token="0" * 64)
    await refuse(401, "unauthorized", body=call(), token=None)
    await refuse(
        401, "unauthorized", body=call(), token=gateway.hooks_token
    )  # its token is not ours
    await refuse(404, "agent_not_found", body={**call(), "agent": "main"})
    await refuse(403, "session_key_not_allowed", body=call(sessionKey="admin-1"))
    await refuse(400, "invalid_request", body=call(sessionKey="order-1", extra="x"))
    await refuse(415, "unsupported_media_type", body=call(), content_type="text/plain")
    markers = [p["body"]["message"] for _, _, p in refused]

    # A call that passes, sent after them: once its run is done, any of the refused
    # ones that had reached the gateway would have been admitted before it.
    sentinel = call(sessionKey=f"order-{uuid.uuid4().hex[:8]}")
    status, _, body = await sc.post("/hooks/agent", sentinel)
    assert status == 200
    await run_of(gateway, body["runId"])
    await model_saw(gateway, sentinel["message"])
    texts = model_texts(gateway)
    assert [m for m in markers if m in texts] == []
    assert "hook:admin-1" not in {r.logical_session_key for r in gateway.hook_runs()}


async def test_agent_the_gateway_does_not_allow_is_502(
    sc: Sidecar, gateway: openclaw.Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    status, _, body = await sc.post("/hooks/agent", {"agent": OPS, "message": "hello"})
    assert (status, body["error"]) == (502, "upstream_error")
    [record] = [r for r in caplog.records if hasattr(r, "upstreamStatus")]
    assert record.upstreamStatus == 400
    assert "allowedAgentIds" in record.upstreamError  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- readiness


async def test_readiness_follows_the_gateway(
    sc: Sidecar, gateway: openclaw.Gateway, aiohttp_client: Any
) -> None:
    admin = await aiohttp_client(create_admin_app(sc.state))
    async with admin.get("/readyz") as resp:
        assert (resp.status, await resp.json()) == (200, {"status": "ok"})


async def test_real_process_configured_like_the_readme(
    sidecar_process: Any, gateway: openclaw.Gateway, token_file: Path, short_tmp: Path
) -> None:
    proc, port, admin_port = start_process(sidecar_process, gateway, token_file, short_tmp)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{admin_port}/readyz") as resp:
            assert resp.status == 200, await resp.text()
        message = marker("process")
        async with http.post(
            f"http://127.0.0.1:{port}/hooks/agent",
            json={"agent": AGENT, "message": message, "sessionKey": "order-process"},
            headers={"Authorization": f"Bearer {SECRET}"},
        ) as resp:
            assert resp.status == 200, await resp.text()
            run_id = (await resp.json())["runId"]
    run = await run_of(gateway, run_id)
    assert run.logical_session_key == "hook:order-process"
    await model_saw(gateway, message)
    assert gateway.hooks_token not in proc.output() and SECRET not in proc.output()


# --------------------------------------------------------------------------- token rotation


class Load:
    """Calls through a sidecar back to back until stopped; remembers every status."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.statuses: list[int] = []
        self.errors: list[str] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        async with aiohttp.ClientSession() as http:
            while not self._stop.is_set():
                async with http.post(
                    self.url,
                    json={"agent": AGENT},
                    headers={"Authorization": f"Bearer {SECRET}"},
                ) as resp:
                    self.statuses.append(resp.status)
                    if resp.status != 200:
                        self.errors.append(await resp.text())
                await asyncio.sleep(0.01)

    async def __aenter__(self) -> Load:
        self._task = asyncio.ensure_future(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task


async def test_rotating_the_gateway_token_file_first_fails_no_call(
    sc: Sidecar, gateway: openclaw.Gateway, token_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    new = os.urandom(32).hex()
    async with Load(str(sc.client.make_url("/hooks/wake"))) as load:
        await asyncio.sleep(0.3)
        token_file.write_text(new + "\n")  # 1. the sidecar's token file (no reload here)
        await asyncio.sleep(0.3)
        await asyncio.to_thread(gateway.set_hooks_token, new)  # 2. the gateway's hooks.token
        switched = len(load.statuses)
        await asyncio.sleep(0.5)
    assert load.errors == []
    assert len(load.statuses) > switched + 5  # calls went on after the old token died
    switches = [r.getMessage() for r in caplog.records if "works and is used" in r.getMessage()]
    assert switches == [
        "the OpenClaw gateway refused the upstream token sent; "
        "the token file works and is used from now on"
    ]


async def test_rotating_with_a_sidecar_reload_in_between_fails_no_call(
    sidecar_process: Any, gateway: openclaw.Gateway, token_file: Path, short_tmp: Path
) -> None:
    """A real sidecar process, reloaded with SIGHUP after its token file changed and
    before the gateway's hooks.token does: it keeps the previous token at hand."""
    proc, port, _ = start_process(sidecar_process, gateway, token_file, short_tmp)
    new = os.urandom(32).hex()
    async with Load(f"http://127.0.0.1:{port}/hooks/wake") as load:
        await asyncio.sleep(0.3)
        token_file.write_text(new + "\n")
        proc.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while not any(line.get("msg") == "config reloaded" for line in proc.json_lines()):
            assert time.monotonic() < deadline, proc.output()
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # calls with the new token, refused, then the previous one
        await asyncio.to_thread(gateway.set_hooks_token, new)
        switched = len(load.statuses)
        await asyncio.sleep(0.5)
    assert load.errors == []
    assert len(load.statuses) > switched + 5
    switches = [x["msg"] for x in proc.json_lines() if "works and is used" in x.get("msg", "")]
    # first the previous token (the gateway still had it), then the file's new one
    assert [m.split("; ")[1].split(" works")[0] for m in switches] == [
        "the previous token",
        "the token file",
    ]
    assert new not in proc.output() and gateway.hooks_token not in proc.output()


async def test_wrong_upstream_token_is_502_and_never_blocks_the_right_one(
    make_sidecar: Any,
    sc: Sidecar,
    gateway: openclaw.Gateway,
    short_tmp: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    wrong_file = short_tmp / "wrong-token"
    wrong_file.write_text(os.urandom(32).hex())
    wrong = await make_sidecar(sidecar_doc(gateway, wrong_file))
    caplog.set_level(logging.INFO)
    # 25 calls: past the gateway's 20-failures-a-minute throttle (its 401s become 429s).
    results = [await wrong.post("/hooks/wake", {"agent": AGENT}) for _ in range(25)]
    assert {(s, b["error"]) for s, _, b in results} == {(502, "upstream_error")}
    loud = [r for r in caplog.records if hasattr(r, "upstreamStatus")]
    assert {r.upstreamStatus for r in loud} == {401, 429}
    assert len(loud) == 2  # rate-limited: one line per kind, not 25
    assert gateway.hooks_token not in caplog.text
    # The gateway takes a valid token while it throttles the address: the right
    # sidecar on the same loopback address is not locked out.
    assert (await sc.post("/hooks/wake", {"agent": AGENT}))[0] == 200


# --------------------------------------------------------------------------- gateway going away


async def test_draining_then_stopped_gateway_is_503_and_not_ready(
    sc: Sidecar, gateway: openclaw.Gateway, aiohttp_client: Any
) -> None:
    """Last: stops the module's gateway. A gateway draining for a restart answers 503;
    so does the sidecar (upstream_unavailable, Retry-After), and /readyz says why."""
    assert gateway.model is not None and gateway.proc is not None
    admin = await aiohttp_client(create_admin_app(sc.state))

    async def ready() -> tuple[int, Any]:
        async with admin.get("/readyz") as resp:
            return resp.status, await resp.json()

    message = marker("slow")
    with gateway.model.slowed(120):  # a run in flight keeps the gateway draining
        status, _, body = await sc.post(
            "/hooks/agent", {"agent": AGENT, "message": message, "sessionKey": "order-drain"}
        )
        assert status == 200
        await model_saw(gateway, message)  # the run is in flight, waiting for the model
        os.killpg(gateway.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while (await ready())[0] == 200:
            assert time.monotonic() < deadline, "the gateway did not start draining"
            await asyncio.sleep(1.1)  # past the readiness cache
        status, body = await ready()
        assert status == 503 and "gateway-draining" in body["reason"], body
        status, headers, body = await sc.post("/hooks/wake", {"agent": AGENT})
        assert (status, body["error"]) == (503, "upstream_unavailable")
        assert headers["Retry-After"].isdigit()
    # The run finishes, the gateway exits: nothing listens any more.
    await asyncio.to_thread(gateway.proc.wait, 60)
    await asyncio.sleep(1.1)
    status, body = await ready()
    assert status == 503 and "not accepting connections" in body["reason"]
    status, headers, body = await sc.post("/hooks/wake", {"agent": AGENT})
    assert (status, body["error"]) == (503, "upstream_unavailable")
    gateway.stop()
