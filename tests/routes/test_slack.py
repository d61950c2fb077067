"""Slack deliveries, checked against slack_sdk's own ``SignatureVerifier``: JSON events,
``url_verification`` answered with its challenge, slash-command forms and interactivity's
``payload=`` form, and the timestamp window."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlencode

import pytest
from slack_sdk.signature import SignatureVerifier
from support.common import Runtime
from support.senders import (
    SLACK_CHALLENGE,
    SLACK_EVENT,
    SLACK_SECRET,
    deliver,
    encode,
    now,
    route,
    route_doc,
    slack_headers,
)

PATH = "/hooks/slack"
FORM = "application/x-www-form-urlencoded"
BODY = encode(SLACK_EVENT)


async def slack_sidecar(make_sidecar: Any, runtime: Runtime, **more: Any) -> Any:
    spec = route(
        "slack",
        SLACK_SECRET,
        **{
            "message": "{{ body.event.text or body.text or body.actions[0].value }}",
            "when": "body.type != 'ignored_type'",
            **more,
        },
    )
    return await make_sidecar(route_doc(runtime.path, {"slack": spec}))


def sdk_headers(body: bytes) -> dict[str, str]:
    ts = str(now())
    signature = SignatureVerifier(SLACK_SECRET).generate_signature(timestamp=ts, body=body)
    assert signature is not None
    return {"X-Slack-Request-Timestamp": ts, "X-Slack-Signature": signature}


async def test_an_event_signed_by_slack_sdk_is_forwarded(
    make_sidecar: Any, runtime: Runtime
) -> None:
    sc = await slack_sidecar(make_sidecar, runtime)
    status, _, reply = await deliver(sc, PATH, BODY, sdk_headers(BODY))
    assert status == 200, reply
    [call] = runtime.calls
    assert call["message"] == "<@U0LAN0Z89> is the deploy green?"
    assert call["idempotencyKey"] == "slack:Ev0PV52K25"


async def test_the_sdk_and_the_sidecar_agree(make_sidecar: Any, runtime: Runtime) -> None:
    sc = await slack_sidecar(make_sidecar, runtime)
    verifier = SignatureVerifier(SLACK_SECRET)
    good = slack_headers(BODY)
    assert verifier.is_valid(BODY, good["X-Slack-Request-Timestamp"], good["X-Slack-Signature"])
    assert (await deliver(sc, PATH, BODY, good))[0] == 200
    for body, headers in [
        (BODY + b" ", good),
        (BODY, slack_headers(BODY, ts=now() - 400)),
        (BODY, slack_headers(BODY, ts=now() + 400)),
        (BODY, slack_headers(BODY, secret="0" * 32)),
    ]:
        ts, sig = headers["X-Slack-Request-Timestamp"], headers["X-Slack-Signature"]
        assert not verifier.is_valid(body, ts, sig)
        status, _, reply = await deliver(sc, PATH, body, headers)
        assert status == 401 and reply["error"] in ("signature_invalid", "signature_expired")
    assert len(runtime.calls) == 1


@pytest.mark.parametrize("offset", [-301, 301])
async def test_timestamp_outside_tolerance(
    make_sidecar: Any, runtime: Runtime, offset: int
) -> None:
    sc = await slack_sidecar(make_sidecar, runtime)
    status, _, reply = await deliver(sc, PATH, BODY, slack_headers(BODY, ts=now() + offset))
    assert (status, reply["error"]) == (401, "signature_expired")
    assert "X-Slack-Request-Timestamp" in reply["message"]


async def test_url_verification_is_answered_with_the_challenge(
    make_sidecar: Any, runtime: Runtime
) -> None:
    sc = await slack_sidecar(make_sidecar, runtime, when="false")
    body = encode(SLACK_CHALLENGE)
    status, headers, reply = await deliver(sc, PATH, body, slack_headers(body))
    assert status == 200
    assert reply == {"challenge": SLACK_CHALLENGE["challenge"]}
    assert headers["Content-Type"] == "application/json"
    assert runtime.calls == []
    # unsigned, it is refused like anything else
    headers_bad = slack_headers(body, secret="f" * 32)
    status, _, reply = await deliver(sc, PATH, body, headers_bad)
    assert (status, reply["error"]) == (401, "signature_invalid")


async def test_a_slash_command_form(make_sidecar: Any, runtime: Runtime) -> None:
    sc = await slack_sidecar(make_sidecar, runtime, message="{{ body.command }} {{ body.text }}")
    body = urlencode(
        {
            "token": "gIkuvaNzQIHg97ATvDxqgjtO",
            "team_id": "T0001",
            "channel_id": "C2147483705",
            "user_id": "U2147483697",
            "command": "/deploy",
            "text": "api to staging",
            "response_url": "https://hooks.slack.com/commands/1234/5678",
            "trigger_id": "13345224609.738474920.8088930838d88f008e0",
        }
    ).encode()
    status, _, reply = await deliver(sc, PATH, body, slack_headers(body), content_type=FORM)
    assert status == 200, reply
    assert runtime.calls[0]["message"] == "/deploy api to staging"
    assert runtime.calls[0]["idempotencyKey"] is None  # forms carry no event_id


async def test_an_interactive_payload_form(make_sidecar: Any, runtime: Runtime) -> None:
    sc = await slack_sidecar(make_sidecar, runtime, message="{{ body.actions[0].value }}")
    payload = {
        "type": "block_actions",
        "user": {"id": "U0CA5", "username": "amy"},
        "actions": [{"action_id": "approve", "value": "approve-deploy-42", "type": "button"}],
    }
    body = urlencode({"payload": json.dumps(payload)}).encode()
    status, _, reply = await deliver(sc, PATH, body, slack_headers(body), content_type=FORM)
    assert status == 200, reply
    assert runtime.calls[0]["message"] == "approve-deploy-42"


async def test_forms_are_verified_and_bad_forms_refused(
    make_sidecar: Any, runtime: Runtime
) -> None:
    sc = await slack_sidecar(make_sidecar, runtime)
    body = b"command=%2Fdeploy&text=x"
    headers = slack_headers(body)
    status, _, reply = await deliver(sc, PATH, body + b"y", headers, content_type=FORM)
    assert (status, reply["error"]) == (401, "signature_invalid")
    dup = b"text=a&text=b"
    status, _, reply = await deliver(sc, PATH, dup, slack_headers(dup), content_type=FORM)
    assert (status, reply["error"]) == (400, "invalid_request")
    status, _, reply = await deliver(sc, PATH, BODY, slack_headers(BODY), content_type="text/plain")
    assert (status, reply["error"]) == (415, "unsupported_media_type")


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Slack-Signature": "v0=" + "a" * 64},  # no timestamp
        {"X-Slack-Request-Timestamp": "{ts}"},  # no signature
        {"X-Slack-Request-Timestamp": "{ts}", "X-Slack-Signature": "v1=" + "a" * 64},
        {"X-Slack-Request-Timestamp": "soon", "X-Slack-Signature": "{sig}"},
    ],
)
async def test_malformed_headers(
    make_sidecar: Any, runtime: Runtime, headers: dict[str, str]
) -> None:
    sc = await slack_sidecar(make_sidecar, runtime)
    good = slack_headers(BODY)
    sent = {
        k: v.format(ts=good["X-Slack-Request-Timestamp"], sig=good["X-Slack-Signature"])
        for k, v in headers.items()
    }
    status, _, reply = await deliver(sc, PATH, BODY, sent)
    assert (status, reply["error"]) == (401, "signature_invalid")
    assert "X-Slack-" in reply["message"]
