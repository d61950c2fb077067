"""The guards only a route's pipeline has (docs/routes.md), in the order they run.

``raw_body`` reads the bytes the signature covers; ``signature`` checks them before
anything is parsed; ``payload`` checks the media type and parses JSON (or Slack's
forms), answers GitHub's ``ping`` and Slack's ``url_verification``; ``when`` ignores
what the route does not want; ``render`` turns the payload into the call's message
and session. The pipeline itself (with the shared guards between these) is
``route_pipeline`` in sidecar/app.py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from functools import partial
from typing import Any
from urllib.parse import parse_qsl

from ..call import Answer, Call, Guard, Reject
from ..guards.agents import requested_session
from ..guards.body import check_utf8, decode_object, invalid_request, read_body
from ..guards.lockout import FailureRecorder
from ..settings import SESSION_KEY, Route, Settings
from .base import MAX_ID_CHARS, Key, Profile, Refused
from .standard_webhooks import key_of

log = logging.getLogger("sidecar.routes")

FORM = "application/x-www-form-urlencoded"
NEVER_SHOWN = frozenset({"authorization", "cookie", "proxy-authorization"})
MAX_CHALLENGE_CHARS = 1024
MAX_FORM_FIELDS = 1000

_UNSUPPORTED_JSON = partial(
    Reject, 415, "unsupported_media_type", "Content-Type must be application/json (UTF-8)"
)
_UNSUPPORTED_FORM = partial(
    Reject,
    415,
    "unsupported_media_type",
    "Content-Type must be application/json or application/x-www-form-urlencoded (UTF-8)",
)


def dispatch(
    call: Call, routes: Mapping[str, tuple[Route, tuple[Guard, ...]]]
) -> tuple[Guard, ...] | None:
    """The guards of the route this call's path names, or None. Marks the call as a
    route call (``endpoint="route"``, its name, its action) for everything after."""
    request = call.request
    found = routes.get(request.raw_path) or routes.get(request.path)
    if found is None:
        return None
    route, guards = found
    call.endpoint = "route"
    call.route = route.name
    call.action = route.action
    call.audit("route", route.name)
    return guards


def keys_of(route: Route) -> tuple[Key, ...]:
    """The HMAC keys of a route's secrets, derived once per config."""
    if route.verify.profile == "standard-webhooks":
        return tuple(Key(s, key_of(s.value)) for s in route.secrets)
    return tuple(Key(s, s.value) for s in route.secrets)


def raw_body(settings: Settings) -> Guard:
    """Reads the body (413 payload_too_large, 408 request_timeout) into ``call.raw``."""
    limits = settings.sidecar.limits
    max_bytes, timeout = limits.max_body_bytes, limits.body_timeout
    too_large = partial(
        Reject, 413, "payload_too_large", f"the body is larger than {max_bytes} bytes"
    )

    async def guard(call: Call) -> None:
        call.raw = await read_body(call.request, max_bytes, timeout, too_large)

    return guard


def _refuse(call: Call, on_failure: FailureRecorder, code: str, message: str) -> Reject:
    """A 401 signature_invalid/signature_expired, counted toward the lockout."""
    on_failure(call)
    log.info(
        "route %s refused a delivery: %s",
        call.route,
        code,
        extra={"requestId": call.request_id, "route": call.route, "reason": message},
    )
    return Reject(401, code, message)


def signature(
    settings: Settings, route: Route, profile: Profile, on_failure: FailureRecorder
) -> Guard:
    """401 unless the raw body is signed by a key of this route valid now; sets the
    matched secret, the agent and the delivery id when a header carries it."""
    keys = keys_of(route)
    verify, tolerance = profile.verify, route.tolerance
    agent = settings.webhooks.agents[route.agent]
    clock = time.time

    def guard(call: Call) -> None:
        verdict = verify(call.raw, call.request.headers, keys, clock(), tolerance)
        if verdict.refusal is not None:
            raise _refuse(call, on_failure, *verdict.refusal)
        call.secret = verdict.secret
        call.agent = agent
        if verdict.delivery_id is not None:
            _delivery(call, verdict.delivery_id)

    return guard


def _delivery(call: Call, delivery_id: str) -> None:
    call.delivery_id = delivery_id
    call.idempotency_key = f"{call.route}:{delivery_id}"
    call.audit("deliveryId", delivery_id)


def payload(
    settings: Settings, route: Route, profile: Profile, on_failure: FailureRecorder
) -> Guard:
    """415 unless JSON (or, for Slack, a form), 400 invalid_json; Linear's signed
    timestamp; the delivery id from the body; then GitHub's ``ping`` and Slack's
    ``url_verification`` answered at once, not forwarded."""
    form_ok = profile.form
    check_body = profile.check_body
    body_delivery = profile.body_delivery
    github = profile.name == "github"
    slack = profile.name == "slack"
    tolerance = route.tolerance
    clock = time.time

    def guard(call: Call) -> None:
        request = call.request
        kind = request.content_type
        if kind == "application/json":
            check_utf8(request)
            body = decode_object(call.raw)
        elif form_ok and kind == FORM:
            check_utf8(request)
            body = _form(call.raw)
        else:
            raise (_UNSUPPORTED_FORM if form_ok else _UNSUPPORTED_JSON)()
        if check_body is not None:
            try:
                check_body(body, clock(), tolerance)
            except Refused as exc:
                raise _refuse(call, on_failure, exc.code, exc.message) from None
        call.body = body
        if body_delivery is not None:
            found = body.get(body_delivery)
            if isinstance(found, str) and 0 < len(found) <= MAX_ID_CHARS and found.isprintable():
                _delivery(call, found)
        if github and request.headers.get("X-GitHub-Event") == "ping":
            raise Answer("answered", {"event": "ping"})
        if slack and body.get("type") == "url_verification":
            challenge = body.get("challenge")
            if not isinstance(challenge, str) or not 0 < len(challenge) <= MAX_CHALLENGE_CHARS:
                raise invalid_request("field 'challenge' must be a string of 1 to 1024 characters")
            raise Answer("answered", {"challenge": challenge}, bare=True)

    return guard


def _form(raw: bytes) -> dict[str, Any]:
    """Slack's form bodies: interactivity sends one ``payload`` field holding JSON (the
    parsed JSON is the body); slash commands send plain fields (they are the body)."""
    try:
        text = raw.decode("utf-8")
        pairs = parse_qsl(
            text,
            keep_blank_values=True,
            strict_parsing=bool(text),
            errors="strict",
            max_num_fields=MAX_FORM_FIELDS,
        )
    except (UnicodeDecodeError, ValueError):
        raise invalid_request("the body is not a valid UTF-8 form") from None
    fields = dict(pairs)
    if len(fields) != len(pairs):
        raise invalid_request("the form has a duplicate field")
    if set(fields) == {"payload"}:
        return decode_object(fields["payload"].encode("utf-8", "surrogatepass"))
    return fields


def context(call: Call, hidden: frozenset[str]) -> dict[str, Any]:
    """What templates see: ``body``, ``headers`` (lower-cased names; never credentials
    nor the profile's signature header) and ``route``."""
    headers: dict[str, str] = {}
    for name, value in call.request.headers.items():
        lower = name.lower()
        if lower in hidden or lower in NEVER_SHOWN:
            continue
        headers[lower] = f"{headers[lower]}, {value}" if lower in headers else value
    return {"body": call.body, "headers": headers, "route": call.route}


def _template_error(call: Call, message: str) -> Reject:
    log.warning("route %s: %s", call.route, message, extra={"requestId": call.request_id})
    return Reject(422, "template_error", message)


def _valid_text(text: str) -> str:
    """``text`` as valid Unicode: a payload's lone surrogate (``"\\ud800"``) becomes U+FFFD."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


def when(route: Route, profile: Profile) -> Guard | None:
    """200 ``{"status": "ok", "ignored": true}`` when the route's ``when`` is false;
    None (no guard) without one."""
    expression = route.when
    if expression is None:
        return None
    hidden = profile.hidden

    def guard(call: Call) -> None:
        try:
            wanted = expression(context(call, hidden))
        except Exception as exc:  # RenderError, or a sandbox refusal
            raise _template_error(
                call, str(exc) if str(exc) else "when expression failed"
            ) from None
        if not wanted:
            raise Answer("ignored", {"ignored": True})

    return guard


def render(settings: Settings, route: Route, profile: Profile) -> Guard:
    """The call's message and session from the route's templates: 422 template_error
    when the message renders empty or the sessionKey is not a valid key; 403
    session_key_not_allowed when the agent refuses requested keys."""
    agent = settings.webhooks.agents[route.agent]
    message_t, session_t = route.message, route.session_key
    max_chars = settings.sidecar.limits.max_message_chars
    hidden = profile.hidden

    def guard(call: Call) -> None:
        ctx = context(call, hidden)
        fields: dict[str, Any] = {"agent": agent.name}
        try:
            if message_t is not None:
                message = message_t.render(ctx)
                if not message.strip():
                    raise _template_error(call, "the message template rendered empty")
                fields["message"] = _valid_text(message[:max_chars])
            session = agent.session_key
            if session_t is not None:
                key = session_t.render(ctx)
                if not SESSION_KEY.fullmatch(key):
                    raise _template_error(
                        call,
                        "the sessionKey template rendered a key that does not match "
                        "[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}",
                    )
                session = requested_session(agent, key)
        except Reject:
            raise
        except Exception as exc:  # RenderError: it names the template
            raise _template_error(call, str(exc)) from None
        call.session = session
        call.body = fields  # what the forwarder sends: the payload is done with

    return guard
