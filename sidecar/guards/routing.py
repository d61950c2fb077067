"""Routing: only ``POST /hooks/wake`` and ``POST /hooks/agent`` exist, matched exactly.

The decoded path is compared with the two canonical paths and nothing else: a
trailing slash, a doubled slash or a case variant is 404, never a near match.
Tokens in the query string are refused outright, because URLs end up in access
logs, browser histories and proxy caches: a parameter named like a credential
(``token``, ``access_token``, ``secret``, ``key``, ``api_key``, ``apikey``, in any
case) or whose value is a configured secret, whatever its name.
"""

from __future__ import annotations

from functools import partial

from ..call import Call, Guard, Reject
from ..secrets import equals_any
from ..settings import Settings

_NOT_FOUND = partial(
    Reject, 404, "not_found", "no such endpoint; use POST /hooks/wake or /hooks/agent"
)
_NOT_POST = partial(Reject, 405, "method_not_allowed", "only POST is allowed", {"Allow": "POST"})
_TOKEN_IN_QUERY = partial(
    Reject,
    400,
    "token_in_query",
    "tokens are not accepted in the URL; send Authorization: Bearer <token>",
)


def route() -> Guard:
    """404 for any path but the two hooks, 405 for any method but POST."""

    def guard(call: Call) -> None:
        if call.endpoint == "other":  # Call looked the path up (call.ENDPOINTS)
            raise _NOT_FOUND()
        if call.request.method != "POST":
            raise _NOT_POST()

    return guard


CREDENTIAL_NAMES = frozenset({"token", "access_token", "secret", "key", "api_key", "apikey"})


def no_token_in_query(settings: Settings) -> Guard:
    """400 when a query parameter is named like a credential (any case) or its value
    equals a configured webhook secret (compared in constant time, never logged)."""
    secrets = settings.webhooks.secrets

    def guard(call: Call) -> None:
        # No "?" in the raw target: no query at all (the common case, decided without
        # parsing the URL). A "?" anywhere falls through to the parsed query.
        if "?" in call.request.raw_path and call.request.query_string:
            for name, value in call.request.query.items():
                if name.lower() in CREDENTIAL_NAMES:
                    raise _TOKEN_IN_QUERY()
                if equals_any(value.encode("utf-8", "surrogateescape"), secrets):
                    raise _TOKEN_IN_QUERY()

    return guard
