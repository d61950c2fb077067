"""Linear: ``Linear-Signature: <hex>``, HMAC-SHA256 of the body.

Linear puts its timestamp in the signed body: ``webhookTimestamp``, in milliseconds,
checked against ``tolerance`` once the body is parsed (:func:`check_body`). The
delivery id is ``Linear-Delivery``, the event ``Linear-Event``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .base import (
    Headers,
    Key,
    Profile,
    Verdict,
    check_time,
    delivery_header,
    hex_signature,
    hmac_match,
    invalid,
    one_header,
    refusals,
)

HEADER = "Linear-Signature"
FIELD = "webhookTimestamp"


@refusals
def verify(
    body: bytes, headers: Headers, keys: Sequence[Key], now: float, tolerance: float
) -> Verdict:
    """Checks the one ``Linear-Signature`` header against every key."""
    signature = hex_signature(one_header(headers, HEADER), HEADER)
    secret = hmac_match(keys, body, (signature,), HEADER, now)
    event = delivery_header(headers, "Linear-Event")
    return Verdict(secret, delivery_header(headers, "Linear-Delivery"), event)


def check_body(body: dict[str, Any], now: float, tolerance: float) -> None:
    """The signed ``webhookTimestamp`` (ms) within ``tolerance``; missing or not a
    number is signature_invalid."""
    sent = body.get(FIELD)
    if isinstance(sent, bool) or not isinstance(sent, int | float) or sent != sent:
        raise invalid(f"body field {FIELD!r} must be a Unix time in milliseconds")
    check_time(sent / 1000.0, now, tolerance, f"body field {FIELD!r}")


PROFILE = Profile(
    "linear", verify, frozenset({"linear-signature"}), check_body=check_body, timestamped=True
)
