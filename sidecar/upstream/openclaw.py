"""``protocol: "openclaw"``: a real OpenClaw gateway (npm ``openclaw`` 2026.9.x) over loopback HTTP.

docs/upstream.md. docs/openclaw.md records how the real gateway answers;
tests/test_openclaw_integration.py drives one.

What the gateway receives, built from validated fields only:

- ``POST /hooks/wake`` ``{"text": wakeText, "mode": "now", "agentId"}`` (without a
  ``sessionKey`` the gateway wakes the agent's main session);
- ``POST /hooks/agent`` ``{"message", "agentId", "sessionKey": "hook:" + session,
  "sessionMode": "persistent", "name": "Webhook"}``. The key is sent lower-cased:
  the gateway stores session keys lower-cased anyway (``hook:Order-1`` and
  ``hook:order-1`` are one session there), so sending the canonical form makes
  what the gateway logs, and its ``Idempotency-Key`` replay identity, match
  what it stores;
- the headers ``Authorization: Bearer <upstream.token>`` (exactly one: the
  gateway does not refuse a second one, the first wins), ``Content-Type`` and
  ``Idempotency-Key`` when the client sent one. Nothing else: any
  ``Forwarded``/``X-Forwarded-*``/``X-Real-IP`` header makes it answer 403.

Its replies, mapped to docs/http-api.md:

- 2xx with ``{"ok": true}``: success, its ``runId`` passed back;
- 503 (a run on the same persistent session kept it busy for 15 s, or it is
  draining for a restart): 503 ``upstream_unavailable`` with ``Retry-After``;
- 401 and 429 (its failed-auth throttle; it still takes a valid token while
  throttling, so a 429 also means ours is wrong): the token is refused. If
  another token is at hand (the token file changed on disk, or the previous
  config's token), the call is sent once more with it, see :class:`Tokens`.
  Otherwise 502, logged loudly;
- 403 (a forwarding header reached it) and every other status: 502, logged
  loudly. Loud logs are rate-limited: a wrong token fails every call.

Readiness is the gateway's own ``GET /readyz``: it answers 503 while starting
or draining, when it still accepts connections.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from typing import Any

from ..call import Call, Reject
from ..secrets import SecretSource, SecretSourceError
from ..settings import OPENCLAW_MAX_BODY_BYTES, Settings
from .base import (
    BaseForwarder,
    Parts,
    header_value,
    json_object_of,
    request_bytes,
    retry_after_of,
    run_id_of,
    unavailable,
)
from .pool import Pool, Response, UpstreamConnectError, UpstreamProtocolError

log = logging.getLogger("sidecar.upstream.openclaw")

SESSION_PREFIX = "hook:"  # matches the gateway's hooks.allowedSessionKeyPrefixes: ["hook:"]
TASK_NAME = "Webhook"  # what the gateway shows the model as the task ("Task: Webhook")
TOKEN_REFUSED = (401, 429)
PROBE_TIMEOUT = 2.0  # a gateway stuck in a long event-loop stall must not hang /readyz
LOUD_LOG_INTERVAL = 10.0
RETRY_BACKOFF = 5.0  # after a retry with another token failed: no retries for this long
_MAX_DETAIL = 200

_MISCONFIGURED = "the agent runtime refused the sidecar: its upstream configuration is wrong"

# What each refusal means for the operator (logged; the client sees only upstream_error).
_HINTS = {
    401: "the OpenClaw gateway refused the sidecar's upstream token: sidecar.upstream.token "
    "must equal the gateway's hooks.token; every call fails with 502 until it does",
    429: "the OpenClaw gateway is throttling the sidecar after failed authentication: "
    "sidecar.upstream.token must equal the gateway's hooks.token",
    403: "the OpenClaw gateway refused the call as proxied: a Forwarded/X-Forwarded-*/X-Real-IP "
    "header reached it; the sidecar sends none, so something between them adds it",
    400: "the OpenClaw gateway refused the call: check webhooks.agents.<name>.agentId against "
    "its hooks.allowedAgentIds, and that it has hooks.allowRequestSessionKey: true and "
    'hooks.allowedSessionKeyPrefixes: ["hook:"]',
    404: 'the OpenClaw gateway has no such hook: check its hooks.enabled and hooks.path: "/hooks"',
    413: "the OpenClaw gateway refused the body as too large: keep sidecar.limits.maxBodyBytes "
    f"below its {OPENCLAW_MAX_BODY_BYTES} bytes",
}


class LoudLog:
    """Errors an operator must act on, at most once per ``interval`` per kind.

    A wrong upstream token fails every call; one line per call would bury the
    rest of the log. The next line after a quiet period says how many were held back.
    """

    def __init__(self, interval: float = LOUD_LOG_INTERVAL) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def emit(self, level: int, kind: str, message: str, **extra: Any) -> bool:
        now = time.monotonic()
        last = self._last.get(kind)
        if last is not None and now - last < self.interval:
            self._held[kind] = self._held.get(kind, 0) + 1
            return False
        self._last[kind] = now
        log.log(level, message, extra={**extra, "suppressed": self._held.pop(kind, 0)})
        return True


def _same(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


def _usable(token: bytes) -> bool:
    """Could this be sent as a header value? (the config applies the same rule)"""
    return bool(token) and not any(c < 0x20 or c == 0x7F for c in token)


class Tokens:
    """Which upstream token to send, and which to try when the gateway refuses it.

    The gateway holds exactly one ``hooks.token`` and drops the old one the moment
    it reloads its config, so for a rotation without failed calls the sidecar must
    hold both for a while: ``current`` (sent first) and ``spare`` (the previous
    config's token after a reload, or the one ``current`` replaced). When the
    gateway refuses the token a call sent, the call is sent once more with the
    first of these that differs from it: the token file as it is on disk now (the
    operator's latest word, read only on this failure path), ``current`` (another
    call may have switched already), ``spare``. The one that works becomes
    ``current``. At most one retry per call, never a loop; after a retry that
    failed too, none for ``RETRY_BACKOFF`` seconds, so a gateway that takes none
    of them sees one attempt per call.
    """

    def __init__(
        self, current: bytes, source: SecretSource | None, spare: bytes | None = None
    ) -> None:
        self.current = current
        self.source = source if source is not None and source.kind == "file" else None
        self.spare = spare if spare is not None and not _same(spare, current) else None
        self.quiet_until = 0.0

    async def other_than(self, refused: bytes, loud: LoudLog) -> tuple[bytes, str] | None:
        """A token worth one more try after ``refused`` was refused, and where it came from."""
        if time.monotonic() < self.quiet_until:
            return None
        candidates: list[tuple[bytes | None, str]] = [
            (await self._on_disk(loud), "the token file"),
            (self.current, "the token in use"),
            (self.spare, "the previous token"),
        ]
        for token, origin in candidates:
            if token is not None and not _same(token, refused):
                return token, origin
        return None

    async def _on_disk(self, loud: LoudLog) -> bytes | None:
        if self.source is None:
            return None
        try:
            token = await asyncio.to_thread(self.source.read)
        except SecretSourceError as exc:
            message = f"cannot re-read sidecar.upstream.token: {exc}"
            loud.emit(logging.WARNING, "token-file", message)
            return None
        if not _usable(token):
            loud.emit(
                logging.WARNING,
                "token-file",
                f"sidecar.upstream.token: {self.source.describe()} is empty or holds control "
                "characters; not used",
            )
            return None
        return token

    def taken(self, token: bytes) -> None:
        """The gateway took ``token``: send it first from now on."""
        if not _same(token, self.current):
            self.spare, self.current = self.current, token

    def refused(self, token: bytes) -> None:
        """The retry with ``token`` was refused too."""
        if self.spare is not None and _same(token, self.spare):
            self.spare = None  # the gateway has moved past it
        self.quiet_until = time.monotonic() + RETRY_BACKOFF


class OpenClawForwarder(BaseForwarder):
    """Sends a validated call to a real OpenClaw gateway's hooks; returns its runId.

    ``previous`` is the forwarder of the config this one replaces: its token stays
    at hand as the spare while the pool (the gateway's address) is the same.
    """

    tokens: Tokens
    loud: LoudLog
    auth_first = True  # exactly one Authorization, first (docs/upstream.md)

    def __init__(
        self, settings: Settings, pool: Pool, previous: BaseForwarder | None = None
    ) -> None:
        super().__init__(settings, pool)
        token = settings.sidecar.upstream.token
        if token is None:  # config.py refuses this; a clear error if that ever changes
            raise ValueError("sidecar.upstream.token is required with protocol 'openclaw'")
        spare: bytes | None = None
        self.loud = LoudLog()
        if isinstance(previous, OpenClawForwarder) and previous.pool is pool:
            spare = previous.tokens.current
            self.loud = previous.loud  # a reload must not reset the rate limit
        self.tokens = Tokens(token.value, token.source, spare)

    def parts(self, call: Call) -> Parts:
        """Path, body and the headers other than Authorization."""
        agent = call.agent
        assert agent is not None
        body: dict[str, Any]
        action = call.endpoint if call.route is None else call.action  # docs/routes.md
        if action == "agent":
            body = {
                "message": call.body["message"],
                "agentId": agent.agent_id,
                "sessionKey": SESSION_PREFIX + call.session.lower(),
                "sessionMode": "persistent",
                "name": TASK_NAME,
            }
        else:
            body = {"text": agent.wake_text, "mode": "now", "agentId": agent.agent_id}
        # UTF-8 rather than \u escapes: a non-ASCII message stays its own size, so a
        # body the sidecar accepted stays under the gateway's 256 KiB cap.
        data = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
        return f"/hooks/{action}", data, [("Content-Type", "application/json")]

    def with_token(self, parts: Parts, token: bytes, key: str | None) -> bytes:
        return self.request(parts, header_value(b"Bearer " + token), key)

    def build(self, call: Call) -> bytes:
        return self.with_token(self.parts(call), self.tokens.current, call.idempotency_key)

    async def exchange(self, parts: Parts, key: str | None, request_id: str) -> Response:
        sent = self.tokens.current
        response = await self.send(self.with_token(parts, sent, key))
        if response.status in TOKEN_REFUSED:
            other = await self.tokens.other_than(sent, self.loud)
            if other is not None:
                token, origin = other
                retry = await self.send(self.with_token(parts, token, key))
                if retry.status in TOKEN_REFUSED:
                    self.tokens.refused(token)
                else:  # authenticated: whatever it says now is about the call itself
                    self.tokens.taken(token)
                    self.loud.emit(
                        logging.WARNING,
                        f"token-switch:{origin}",
                        f"the OpenClaw gateway refused the upstream token sent; {origin} "
                        "works and is used from now on",
                        requestId=request_id,
                    )
                response = retry
        return response

    def reply(self, call: Call, response: Response) -> str | None:
        status = response.status
        if 200 <= status < 300:
            body = json_object_of(response)
            if body is None or body.get("ok") is not True:
                self.loud.emit(
                    logging.ERROR,
                    "reply",
                    f"the OpenClaw gateway answered {status} without ok: true",
                    requestId=call.request_id,
                    upstreamStatus=status,
                )
                raise Reject(502, "upstream_error", "the agent runtime sent an unexpected reply")
            return run_id_of(response)
        detail = error_detail(response)
        if status == 503:  # busy session (admission timeout) or draining: both pass
            log.warning(
                "the OpenClaw gateway is unavailable (503): %s",
                detail,
                extra={"requestId": call.request_id, "upstreamStatus": status},
            )
            raise unavailable("the agent runtime is busy or restarting", retry_after_of(response))
        hint = _HINTS.get(status, f"the OpenClaw gateway answered {status}")
        self.loud.emit(
            logging.ERROR,
            str(status),
            hint,
            requestId=call.request_id,
            upstreamStatus=status,
            upstreamError=detail,
        )
        if status in (401, 403, 429):
            raise Reject(502, "upstream_error", _MISCONFIGURED)
        raise Reject(502, "upstream_error", f"the agent runtime answered {status}")

    async def probe(self) -> None:
        """Raises UpstreamConnectError unless the gateway's ``GET /readyz`` answers 200."""
        raw = request_bytes("/readyz", self.host, [], b"", method="GET")
        try:
            async with asyncio.timeout(PROBE_TIMEOUT):
                response = await self.pool.request(raw)
        except TimeoutError:
            raise UpstreamConnectError(
                f"gateway /readyz gave no answer in {PROBE_TIMEOUT:g}s"
            ) from None
        except UpstreamProtocolError as exc:
            raise UpstreamConnectError(f"gateway /readyz reply unusable: {exc}") from None
        if response.status != 200:
            body = json_object_of(response) or {}
            failing = body.get("failing")
            why = (
                " (failing: " + ", ".join(str(f)[:64] for f in failing[:5]) + ")"
                if isinstance(failing, list) and failing
                else ""
            )
            raise UpstreamConnectError(f"gateway /readyz answered {response.status}{why}")


def error_detail(response: Response) -> str:
    """The gateway's error text for the log: its JSON ``error`` (a string, or an object's
    ``message``) or the plain-text body; printable characters only, truncated."""
    body = json_object_of(response)
    if body is None:
        text = response.body.decode("utf-8", "replace")
    else:
        error = body.get("error")
        if isinstance(error, dict):
            error = error.get("message")
        text = error if isinstance(error, str) else ""
    return "".join(c if c.isprintable() else " " for c in text[:_MAX_DETAIL])
