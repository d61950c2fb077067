"""The public API end to end (docs/http-api.md): real loopback sockets in front of the
reference runtime on a real Unix socket. One test per error path, in the order
docs/http-api.md checks them."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from support.common import AGENT, OTHER_SECRET, SECRET, Runtime, Sidecar, base_doc

AGENT_BODY = {"agent": AGENT, "message": "Deployed v1.2.3, check the service"}


def assert_error(status: int, body: Any, headers: Any, want_status: int, code: str) -> None:
    assert (status, body["error"]) == (want_status, code), body
    assert body["status"] == "error"
    assert isinstance(body["message"], str) and body["message"]
    assert body["requestId"] == headers["X-Request-Id"]


# ---------------------------------------------------------------- success


async def test_wake_uses_the_agents_fixed_session(sidecar: Sidecar, runtime: Runtime) -> None:
    status, headers, body = await sidecar.post("/hooks/wake", {"agent": AGENT})
    assert status == 200
    assert body["status"] == "ok" and body["queued"] is True
    assert body["session"] == "webhook-session"
    assert body["requestId"] == headers["X-Request-Id"]
    assert body["runId"].startswith("run-")
    [call] = runtime.calls
    assert call["hook"] == "wake"
    assert call["agent"] == AGENT and call["sessionKey"] == "webhook-session"
    assert call["requestId"] == body["requestId"] and call["runId"] == body["runId"]


async def test_agent_call_forwards_message_and_metadata(sidecar: Sidecar, runtime: Runtime) -> None:
    status, _, body = await sidecar.post(
        "/hooks/agent", AGENT_BODY, headers={"Idempotency-Key": "deploy-42"}
    )
    assert status == 200 and body["session"] == "webhook-session"
    [call] = runtime.calls
    assert call["message"] == AGENT_BODY["message"]
    assert call["secretId"] == "default"
    assert call["forwardedFor"] == "127.0.0.1"
    assert call["idempotencyKey"] == "deploy-42"


async def test_request_session_key_is_used_when_allowed(sidecar: Sidecar, runtime: Runtime) -> None:
    status, _, body = await sidecar.post("/hooks/agent", {**AGENT_BODY, "sessionKey": "order-1234"})
    assert status == 200 and body["session"] == "order-1234"
    assert runtime.calls[0]["sessionKey"] == "order-1234"


async def test_default_session_is_webhook_colon_name(make_sidecar: Any, runtime: Runtime) -> None:
    doc = base_doc(runtime.path)
    doc["webhooks"]["agents"] = {"alert-handler": {}}
    sc = await make_sidecar(doc)
    status, _, body = await sc.post("/hooks/wake", {"agent": "alert-handler"})
    assert (status, body["session"]) == (200, "webhook:alert-handler")


async def test_client_request_id_is_adopted_only_from_a_trusted_proxy(
    make_sidecar: Any, runtime: Runtime
) -> None:
    """From anyone else it could make a caller's calls collide with another's in the
    logs: a fresh id is made and the client's kept in the audit line."""
    sc = await make_sidecar(base_doc(runtime.path))  # the test client is not a proxy
    _, headers, body = await sc.post(
        "/hooks/wake", {"agent": AGENT}, headers={"X-Request-Id": "ci.run-7_a"}
    )
    assert body["requestId"] == headers["X-Request-Id"] != "ci.run-7_a"
    [entry] = sc.audit.entries()
    assert (entry["requestId"], entry["clientRequestId"]) == (body["requestId"], "ci.run-7_a")

    proxied = await make_sidecar(base_doc(runtime.path, trustedProxies=["127.0.0.1/32"]))
    _, headers, body = await proxied.post(
        "/hooks/wake", {"agent": AGENT}, headers={"X-Request-Id": "ci.run-7_a"}
    )
    assert body["requestId"] == headers["X-Request-Id"] == "ci.run-7_a"
    assert "clientRequestId" not in proxied.audit.entries()[0]


async def test_a_secret_sent_as_request_id_is_neither_adopted_nor_audited(
    make_sidecar: Any, runtime: Runtime
) -> None:
    for trusted in ([], ["127.0.0.1/32"]):
        sc = await make_sidecar(base_doc(runtime.path, trustedProxies=trusted))
        _, headers, _ = await sc.post(
            "/hooks/wake", {"agent": AGENT}, headers={"X-Request-Id": SECRET}
        )
        assert headers["X-Request-Id"] != SECRET
        assert SECRET not in "\n".join(sc.audit.lines)


@pytest.mark.parametrize("bad", ["", "has space", "x" * 65, "semi;colon", "ünï"])
async def test_malformed_client_request_id_is_replaced(sidecar: Sidecar, bad: str) -> None:
    _, headers, body = await sidecar.post(
        "/hooks/wake", {"agent": AGENT}, headers={"X-Request-Id": bad.encode().decode("latin-1")}
    )
    assert body["requestId"] == headers["X-Request-Id"] != bad
    assert len(body["requestId"]) == 16


async def test_client_credentials_and_forwarding_headers_never_reach_the_runtime(
    make_sidecar: Any, short_tmp: Any
) -> None:
    """A raw runtime that records every header it receives."""
    from aiohttp import web

    seen: list[dict[str, str]] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/hooks/{hook}", record)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.UnixSite(runner, str(short_tmp / "raw.sock")).start()
    try:
        sc = await make_sidecar(base_doc(short_tmp / "raw.sock"))
        status, _, _ = await sc.post(
            "/hooks/agent",
            AGENT_BODY,
            headers={
                "Cookie": "session=abc",
                "X-Forwarded-For": "6.6.6.6",
                "Forwarded": "for=6.6.6.6",
                "X-Forwarded-Host": "evil.example",
                "X-Webhook-Secret-Id": "forged",
                "X-Custom": "nope",
            },
        )
        assert status == 200
        [headers] = seen
        assert "Cookie" not in headers and "Forwarded" not in headers and "X-Custom" not in headers
        assert "Authorization" not in headers  # no upstream.token configured
        assert "X-Forwarded-Host" not in headers
        assert headers["X-Forwarded-For"] == "127.0.0.1"
        assert headers["X-Webhook-Secret-Id"] == "default"
        assert SECRET not in str(headers)
    finally:
        await runner.cleanup()


# ---------------------------------------------------------------- routing


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/hooks",
        "/hooks/",
        "/hooks/agent/",
        "/hooks//agent",
        "/HOOKS/agent",
        "/hooks/Agent",
        "/hooks/agents",
        "/metrics",
        "/healthz",
        "/readyz",
        "/hooks/wake/x",
    ],
)
async def test_unknown_paths_are_404_even_with_a_valid_token(
    sidecar: Sidecar, runtime: Runtime, path: str
) -> None:
    status, headers, body = await sidecar.post(path, AGENT_BODY)
    assert_error(status, body, headers, 404, "not_found")
    assert runtime.calls == []


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
async def test_other_methods_are_405_with_allow(sidecar: Sidecar, method: str) -> None:
    async with sidecar.client.request(method, "/hooks/agent") as resp:
        body = await resp.json()
        assert_error(resp.status, body, resp.headers, 405, "method_not_allowed")
        assert resp.headers["Allow"] == "POST"


@pytest.mark.parametrize(
    "query",
    [
        f"token={SECRET}",
        f"access_token={SECRET}",
        "TOKEN=anything",
        "Access_Token=x",
        "secret=x",
        "Key=x",
        "api_key=x",
        "APIKEY=x",
        f"x=1&anything={SECRET}",  # a configured secret under any name
    ],
)
async def test_token_in_query_is_400_even_when_valid(
    sidecar: Sidecar, runtime: Runtime, query: str, caplog: pytest.LogCaptureFixture
) -> None:
    status, headers, body = await sidecar.post(f"/hooks/agent?{query}", AGENT_BODY)
    assert_error(status, body, headers, 400, "token_in_query")
    assert SECRET not in str(body) and SECRET not in caplog.text
    assert SECRET not in "\n".join(sidecar.audit.lines)
    assert runtime.calls == []


@pytest.mark.parametrize(
    "query", ["page=2", "tokens=1", "monkey=x", "id=abc", f"sig={OTHER_SECRET}"]
)
async def test_other_query_parameters_pass(sidecar: Sidecar, query: str) -> None:
    status, _, _ = await sidecar.post(f"/hooks/agent?{query}", AGENT_BODY)
    assert status == 200


# ---------------------------------------------------------------- authentication


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        f"Basic {SECRET}",
        f"Bearer  {SECRET}",  # two spaces: the token would start with a space
        f"Bearer {SECRET[:-1]}",
        f"Bearer {SECRET}x",
        f"Token {SECRET}",
        f"Bearer{SECRET}",
    ],
)
async def test_bad_tokens_are_401_with_www_authenticate(
    sidecar: Sidecar, runtime: Runtime, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    status, h, body = await sidecar.post("/hooks/agent", AGENT_BODY, token=None, headers=headers)
    assert_error(status, body, h, 401, "unauthorized")
    assert h["WWW-Authenticate"] == 'Bearer realm="webhooks"'
    assert runtime.calls == []


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "BeArEr"])
async def test_bearer_scheme_is_case_insensitive(sidecar: Sidecar, scheme: str) -> None:
    status, _, _ = await sidecar.post(
        "/hooks/wake", {"agent": AGENT}, token=None, headers={"Authorization": f"{scheme} {SECRET}"}
    )
    assert status == 200


async def test_two_authorization_headers_are_401(sidecar: Sidecar, runtime: Runtime) -> None:
    from multidict import CIMultiDict

    headers = CIMultiDict(
        [
            ("Authorization", f"Bearer {SECRET}"),
            ("Authorization", f"Bearer {SECRET}"),
            ("Content-Type", "application/json"),
        ]
    )
    async with sidecar.client.post(
        "/hooks/wake", data=b'{"agent": "my-agent"}', headers=headers
    ) as resp:
        assert resp.status == 401
        assert (await resp.json())["error"] == "unauthorized"
    assert runtime.calls == []


def rotation_doc(runtime: Runtime, now: float) -> dict[str, Any]:
    doc = base_doc(runtime.path)
    doc["webhooks"].pop("secret")
    doc["webhooks"]["agents"]["devops-agent"] = {}
    doc["webhooks"]["secrets"] = [
        {"id": "current", "env": "TEST_WEBHOOK_SECRET"},
        {"id": "expired", "value": OTHER_SECRET, "notAfter": "2020-01-01T00:00:00Z"},
        {
            "id": "future",
            "value": "f" * 16 + "0123456789abcdef" * 3,
            "notBefore": "2999-01-01T00:00:00Z",
        },
        {"id": "ci", "value": "c1" * 8 + "0123456789abcdef" * 3, "agents": ["devops-agent"]},
    ]
    return doc


async def test_expired_secret_is_401(make_sidecar: Any, runtime: Runtime) -> None:
    sc = await make_sidecar(rotation_doc(runtime, 0))
    status, h, body = await sc.post("/hooks/wake", {"agent": AGENT}, token=OTHER_SECRET)
    assert_error(status, body, h, 401, "unauthorized")


async def test_not_yet_valid_secret_is_401(make_sidecar: Any, runtime: Runtime) -> None:
    sc = await make_sidecar(rotation_doc(runtime, 0))
    status, h, body = await sc.post(
        "/hooks/wake", {"agent": AGENT}, token="f" * 16 + "0123456789abcdef" * 3
    )
    assert_error(status, body, h, 401, "unauthorized")


async def test_every_valid_secret_is_accepted_and_named_upstream(
    make_sidecar: Any, runtime: Runtime
) -> None:
    sc = await make_sidecar(rotation_doc(runtime, 0))
    assert (await sc.post("/hooks/wake", {"agent": AGENT}))[0] == 200
    ci = "c1" * 8 + "0123456789abcdef" * 3
    assert (await sc.post("/hooks/wake", {"agent": "devops-agent"}, token=ci))[0] == 200
    assert [c["secretId"] for c in runtime.calls] == ["current", "ci"]


async def test_scoped_secret_on_other_agent_is_403(make_sidecar: Any, runtime: Runtime) -> None:
    sc = await make_sidecar(rotation_doc(runtime, 0))
    ci = "c1" * 8 + "0123456789abcdef" * 3
    status, h, body = await sc.post("/hooks/wake", {"agent": AGENT}, token=ci)
    assert_error(status, body, h, 403, "agent_not_permitted")
    assert runtime.calls == []


# ---------------------------------------------------------------- switch, body, fields


async def test_disabled_webhooks_are_503_after_auth(make_sidecar: Any, runtime: Runtime) -> None:
    doc = base_doc(runtime.path)
    doc["webhooks"]["enabled"] = False
    sc = await make_sidecar(doc)
    status, h, body = await sc.post("/hooks/wake", {"agent": AGENT})
    assert_error(status, body, h, 503, "webhooks_disabled")
    status, _, body = await sc.post("/hooks/wake", {"agent": AGENT}, token="wrong" * 10)
    assert (status, body["error"]) == (401, "unauthorized")


async def test_oversized_body_is_413_from_content_length(
    sidecar: Sidecar, runtime: Runtime
) -> None:
    status, h, body = await sidecar.post("/hooks/agent", raw=b"x" * 65537)
    assert_error(status, body, h, 413, "payload_too_large")


async def test_oversized_chunked_body_is_413(sidecar: Sidecar, runtime: Runtime) -> None:
    async def chunks() -> Any:
        for _ in range(20):
            yield b'{"agent": "my-agent", "message": "' + b"a" * 4096

    async with sidecar.client.post(
        "/hooks/agent",
        data=chunks(),
        headers={"Authorization": f"Bearer {SECRET}", "Content-Type": "application/json"},
    ) as resp:
        assert resp.status == 413
        assert (await resp.json())["error"] == "payload_too_large"
    assert runtime.calls == []


RAW_BODY = json.dumps(AGENT_BODY).encode()


async def _raw_post(
    sidecar: Sidecar, token: str, extra: bytes = b""
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection with the head of a valid-looking POST written, and no body yet."""
    url = sidecar.client.make_url("/")
    reader, writer = await asyncio.open_connection(url.host, url.port)
    writer.write(
        b"POST /hooks/agent HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + token.encode() + b"\r\n" + extra
        + b"Content-Length: " + str(len(RAW_BODY)).encode() + b"\r\n\r\n"
    )  # fmt: skip
    return reader, writer


async def _expect_continue(sidecar: Sidecar, token: str) -> tuple[bytes, bytes]:
    """A client that sends ``Expect: 100-continue`` and holds its body back: what arrives
    before it sends the body, and what arrives after (empty when it never sends it)."""
    body = RAW_BODY
    reader, writer = await _raw_post(sidecar, token, b"Expect: 100-continue\r\n")
    try:
        first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        rest = b""
        if first.startswith(b"HTTP/1.1 100 "):
            writer.write(body)
            rest = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        return first, rest
    finally:
        writer.close()


async def _post_in_two_parts(sidecar: Sidecar, pause: float) -> bytes:
    """A valid call whose body arrives in two writes ``pause`` seconds apart; the reply head."""
    body = RAW_BODY
    reader, writer = await _raw_post(sidecar, SECRET)
    try:
        writer.write(body[:10])
        await writer.drain()
        await asyncio.sleep(pause)
        if not reader.at_eof():
            writer.write(body[10:])
        return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    finally:
        writer.close()


async def test_a_body_arriving_in_parts_within_body_timeout_is_read(
    make_sidecar: Any, runtime: Runtime
) -> None:
    sidecar = await make_sidecar(base_doc(runtime.path, limits={"bodyTimeout": "2s"}))
    head = await _post_in_two_parts(sidecar, 0.1)
    assert head.startswith(b"HTTP/1.1 200 "), head
    assert len(runtime.calls) == 1


async def test_a_body_slower_than_body_timeout_is_408(make_sidecar: Any, runtime: Runtime) -> None:
    sidecar = await make_sidecar(base_doc(runtime.path, limits={"bodyTimeout": "200ms"}))
    head = await _post_in_two_parts(sidecar, 1.0)
    assert head.startswith(b"HTTP/1.1 408 "), head
    assert runtime.calls == []
    assert json.loads(sidecar.audit.lines[-1])["error"] == "request_timeout"


async def test_expect_100_continue_is_answered_when_the_body_is_wanted(
    sidecar: Sidecar, runtime: Runtime
) -> None:
    first, rest = await _expect_continue(sidecar, SECRET)
    assert first == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert rest.startswith(b"HTTP/1.1 200 ")
    assert len(runtime.calls) == 1


async def test_expect_100_continue_refused_before_the_body_never_asks_for_it(
    sidecar: Sidecar, runtime: Runtime
) -> None:
    first, rest = await _expect_continue(sidecar, "not-the-secret")
    assert first.startswith(b"HTTP/1.1 401 "), first
    assert rest == b""
    assert runtime.calls == []


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "text/plain",
        "application/x-www-form-urlencoded",
        "application/json; charset=latin-1",
        "application/jsonx",
    ],
)
async def test_non_json_media_type_is_415(sidecar: Sidecar, content_type: str | None) -> None:
    status, h, body = await sidecar.post("/hooks/wake", {"agent": AGENT}, content_type=content_type)
    assert_error(status, body, h, 415, "unsupported_media_type")


@pytest.mark.parametrize(
    "content_type", ["application/json; charset=utf-8", "Application/JSON; charset=UTF-8"]
)
async def test_utf8_json_media_types_are_accepted(sidecar: Sidecar, content_type: str) -> None:
    status, _, _ = await sidecar.post("/hooks/wake", {"agent": AGENT}, content_type=content_type)
    assert status == 200


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b'["my-agent"]',
        b'"my-agent"',
        b"null",
        b'{"agent": "my-agent", "agent": "other"}',
        b'{"agent": "my-agent", "message": NaN}',
        b'{"agent": "my-agent", "message": Infinity}',
        b'{"agent": "my-agent"',
        b'{"agent": "my-\xff"}',
        b"[" * 100_00 + b"]" * 100_00,
        b'{"agent": "my-agent", "n": ' + b"9" * 5000 + b"}",
    ],
)
async def test_bodies_that_are_not_one_json_object_are_invalid_json(
    sidecar: Sidecar, runtime: Runtime, raw: bytes
) -> None:
    status, h, body = await sidecar.post("/hooks/agent", raw=raw)
    assert_error(status, body, h, 400, "invalid_json")
    assert runtime.calls == []


@pytest.mark.parametrize(
    ("path", "payload", "field"),
    [
        ("/hooks/wake", {}, "agent"),
        ("/hooks/wake", {"agent": 5}, "agent"),
        ("/hooks/wake", {"agent": "bad name!"}, "agent"),
        ("/hooks/wake", {"agent": AGENT, "message": "wake has no message"}, "message"),
        ("/hooks/wake", {"agent": AGENT, "extra": 1}, "extra"),
        ("/hooks/agent", {"agent": AGENT}, "message"),
        ("/hooks/agent", {"agent": AGENT, "message": ""}, "message"),
        ("/hooks/agent", {"agent": AGENT, "message": "   "}, "message"),
        ("/hooks/agent", {"agent": AGENT, "message": 42}, "message"),
        ("/hooks/agent", {"agent": AGENT, "message": ["a"]}, "message"),
        ("/hooks/agent", {"agent": AGENT, "message": "x" * 32769}, "message"),
        ("/hooks/agent", {"agent": AGENT, "message": "hi", "sessionKey": 7}, "sessionKey"),
        (
            "/hooks/agent",
            {"agent": AGENT, "message": "hi", "sessionKey": "has space"},
            "sessionKey",
        ),
        ("/hooks/agent", {"agent": AGENT, "message": "hi", "sessionKey": "-leading"}, "sessionKey"),
        ("/hooks/agent", {"agent": AGENT, "message": "hi", "sessionKey": "k" * 129}, "sessionKey"),
        ("/hooks/agent", {"agent": AGENT, "message": "hi", "session": "typo"}, "session"),
    ],
)
async def test_bad_fields_are_invalid_request_naming_the_field(
    sidecar: Sidecar, runtime: Runtime, path: str, payload: dict[str, Any], field: str
) -> None:
    status, h, body = await sidecar.post(path, payload)
    assert_error(status, body, h, 400, "invalid_request")
    assert f"'{field}'" in body["message"]
    assert runtime.calls == []


async def test_lone_surrogate_in_message_is_invalid_request(
    sidecar: Sidecar, runtime: Runtime
) -> None:
    status, h, body = await sidecar.post(
        "/hooks/agent", raw=b'{"agent": "my-agent", "message": "a\\ud800b"}'
    )
    assert_error(status, body, h, 400, "invalid_request")
    assert "'message'" in body["message"]


async def test_unicode_message_is_forwarded_intact(sidecar: Sidecar, runtime: Runtime) -> None:
    message = "Überwachung: 🚨 CPU > 90% — prüfen"
    status, _, _ = await sidecar.post("/hooks/agent", {"agent": AGENT, "message": message})
    assert status == 200 and runtime.calls[0]["message"] == message


@pytest.mark.parametrize("key", ["", "x" * 257, "tab\there", "ünicode"])
async def test_bad_idempotency_key_is_invalid_request(
    sidecar: Sidecar, runtime: Runtime, key: str
) -> None:
    status, h, body = await sidecar.post(
        "/hooks/wake", {"agent": AGENT}, headers={"Idempotency-Key": key.encode().decode("latin-1")}
    )
    assert_error(status, body, h, 400, "invalid_request")
    assert "Idempotency-Key" in body["message"]


# ---------------------------------------------------------------- agents and sessions


async def test_unknown_agent_is_404_only_after_auth(sidecar: Sidecar, runtime: Runtime) -> None:
    status, h, body = await sidecar.post("/hooks/wake", {"agent": "nobody"})
    assert_error(status, body, h, 404, "agent_not_found")
    status, _, body = await sidecar.post("/hooks/wake", {"agent": "nobody"}, token=None)
    assert (status, body["error"]) == (401, "unauthorized")


async def test_request_session_key_refused_when_agent_forbids_it(
    make_sidecar: Any, runtime: Runtime
) -> None:
    doc = base_doc(runtime.path)
    doc["webhooks"]["agents"][AGENT]["allowRequestSessionKey"] = False
    sc = await make_sidecar(doc)
    status, h, body = await sc.post("/hooks/agent", {**AGENT_BODY, "sessionKey": "mine"})
    assert_error(status, body, h, 403, "session_key_not_allowed")
    assert runtime.calls == []
    assert (await sc.post("/hooks/agent", AGENT_BODY))[0] == 200  # the fixed session still works


async def test_session_key_prefixes_are_enforced(make_sidecar: Any, runtime: Runtime) -> None:
    doc = base_doc(runtime.path)
    doc["webhooks"]["agents"][AGENT]["sessionKeyPrefixes"] = ["order-", "ticket-"]
    sc = await make_sidecar(doc)
    status, h, body = await sc.post("/hooks/agent", {**AGENT_BODY, "sessionKey": "admin-main"})
    assert_error(status, body, h, 403, "session_key_not_allowed")
    status, _, body = await sc.post("/hooks/agent", {**AGENT_BODY, "sessionKey": "ticket-9"})
    assert (status, body["session"]) == (200, "ticket-9")


# ---------------------------------------------------------------- audit


async def test_one_audit_line_per_request_without_secrets_or_messages(sidecar: Sidecar) -> None:
    await sidecar.post("/hooks/agent", AGENT_BODY)
    await sidecar.post("/hooks/agent", AGENT_BODY, token="wrong-token-" + "x" * 40)
    await sidecar.post("/nowhere", AGENT_BODY)
    entries = sidecar.audit.entries()
    assert [e["status"] for e in entries] == [200, 401, 404]
    ok, bad, missing = entries
    assert ok["outcome"] == "forwarded" and ok["agent"] == AGENT and ok["secretId"] == "default"
    assert bad["outcome"] == "rejected" and bad["error"] == "unauthorized" and bad["agent"] is None
    assert missing["endpoint"] == "other"
    for line in sidecar.audit.lines:
        assert (
            SECRET not in line and "wrong-token" not in line and AGENT_BODY["message"] not in line
        )


async def test_refused_and_forwarded_requests_leave_nothing_behind(sidecar: Sidecar) -> None:
    """Regression: re-raising one shared Reject instance chained every traceback onto
    it and kept each refused request's frames (and its Call) alive, several KiB each."""
    import gc

    from sidecar.call import Call

    for _ in range(50):
        await sidecar.post("/hooks/agent", AGENT_BODY, token="wrong-" + "x" * 40)
        await sidecar.post("/nowhere", AGENT_BODY)
        await sidecar.post("/hooks/agent", AGENT_BODY)
    gc.collect()
    assert sum(isinstance(o, Call) for o in gc.get_objects()) == 0


async def test_a_bug_in_the_chain_is_500_internal_error_without_its_detail(
    sidecar: Sidecar, runtime: Runtime
) -> None:
    """docs/http-api.md internal_error: the detail goes to the log, not the response."""
    import dataclasses

    def broken(call: Any) -> None:
        raise RuntimeError("detail-that-stays-in-the-log")

    current = sidecar.state.runtime
    assert current is not None
    sidecar.state.runtime = dataclasses.replace(current, guards=(*current.guards[:3], broken))
    status, headers, body = await sidecar.post("/hooks/agent", AGENT_BODY)
    assert_error(status, body, headers, 500, "internal_error")
    assert "detail-that-stays-in-the-log" not in str(body)
    assert sidecar.audit.entries()[-1]["error"] == "internal_error"
    assert runtime.calls == []
