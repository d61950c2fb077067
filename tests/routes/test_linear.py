"""Linear deliveries: ``Linear-Signature`` over the body, and the signed
``webhookTimestamp`` (ms) in the body within tolerance."""

from __future__ import annotations

import time
from typing import Any

import pytest
from support.common import Runtime
from support.senders import (
    LINEAR_ISSUE,
    LINEAR_SECRET,
    deliver,
    encode,
    linear_headers,
    route,
    route_doc,
)

PATH = "/hooks/linear"


def body_at(ms: Any) -> bytes:
    return encode(dict(LINEAR_ISSUE, webhookTimestamp=ms))


async def linear_sidecar(make_sidecar: Any, runtime: Runtime) -> Any:
    spec = route(
        "linear",
        LINEAR_SECRET,
        when="body.type == 'Issue' and body.action == 'create'",
        message="{{ body.data.identifier }}: {{ body.data.title }} ({{ body.url }})",
    )
    return await make_sidecar(route_doc(runtime.path, {"linear": spec}))


async def test_a_signed_issue_is_forwarded(make_sidecar: Any, runtime: Runtime) -> None:
    sc = await linear_sidecar(make_sidecar, runtime)
    body = body_at(int(time.time() * 1000))
    status, _, reply = await deliver(sc, PATH, body, linear_headers(body))
    assert status == 200, reply
    [call] = runtime.calls
    assert call["message"].startswith("ENG-123: Checkout fails on Safari (https://linear.app/")
    assert call["idempotencyKey"] == "linear:234d1a4e-b617-4388-90fe-adc3633d6b72"


@pytest.mark.parametrize("offset_ms", [-301_000, 301_000])
async def test_webhook_timestamp_outside_tolerance(
    make_sidecar: Any, runtime: Runtime, offset_ms: int
) -> None:
    sc = await linear_sidecar(make_sidecar, runtime)
    body = body_at(int(time.time() * 1000) + offset_ms)
    status, _, reply = await deliver(sc, PATH, body, linear_headers(body))
    assert (status, reply["error"]) == (401, "signature_expired")
    assert "webhookTimestamp" in reply["message"]


@pytest.mark.parametrize("value", [None, "1700000000000", True])
async def test_webhook_timestamp_missing_or_not_a_number(
    make_sidecar: Any, runtime: Runtime, value: Any
) -> None:
    sc = await linear_sidecar(make_sidecar, runtime)
    body = body_at(value)
    status, _, reply = await deliver(sc, PATH, body, linear_headers(body))
    assert (status, reply["error"]) == (401, "signature_invalid")


async def test_a_changed_body_is_refused(make_sidecar: Any, runtime: Runtime) -> None:
    sc = await linear_sidecar(make_sidecar, runtime)
    body = body_at(int(time.time() * 1000))
    headers = linear_headers(body)
    status, _, reply = await deliver(sc, PATH, body.replace(b"Safari", b"Chrome"), headers)
    assert (status, reply["error"]) == (401, "signature_invalid")
    headers["Linear-Signature"] = "sha256=" + headers["Linear-Signature"]
    status, _, reply = await deliver(sc, PATH, body, headers)
    assert (status, reply["error"]) == (401, "signature_invalid")
    assert "Linear-Signature" in reply["message"]
    assert runtime.calls == []
