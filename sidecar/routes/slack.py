"""Slack: ``X-Slack-Signature: v0=<hex>`` over ``v0:<X-Slack-Request-Timestamp>:<body>``.

Slack sends JSON (the Events API) or form-encoded bodies (slash commands, and
interactivity as a ``payload=<json>`` form field). The delivery id is the Events API's
``event_id``; a signed ``url_verification`` is answered with its challenge by the
route pipeline (docs/routes.md).
"""

from __future__ import annotations

from collections.abc import Sequence

from .base import (
    Headers,
    Key,
    Profile,
    Verdict,
    check_time,
    hex_signature,
    hmac_match,
    invalid,
    one_header,
    refusals,
    timestamp,
)

HEADER = "X-Slack-Signature"
TIMESTAMP = "X-Slack-Request-Timestamp"
_PREFIX = "v0="


@refusals
def verify(
    body: bytes, headers: Headers, keys: Sequence[Key], now: float, tolerance: float
) -> Verdict:
    """Checks the ``v0`` signature over the timestamp and body, then the timestamp."""
    value = one_header(headers, HEADER)
    sent = one_header(headers, TIMESTAMP)
    if not value.startswith(_PREFIX):
        raise invalid(f"header {HEADER!r} must start with {_PREFIX!r}")
    signature = hex_signature(value[len(_PREFIX) :], HEADER)
    when = timestamp(sent, TIMESTAMP)
    prefix = b"v0:" + sent.encode() + b":"
    secret = hmac_match(keys, body, (signature,), HEADER, now, prefix=prefix)
    check_time(when, now, tolerance, f"header {TIMESTAMP!r}")
    return Verdict(secret)


PROFILE = Profile(
    "slack",
    verify,
    frozenset({"x-slack-signature"}),
    body_delivery="event_id",
    form=True,
    timestamped=True,
)
