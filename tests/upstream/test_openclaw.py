"""``protocol: "openclaw"`` against a fake gateway on real loopback TCP: what it is sent,
how each of its replies maps to docs/http-api.md, token rotation, readiness from its /readyz.

The fake answers the way docs/openclaw.md says the real one does
(plain-text 401/429, JSON 400/403/413/503, forwarding headers refused before the
token check), so this covers the mapping where the real gateway is not installed;
tests/test_openclaw_integration.py repeats the essentials against the real one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from support.common import AGENT, SECRET, MakeSidecar, Sidecar, base_doc
from support.fake_gateway import (
    FORWARDING,
    NEW_TOKEN,
    THIRD_TOKEN,
    TOKEN,
    FakeGateway,
    openclaw_doc,
)

from sidecar import config
from sidecar.admin import create_admin_app
from sidecar.upstream import make_forwarder, make_pool
from sidecar.upstream import openclaw as oc
from sidecar.upstream.forward import Forwarder
from sidecar.upstream.pool import UpstreamConnectError


@pytest.fixture
def token_file(short_tmp: Path) -> Path:
    path = short_tmp / "upstream-token"
    path.write_text(TOKEN + "\n")
    return path


@pytest.fixture
async def sc(make_sidecar: MakeSidecar, gateway: FakeGateway, token_file: Path) -> Sidecar:
    return await make_sidecar(openclaw_doc(gateway, token_file, sessionKeyPrefixes=["order-"]))


AGENT_CALL = {"agent": AGENT, "message": "deploy finished"}
WAKE_CALL = {"agent": AGENT}


# --------------------------------------------------------------------------- what it is sent


async def test_agent_call_is_exactly_the_spec_body_and_headers(
    sc: Sidecar, gateway: FakeGateway
) -> None:
    status, _, body = await sc.post(
        "/hooks/agent",
        {**AGENT_CALL, "sessionKey": "order-7"},
        headers={"Idempotency-Key": "idem-1", "X-Request-Id": "client-rid-1", "Cookie": "a=b"},
    )
    assert status == 200, body
    [seen] = gateway.hooks
    assert seen.path == "/hooks/agent"
    assert seen.json() == {
        "message": "deploy finished",
        "agentId": AGENT,
        "sessionKey": "hook:order-7",
        "sessionMode": "persistent",
        "name": "Webhook",
    }
    # docs/upstream.md: exactly these headers (plus HTTP framing), Authorization once.
    assert sorted(seen.header_names()) == sorted(
        ["host", "content-length", "authorization", "content-type", "idempotency-key"]
    )
    assert seen.header("Authorization") == f"Bearer {TOKEN}"
    assert seen.header("Content-Type") == "application/json"
    assert seen.header("Idempotency-Key") == "idem-1"
    assert seen.header("Host") == "127.0.0.1"
    assert body["runId"] and body["session"] == "order-7"


async def test_wake_body_uses_the_agent_defaults(sc: Sidecar, gateway: FakeGateway) -> None:
    status, _, body = await sc.post("/hooks/wake", WAKE_CALL)
    assert status == 200 and "runId" not in body  # the gateway's wake has no runId
    [seen] = gateway.hooks
    assert seen.path == "/hooks/wake"
    assert seen.json() == {"text": f"Webhook wake for {AGENT}", "mode": "now", "agentId": AGENT}
    assert "idempotency-key" not in seen.header_names()


async def test_configured_agent_id_and_wake_text(
    make_sidecar: Any, gateway: FakeGateway, token_file: Path
) -> None:
    doc = openclaw_doc(gateway, token_file, agentId="main", wakeText="New alerts: check the queue")
    sidecar = await make_sidecar(doc)
    assert (await sidecar.post("/hooks/wake", WAKE_CALL))[0] == 200
    assert (await sidecar.post("/hooks/agent", AGENT_CALL))[0] == 200
    wake, agent = (s.json() for s in gateway.hooks)
    assert wake == {"text": "New alerts: check the queue", "mode": "now", "agentId": "main"}
    assert agent["agentId"] == "main" and agent["sessionKey"] == "hook:webhook-session"


async def test_client_forwarding_headers_and_credentials_never_reach_it(
    sc: Sidecar, gateway: FakeGateway
) -> None:
    client_headers = {
        "X-Forwarded-For": "203.0.113.9",
        "Forwarded": "for=203.0.113.9",
        "X-Real-IP": "203.0.113.9",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "evil.example",
        "X-OpenClaw-Token": "client-chosen",
        "Cookie": "session=1",
    }
    status, _, body = await sc.post("/hooks/agent", AGENT_CALL, headers=client_headers)
    assert status == 200, body  # the fake, like the real gateway, would answer 403
    [seen] = gateway.hooks
    assert not set(seen.header_names()) & {*FORWARDING, "x-openclaw-token", "cookie"}
    assert SECRET not in str(seen.raw_headers)


async def test_session_key_is_sent_lower_cased(sc: Sidecar, gateway: FakeGateway) -> None:
    # The gateway stores keys lower-cased; the sidecar sends the form it will store.
    status, _, body = await sc.post("/hooks/agent", {**AGENT_CALL, "sessionKey": "order-AbC-9"})
    assert status == 200
    assert gateway.hooks[0].json()["sessionKey"] == "hook:order-abc-9"
    assert body["session"] == "order-AbC-9"  # the client's answer keeps its own spelling


async def test_non_ascii_message_is_sent_as_utf8_not_escapes(
    make_sidecar: Any, gateway: FakeGateway, token_file: Path
) -> None:
    doc = openclaw_doc(gateway, token_file)
    doc["sidecar"]["limits"] = {"maxBodyBytes": 200_000, "maxMessageChars": 200_000}
    sidecar = await make_sidecar(doc)
    message = "€" * 60_000  # 180,000 bytes in UTF-8; as \u20ac escapes 360,000: over 256 KiB
    raw = json.dumps({"agent": AGENT, "message": message}, ensure_ascii=False).encode()
    assert (await sidecar.post("/hooks/agent", raw=raw))[0] == 200
    [seen] = gateway.hooks
    assert len(seen.body) < 180_200 and seen.json()["message"] == message


# --------------------------------------------------------------------------- its replies


async def test_wake_success_without_ok_true_is_502(sc: Sidecar, gateway: FakeGateway) -> None:
    async def not_ok(request: web.Request) -> web.StreamResponse:
        return web.json_response({"ok": False})

    gateway.reply = not_ok
    status, _, body = await sc.post("/hooks/wake", WAKE_CALL)
    assert (status, body["error"]) == (502, "upstream_error")


async def test_non_json_2xx_is_502(sc: Sidecar, gateway: FakeGateway) -> None:
    async def text(request: web.Request) -> web.StreamResponse:
        return web.Response(text="OK")

    gateway.reply = text
    assert (await sc.post("/hooks/agent", AGENT_CALL))[0] == 502


@pytest.mark.parametrize(
    ("payload", "retry_after", "expected"),
    [
        # admission timeout while the same persistent session is busy (15 s)
        (
            {
                "ok": False,
                "error": "hook agent run did not start before admission timeout",
                "runId": "r",
            },
            None,
            "5",
        ),
        # draining for a restart
        (
            {
                "error": {
                    "message": "Gateway is temporarily unavailable",
                    "type": "service_unavailable",
                }
            },
            "12",
            "12",
        ),
    ],
)
async def test_503_is_upstream_unavailable_with_retry_after(
    sc: Sidecar, gateway: FakeGateway, payload: Any, retry_after: str | None, expected: str
) -> None:
    async def busy(request: web.Request) -> web.StreamResponse:
        headers = {"Retry-After": retry_after} if retry_after else None
        return web.json_response(payload, status=503, headers=headers)

    gateway.reply = busy
    status, headers, body = await sc.post("/hooks/agent", AGENT_CALL)
    assert (status, body["error"], headers["Retry-After"]) == (
        503,
        "upstream_unavailable",
        expected,
    )
    assert len(gateway.hooks) == 1  # no retry of our own: the client decides


async def test_wrong_upstream_token_is_502_once_logged_and_never_retried(
    sc: Sidecar, gateway: FakeGateway, caplog: pytest.LogCaptureFixture
) -> None:
    gateway.token = NEW_TOKEN  # the gateway's hooks.token differs from ours; the file too
    caplog.set_level(logging.INFO)
    results = [await sc.post("/hooks/agent", AGENT_CALL) for _ in range(4)]
    assert [(s, b["error"]) for s, _, b in results] == [(502, "upstream_error")] * 4
    assert "configuration is wrong" in results[0][2]["message"]
    assert len(gateway.hooks) == 4  # one attempt per call: nothing else to try
    loud = [
        r for r in caplog.records if r.levelno == logging.ERROR and "hooks.token" in r.getMessage()
    ]
    assert len(loud) == 1  # rate-limited: one line for four failures
    assert loud[0].upstreamStatus == 401  # type: ignore[attr-defined]
    assert TOKEN not in caplog.text and NEW_TOKEN not in caplog.text
    audit = sc.audit.entries()[-1]
    assert (audit["outcome"], audit["error"]) == ("upstream_failed", "upstream_error")


@pytest.mark.parametrize(
    ("status", "reply", "hint"),
    [
        (
            429,
            web.Response(status=429, text="Too Many Requests", headers={"Retry-After": "60"}),
            "throttling",
        ),
        (
            403,
            web.json_response(
                {"error": {"message": "Proxy client attribution is required."}}, status=403
            ),
            "proxied",
        ),
        (
            400,
            web.json_response(
                {"ok": False, "error": "agentId is not allowed by hooks.allowedAgentIds"},
                status=400,
            ),
            "allowedAgentIds",
        ),
        (404, web.Response(status=404, text="Not Found"), "hooks.path"),
        (
            413,
            web.json_response({"ok": False, "error": "payload too large"}, status=413),
            "maxBodyBytes",
        ),
        (500, web.json_response({"ok": False, "error": "boom"}, status=500), "answered 500"),
    ],
)
async def test_other_refusals_are_502_with_an_operator_hint(
    sc: Sidecar,
    gateway: FakeGateway,
    caplog: pytest.LogCaptureFixture,
    status: int,
    reply: web.Response,
    hint: str,
) -> None:
    async def refuse(request: web.Request) -> web.StreamResponse:
        return reply

    gateway.reply = refuse
    caplog.set_level(logging.INFO)
    code, headers, body = await sc.post("/hooks/agent", AGENT_CALL)
    assert (code, body["error"]) == (502, "upstream_error")
    assert "Retry-After" not in headers  # 502 means "fix the config", not "come back later"
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert hint in record.getMessage() and record.upstreamStatus == status  # type: ignore[attr-defined]
    assert "allowedAgentIds" not in body["message"]  # details go to the log, not the caller
    assert len(gateway.hooks) == 1  # the file holds the token refused: nothing to retry


async def test_gateway_error_text_in_the_log_is_printable_and_bounded(
    sc: Sidecar, gateway: FakeGateway, caplog: pytest.LogCaptureFixture
) -> None:
    async def noisy(request: web.Request) -> web.StreamResponse:
        return web.json_response(
            {"ok": False, "error": "bad\r\nInjected: yes" + "x" * 500}, status=400
        )

    gateway.reply = noisy
    caplog.set_level(logging.INFO)
    await sc.post("/hooks/agent", AGENT_CALL)
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    detail = record.upstreamError  # type: ignore[attr-defined]
    assert detail.startswith("bad  Injected") and len(detail) == 200


def test_loud_log_holds_back_repeats_and_counts_them(caplog: pytest.LogCaptureFixture) -> None:
    loud = oc.LoudLog(interval=0.2)
    caplog.set_level(logging.INFO)
    assert loud.emit(logging.ERROR, "401", "refused")
    assert not loud.emit(logging.ERROR, "401", "refused")
    assert loud.emit(logging.ERROR, "403", "other kind")  # kinds are separate
    time.sleep(0.25)
    assert loud.emit(logging.ERROR, "401", "refused")
    counts = [(r.getMessage(), r.suppressed) for r in caplog.records]  # type: ignore[attr-defined]
    assert counts == [("refused", 0), ("other kind", 0), ("refused", 1)]


# --------------------------------------------------------------------------- token rotation


async def test_token_file_rewritten_before_the_gateway_switches_no_call_fails(
    sc: Sidecar, gateway: FakeGateway, token_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The documented order: the sidecar's token file first, then the gateway's
    hooks.token. No reload of the sidecar needed, no call fails."""
    assert (await sc.post("/hooks/agent", AGENT_CALL))[0] == 200
    token_file.write_text(NEW_TOKEN + "\n")
    assert (await sc.post("/hooks/agent", AGENT_CALL))[0] == 200  # still the old one in use
    gateway.token = NEW_TOKEN  # the gateway's hot reload: the old token dies at once
    caplog.set_level(logging.INFO)
    assert (await sc.post("/hooks/agent", AGENT_CALL))[0] == 200
    assert (await sc.post("/hooks/agent", AGENT_CALL))[0] == 200
    sent = [s.header("Authorization") for s in gateway.hooks]
    old, new = f"Bearer {TOKEN}", f"Bearer {NEW_TOKEN}"
    assert sent == [old, old, old, new, new]  # one refused attempt, then the new token
    assert any("token file works" in r.getMessage() for r in caplog.records)


async def test_sidecar_reloaded_before_the_gateway_switches_no_call_fails(
    sc: Sidecar, gateway: FakeGateway, token_file: Path, short_tmp: Path
) -> None:
    """The sidecar's reload (file watcher or SIGHUP) may land before the gateway's:
    the previous config's token stays at hand until the gateway moves."""
    token_file.write_text(NEW_TOKEN)
    sc.state.apply(config.load(short_tmp / "config.json5"))  # what a reload does
    old, new = f"Bearer {TOKEN}", f"Bearer {NEW_TOKEN}"
    assert (await sc.post("/hooks/agent", AGENT_CALL))[0] == 200  # new refused, old taken
    assert (await sc.post("/hooks/agent", AGENT_CALL))[0] == 200  # old first now
    gateway.token = NEW_TOKEN
    assert (await sc.post("/hooks/agent", AGENT_CALL))[0] == 200  # old refused, file's new
    assert (await sc.post("/hooks/agent", AGENT_CALL))[0] == 200
    assert [s.header("Authorization") for s in gateway.hooks] == [new, old, old, old, new, new]


async def test_inline_token_rotated_by_reload_first_no_call_fails(
    make_sidecar: Any, gateway: FakeGateway, short_tmp: Path
) -> None:
    """A token written in the config (or from env) cannot be re-read; the spare covers it."""
    doc = openclaw_doc(gateway, short_tmp / "unused")
    doc["sidecar"]["upstream"]["token"] = TOKEN
    sidecar = await make_sidecar(doc)
    doc["sidecar"]["upstream"]["token"] = NEW_TOKEN
    (short_tmp / "config.json5").write_text(json.dumps(doc))
    sidecar.state.apply(config.load(short_tmp / "config.json5"))
    assert (await sidecar.post("/hooks/wake", WAKE_CALL))[0] == 200
    gateway.token = NEW_TOKEN
    assert (await sidecar.post("/hooks/wake", WAKE_CALL))[0] == 200
    assert (await sidecar.post("/hooks/wake", WAKE_CALL))[0] == 200
    assert len(gateway.hooks) == 5  # two calls needed a second attempt, the last none


async def test_gateway_switched_first_fails_until_the_file_is_written(
    sc: Sidecar, gateway: FakeGateway, token_file: Path
) -> None:
    """The wrong order: calls fail (502) between the gateway's switch and the file write,
    and work again with the next call after it, without a reload."""
    gateway.token = NEW_TOKEN
    assert (await sc.post("/hooks/agent", AGENT_CALL))[0] == 502
    token_file.write_text(NEW_TOKEN)
    assert (await sc.post("/hooks/agent", AGENT_CALL))[0] == 200


async def test_a_token_file_the_gateway_refuses_too_is_not_retried_every_call(
    sc: Sidecar, gateway: FakeGateway, token_file: Path
) -> None:
    gateway.token = THIRD_TOKEN  # neither ours nor the file's
    token_file.write_text(NEW_TOKEN)
    for _ in range(3):
        assert (await sc.post("/hooks/agent", AGENT_CALL))[0] == 502
    assert len(gateway.hooks) == 4  # the first call tried the file's token; then backoff


async def test_the_spare_token_is_dropped_once_the_gateway_refuses_it(
    make_sidecar: Any,
    gateway: FakeGateway,
    token_file: Path,
    short_tmp: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(oc, "RETRY_BACKOFF", 0.0)
    sidecar = await make_sidecar(openclaw_doc(gateway, token_file))
    token_file.write_text(NEW_TOKEN)
    sidecar.state.apply(config.load(short_tmp / "config.json5"))  # spare: TOKEN
    gateway.token = THIRD_TOKEN
    for _ in range(3):
        assert (await sidecar.post("/hooks/wake", WAKE_CALL))[0] == 502
    # first call: NEW refused, spare TOKEN refused (dropped); then NEW alone
    assert len(gateway.hooks) == 4


@pytest.mark.parametrize("content", ["", "line\nbreak", "nul\0byte"])
async def test_an_unusable_token_file_is_not_sent(
    sc: Sidecar,
    gateway: FakeGateway,
    token_file: Path,
    caplog: pytest.LogCaptureFixture,
    content: str,
) -> None:
    gateway.token = NEW_TOKEN
    token_file.write_text(content)
    caplog.set_level(logging.INFO)
    assert (await sc.post("/hooks/agent", AGENT_CALL))[0] == 502
    assert len(gateway.hooks) == 1
    assert any("not used" in r.getMessage() for r in caplog.records)


async def test_a_vanished_token_file_is_logged_and_not_fatal(
    sc: Sidecar, gateway: FakeGateway, token_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    token_file.unlink()
    assert (await sc.post("/hooks/agent", AGENT_CALL))[0] == 200  # only read after a refusal
    gateway.token = NEW_TOKEN
    caplog.set_level(logging.INFO)
    assert (await sc.post("/hooks/agent", AGENT_CALL))[0] == 502
    assert any("cannot re-read sidecar.upstream.token" in r.getMessage() for r in caplog.records)


async def test_the_spare_is_kept_only_for_the_same_gateway(
    gateway: FakeGateway, short_tmp: Path
) -> None:
    token_file = short_tmp / "tok"
    token_file.write_text(TOKEN)
    path = short_tmp / "config.json5"
    path.write_text(json.dumps(openclaw_doc(gateway, token_file)))
    first = config.load(path)
    token_file.write_text(NEW_TOKEN)
    second = config.load(path)
    pool = make_pool(first)
    try:
        old = make_forwarder(first, pool)
        assert isinstance(old, oc.OpenClawForwarder) and old.tokens.spare is None
        same = make_forwarder(second, pool, old)
        assert isinstance(same, oc.OpenClawForwarder)
        assert (same.tokens.current, same.tokens.spare) == (NEW_TOKEN.encode(), TOKEN.encode())
        other_pool = make_pool(second)
        moved = make_forwarder(second, other_pool, old)
        assert isinstance(moved, oc.OpenClawForwarder) and moved.tokens.spare is None
        other_pool.close()
    finally:
        pool.close()


# --------------------------------------------------------------------------- pool and readiness


async def test_calls_reuse_one_keep_alive_connection(sc: Sidecar, gateway: FakeGateway) -> None:
    for _ in range(5):
        assert (await sc.post("/hooks/wake", WAKE_CALL))[0] == 200
    assert len({s.peer for s in gateway.hooks}) == 1
    pool = sc.state.pool
    assert pool is not None and pool.idle_timeout < 5  # the gateway closes idle ones at 5-6 s


async def readyz(sc: Sidecar, aiohttp_client: Any) -> tuple[int, Any]:
    admin = await aiohttp_client(create_admin_app(sc.state))
    async with admin.get("/readyz") as resp:
        return resp.status, await resp.json()


async def test_readiness_is_the_gateways_readyz(
    sc: Sidecar, gateway: FakeGateway, aiohttp_client: Any
) -> None:
    assert await readyz(sc, aiohttp_client) == (200, {"status": "ok"})
    probes = [s for s in gateway.seen if s.path == "/readyz"]
    assert len(probes) == 1 and "authorization" not in probes[0].header_names()


async def test_gateway_not_ready_is_503_with_its_reason(
    sc: Sidecar, gateway: FakeGateway, aiohttp_client: Any
) -> None:
    gateway.ready = web.json_response({"ready": False, "failing": ["gateway-draining"]}, status=503)
    status, body = await readyz(sc, aiohttp_client)
    assert status == 503 and "503" in body["reason"] and "gateway-draining" in body["reason"]


async def test_probe_of_a_stopped_gateway_raises(sc: Sidecar, gateway: FakeGateway) -> None:
    await gateway.stop()
    assert sc.state.runtime is not None
    with pytest.raises(UpstreamConnectError):
        await sc.state.runtime.forward.probe()


async def test_probe_of_a_hanging_gateway_times_out(
    sc: Sidecar, gateway: FakeGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(oc, "PROBE_TIMEOUT", 0.2)
    gateway.ready_delay = 1.0
    assert sc.state.runtime is not None
    with pytest.raises(UpstreamConnectError, match="no answer"):
        await sc.state.runtime.forward.probe()


async def test_forward_protocol_still_gets_the_forward_forwarder(
    make_sidecar: Any, runtime: Any
) -> None:
    sidecar = await make_sidecar(base_doc(runtime.path))
    assert sidecar.state.runtime is not None
    assert type(sidecar.state.runtime.forward) is Forwarder


def test_a_missing_token_cannot_build_an_openclaw_forwarder(short_tmp: Path) -> None:
    path = short_tmp / "config.json5"
    (short_tmp / "tok").write_text(TOKEN)
    path.write_text(json.dumps(openclaw_doc(FakeGateway(), short_tmp / "tok")))
    settings = config.load(path)
    upstream = settings.sidecar.upstream
    bare = dataclasses.replace(
        settings,
        sidecar=dataclasses.replace(
            settings.sidecar, upstream=dataclasses.replace(upstream, token=None)
        ),
    )
    with pytest.raises(ValueError, match=r"upstream\.token is required"):
        oc.OpenClawForwarder(bare, None)  # type: ignore[arg-type]
