"""GitHub deliveries on a route, over real sockets to the reference runtime on a Unix
socket: the signature on the raw bytes, ping, `when`, templates, the upstream call, and
the route pipeline's refusals (each would pass if its check were removed)."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest
from support.common import AGENT, SECRET, Runtime
from support.scrape import Scrape
from support.senders import (
    GH_OLD_SECRET,
    GH_SECRET,
    GITHUB_PING,
    GITHUB_PUSH,
    deliver,
    encode,
    github_headers,
    route,
    route_doc,
)

PATH = "/hooks/github"
MESSAGE = (
    "GitHub {{ headers['x-github-event'] }} on {{ body.repository.full_name }}: "
    "{{ body.head_commit.message }}"
)


def github_route(**more: Any) -> dict[str, Any]:
    spec = route("github", GH_SECRET, message=MESSAGE, sessionKey="gh-{{ body.repository.name }}")
    spec.update(more)
    return spec


async def github_sidecar(make_sidecar: Any, runtime: Runtime, **more: Any) -> Any:
    return await make_sidecar(route_doc(runtime.path, {"github": github_route(**more)}))


async def test_a_signed_push_becomes_an_agent_call(make_sidecar: Any, runtime: Runtime) -> None:
    sc = await github_sidecar(make_sidecar, runtime)
    body = encode(GITHUB_PUSH)
    status, headers, reply = await deliver(sc, PATH, body, github_headers(body))
    assert status == 200, reply
    assert reply["status"] == "ok" and reply["session"] == "gh-api" and reply["queued"]
    assert headers["X-Request-Id"] == reply["requestId"]
    [call] = runtime.calls
    assert call["hook"] == "agent"
    assert call["agent"] == AGENT
    assert call["message"] == "GitHub push on acme/api: Fix the flaky deploy step"
    assert call["sessionKey"] == "gh-api"
    assert call["secretId"] == "r1"
    assert call["route"] == "github"
    assert call["idempotencyKey"] == "github:72d3162e-cc78-11e3-81ab-4c9367dc0958"
    [line] = sc.audit.entries()
    assert line["endpoint"] == "route" and line["route"] == "github"
    assert line["deliveryId"] == "72d3162e-cc78-11e3-81ab-4c9367dc0958"
    assert line["outcome"] == "forwarded" and line["agent"] == AGENT and line["secretId"] == "r1"
    scrape = Scrape.of(sc.state.metrics.registry)
    assert scrape.value("webhook_sidecar_requests_total", endpoint="route", code="200") == 1
    assert scrape.value("webhook_sidecar_route_requests_total", route="github", code="200") == 1


async def test_wake_action_sends_a_wake(make_sidecar: Any, runtime: Runtime) -> None:
    spec = route("github", GH_SECRET, action="wake")
    del spec["message"]
    sc = await make_sidecar(route_doc(runtime.path, {"github": spec}))
    body = encode(GITHUB_PUSH)
    status, _, reply = await deliver(sc, PATH, body, github_headers(body))
    assert status == 200, reply
    [call] = runtime.calls
    assert call["hook"] == "wake" and "message" not in call


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda b: b[:-2] + b"x}", id="one byte changed"),
        pytest.param(lambda b: json.dumps(json.loads(b)).encode(), id="re-serialised JSON"),
        pytest.param(lambda b: b + b"\n", id="a byte appended"),
    ],
)
async def test_a_changed_body_is_refused(make_sidecar: Any, runtime: Runtime, tamper: Any) -> None:
    sc = await github_sidecar(make_sidecar, runtime)
    body = encode(GITHUB_PUSH)
    headers = github_headers(body)
    status, _, reply = await deliver(sc, PATH, tamper(body), headers)
    assert (status, reply["error"]) == (401, "signature_invalid")
    assert runtime.calls == []


async def test_the_webhooks_secret_does_not_open_a_route(
    make_sidecar: Any, runtime: Runtime
) -> None:
    sc = await github_sidecar(make_sidecar, runtime)
    body = encode(GITHUB_PUSH)
    status, _, reply = await deliver(sc, PATH, body, github_headers(body, secret=SECRET))
    assert (status, reply["error"]) == (401, "signature_invalid")
    # ...nor a bearer token on the route, nor the route secret on the seed's hooks
    status, _, reply = await sc.post(PATH, raw=body, token=SECRET)
    assert (status, reply["error"]) == (401, "signature_invalid")
    status, _, reply = await sc.post(
        "/hooks/agent", {"agent": AGENT, "message": "x"}, token=GH_SECRET
    )
    assert (status, reply["error"]) == (401, "unauthorized")
    assert runtime.calls == []


async def test_another_routes_signature_is_refused(make_sidecar: Any, runtime: Runtime) -> None:
    routes = {
        "github": github_route(),
        "github-ops": route("github", GH_OLD_SECRET, when="true"),
    }
    sc = await make_sidecar(route_doc(runtime.path, routes))
    body = encode(GITHUB_PUSH)
    status, _, reply = await deliver(sc, "/hooks/github-ops", body, github_headers(body))
    assert (status, reply["error"]) == (401, "signature_invalid")
    status, _, _ = await deliver(sc, PATH, body, github_headers(body))
    assert status == 200


H = "X-Hub-Signature-256"


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param([], id="missing"),
        pytest.param([(H, "{sig}")], id="no sha256= prefix"),
        pytest.param([(H, "sha1={sig}")], id="sha1 prefix"),
        pytest.param([(H, "sha256={short}")], id="short"),
        pytest.param([(H, "sha256=" + "zz" * 32)], id="not hex"),
        pytest.param([(H, "sha256=" + "ab" * 2048)], id="oversized"),
        pytest.param([(H, "sha256= {sig}")], id="space"),
        pytest.param([(H, "sha256={sig}"), (H, "sha256={sig}")], id="two headers"),
    ],
)
async def test_malformed_signature_headers(
    make_sidecar: Any, runtime: Runtime, headers: list[tuple[str, str]]
) -> None:
    sc = await github_sidecar(make_sidecar, runtime)
    body = encode(GITHUB_PUSH)
    sig = github_headers(body)[H].removeprefix("sha256=")
    sent = [("X-GitHub-Event", "push")]
    sent += [(n, v.format(sig=sig, short=sig[:-1])) for n, v in headers]
    status, _, reply = await deliver(sc, PATH, body, sent)
    assert (status, reply["error"]) == (401, "signature_invalid")
    assert H in reply["message"]
    assert sig[:16] not in reply["message"]
    assert runtime.calls == []


async def test_non_ascii_signature_header(make_sidecar: Any, runtime: Runtime) -> None:
    sc = await github_sidecar(make_sidecar, runtime)
    body = encode(GITHUB_PUSH)
    raw = (
        b"POST /hooks/github HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"X-Hub-Signature-256: sha256=\xc3\xa9" + b"a" * 62 + b"\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    reader, writer = await asyncio.open_connection(sc.client.host, sc.client.port)
    writer.write(raw)
    head = await reader.readuntil(b"\r\n\r\n")
    writer.close()
    assert head.startswith(b"HTTP/1.1 401")


async def test_ping_is_answered_and_not_forwarded(make_sidecar: Any, runtime: Runtime) -> None:
    sc = await github_sidecar(make_sidecar, runtime, when="headers['x-github-event'] == 'push'")
    body = encode(GITHUB_PING)
    status, _, reply = await deliver(sc, PATH, body, github_headers(body, event="ping"))
    assert status == 200
    assert reply["status"] == "ok" and reply["event"] == "ping" and "requestId" in reply
    assert runtime.calls == []
    # an unsigned ping is no ping
    headers = github_headers(body, event="ping")
    headers["X-Hub-Signature-256"] = "sha256=" + "0" * 64
    status, _, reply = await deliver(sc, PATH, body, headers)
    assert (status, reply["error"]) == (401, "signature_invalid")


async def test_when_false_is_ignored_and_counted(make_sidecar: Any, runtime: Runtime) -> None:
    when = "headers['x-github-event'] in ['push'] and body.repository.full_name == 'acme/api'"
    sc = await github_sidecar(make_sidecar, runtime, when=when)
    other = dict(GITHUB_PUSH, repository={"name": "web", "full_name": "acme/web"})
    body = encode(other)
    status, _, reply = await deliver(sc, PATH, body, github_headers(body))
    assert status == 200 and reply["ignored"] is True and reply["status"] == "ok"
    assert runtime.calls == []
    body = encode(GITHUB_PUSH)
    status, _, reply = await deliver(sc, PATH, body, github_headers(body, event="issues"))
    assert reply["ignored"] is True
    status, _, reply = await deliver(sc, PATH, body, github_headers(body))
    assert status == 200 and "ignored" not in reply
    assert len(runtime.calls) == 1
    scrape = Scrape.of(sc.state.metrics.registry)
    assert scrape.value("webhook_sidecar_route_ignored_total", route="github") == 2
    assert [e["outcome"] for e in sc.audit.entries()] == ["ignored", "ignored", "forwarded"]


async def test_rotation_two_secrets_and_not_after(make_sidecar: Any, runtime: Runtime) -> None:
    secrets = [
        {"id": "gh-new", "value": GH_SECRET},
        {"id": "gh-old", "value": GH_OLD_SECRET, "notAfter": "2020-01-01T00:00:00Z"},
    ]
    spec = github_route(secrets=secrets)
    sc = await make_sidecar(route_doc(runtime.path, {"github": spec}))
    body = encode(GITHUB_PUSH)
    status, _, _ = await deliver(sc, PATH, body, github_headers(body))
    assert status == 200 and runtime.calls[-1]["secretId"] == "gh-new"
    status, _, reply = await deliver(sc, PATH, body, github_headers(body, GH_OLD_SECRET))
    assert (status, reply["error"]) == (401, "signature_invalid")
    # both valid: either signs
    secrets[1].pop("notAfter")
    sc = await make_sidecar(route_doc(runtime.path, {"github": github_route(secrets=secrets)}))
    status, _, _ = await deliver(sc, PATH, body, github_headers(body, GH_OLD_SECRET))
    assert status == 200 and runtime.calls[-1]["secretId"] == "gh-old"


async def test_signature_failures_count_toward_the_lockout(
    make_sidecar: Any, runtime: Runtime
) -> None:
    doc = route_doc(runtime.path, {"github": github_route()}, authLockout={"maxFailures": 3})
    sc = await make_sidecar(doc)
    body = encode(GITHUB_PUSH)
    bad = github_headers(body, secret=GH_OLD_SECRET)
    for _ in range(3):
        status, _, reply = await deliver(sc, PATH, body, bad)
        assert reply["error"] == "signature_invalid"
    status, headers, reply = await deliver(sc, PATH, body, github_headers(body))
    assert (status, reply["error"]) == (429, "locked_out") and "Retry-After" in headers
    # the seed's hooks share the lock: it is the address that failed
    status, _, reply = await sc.post("/hooks/wake", {"agent": AGENT})
    assert reply["error"] == "locked_out"


async def test_order_of_cheap_refusals(make_sidecar: Any, runtime: Runtime) -> None:
    sc = await github_sidecar(make_sidecar, runtime)
    body = encode(GITHUB_PUSH)
    status, _, reply = await deliver(sc, "/hooks/gitbub", body, github_headers(body))
    assert (status, reply["error"]) == (404, "not_found")
    async with sc.client.get(PATH) as resp:
        assert resp.status == 405 and resp.headers["Allow"] == "POST"
    status, _, reply = await deliver(sc, PATH + "?token=x", body, github_headers(body))
    assert (status, reply["error"]) == (400, "token_in_query")
    # the signature before the media type and the JSON
    status, _, reply = await deliver(sc, PATH, b"not json", {}, content_type="text/plain")
    assert (status, reply["error"]) == (401, "signature_invalid")
    status, _, reply = await deliver(sc, PATH, b"not json", github_headers(b"not json"))
    assert (status, reply["error"]) == (400, "invalid_json")
    status, _, reply = await deliver(
        sc, PATH, body, github_headers(body), content_type="text/plain"
    )
    assert (status, reply["error"]) == (415, "unsupported_media_type")
    form = b"payload=" + body
    status, _, reply = await deliver(
        sc, PATH, form, github_headers(form), content_type="application/x-www-form-urlencoded"
    )
    assert (status, reply["error"]) == (415, "unsupported_media_type")
    assert runtime.calls == []


async def test_oversized_body_is_413(make_sidecar: Any, runtime: Runtime) -> None:
    doc = route_doc(runtime.path, {"github": github_route()}, limits={"maxBodyBytes": 1024})
    sc = await make_sidecar(doc)
    body = encode(dict(GITHUB_PUSH, padding="x" * 2000))
    status, _, reply = await deliver(sc, PATH, body, github_headers(body))
    assert (status, reply["error"]) == (413, "payload_too_large")


async def test_disabled_webhooks_close_routes(make_sidecar: Any, runtime: Runtime) -> None:
    doc = route_doc(runtime.path, {"github": github_route()})
    doc["webhooks"]["enabled"] = False
    sc = await make_sidecar(doc)
    body = encode(GITHUB_PUSH)
    status, _, reply = await deliver(sc, PATH, body, github_headers(body))
    assert (status, reply["error"]) == (503, "webhooks_disabled")


async def test_templates_errors(make_sidecar: Any, runtime: Runtime) -> None:
    sc = await github_sidecar(make_sidecar, runtime, message="{{ body.nothing }}")
    body = encode(GITHUB_PUSH)
    status, _, reply = await deliver(sc, PATH, body, github_headers(body))
    assert (status, reply["error"]) == (422, "template_error")
    assert "message" in reply["message"]
    sc = await github_sidecar(make_sidecar, runtime, sessionKey="gh {{ body.repository.name }}")
    status, _, reply = await deliver(sc, PATH, body, github_headers(body))
    assert (status, reply["error"]) == (422, "template_error")
    assert "sessionKey" in reply["message"]
    assert runtime.calls == []


async def test_rendered_session_key_obeys_the_agent_policy(
    make_sidecar: Any, runtime: Runtime
) -> None:
    doc = route_doc(runtime.path, {"github": github_route()})
    doc["webhooks"]["agents"][AGENT]["sessionKeyPrefixes"] = ["order-"]
    sc = await make_sidecar(doc)
    body = encode(GITHUB_PUSH)
    status, _, reply = await deliver(sc, PATH, body, github_headers(body))
    assert (status, reply["error"]) == (403, "session_key_not_allowed")
    doc["webhooks"]["agents"][AGENT] = {"allowRequestSessionKey": False}
    sc = await make_sidecar(doc)
    status, _, reply = await deliver(sc, PATH, body, github_headers(body))
    assert (status, reply["error"]) == (403, "session_key_not_allowed")
    # without a sessionKey template the agent's own session is used
    spec = github_route()
    del spec["sessionKey"]
    doc["webhooks"]["routes"] = {"github": spec}
    sc = await make_sidecar(doc)
    status, _, reply = await deliver(sc, PATH, body, github_headers(body))
    assert status == 200 and reply["session"] == f"webhook:{AGENT}"


async def test_message_is_cut_to_max_message_chars(make_sidecar: Any, runtime: Runtime) -> None:
    doc = route_doc(runtime.path, {"github": github_route()}, limits={"maxMessageChars": 20})
    sc = await make_sidecar(doc)
    body = encode(GITHUB_PUSH)
    status, _, _ = await deliver(sc, PATH, body, github_headers(body))
    assert status == 200 and runtime.calls[0]["message"] == "GitHub push on acme/"


async def test_no_secret_signature_or_text_in_logs(
    make_sidecar: Any, runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    sc = await github_sidecar(make_sidecar, runtime, message="{{ body.head_commit.message }}")
    body = encode(GITHUB_PUSH)
    good = github_headers(body)
    await deliver(sc, PATH, body, good)
    bad = github_headers(body, secret=GH_OLD_SECRET)
    await deliver(sc, PATH, body, bad)
    text = caplog.text + "\n".join(sc.audit.lines)
    for needle in (GH_SECRET, GH_OLD_SECRET, good["X-Hub-Signature-256"][7:],
                   bad["X-Hub-Signature-256"][7:], "Fix the flaky deploy step"):  # fmt: skip
        assert needle not in text
