"""``verify: "bearer"`` for Alertmanager, Grafana and friends, with a template; and the
generic ``{hmac, header, prefix, encoding}`` form (sha256/sha1, hex/base64, empty prefix)."""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Any

import pytest
from support.common import SECRET, Runtime
from support.scrape import Scrape
from support.senders import (
    ALERTMANAGER,
    BEARER_TOKEN,
    HMAC_SECRET,
    deliver,
    encode,
    route,
    route_doc,
)

BODY = encode(ALERTMANAGER)
ALERT_MESSAGE = (
    "[{{ body.status | upper }}] {{ body.commonLabels.alertname }}: "
    "{{ body.commonAnnotations.summary }}"
)


async def test_alertmanager_with_a_bearer_token(make_sidecar: Any, runtime: Runtime) -> None:
    spec = route("bearer", BEARER_TOKEN, message=ALERT_MESSAGE, sessionKey="alerts")
    sc = await make_sidecar(route_doc(runtime.path, {"alerts": spec}))
    status, _, reply = await sc.post("/hooks/alerts", raw=BODY, token=BEARER_TOKEN)
    assert status == 200, reply
    [call] = runtime.calls
    assert call["message"] == "[FIRING] HighErrorRate: API error rate above 5% for 10 minutes"
    assert call["idempotencyKey"] is None
    headers = {"Authorization": f"Bearer {BEARER_TOKEN}", "Idempotency-Key": "grp-1"}
    status, _, _ = await deliver(sc, "/hooks/alerts", BODY, headers)
    assert status == 200 and runtime.calls[1]["idempotencyKey"] == "alerts:grp-1"
    for token in (SECRET, BEARER_TOKEN[:-1], None):
        status, _, reply = await sc.post("/hooks/alerts", raw=BODY, token=token)
        assert (status, reply["error"]) == (401, "signature_invalid")
    status, _, reply = await sc.post("/hooks/wake", {"agent": "my-agent"}, token=BEARER_TOKEN)
    assert (status, reply["error"]) == (401, "unauthorized")
    scrape = Scrape.of(sc.state.metrics.registry)
    assert scrape.value("webhook_sidecar_route_requests_total", route="alerts", code="401") == 3
    assert scrape.value("webhook_sidecar_rejections_total", reason="signature_invalid") == 3


def sign(secret: str, body: bytes, digest: str, encoding: str) -> str:
    mac = hmac.new(secret.encode(), body, getattr(hashlib, digest)).digest()
    return mac.hex() if encoding == "hex" else base64.b64encode(mac).decode()


@pytest.mark.parametrize(
    ("digest", "prefix", "encoding"),
    [("sha256", "sha256=", "hex"), ("sha256", "", "base64"), ("sha1", "sha1=", "hex")],
)
async def test_generic_hmac(
    make_sidecar: Any, runtime: Runtime, digest: str, prefix: str, encoding: str
) -> None:
    verify = {"hmac": digest, "header": "X-Signature", "prefix": prefix, "encoding": encoding}
    spec = route(verify, HMAC_SECRET, message="{{ body.commonAnnotations.summary }}")
    sc = await make_sidecar(route_doc(runtime.path, {"custom": spec}))
    good = prefix + sign(HMAC_SECRET, BODY, digest, encoding)
    status, _, reply = await deliver(sc, "/hooks/custom", BODY, {"X-Signature": good})
    assert status == 200, reply
    wrong = prefix + sign(HMAC_SECRET + "x", BODY, digest, encoding)
    other = "sha512=" + sign(HMAC_SECRET, BODY, digest, encoding)
    for value in (wrong, other, good[:-2]):
        status, _, reply = await deliver(sc, "/hooks/custom", BODY, {"X-Signature": value})
        assert (status, reply["error"]) == (401, "signature_invalid")
        assert "X-Signature" in reply["message"]
    status, _, reply = await deliver(sc, "/hooks/custom", BODY + b" ", {"X-Signature": good})
    assert (status, reply["error"]) == (401, "signature_invalid")
    assert len(runtime.calls) == 1
