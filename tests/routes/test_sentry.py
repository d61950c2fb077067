"""Sentry integration deliveries: ``Sentry-Hook-Signature`` over the body, ``Request-ID``
as the delivery id, ``Sentry-Hook-Resource`` for filtering."""

from __future__ import annotations

from typing import Any

from support.common import Runtime
from support.senders import (
    SENTRY_ISSUE,
    SENTRY_SECRET,
    deliver,
    encode,
    route,
    route_doc,
    sentry_headers,
)

PATH = "/hooks/sentry"
BODY = encode(SENTRY_ISSUE)


async def sentry_sidecar(make_sidecar: Any, runtime: Runtime) -> Any:
    spec = route(
        "sentry",
        SENTRY_SECRET,
        when="headers['sentry-hook-resource'] == 'issue' and body.action == 'created'",
        message="Sentry {{ body.data.issue.shortId }}: {{ body.data.issue.title }}",
        sessionKey="sentry-{{ body.data.issue.project.slug }}",
    )
    return await make_sidecar(route_doc(runtime.path, {"sentry": spec}))


async def test_a_signed_issue_is_forwarded(make_sidecar: Any, runtime: Runtime) -> None:
    sc = await sentry_sidecar(make_sidecar, runtime)
    status, _, reply = await deliver(sc, PATH, BODY, sentry_headers(BODY))
    assert status == 200, reply
    [call] = runtime.calls
    assert call["message"] == "Sentry API-1Z: ZeroDivisionError: division by zero"
    assert call["sessionKey"] == "sentry-api"
    assert call["idempotencyKey"] == "sentry:4c1b7f2a-5d3e-4e8f-9a0b-6c2d1e3f4a5b"


async def test_other_resources_are_ignored(make_sidecar: Any, runtime: Runtime) -> None:
    sc = await sentry_sidecar(make_sidecar, runtime)
    headers = sentry_headers(BODY)
    headers["Sentry-Hook-Resource"] = "installation"
    status, _, reply = await deliver(sc, PATH, BODY, headers)
    assert status == 200 and reply["ignored"] is True


async def test_wrong_or_malformed_signatures(make_sidecar: Any, runtime: Runtime) -> None:
    sc = await sentry_sidecar(make_sidecar, runtime)
    for headers in [
        sentry_headers(BODY, secret="0123456789abcdef" * 4),
        {**sentry_headers(BODY), "Sentry-Hook-Signature": "not-hex"},
        {k: v for k, v in sentry_headers(BODY).items() if k != "Sentry-Hook-Signature"},
    ]:
        status, _, reply = await deliver(sc, PATH, BODY, headers)
        assert (status, reply["error"]) == (401, "signature_invalid")
        assert "Sentry-Hook-Signature" in reply["message"]
    status, _, reply = await deliver(sc, PATH, BODY[:-1] + b" }", sentry_headers(BODY))
    assert (status, reply["error"]) == (401, "signature_invalid")
    assert runtime.calls == []
