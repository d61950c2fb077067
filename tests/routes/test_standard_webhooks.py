"""Standard Webhooks (and Svix) deliveries, checked against the reference verifier from
PyPI (``standardwebhooks``): what it signs the sidecar accepts, what the sidecar accepts
it verifies, and both refuse the same tampered, expired and future deliveries."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from standardwebhooks import Webhook, WebhookVerificationError
from support.common import AGENT, Runtime
from support.senders import SW_KEY, SW_SECRET, deliver, now, route, route_doc, standard_headers

from sidecar.config.parser import ConfigError, loads

PATH = "/hooks/billing"
# The shape of a Standard Webhooks payload (type, timestamp, data), as in the spec's examples.
EVENT: dict[str, Any] = {
    "type": "invoice.paid",
    "timestamp": "2026-11-02T10:15:00.000Z",
    "data": {"id": "inv_1NG8Du2eZvKYlo2C", "customer": "cus_9s6XKzkNRiz8i3", "amount": 4200},
}
BODY = json.dumps(EVENT).encode()
MESSAGE = "{{ body.type }} for {{ body.data.customer }} ({{ headers['webhook-id'] }})"


async def sw_sidecar(make_sidecar: Any, runtime: Runtime, **more: Any) -> Any:
    spec = route("standard-webhooks", SW_SECRET, **{"message": MESSAGE, "when": "true", **more})
    return await make_sidecar(route_doc(runtime.path, {"billing": spec}))


def reference_headers(msg_id: str, when: datetime, body: bytes = BODY) -> dict[str, str]:
    signature = Webhook(SW_SECRET).sign(msg_id, when, body)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(when.timestamp())),
        "webhook-signature": signature,
    }


async def test_what_the_reference_signs_is_accepted(make_sidecar: Any, runtime: Runtime) -> None:
    sc = await sw_sidecar(make_sidecar, runtime)
    headers = reference_headers("msg_2KWPBgLlAfxdpx2AI54pPJ85f4W", datetime.now(UTC))
    status, _, reply = await deliver(sc, PATH, BODY, headers)
    assert status == 200, reply
    [call] = runtime.calls
    assert (
        call["message"] == "invoice.paid for cus_9s6XKzkNRiz8i3 (msg_2KWPBgLlAfxdpx2AI54pPJ85f4W)"
    )
    assert call["idempotencyKey"] == "billing:msg_2KWPBgLlAfxdpx2AI54pPJ85f4W"
    assert call["agent"] == AGENT and call["route"] == "billing"


async def test_what_the_sidecar_accepts_the_reference_verifies(
    make_sidecar: Any, runtime: Runtime
) -> None:
    sc = await sw_sidecar(make_sidecar, runtime)
    headers = standard_headers(BODY)
    assert Webhook(SW_SECRET).verify(BODY, headers) == EVENT
    status, _, _ = await deliver(sc, PATH, BODY, headers)
    assert status == 200


@pytest.mark.parametrize(
    ("change", "code"),
    [
        pytest.param(lambda b, h: (b.replace(b"4200", b"4201"), h), "signature_invalid", id="body"),
        pytest.param(
            lambda b, h: (b, {**h, "webhook-id": "msg_other"}), "signature_invalid", id="id"
        ),
        pytest.param(
            lambda b, h: (b, {**h, "webhook-timestamp": str(int(h["webhook-timestamp"]) + 1)}),
            "signature_invalid",
            id="timestamp changed",
        ),
        pytest.param(
            lambda b, h: (b, {**h, "webhook-signature": "v2" + h["webhook-signature"][2:]}),
            "signature_invalid",
            id="no v1",
        ),
    ],
)
async def test_tampered_deliveries_are_refused_by_both(
    make_sidecar: Any, runtime: Runtime, change: Any, code: str
) -> None:
    sc = await sw_sidecar(make_sidecar, runtime)
    body, headers = change(BODY, standard_headers(BODY))
    with pytest.raises(WebhookVerificationError):
        Webhook(SW_SECRET).verify(body, headers)
    status, _, reply = await deliver(sc, PATH, body, headers)
    assert (status, reply["error"]) == (401, code)
    assert runtime.calls == []


@pytest.mark.parametrize("offset", [-301, 301, -3600, 86400])
async def test_expired_and_future_timestamps(
    make_sidecar: Any, runtime: Runtime, offset: int
) -> None:
    sc = await sw_sidecar(make_sidecar, runtime)
    headers = standard_headers(BODY, ts=now() + offset)
    with pytest.raises(WebhookVerificationError):
        Webhook(SW_SECRET).verify(BODY, headers)
    status, _, reply = await deliver(sc, PATH, BODY, headers)
    assert (status, reply["error"]) == (401, "signature_expired")
    assert "webhook-timestamp" in reply["message"]


async def test_tolerance_is_configurable(make_sidecar: Any, runtime: Runtime) -> None:
    sc = await sw_sidecar(make_sidecar, runtime, tolerance="1h")
    status, _, _ = await deliver(sc, PATH, BODY, standard_headers(BODY, ts=now() - 1800))
    assert status == 200
    status, _, reply = await deliver(sc, PATH, BODY, standard_headers(BODY, ts=now() - 3700))
    assert reply["error"] == "signature_expired"


@pytest.mark.parametrize("stamp", ["12e3", "-5", "", "1700000000.5", "\u0661" * 10])
async def test_a_non_numeric_timestamp_is_invalid(
    make_sidecar: Any, runtime: Runtime, stamp: str
) -> None:
    sc = await sw_sidecar(make_sidecar, runtime)
    headers = standard_headers(BODY)
    headers["webhook-timestamp"] = stamp
    status, _, reply = await deliver(sc, PATH, BODY, headers)
    assert (status, reply["error"]) == (401, "signature_invalid")


async def test_any_listed_v1_passes(make_sidecar: Any, runtime: Runtime) -> None:
    sc = await sw_sidecar(make_sidecar, runtime)
    headers = standard_headers(BODY)
    good = headers["webhook-signature"]
    other = standard_headers(BODY, key=b"another key of enough length!!")["webhook-signature"]
    headers["webhook-signature"] = f"v1a,c29tZXRoaW5n {other} {good}"
    assert Webhook(SW_SECRET).verify(BODY, headers) == EVENT
    status, _, _ = await deliver(sc, PATH, BODY, headers)
    assert status == 200
    headers["webhook-signature"] = other
    status, _, reply = await deliver(sc, PATH, BODY, headers)
    assert reply["error"] == "signature_invalid"


async def test_svix_header_names(make_sidecar: Any, runtime: Runtime) -> None:
    sc = await sw_sidecar(make_sidecar, runtime, message="{{ body.type }}")
    headers = standard_headers(BODY, prefix="svix")
    status, _, reply = await deliver(sc, PATH, BODY, headers)
    assert status == 200, reply
    assert runtime.calls[0]["idempotencyKey"] == "billing:msg_2KWPBgLlAfxdpx2AI54pPJ85f4W"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("webhook-signature", "v1,not base64!"),
        ("webhook-signature", "v1," + "QUJD" * 2),  # base64, but not 32 bytes
        ("webhook-signature", "v1" + "x" * 5000),
        ("webhook-id", None),
        ("webhook-timestamp", None),
    ],
)
async def test_malformed_headers_name_the_header(
    make_sidecar: Any, runtime: Runtime, name: str, value: str | None
) -> None:
    sc = await sw_sidecar(make_sidecar, runtime)
    headers = standard_headers(BODY)
    if value is None:
        del headers[name]
    else:
        headers[name] = value
    status, _, reply = await deliver(sc, PATH, BODY, headers)
    assert (status, reply["error"]) == (401, "signature_invalid")
    assert name in reply["message"]


async def test_two_signature_headers_are_refused(make_sidecar: Any, runtime: Runtime) -> None:
    sc = await sw_sidecar(make_sidecar, runtime)
    headers = list(standard_headers(BODY).items())
    headers.append(("webhook-signature", headers[-1][1]))
    status, _, reply = await deliver(sc, PATH, BODY, headers)
    assert (status, reply["error"]) == (401, "signature_invalid")


def test_the_secret_is_the_decoded_key() -> None:
    # the key is the base64-decoded bytes: signing with the text of the secret fails
    text_signed = standard_headers(BODY, key=SW_SECRET.encode())
    with pytest.raises(WebhookVerificationError):
        Webhook(SW_SECRET).verify(BODY, text_signed)
    Webhook(SW_SECRET).verify(BODY, standard_headers(BODY, key=SW_KEY))


def test_a_secret_that_is_not_base64_is_a_config_error() -> None:
    doc = {
        "webhooks": {
            "secret": "8f3a1c2e9b7d4f6a0c5e8b1d3f7a9c2e4b6d8f0a1c3e5b7d9f2a4c6e8b0d1f3a",
            "agents": {AGENT: {}},
            "routes": {
                "billing": route("standard-webhooks", "whsec_this is not base64 at all!!"),
            },
        }
    }
    with pytest.raises(ConfigError) as err:
        loads(json.dumps(doc))
    assert "webhooks.routes.billing.secrets" in str(err.value)
    assert "base64" in str(err.value)
    assert "this is not base64" not in str(err.value)
