"""Signed senders for the route tests (tests/routes/): each provider's signature scheme,
written from its public documentation, payloads in each provider's documented format,
and a sidecar with one route in front of the reference runtime."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

from multidict import CIMultiDict

from support.common import AGENT, Sidecar, base_doc, read_reply

# Route secrets: long and random-looking, different from the webhooks secret.
GH_SECRET = "3c9e1a7f5b2d8e4a6c0f9b1d7e3a5c8f2b4d6e8a0c1e3f5a7b9d2c4e6f8a0b1d"
GH_OLD_SECRET = "7a5c3e1f9d8b6a4c2e0f1d3b5a7c9e2f4d6b8a0c3e5f7a9b1d2c4e6f8a0b3d5c"
STRIPE_SECRET = "whsec_5f2b8d4e6a1c3f7b9d0e2a4c6f8b1d3e5a7c9f0b"
SLACK_SECRET = "8f14e45fceea167a5a36dedd4bea2543"  # Slack signing secrets: 32 hex
LINEAR_SECRET = "lin_wh_4d8e2a6c0f9b1d3e5a7c9f2b4d6e8a0c1e3f5a7b"
SENTRY_SECRET = "6b1d3f5a7c9e2b4d6f8a0c1e3f5a7b9d2c4e6f8a0b1d3c5e7f9a2b4d6c8e0f1a"
GITLAB_TOKEN = "glpat-like-9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f"
BEARER_TOKEN = "am-token-2f4e6a8c0b1d3f5e7a9c2b4d6f8e0a1c3b5d"
HMAC_SECRET = "custom-1e3d5c7b9a0f2e4d6c8b0a1f3e5d7c9b2a4f6e8d"
# Standard Webhooks: whsec_ + base64 of the key bytes, as the sender's dashboard shows it.
SW_KEY = bytes(range(7, 39))
SW_SECRET = "whsec_" + base64.b64encode(SW_KEY).decode()


def now() -> int:
    return int(time.time())


def hex_hmac(secret: str | bytes, content: bytes, digest: str = "sha256") -> str:
    key = secret.encode() if isinstance(secret, str) else secret
    return hmac.new(key, content, getattr(hashlib, digest)).hexdigest()


def github_headers(body: bytes, secret: str = GH_SECRET, event: str = "push") -> dict[str, str]:
    return {
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": "72d3162e-cc78-11e3-81ab-4c9367dc0958",
        "X-GitHub-Hook-ID": "292430182",
        "User-Agent": "GitHub-Hookshot/044aadd",
        "X-Hub-Signature": "sha1=" + hex_hmac(secret, body, "sha1"),
        "X-Hub-Signature-256": "sha256=" + hex_hmac(secret, body),
    }


def stripe_headers(
    body: bytes, secret: str = STRIPE_SECRET, t: int | None = None
) -> dict[str, str]:
    t = now() if t is None else t
    return {"Stripe-Signature": f"t={t},v1={hex_hmac(secret, f'{t}.'.encode() + body)}"}


def slack_headers(body: bytes, secret: str = SLACK_SECRET, ts: int | None = None) -> dict[str, str]:
    ts = now() if ts is None else ts
    signature = "v0=" + hex_hmac(secret, f"v0:{ts}:".encode() + body)
    return {"X-Slack-Request-Timestamp": str(ts), "X-Slack-Signature": signature}


def linear_headers(body: bytes, secret: str = LINEAR_SECRET) -> dict[str, str]:
    return {
        "Linear-Delivery": "234d1a4e-b617-4388-90fe-adc3633d6b72",
        "Linear-Event": "Issue",
        "Linear-Signature": hex_hmac(secret, body),
    }


def sentry_headers(body: bytes, secret: str = SENTRY_SECRET) -> dict[str, str]:
    return {
        "Request-ID": "4c1b7f2a-5d3e-4e8f-9a0b-6c2d1e3f4a5b",
        "Sentry-Hook-Resource": "issue",
        "Sentry-Hook-Timestamp": str(now()),
        "Sentry-Hook-Signature": hex_hmac(secret, body),
    }


def standard_headers(
    body: bytes, key: bytes = SW_KEY, msg_id: str = "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W",
    ts: int | None = None, prefix: str = "webhook",
) -> dict[str, str]:  # fmt: skip
    ts = now() if ts is None else ts
    mac = hmac.new(key, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()
    return {
        f"{prefix}-id": msg_id,
        f"{prefix}-timestamp": str(ts),
        f"{prefix}-signature": "v1," + base64.b64encode(mac).decode(),
    }


# --------------------------------------------------------------------------- payloads
# Shapes from each provider's documentation (trimmed: the fields templates use, and
# enough around them to be the real thing).

GITHUB_PUSH: dict[str, Any] = {
    "ref": "refs/heads/main",
    "before": "6113728f27ae82c7b1a177c8d03f9e96e0adf246",
    "after": "0000000000000000000000000000000000000000",
    "repository": {
        "id": 186853002,
        "name": "api",
        "full_name": "acme/api",
        "private": False,
        "owner": {"name": "acme", "login": "acme"},
        "html_url": "https://github.com/acme/api",
        "default_branch": "main",
    },
    "pusher": {"name": "octocat", "email": "octocat@github.com"},
    "sender": {"login": "octocat", "id": 1, "type": "User"},
    "created": False,
    "deleted": False,
    "forced": False,
    "compare": "https://github.com/acme/api/compare/6113728f27ae...000000000000",
    "commits": [],
    "head_commit": {
        "id": "0000000000000000000000000000000000000000",
        "message": "Fix the flaky deploy step",
        "timestamp": "2026-11-02T10:15:00Z",
        "author": {"name": "Mona Lisa Octocat", "email": "octocat@github.com"},
    },
}
GITHUB_PING: dict[str, Any] = {
    "zen": "Design for failure.",
    "hook_id": 292430182,
    "hook": {"type": "Repository", "id": 292430182, "events": ["push"], "active": True},
    "repository": {"name": "api", "full_name": "acme/api"},
}
STRIPE_EVENT: dict[str, Any] = {
    "id": "evt_1NG8Du2eZvKYlo2CUI79vXWy",
    "object": "event",
    "api_version": "2024-06-20",
    "created": 1686089970,
    "data": {
        "object": {
            "id": "pi_3NG8Du2eZvKYlo2C0mRpdoWk",
            "object": "payment_intent",
            "amount": 2000,
            "currency": "usd",
            "status": "succeeded",
        }
    },
    "livemode": False,
    "pending_webhooks": 1,
    "request": {"id": "req_DSxkL5GBQbSbrE", "idempotency_key": None},
    "type": "payment_intent.succeeded",
}
SLACK_EVENT: dict[str, Any] = {
    "token": "Jhj5dZrVaK7ZwHHjRyZWjbDl",
    "team_id": "T0001",
    "api_app_id": "A0PNCHHK2",
    "event": {
        "type": "app_mention",
        "user": "U061F7AUR",
        "text": "<@U0LAN0Z89> is the deploy green?",
        "ts": "1515449522.000016",
        "channel": "C0LAN2Q65",
        "event_ts": "1515449522000016",
    },
    "type": "event_callback",
    "event_id": "Ev0PV52K25",
    "event_time": 1515449522,
    "authed_users": ["U0LAN0Z89"],
}
SLACK_CHALLENGE: dict[str, Any] = {
    "token": "Jhj5dZrVaK7ZwHHjRyZWjbDl",
    "challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P",
    "type": "url_verification",
}
LINEAR_ISSUE: dict[str, Any] = {
    "action": "create",
    "type": "Issue",
    "actor": {"id": "2e6eea91-1111-0000-9486-acea0603064d", "name": "Alice", "type": "user"},
    "createdAt": "2026-11-02T10:15:00.000Z",
    "data": {
        "id": "2174add1-f7c8-44e3-bbf3-2d60b5ea8bc9",
        "identifier": "ENG-123",
        "title": "Checkout fails on Safari",
        "priority": 2,
        "team": {"id": "72b2a2dc-6f4f-4423-9d34-24b5bd10634a", "key": "ENG", "name": "Engineering"},
    },
    "url": "https://linear.app/acme/issue/ENG-123/checkout-fails-on-safari",
    "organizationId": "3b5b8c4a-1111-0000-8c3d-1b8a3d3c3d3c",
    "webhookTimestamp": 0,  # set when sent
    "webhookId": "000042e3-d123-4980-b49f-8e140eef9329",
}
SENTRY_ISSUE: dict[str, Any] = {
    "action": "created",
    "installation": {"uuid": "a8e5d37a-696c-4c54-adb5-b3f28d64c7de"},
    "data": {
        "issue": {
            "id": "1170820242",
            "shortId": "API-1Z",
            "title": "ZeroDivisionError: division by zero",
            "culprit": "billing.views in invoice",
            "level": "error",
            "status": "unresolved",
            "project": {"id": "1", "name": "api", "slug": "api"},
            "web_url": "https://acme.sentry.io/issues/1170820242/",
        }
    },
    "actor": {"type": "application", "id": "sentry", "name": "Sentry"},
}
GITLAB_PUSH: dict[str, Any] = {
    "object_kind": "push",
    "event_name": "push",
    "ref": "refs/heads/main",
    "user_username": "jsmith",
    "project": {"name": "api", "path_with_namespace": "acme/api", "default_branch": "main"},
    "commits": [{"id": "b6568db1bc1dcd7f8b4d5a946b0b91f9dacd7327", "message": "Update README"}],
    "total_commits_count": 1,
}
ALERTMANAGER: dict[str, Any] = {
    "version": "4",
    "groupKey": '{}:{alertname="HighErrorRate"}',
    "status": "firing",
    "receiver": "sidecar",
    "groupLabels": {"alertname": "HighErrorRate"},
    "commonLabels": {"alertname": "HighErrorRate", "severity": "page"},
    "commonAnnotations": {"summary": "API error rate above 5% for 10 minutes"},
    "externalURL": "http://alertmanager:9093",
    "alerts": [{"status": "firing", "labels": {"alertname": "HighErrorRate"}}],
}


def encode(payload: dict[str, Any]) -> bytes:
    """What a sender puts on the wire (GitHub-style compact JSON)."""
    return json.dumps(payload, separators=(",", ":")).encode()


def route_doc(runtime_path: Path, routes: dict[str, Any], **sidecar: Any) -> dict[str, Any]:
    doc = base_doc(runtime_path, **sidecar)
    doc["webhooks"]["routes"] = routes
    return doc


def route(verify: Any, secret: str, **more: Any) -> dict[str, Any]:
    """A route's config: ``verify``, one inline secret, the test agent, a message."""
    spec: dict[str, Any] = {
        "verify": verify,
        "secrets": [{"id": "r1", "value": secret}],
        "agent": AGENT,
        "message": "{{ route }} delivery",
    }
    spec.update(more)
    return spec


async def deliver(
    sc: Sidecar,
    path: str,
    body: bytes,
    headers: dict[str, str] | list[tuple[str, str]],
    content_type: str | None = "application/json",
) -> tuple[int, Any, Any]:
    """POST raw bytes with exactly these headers (a list may repeat a name)."""
    h: CIMultiDict[str] = CIMultiDict(headers.items() if isinstance(headers, dict) else headers)
    if content_type is not None:
        h["Content-Type"] = content_type
    async with sc.client.post(path, data=body, headers=h) as resp:
        return await read_reply(resp)
