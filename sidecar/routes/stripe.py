"""Stripe: ``Stripe-Signature: t=<unix>,v1=<hex>[,v1=<hex>...]`` over ``<t>.<body>``.

Any listed ``v1`` may match (Stripe lists one per active endpoint secret while one is
being rolled); ``v0`` and unknown schemes are ignored. ``t`` must be within
``tolerance`` of now, either way. The delivery id is the event's ``id`` in the body.
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

HEADER = "Stripe-Signature"


@refusals
def verify(
    body: bytes, headers: Headers, keys: Sequence[Key], now: float, tolerance: float
) -> Verdict:
    """Parses ``t`` and every ``v1``, checks them, then the timestamp."""
    value = one_header(headers, HEADER)
    sent: str | None = None
    signatures: list[bytes] = []
    for item in value.split(","):
        scheme, sep, text = item.strip().partition("=")
        if not sep:
            raise invalid(f"header {HEADER!r} must be a list of key=value items")
        if scheme == "t":
            if sent is not None:
                raise invalid(f"header {HEADER!r} must hold one timestamp 't'")
            sent = text
        elif scheme == "v1":
            signatures.append(hex_signature(text, HEADER))
    if sent is None:
        raise invalid(f"header {HEADER!r} has no timestamp 't'")
    if not signatures:
        raise invalid(f"header {HEADER!r} has no 'v1' signature")
    when = timestamp(sent, HEADER)
    secret = hmac_match(keys, body, signatures, HEADER, now, prefix=sent.encode() + b".")
    check_time(when, now, tolerance, f"the timestamp of header {HEADER!r}")
    return Verdict(secret)


PROFILE = Profile(
    "stripe", verify, frozenset({"stripe-signature"}), body_delivery="id", timestamped=True
)
