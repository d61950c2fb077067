"""``webhooks.routes``: signed senders -> :class:`sidecar.settings.Route` (docs/routes.md).

Parsed with the config builder's own readers (passed in as ``reader``, so this module
does not import the parser): the same key-path messages, and route secrets read,
windowed and strength-checked by exactly the code that reads ``webhooks.secrets``.
Templates are compiled here, once; a syntax error names its key path.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol, TypeVar

from ..routes import PROFILES
from ..routes.standard_webhooks import key_of
from ..routes.templates import Expression, Template, TemplateSyntaxError
from ..secrets import Secret
from ..settings import AGENT_NAME, Agent, Route, Verify
from .fields import choice as _choice

T = TypeVar("T")
RESERVED = frozenset({"wake", "agent"})  # the seed's own hooks
ROUTE_KEYS = [
    "verify", "secret", "secrets", "agent", "when", "message", "sessionKey", "action",
    "tolerance", "dedup",
]  # fmt: skip
GENERIC_KEYS = ["hmac", "header", "prefix", "encoding"]
DEFAULT_TOLERANCE = 300.0
DEFAULT_DEDUP = 86400.0
MAX_TEMPLATE_CHARS = 16384
_HEADER_NAME = frozenset(
    "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)


class Reader(Protocol):
    """What this module uses of the config builder (sidecar/config/parser.py)."""

    def bad(self, path: str, message: str) -> None: ...

    def obj(self, path: str, value: object, allowed: Iterable[str]) -> dict[str, Any] | None: ...

    def field(
        self,
        path: str,
        obj: Mapping[str, Any],
        key: str,
        convert: Callable[[Any], T],
        default: T = ...,
    ) -> T: ...

    def secrets(
        self, doc: Mapping[str, Any], agents: Mapping[str, Agent], min_len: int, at: str = ...
    ) -> list[Secret]: ...


def parse_routes(
    reader: Reader,
    value: object,
    agents: Mapping[str, Agent],
    webhook_secrets: list[Secret],
    min_len: int,
    duration: Callable[[object], float],
) -> dict[str, Route]:
    """Every route of ``webhooks.routes``, by name; problems go to ``reader.bad``.

    In order, per route: its name, its keys, ``verify``, its secrets (the webhooks.secrets
    rules, plus: none may equal a webhook secret or another route's, since one value
    would then open both doors), ``agent`` (must exist), ``action``, the templates, and
    the two durations."""
    if not isinstance(value, dict):
        reader.bad("webhooks.routes", "must be an object of route name -> settings")
        return {}
    routes: dict[str, Route] = {}
    taken: list[tuple[str, Secret]] = [("webhooks", s) for s in webhook_secrets]
    for name, spec in value.items():
        path = f"webhooks.routes.{name}"
        if not AGENT_NAME.fullmatch(name):
            reader.bad(path, "route names must match [A-Za-z0-9][A-Za-z0-9._-]{0,63}")
            continue
        if name in RESERVED:
            reader.bad(path, f"the route name {name!r} is reserved for /hooks/{name}")
            continue
        route = _route(reader, path, name, spec, agents, min_len, duration, taken)
        if route is not None:
            routes[name] = route
    return routes


def _route(
    reader: Reader,
    path: str,
    name: str,
    spec: object,
    agents: Mapping[str, Agent],
    min_len: int,
    duration: Callable[[object], float],
    taken: list[tuple[str, Secret]],
) -> Route | None:
    doc = reader.obj(path, spec, ROUTE_KEYS)
    if doc is None:
        return None
    verify = _verify(reader, path, doc)
    secrets = reader.secrets(doc, agents, min_len, at=path)
    for secret in secrets:
        if secret.agents is not None:
            reader.bad(f"{path}.secrets", "'agents' does not apply to route secrets (set 'agent')")
        for owner, other in taken:
            if hmac.compare_digest(other.value, secret.value):
                reader.bad(
                    f"{path}.secrets",
                    f"secret {secret.id!r} has the same value as a secret of {owner}",
                )
        taken.append((f"webhooks.routes.{name}", secret))
    if verify is not None and verify.profile == "standard-webhooks":
        for secret in secrets:
            try:
                key_of(secret.value)
            except ValueError as exc:
                reader.bad(f"{path}.secrets", f"secret {secret.id!r}: {exc}")
    agent = reader.field(path, doc, "agent", _string)
    if agent is not None and agent not in agents:
        reader.bad(f"{path}.agent", f"no agent named {agent!r} in webhooks.agents")
    action = reader.field(path, doc, "action", _choice("agent", "wake"), "agent")
    message = _template(reader, path, doc, "message", Template)
    if action == "agent" and "message" not in doc:
        reader.bad(f"{path}.message", "is required for action 'agent'")
    if action == "wake" and "message" in doc:
        reader.bad(f"{path}.message", "does not apply to action 'wake' (a wake has no message)")
    session_key = _template(reader, path, doc, "sessionKey", Template)
    when = _template(reader, path, doc, "when", lambda _name, source: Expression(source))
    tolerance = reader.field(path, doc, "tolerance", duration, DEFAULT_TOLERANCE)
    dedup = reader.field(path, doc, "dedup", _off_or(duration), DEFAULT_DEDUP)
    if verify is None or agent is None or agent not in agents or not secrets:
        return None
    return Route(
        name,
        verify,
        tuple(secrets),
        agent,
        action,
        message,
        session_key,
        when,
        tolerance,
        dedup,
    )


def _verify(reader: Reader, path: str, doc: Mapping[str, Any]) -> Verify | None:
    if "verify" not in doc:
        reader.bad(f"{path}.verify", "is required: a profile name or {hmac, header, ...}")
        return None
    value = doc["verify"]
    if isinstance(value, str):
        if value not in PROFILES:
            reader.bad(
                f"{path}.verify",
                "must be one of " + ", ".join(repr(p) for p in PROFILES) + " or an object",
            )
            return None
        return Verify(value)
    at = f"{path}.verify"
    generic = reader.obj(at, value, GENERIC_KEYS)
    if generic is None:
        return None
    algorithm = reader.field(at, generic, "hmac", _choice("sha256", "sha1"))
    header = reader.field(at, generic, "header", _header_name)
    prefix = reader.field(at, generic, "prefix", _prefix, "")
    encoding = reader.field(at, generic, "encoding", _choice("hex", "base64"), "hex")
    if algorithm is None or header is None or prefix is None or encoding is None:
        return None
    return Verify("hmac", algorithm, header, prefix, encoding)


def _template(
    reader: Reader,
    path: str,
    doc: Mapping[str, Any],
    key: str,
    compile_: Callable[[str, str], T],
) -> T | None:
    if key not in doc:
        return None
    source = doc[key]
    if not isinstance(source, str) or not source.strip():
        reader.bad(f"{path}.{key}", "must be a non-empty template string")
        return None
    if len(source) > MAX_TEMPLATE_CHARS:
        reader.bad(f"{path}.{key}", f"must be at most {MAX_TEMPLATE_CHARS} characters")
        return None
    try:
        return compile_(key, source)
    except TemplateSyntaxError as exc:
        reader.bad(f"{path}.{key}", str(exc))
        return None


def _string(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a string")
    return value


def _header_name(value: object) -> str:
    if not isinstance(value, str) or not value or not set(value) <= _HEADER_NAME:
        raise ValueError("must be an HTTP header name, e.g. X-Signature")
    if value.lower() in ("authorization", "cookie", "content-type", "content-length", "host"):
        raise ValueError(f"{value!r} cannot carry a signature")
    return value


def _prefix(value: object) -> str:
    if (
        not isinstance(value, str)
        or len(value) > 64
        or not (value.isascii() and value.isprintable())
    ):
        raise ValueError("must be a string of at most 64 printable ASCII characters (may be empty)")
    return value


def _off_or(duration: Callable[[object], float]) -> Callable[[object], float]:
    """A duration, where 0 (``0``, ``"0s"``, ``"0ms"``...) means off."""

    def convert(value: object) -> float:
        if not isinstance(value, bool) and (
            value == 0
            or (isinstance(value, str) and value.strip() in ("0", "0s", "0ms", "0m", "0h"))
        ):
            return 0.0
        return duration(value)

    return convert
