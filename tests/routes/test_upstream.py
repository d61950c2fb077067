"""What the runtime receives for a route call (docs/routes.md, "What the runtime receives"):
the forward protocol's X-Webhook-Route, and the openclaw protocol's exact header set
(no X-Webhook-Route: the gateway gets only what docs/upstream.md lists)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from support.fake_gateway import TOKEN, FakeGateway, openclaw_doc
from support.senders import GH_SECRET, GITHUB_PUSH, deliver, encode, github_headers, route


@pytest.mark.parametrize("action", ["agent", "wake"])
async def test_openclaw_gets_the_ordinary_call(
    make_sidecar: Any, gateway: FakeGateway, short_tmp: Path, action: str
) -> None:
    token_file = short_tmp / "token"
    token_file.write_text(TOKEN)
    doc = openclaw_doc(gateway, token_file)
    spec = route("github", GH_SECRET, when="true", sessionKey="gh-{{ body.repository.name }}")
    if action == "wake":
        spec = {k: v for k, v in spec.items() if k not in ("message", "sessionKey")}
        spec["action"] = "wake"
    doc["webhooks"]["routes"] = {"github": spec}
    sc = await make_sidecar(doc)
    body = encode(GITHUB_PUSH)
    status, _, reply = await deliver(sc, "/hooks/github", body, github_headers(body))
    assert status == 200, reply
    [seen] = gateway.hooks
    assert seen.path == f"/hooks/{action}"
    assert sorted(seen.header_names()) == sorted(
        ["host", "content-length", "authorization", "content-type", "idempotency-key"]
    )
    assert seen.header("Idempotency-Key") == "github:72d3162e-cc78-11e3-81ab-4c9367dc0958"
    if action == "agent":
        assert seen.json()["message"] == "github delivery"
        assert seen.json()["sessionKey"] == "hook:gh-api"
