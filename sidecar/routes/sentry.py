"""Sentry integration webhooks: ``Sentry-Hook-Signature: <hex>``, HMAC-SHA256 of the body
with the integration's client secret.

The delivery id is ``Request-ID``; the resource (issue, event_alert, installation...)
is ``Sentry-Hook-Resource``.
"""

from __future__ import annotations

from collections.abc import Sequence

from .base import (
    Headers,
    Key,
    Profile,
    Verdict,
    delivery_header,
    hex_signature,
    hmac_match,
    one_header,
    refusals,
)

HEADER = "Sentry-Hook-Signature"


@refusals
def verify(
    body: bytes, headers: Headers, keys: Sequence[Key], now: float, tolerance: float
) -> Verdict:
    """Checks the one ``Sentry-Hook-Signature`` header against every key."""
    signature = hex_signature(one_header(headers, HEADER), HEADER)
    secret = hmac_match(keys, body, (signature,), HEADER, now)
    event = delivery_header(headers, "Sentry-Hook-Resource")
    return Verdict(secret, delivery_header(headers, "Request-ID"), event)


PROFILE = Profile("sentry", verify, frozenset({"sentry-hook-signature"}))
