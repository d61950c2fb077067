"""The types every guard shares: the per-request :class:`Call`, :class:`Reject`, ``Guard``.

A guard is a plain callable ``guard(call)`` that either returns ``None`` (pass),
returns an awaitable (an async guard: the pipeline awaits it), or raises
:class:`Reject`. Sync guards cost one function call; only guards that wait for
something (the body, a shared limiter) are coroutines.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .secrets import equals_any

if TYPE_CHECKING:
    from .secrets import Secret
    from .settings import Agent, IPAddress, Settings

Guard = Callable[["Call"], Awaitable[None] | None]


# Finishes the dedup id a call holds (guards/dedup.py): ``app.handle`` calls it once, as
# ``call.claim(call.claim_key, call.claim_ttl, answered_ok)``, when the answer is known
# or the call is cut off. It may return an awaitable (a shared backend's round trip).
# One callable per store, not one object per call: the id and its time are the call's.
Finish = Callable[[str, float, bool], Awaitable[None] | None]


# The hooks, by their exact decoded path (docs/http-api.md): nothing else routes.
ENDPOINTS = {"/hooks/wake": "wake", "/hooks/agent": "agent"}
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_randbits = random.getrandbits


def new_request_id() -> str:
    """A fresh id. Not a secret: it only has to be unique enough to find a log line."""
    return "%016x" % _randbits(64)  # noqa: UP031 - fastest of the spellings


class Call:
    """What the guards learn about one request, in the order they learn it."""

    __slots__ = (
        "action",
        "agent",
        "audit_extra",
        "body",
        "claim",
        "claim_key",
        "claim_ttl",
        "client_addr",
        "client_ip",
        "delivery_id",
        "endpoint",
        "finalizers",
        "idempotency_key",
        "raw",
        "request",
        "request_id",
        "response_headers",
        "route",
        "secret",
        "session",
        "settings",
        "started",
    )

    def __init__(self, request: web.BaseRequest, settings: Settings) -> None:
        self.request = request
        self.settings = settings
        self.started = time.perf_counter()
        # A fresh id; the client's own X-Request-Id is judged by guards/clientip.py, which
        # knows whether the peer is a trusted proxy (adopt_request_id).
        self.request_id = new_request_id()
        # The resolved client address (see guards/clientip.py): every later guard,
        # the audit log and the upstream X-Forwarded-For use it.
        self.client_ip: str = request.remote or ""
        self.client_addr: IPAddress | None = None
        # "wake" or "agent" when the path names a hook, else "other": the metrics label
        # also of calls refused before routing, and what the route guard judges. The
        # raw target is tried first: when it is exactly a hook's path, so is the decoded
        # one, and the URL is never decoded (most calls).
        endpoint = ENDPOINTS.get(request.raw_path) or ENDPOINTS.get(request.path)
        self.endpoint = endpoint or "other"
        self.secret: Secret | None = None  # set by bearer auth
        self.body: dict[str, Any] = {}  # the validated JSON body
        self.agent: Agent | None = None  # set by the agent lookup
        self.session = ""  # the session key the call will use
        self.response_headers: dict[str, str] | None = None  # e.g. RateLimit on success
        self.finalizers: list[Callable[[], None]] | None = None  # run when the call ends
        # Routes (docs/routes.md): the route's name, and the sender's delivery id. Only
        # route calls set (and read) ``action`` ("agent" or "wake") and ``raw`` (the body
        # bytes the signature covers), so the seed's calls do not pay for them.
        self.action: str
        self.raw: bytes
        self.route: str | None = None
        self.delivery_id: str | None = None
        # Sent upstream as Idempotency-Key when set: the client's own key, or a route's
        # "<route>:<delivery id>" (docs/upstream.md).
        self.idempotency_key: str | None = None
        # The dedup id this call holds (docs/dedup.md): set, with the two after it, by
        # guards/dedup.py only, so the calls without one do not pay for them.
        self.claim: Finish | None = None
        self.claim_key: str  # the id
        self.claim_ttl: float  # how long it is remembered once answered with a 200
        # Audit keys beyond the fixed ones (docs/audit-log.md), e.g. route, deliveryId.
        self.audit_extra: dict[str, object] | None = None

    def adopt_request_id(self, trusted_peer: bool) -> None:
        """Use the client's ``X-Request-Id`` when a trusted proxy sent it; from anyone
        else keep it only in the audit line (``clientRequestId``), so a caller cannot
        make its calls collide with another's in the logs (docs/audit-log.md). Values
        that are not id-shaped are dropped either way."""
        rid = self.request.headers.get("X-Request-Id")
        if rid is None or not _REQUEST_ID.fullmatch(rid):
            return
        # A token pasted into the header is id-shaped too: never adopt or log it.
        if equals_any(rid.encode(), self.settings.webhooks.secrets):
            return
        if trusted_peer:
            self.request_id = rid
        else:
            self.audit("clientRequestId", rid)

    def on_done(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` when the request ends, however it ends (e.g. release a slot)."""
        if self.finalizers is None:
            self.finalizers = []
        self.finalizers.append(callback)

    def audit(self, key: str, value: object) -> None:
        """Add ``key`` to this call's audit line (a name from docs/audit-log.md)."""
        if self.audit_extra is None:
            self.audit_extra = {}
        self.audit_extra[key] = value

    def add_header(self, name: str, value: str) -> None:
        if self.response_headers is None:
            self.response_headers = {}
        self.response_headers[name] = value


class Reject(Exception):
    """Refuse the request with a docs/http-api.md error code. ``message`` never holds secrets.

    Raise a new instance every time (module constants are ``partial(Reject, ...)``):
    re-raising one shared instance chains each new traceback onto the old ones and
    keeps every request's frames alive — a leak of several KiB per refusal.
    """

    __slots__ = ("code", "headers", "message", "status")

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(code)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


class Answer(Exception):
    """End the call with a 200 that is not forwarded: a GitHub ``ping``, a Slack
    ``url_verification``, a route's ``when`` that is false, a duplicate delivery
    (docs/routes.md). ``fields`` go into the JSON body after ``"status": "ok"``;
    ``"requestId"`` is added unless ``bare`` (Slack's challenge answer is exactly
    ``{"challenge": ...}``). ``outcome`` names it in the audit log."""

    __slots__ = ("bare", "fields", "outcome")

    def __init__(self, outcome: str, fields: dict[str, Any], *, bare: bool = False) -> None:
        super().__init__(outcome)
        self.outcome = outcome
        self.fields = fields
        self.bare = bare
