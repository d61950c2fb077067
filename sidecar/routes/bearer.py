"""Bearer: ``Authorization: Bearer <secret>``, for senders that only send a static token
(Grafana, Alertmanager, n8n, Zapier...). Parsed as the seed endpoints parse it
(docs/http-api.md); the delivery id is the sender's ``Idempotency-Key``, if any.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..guards.auth import parse_bearer
from .base import Headers, Key, Profile, Verdict, delivery_header, invalid, refusals, token_match

HEADER = "Authorization"


@refusals
def verify(
    body: bytes, headers: Headers, keys: Sequence[Key], now: float, tolerance: float
) -> Verdict:
    """Compares the one bearer token with every key."""
    token = parse_bearer(headers.getall(HEADER, []))
    if token is None:
        raise invalid(f"header {HEADER!r} must be exactly one 'Bearer <token>'")
    secret = token_match(keys, token, HEADER, now)
    return Verdict(secret, delivery_header(headers, "Idempotency-Key"))


PROFILE = Profile("bearer", verify, frozenset({"authorization"}))
