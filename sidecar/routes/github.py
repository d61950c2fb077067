"""GitHub: ``X-Hub-Signature-256: sha256=<hex>``, HMAC-SHA256 of the body (docs/routes.md).

The delivery id is ``X-GitHub-Delivery`` (the same on a manual redelivery), the event
``X-GitHub-Event``. The older ``X-Hub-Signature`` (SHA-1) GitHub also sends is ignored
for verification and, like the SHA-256 one, never shown to templates.
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
    invalid,
    one_header,
    refusals,
)

HEADER = "X-Hub-Signature-256"
_PREFIX = "sha256="


@refusals
def verify(
    body: bytes, headers: Headers, keys: Sequence[Key], now: float, tolerance: float
) -> Verdict:
    """Checks the one ``X-Hub-Signature-256`` header against every key."""
    value = one_header(headers, HEADER)
    if not value.startswith(_PREFIX):
        raise invalid(f"header {HEADER!r} must start with {_PREFIX!r}")
    signature = hex_signature(value[len(_PREFIX) :], HEADER)
    secret = hmac_match(keys, body, (signature,), HEADER, now)
    event = delivery_header(headers, "X-GitHub-Event")
    return Verdict(secret, delivery_header(headers, "X-GitHub-Delivery"), event)


PROFILE = Profile("github", verify, frozenset({"x-hub-signature-256", "x-hub-signature"}))
