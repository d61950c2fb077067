"""Stripe deliveries: ``Stripe-Signature: t=...,v1=...`` over ``<t>.<body>``, any v1 passes,
``t`` within tolerance either way, the event ``id`` as the delivery id."""

from __future__ import annotations

from typing import Any

import pytest
from support.common import Runtime
from support.senders import (
    STRIPE_EVENT,
    STRIPE_SECRET,
    deliver,
    encode,
    hex_hmac,
    now,
    route,
    route_doc,
    stripe_headers,
)

PATH = "/hooks/stripe"
BODY = encode(STRIPE_EVENT)
H = "Stripe-Signature"


async def stripe_sidecar(make_sidecar: Any, runtime: Runtime) -> Any:
    spec = route(
        "stripe",
        STRIPE_SECRET,
        when="body.type == 'payment_intent.succeeded'",
        message="Stripe {{ body.type }}: {{ body.data.object.amount }} "
        "{{ body.data.object.currency }}",
    )
    return await make_sidecar(route_doc(runtime.path, {"stripe": spec}))


async def test_a_signed_event_is_forwarded_with_its_id(make_sidecar: Any, runtime: Runtime) -> None:
    sc = await stripe_sidecar(make_sidecar, runtime)
    status, _, reply = await deliver(sc, PATH, BODY, stripe_headers(BODY))
    assert status == 200, reply
    [call] = runtime.calls
    assert call["message"] == "Stripe payment_intent.succeeded: 2000 usd"
    assert call["idempotencyKey"] == "stripe:evt_1NG8Du2eZvKYlo2CUI79vXWy"
    assert sc.audit.entries()[0]["deliveryId"] == "evt_1NG8Du2eZvKYlo2CUI79vXWy"


async def test_any_v1_passes_and_v0_is_ignored(make_sidecar: Any, runtime: Runtime) -> None:
    sc = await stripe_sidecar(make_sidecar, runtime)
    t = now()
    good = hex_hmac(STRIPE_SECRET, f"{t}.".encode() + BODY)
    other = hex_hmac("whsec_another_secret_of_some_length", f"{t}.".encode() + BODY)
    header = f"t={t},v1={other},v1={good},v0={'a' * 64}"
    status, _, reply = await deliver(sc, PATH, BODY, {H: header})
    assert status == 200, reply
    status, _, reply = await deliver(sc, PATH, BODY, {H: f"t={t},v1={other},v0={good}"})
    assert (status, reply["error"]) == (401, "signature_invalid")


@pytest.mark.parametrize("offset", [-301, 301])
async def test_old_and_future_timestamps_expire(
    make_sidecar: Any, runtime: Runtime, offset: int
) -> None:
    sc = await stripe_sidecar(make_sidecar, runtime)
    status, _, reply = await deliver(sc, PATH, BODY, stripe_headers(BODY, t=now() + offset))
    assert (status, reply["error"]) == (401, "signature_expired")
    status, _, reply = await deliver(sc, PATH, BODY, stripe_headers(BODY, t=now() + offset // 2))
    assert status == 200


async def test_an_expired_timestamp_with_a_wrong_signature_is_invalid(
    make_sidecar: Any, runtime: Runtime
) -> None:
    # who does not hold the secret learns nothing about the time window
    sc = await stripe_sidecar(make_sidecar, runtime)
    headers = stripe_headers(BODY, secret="whsec_wrong_wrong_wrong_wrong_wrong", t=now() - 9999)
    status, _, reply = await deliver(sc, PATH, BODY, headers)
    assert (status, reply["error"]) == (401, "signature_invalid")


async def test_re_signed_timestamp_is_invalid(make_sidecar: Any, runtime: Runtime) -> None:
    sc = await stripe_sidecar(make_sidecar, runtime)
    old = stripe_headers(BODY, t=now() - 1000)[H]
    v1 = old.split(",", 1)[1]
    status, _, reply = await deliver(sc, PATH, BODY, {H: f"t={now()},{v1}"})
    assert (status, reply["error"]) == (401, "signature_invalid")


@pytest.mark.parametrize(
    "header",
    [
        "",
        "v1={sig}",  # no t
        "t={t}",  # no v1
        "t={t},v1={sig},t={t}",  # two t
        "t=abc,v1={sig}",  # not a number
        "t={t},v1=xyz",  # not hex
        "t={t};v1={sig}",  # wrong separator
        "t={t},v1={sig}" + ",v1=" + "a" * 4096,  # oversized
    ],
)
async def test_malformed_header(make_sidecar: Any, runtime: Runtime, header: str) -> None:
    sc = await stripe_sidecar(make_sidecar, runtime)
    t = now()
    sig = hex_hmac(STRIPE_SECRET, f"{t}.".encode() + BODY)
    status, _, reply = await deliver(sc, PATH, BODY, {H: header.format(t=t, sig=sig)})
    assert (status, reply["error"]) == (401, "signature_invalid")
    assert H in reply["message"] and sig not in reply["message"]
    assert runtime.calls == []


async def test_other_event_types_are_ignored(make_sidecar: Any, runtime: Runtime) -> None:
    sc = await stripe_sidecar(make_sidecar, runtime)
    body = encode(dict(STRIPE_EVENT, type="customer.created"))
    status, _, reply = await deliver(sc, PATH, body, stripe_headers(body))
    assert status == 200 and reply["ignored"] is True
    assert runtime.calls == []
