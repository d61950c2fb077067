"""Bearer authentication over every configured secret, in constant time.

``Authorization`` must appear exactly once, as ``Bearer <token>`` with the
scheme matched case-insensitively (RFC 7235 §2.1) and the token compared byte
for byte after the single space. The token is compared with *every* secret
(``hmac.compare_digest``, no early exit), so timing does not tell which secret,
if any, came close. A match outside its ``notBefore``/``notAfter`` window is a
failure like any other; the log says which window it missed, the response does
not. Each failure is reported to the lockout.
"""

from __future__ import annotations

import hmac
import logging
import time
from functools import partial

from ..call import Call, Guard, Reject
from ..settings import Settings
from .lockout import FailureRecorder

log = logging.getLogger("sidecar.auth")

_UNAUTHORIZED = partial(
    Reject,
    401,
    "unauthorized",
    "missing or invalid bearer token",
    {"WWW-Authenticate": 'Bearer realm="webhooks"'},
)


def parse_bearer(values: list[str]) -> bytes | None:
    """The token of a single ``Authorization: Bearer <token>`` header, else None."""
    if len(values) != 1:
        return None
    value = values[0]
    if len(value) < 8 or value[6] != " " or value[:6].lower() != "bearer":
        return None
    token = value[7:]
    if not token:
        return None
    # aiohttp decodes header bytes as UTF-8 with surrogateescape: this restores them.
    return token.encode("utf-8", "surrogateescape")


def bearer_auth(settings: Settings, on_failure: FailureRecorder) -> Guard:
    """401 ``unauthorized`` unless the token matches a secret valid now; sets ``call.secret``."""
    secrets = settings.webhooks.secrets
    clock = time.time

    def guard(call: Call) -> None:
        token = parse_bearer(call.request.headers.getall("Authorization", []))
        matched = None
        if token is not None:
            for secret in secrets:  # no break: every secret costs the same
                if hmac.compare_digest(token, secret.value):
                    matched = secret
        if matched is None:
            on_failure(call)
            raise _UNAUTHORIZED()
        if not matched.valid_at(clock()):
            log.warning(
                "token matched secret %r outside its validity window",
                matched.id,
                extra={"requestId": call.request_id, "secretId": matched.id},
            )
            on_failure(call)
            raise _UNAUTHORIZED()
        call.secret = matched

    return guard
