"""The generic form ``{hmac, header, prefix, encoding}``: ``<header>: <prefix><signature>``,
the HMAC (SHA-256, or SHA-1 for old senders) of the body in hex or base64.

The delivery id is the sender's ``Idempotency-Key``, if any.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..settings import Verify
from .base import (
    Headers,
    Key,
    Profile,
    Verdict,
    base64_signature,
    delivery_header,
    hex_signature,
    hmac_match,
    invalid,
    one_header,
    refusals,
)

SIZES = {"sha256": 32, "sha1": 20}


def profile(settings: Verify) -> Profile:
    """A profile for one route's generic settings."""
    header, prefix, digest = settings.header, settings.prefix, settings.algorithm
    size = SIZES[digest]
    decode = hex_signature if settings.encoding == "hex" else base64_signature

    @refusals
    def verify(
        body: bytes, headers: Headers, keys: Sequence[Key], now: float, tolerance: float
    ) -> Verdict:
        value = one_header(headers, header)
        if not value.startswith(prefix):
            raise invalid(f"header {header!r} must start with {prefix!r}")
        signature = decode(value[len(prefix) :], header, size)
        secret = hmac_match(keys, body, (signature,), header, now, digest=digest)
        return Verdict(secret, delivery_header(headers, "Idempotency-Key"))

    return Profile("hmac", verify, frozenset({header.lower()}))
