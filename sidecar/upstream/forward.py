"""``protocol: "forward"``: the seed's API, normalized, to a runtime on a Unix socket or loopback.

What the runtime receives is built here from validated fields only: the
canonical path, a fresh JSON body, and a fixed set of headers. Nothing the
client sent (its Authorization, cookies, forwarding headers) is copied.

Replies map to docs/http-api.md: any 2xx is success (a string ``runId`` in a JSON body
is passed back); 429 and 503 mean "busy": 503 ``upstream_unavailable`` with the
runtime's ``Retry-After``; any other status is 502 ``upstream_error``; no
connection is 503 and no reply within ``upstream.timeout`` is 504 (see base.py).
"""

from __future__ import annotations

import json

from ..call import Call, Reject
from ..settings import Settings
from .base import (
    BaseForwarder,
    Parts,
    header_value,
    log,
    retry_after_of,
    run_id_of,
    unavailable,
)
from .pool import Pool, Response

_quote = json.encoder.encode_basestring_ascii  # what json.dumps uses for str


class Forwarder(BaseForwarder):
    """Sends a validated call to a ``forward``-protocol runtime; returns its runId."""

    def __init__(self, settings: Settings, pool: Pool) -> None:
        super().__init__(settings, pool)
        token = settings.sidecar.upstream.token
        # Header values are validated here once: a token with CR/LF would split headers.
        self.auth_header = None if token is None else header_value(b"Bearer " + token.value)

    def parts(self, call: Call) -> Parts:
        agent = call.agent
        assert agent is not None
        # Spelled out with the C string encoder: what json.dumps wrote, for a third of it.
        action = call.endpoint if call.route is None else call.action  # docs/routes.md
        body = '{"agent": ' + _quote(agent.name)
        if action == "agent":
            body += ', "message": ' + _quote(call.body["message"])
        body += f', "sessionKey": {_quote(call.session)}, "requestId": {_quote(call.request_id)}}}'
        headers = [
            ("Content-Type", "application/json"),
            ("X-Request-Id", call.request_id),
            ("X-Forwarded-For", call.client_ip),
            ("X-Webhook-Secret-Id", call.secret.id if call.secret else ""),
        ]
        if call.route is not None:
            headers.append(("X-Webhook-Route", call.route))
        return f"/hooks/{action}", body.encode(), headers

    def reply(self, call: Call, response: Response) -> str | None:
        if 200 <= response.status < 300:
            return run_id_of(response)
        if response.status in (429, 503):
            raise unavailable("the agent runtime is busy", retry_after_of(response))
        log.warning(
            "runtime answered %d",
            response.status,
            extra={"requestId": call.request_id, "upstreamStatus": response.status},
        )
        raise Reject(502, "upstream_error", f"the agent runtime answered {response.status}")
