"""GitLab: ``X-Gitlab-Token: <secret>``, the secret itself compared in constant time.

GitLab signs nothing: the token proves only that the sender knows it, so serve this
route over TLS. The delivery id is ``Idempotency-Key`` (GitLab 17.4+), else
``X-Gitlab-Event-UUID``; the event is ``X-Gitlab-Event``.
"""

from __future__ import annotations

from collections.abc import Sequence

from .base import Headers, Key, Profile, Verdict, delivery_header, one_header, refusals, token_match

HEADER = "X-Gitlab-Token"


@refusals
def verify(
    body: bytes, headers: Headers, keys: Sequence[Key], now: float, tolerance: float
) -> Verdict:
    """Compares the one ``X-Gitlab-Token`` header with every key."""
    token = one_header(headers, HEADER).encode("ascii")
    secret = token_match(keys, token, HEADER, now)
    delivery = delivery_header(headers, "Idempotency-Key") or delivery_header(
        headers, "X-Gitlab-Event-UUID"
    )
    return Verdict(secret, delivery, delivery_header(headers, "X-Gitlab-Event"))


PROFILE = Profile("gitlab", verify, frozenset({"x-gitlab-token"}))
