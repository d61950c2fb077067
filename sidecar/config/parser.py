"""JSON5 config file -> :class:`sidecar.settings.Settings` (docs/configuration.md).

Everything is validated once, here; the request path only reads the result.
Every problem names its key path (``webhooks.agents.my-agent.sessionKey: must be
a string``) and all problems of a file are reported together. No message ever
contains secret material: secret values are only compared, never formatted.
"""

from __future__ import annotations

import difflib
import hmac
import ipaddress
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar
from urllib.parse import urlsplit

import json5

from .. import tls
from ..secrets import Secret, SecretSource, SecretSourceError
from ..settings import (
    AGENT_NAME,
    DEFAULT_ADMIN_LISTEN,
    DEFAULT_MIN_SECRET_LENGTH,
    DEFAULT_UPSTREAM_SOCKET,
    SECRET_ID,
    SESSION_KEY,
    Agent,
    Dedup,
    IPNetwork,
    Limits,
    Listen,
    Lockout,
    Log,
    RateLimit,
    RateLimits,
    Settings,
    Sidecar,
    Spool,
    SpoolRetry,
    Tls,
    Upstream,
    Webhooks,
)
from .fields import choice as _choice
from .routes import parse_routes
from .strength import weak_secret_reason

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
MAX_DURATION = 365 * 86400.0
# A secret with fewer distinct characters than this is a pattern, not a secret.


class ConfigError(Exception):
    """The config is unusable. ``problems`` holds one line per problem, each naming its key."""

    def __init__(self, problems: list[str]) -> None:
        problems = [_printable(p) for p in problems]
        super().__init__("\n".join(problems))
        self.problems = problems


def _printable(text: str) -> str:
    """``text`` with what a terminal or a UTF-8 stream cannot take escaped: a key quoted
    from the config may hold a lone surrogate (``print`` to stdout then raises) or an
    escape sequence (it would drive the operator's terminal)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


# --------------------------------------------------------------------------- loading


def load(
    path: str | os.PathLike[str], *, now: float | None = None, revoke: bool = False
) -> Settings:
    """Read and validate a config file. Raises :class:`ConfigError`.

    With ``revoke`` (a reload), a secret whose file was deleted or emptied is left
    out instead of failing the load: that is how a leaked secret is revoked, and it
    must not keep working because the reload was refused (docs/connections.md)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{p}: cannot read config file: {exc.strerror}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{p}: config file is not UTF-8"]) from None
    return loads(text, path=p, now=now, revoke=revoke)


def loads(
    text: str, *, path: Path | None = None, now: float | None = None, revoke: bool = False
) -> Settings:
    """Validate config text. Relative file paths are relative to ``path``'s folder."""
    where = str(path) if path is not None else "config"
    try:
        doc = json5.loads(text, allow_duplicate_keys=False)
    except ValueError as exc:
        # json5's messages quote position and a character, not whole values.
        raise ConfigError([f"{where}: not valid JSON5{_json5_error(exc)}"]) from None
    except RecursionError:
        raise ConfigError([f"{where}: not valid JSON5: nested too deeply"]) from None
    base = path.parent if path is not None else Path.cwd()
    return _Builder(base, time.time() if now is None else now, revoke).settings(doc, path)


def _first_line(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]


# json5 names the text "<string>" and puts the line first: "<string>:3 Unexpected "," at column 9".
_JSON5_POSITION = re.compile(r"<string>:(\d+) (.*) at column (\d+)", re.DOTALL)


def _json5_error(exc: ValueError) -> str:
    """`` at line L, column C: what`` from json5's message (the file path is ours to add)."""
    found = _JSON5_POSITION.fullmatch(str(exc))
    if found is None:
        return f": {_first_line(exc)}"
    line, what, column = found.groups()  # ``what`` may quote a newline: ConfigError escapes it
    return f" at line {line}, column {column}: {what[:200]}"


def parse_duration(value: object) -> float:
    """``30`` / ``1.5`` seconds, or ``"500ms"``, ``"30s"``, ``"5m"``, ``"1h"``."""
    if isinstance(value, bool):
        raise ValueError("must be a duration (seconds, or a string like 30s, 5m, 1h)")
    try:
        if isinstance(value, int | float):
            seconds = float(value)
        elif isinstance(value, str) and (m := _DURATION.fullmatch(value.strip())):
            seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        else:
            raise ValueError("must be a duration (seconds, or a string like 30s, 5m, 1h)")
    except OverflowError:  # an integer past float range: 1 followed by 400 zeros
        seconds = math.inf
    if math.isnan(seconds) or seconds <= 0:
        raise ValueError("must be a positive duration")
    # Bounded, so every use stays exact and finite: a rate limit's "per" in whole
    # microseconds, deadlines on the event loop's clock, a Retry-After header.
    if seconds > MAX_DURATION:
        raise ValueError("must be at most 1 year (365d)")
    return seconds


def parse_listen(value: str) -> Listen:
    """``host:port`` or ``[v6]:port``."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isascii() or not port_text.isdigit() or len(port_text) > 5:
        raise ValueError("must be host:port, e.g. 0.0.0.0:8080 or [::]:8080")
    port = int(port_text)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or port > 65535:
        raise ValueError("must be host:port, e.g. 0.0.0.0:8080 or [::]:8080")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise ValueError("host must be an IP address or localhost") from None
    return Listen(host, port)


def parse_network(value: str) -> IPNetwork:
    """A CIDR or a single address; IPv4-mapped IPv6 networks count as IPv4."""
    if "%" in value:  # a zone id names a local interface; client addresses never carry one
        raise ValueError("IPv6 zone ids are not allowed")
    net = ipaddress.ip_network(value.strip(), strict=False)
    if isinstance(net, ipaddress.IPv6Network) and net.network_address.ipv4_mapped is not None:
        mapped = net.network_address.ipv4_mapped
        return ipaddress.ip_network(f"{mapped}/{max(net.prefixlen - 96, 0)}", strict=False)
    return net


# --------------------------------------------------------------------------- builder

T = TypeVar("T")
_MISSING: Any = object()
_REVOKED: Any = object()  # secret_value: a deleted or emptied secret file on reload


class _Builder:
    """Walks the document once, collecting every problem with its key path."""

    def __init__(self, base: Path, now: float, revoke: bool = False) -> None:
        self.base = base
        self.now = now
        self.revoke = revoke  # a deleted or emptied secret file drops that secret
        self.revoked: list[str] = []
        self.problems: list[str] = []

    # -- generic readers ------------------------------------------------------

    def bad(self, path: str, message: str) -> None:
        self.problems.append(f"{path}: {message}")

    def obj(self, path: str, value: object, allowed: Iterable[str]) -> dict[str, Any] | None:
        if not isinstance(value, dict):
            self.bad(path, "must be an object")
            return None
        known = list(allowed)
        for key in value:
            if key not in known:
                hint = difflib.get_close_matches(key, known, n=1)
                self.bad(
                    _join(path, key),
                    "unknown key" + (f" (did you mean {hint[0]!r}?)" if hint else ""),
                )
        return value

    def field(
        self,
        path: str,
        obj: Mapping[str, Any],
        key: str,
        convert: Callable[[Any], T],
        default: T = _MISSING,
    ) -> T:
        """Read ``obj[key]`` through ``convert`` (which raises ValueError with a message)."""
        if key not in obj:
            if default is _MISSING:
                self.bad(_join(path, key), "is required")
            return default
        try:
            return convert(obj[key])
        except ValueError as exc:
            self.bad(_join(path, key), str(exc))
            return default if default is not _MISSING else None  # type: ignore[return-value]

    # -- top level ------------------------------------------------------------

    def settings(self, doc: object, path: Path | None) -> Settings:
        if not isinstance(doc, dict):  # nothing else can be checked
            raise ConfigError(["config: must be an object with the keys 'webhooks' and 'sidecar'"])
        root = self.obj("", doc, ["webhooks", "sidecar"]) or {}
        if "webhooks" not in root:
            self.bad("webhooks", "is required")
        sidecar_doc = self.obj("sidecar", root.get("sidecar", {}), _SIDECAR_KEYS) or {}
        sidecar = self.sidecar(sidecar_doc)
        webhooks, inline = self.webhooks(root.get("webhooks", {}), sidecar)
        if self.problems:
            raise ConfigError(self.problems)
        assert webhooks is not None and sidecar is not None
        return Settings(webhooks, sidecar, path, inline)

    # -- webhooks -------------------------------------------------------------

    def webhooks(
        self, value: object, sidecar: Sidecar | None
    ) -> tuple[Webhooks | None, tuple[str, ...]]:
        keys = ["enabled", "secret", "secrets", "agents", "routes"]
        doc = self.obj("webhooks", value, keys)
        if doc is None:
            return None, ()
        enabled = self.field("webhooks", doc, "enabled", _bool, True)
        agents = self.agents(doc.get("agents", {}))
        min_len = sidecar.min_secret_length if sidecar else DEFAULT_MIN_SECRET_LENGTH
        secrets = self.secrets(doc, agents, min_len)
        # Signed senders (docs/routes.md): config/routes.py, with this builder's readers.
        routes = parse_routes(self, doc.get("routes", {}), agents, secrets, min_len, parse_duration)
        inline = tuple(s.id for s in secrets if s.source.kind == "value")
        inline += tuple(
            s.id for r in routes.values() for s in r.secrets if s.source.kind == "value"
        )
        routes_view = MappingProxyType({r.path: r for r in routes.values()})
        return Webhooks(enabled, tuple(secrets), MappingProxyType(agents), routes_view), inline

    def agents(self, value: object) -> dict[str, Agent]:
        if not isinstance(value, dict):
            self.bad("webhooks.agents", "must be an object of agent name -> settings")
            return {}
        agents: dict[str, Agent] = {}
        for name, spec in value.items():
            path = f"webhooks.agents.{name}"
            if not AGENT_NAME.fullmatch(name):
                self.bad(path, "agent names must match [A-Za-z0-9][A-Za-z0-9._-]{0,63}")
                continue
            agent = self.agent(path, name, spec)
            if agent is not None:
                agents[name] = agent
        return agents

    def agent(self, path: str, name: str, value: object) -> Agent | None:
        doc = self.obj(path, value, _AGENT_KEYS)
        if doc is None:
            return None
        session_key = self.field(path, doc, "sessionKey", _session_key, f"webhook:{name}")
        allow = self.field(path, doc, "allowRequestSessionKey", _bool, True)
        prefixes: tuple[str, ...] = self.field(path, doc, "sessionKeyPrefixes", _prefixes, ())
        rate = (
            self.rate_limit(_join(path, "rateLimit"), doc["rateLimit"])
            if "rateLimit" in doc
            else None
        )
        concurrent = self.field(path, doc, "maxConcurrent", _int_between(1, 100_000), None)
        agent_id = self.field(path, doc, "agentId", _agent_name, name)
        wake = self.field(path, doc, "wakeText", _text(1, 2000), f"Webhook wake for {name}")
        return Agent(name, session_key, allow, prefixes, rate, concurrent, agent_id, wake)

    def secrets(
        self,
        doc: Mapping[str, Any],
        agents: Mapping[str, Agent],
        min_len: int,
        at: str = "webhooks",
    ) -> list[Secret]:
        """The ``secret``/``secrets`` of the block at ``at`` (webhooks, or a route)."""
        if ("secret" in doc) == ("secrets" in doc):
            self.bad(at, "exactly one of 'secret' and 'secrets' is required")
            return []
        if "secret" in doc:
            one = self.secret(f"{at}.secret", doc["secret"], "default", listed=False)
            found = [one] if one is not None else []
        else:
            found = self.secret_list(doc["secrets"], agents, f"{at}.secrets")
        for index, secret in enumerate(found):
            label = f"{at}.secret" if "secret" in doc else f"{at}.secrets[{index}]"
            if len(secret.value) < min_len:
                self.bad(
                    label,
                    f"secret {secret.id!r} is shorter than minSecretLength ({min_len} characters); "
                    "generate one with `webhook-sidecar gen-secret`",
                )
            elif (weak := weak_secret_reason(secret.value)) is not None:
                self.bad(
                    label,
                    f"secret {secret.id!r} is weak: {weak}; "
                    "generate one with `webhook-sidecar gen-secret`",
                )
            for other in found[:index]:
                if hmac.compare_digest(other.value, secret.value):
                    self.bad(
                        label, f"secret {secret.id!r} has the same value as secret {other.id!r}"
                    )
        if not found and self.revoked and len(self.problems) == 0:
            return found  # every secret revoked: hooks answer 401, /readyz 503
        if found and not any(s.valid_at(self.now) for s in found):
            self.bad(f"{at}.secrets", "no secret is valid now (check notBefore/notAfter)")
        return found

    def secret_list(
        self, value: object, agents: Mapping[str, Agent], at: str = "webhooks.secrets"
    ) -> list[Secret]:
        if not isinstance(value, list) or not value:
            self.bad(at, "must be a non-empty list")
            return []
        found: list[Secret] = []
        ids: set[str] = set()
        for index, entry in enumerate(value):
            path = f"{at}[{index}]"
            secret = self.secret(path, entry, None, listed=True)
            if secret is None:
                continue
            if secret.id in ids:
                self.bad(_join(path, "id"), f"duplicate secret id {secret.id!r}")
            ids.add(secret.id)
            for agent in sorted(secret.agents or ()):
                if agent not in agents:
                    self.bad(_join(path, "agents"), f"unknown agent {agent!r}")
            found.append(secret)
        return found

    def secret(
        self, path: str, value: object, default_id: str | None, *, listed: bool
    ) -> Secret | None:
        """A secret entry: a string, or an object with exactly one of value/file/env."""
        if isinstance(value, str) and not listed:
            value = {"value": value}
        elif not isinstance(value, dict):
            self.bad(
                path,
                "must be an object: {id: ..., file: PATH}, {id: ..., env: NAME} "
                "or {id: ..., value: ...}"
                if listed
                else "must be a string, {file: PATH}, {env: NAME} or {value: ...}",
            )
            return None
        keys = ["value", "file", "env"] + (
            ["id", "notBefore", "notAfter", "agents"] if listed else []
        )
        doc = self.obj(path, value, keys)
        if doc is None:
            return None
        before = len(self.problems)
        secret_id = self.field(path, doc, "id", _secret_id) if listed else default_id
        not_before = self.field(path, doc, "notBefore", _timestamp, None)
        not_after = self.field(path, doc, "notAfter", _timestamp, None)
        if not_before is not None and not_after is not None and not_after <= not_before:
            self.bad(_join(path, "notAfter"), "must be later than notBefore")
        scope = self.field(path, doc, "agents", _agent_list, None)
        loaded = self.secret_value(path, doc)
        if loaded is _REVOKED:
            self.revoked.append(str(secret_id))
            return None
        if loaded is None or len(self.problems) > before:
            return None
        source, data = loaded
        assert secret_id is not None
        return Secret(secret_id, data, source, not_before, not_after, scope)

    def secret_value(self, path: str, doc: Mapping[str, Any]) -> tuple[SecretSource, bytes] | Any:
        given = [k for k in ("value", "file", "env") if k in doc]
        if len(given) != 1:
            self.bad(path, "needs exactly one of 'value', 'file', 'env'")
            return None
        kind = given[0]
        raw = doc[kind]
        if not isinstance(raw, str) or not raw:
            self.bad(_join(path, kind), "must be a non-empty string")
            return None
        where = "" if kind == "value" else str(self.base / raw) if kind == "file" else raw
        source = SecretSource(kind, where)
        try:
            data = source.read(raw)
        except SecretSourceError as exc:
            if self.revoke and kind == "file" and not os.path.exists(where):
                return _REVOKED  # deleted (or a dangling symlink): revoked, not an error
            self.bad(_join(path, kind), str(exc))
            return None
        if not data and self.revoke and kind == "file":
            return _REVOKED
        if not data:
            self.bad(_join(path, kind), "secret is empty")
            return None
        return source, data

    def rate_limit(self, path: str, value: object) -> RateLimit | None:
        doc = self.obj(path, value, ["requests", "per", "burst"])
        if doc is None:
            return None
        requests = self.field(path, doc, "requests", _int_between(1, 10**9))
        per = self.field(path, doc, "per", parse_duration, 1.0)
        burst = self.field(path, doc, "burst", _int_between(1, 10**9), requests)
        if requests is None or burst is None:
            return None
        return RateLimit(requests, per, burst)

    # -- sidecar --------------------------------------------------------------

    def sidecar(self, doc: Mapping[str, Any]) -> Sidecar | None:
        p = "sidecar"
        listen = self.field(p, doc, "listen", _listen, Listen("0.0.0.0", 8080))
        admin_doc = self.obj("sidecar.admin", doc.get("admin", {}), ["listen"]) or {}
        admin = self.field("sidecar.admin", admin_doc, "listen", _listen, DEFAULT_ADMIN_LISTEN)
        if listen and admin and listen.port == admin.port and listen.port != 0:
            self.bad("sidecar.admin.listen", "must not share the public port")
        tls = self.tls(doc["tls"]) if "tls" in doc else None
        upstream = self.upstream(doc.get("upstream", {}))
        allow = self.field(p, doc, "allowIps", _networks, None)
        if allow == ():
            self.bad(f"{p}.allowIps", "must list one network at least (omit it to allow any)")
        no_proxies: tuple[IPNetwork, ...] = ()
        trusted = self.field(p, doc, "trustedProxies", _networks, no_proxies)
        rate = self.rate_limits(doc.get("rateLimit", {}))
        lockout = self.lockout(doc.get("authLockout", {}))
        limits = self.limits(doc.get("limits", {}))
        min_len = self.field(
            p, doc, "minSecretLength", _int_between(1, 4096), DEFAULT_MIN_SECRET_LENGTH
        )
        shutdown = self.field(p, doc, "shutdownTimeout", parse_duration, 15.0)
        workers = self.field(p, doc, "workers", _workers, 1)
        dedup = self.dedup(doc.get("dedup", {}), has_spool="spool" in doc)
        spool = self.spool(doc["spool"]) if "spool" in doc else None
        log_doc = self.obj("sidecar.log", doc.get("log", {}), ["level", "format"]) or {}
        log = Log(
            self.field(
                "sidecar.log",
                log_doc,
                "level",
                _choice("debug", "info", "warning", "error"),
                "info",
            ),
            self.field("sidecar.log", log_doc, "format", _choice("json", "text"), "json"),
        )
        if (
            listen is None
            or admin is None
            or upstream is None
            or rate is None
            or lockout is None
            or limits is None
            or dedup is None
        ):
            return None
        return Sidecar(
            listen,
            admin,
            upstream,
            tls,
            allow,
            trusted or (),
            rate,
            lockout,
            limits,
            min_len,
            shutdown,
            log,
            workers,
            dedup=dedup,
            spool=spool,
        )

    def spool(self, value: object) -> Spool | None:
        """``sidecar.spool`` (docs/spool.md); the file itself is opened at start."""
        p = "sidecar.spool"
        doc = self.obj(p, value, ["path", "maxEvents", "retry", "concurrency"])
        if doc is None:
            return None
        if not isinstance(doc.get("path"), str) or not doc["path"]:
            self.bad(f"{p}.path", "required: the spool's SQLite file")
            return None
        path = self.base / doc["path"]
        max_events = self.field(p, doc, "maxEvents", _int_between(1, 100_000_000), 100000)
        concurrency = self.field(p, doc, "concurrency", _int_between(1, 1024), 8)
        r = f"{p}.retry"
        retry_doc = self.obj(r, doc.get("retry", {}), ["initial", "max", "giveUpAfter"]) or {}
        initial = self.field(r, retry_doc, "initial", parse_duration, 1.0)
        most = self.field(r, retry_doc, "max", parse_duration, 300.0)
        give_up = self.field(r, retry_doc, "giveUpAfter", parse_duration, 86400.0)
        if initial is not None and most is not None and initial > most:
            self.bad(f"{r}.max", "must not be less than retry.initial")
        if initial is not None and initial <= 0:
            self.bad(f"{r}.initial", "must be more than 0")
        return Spool(path, max_events, SpoolRetry(initial, most, give_up), concurrency)

    def tls(self, value: object) -> Tls | None:
        p = "sidecar.tls"
        doc = self.obj(p, value, ["certFile", "keyFile", "clientCaFile", "minVersion"])
        if doc is None:
            return None
        before = len(self.problems)
        cert = self.field(p, doc, "certFile", self.readable_file)
        key = self.field(p, doc, "keyFile", self.readable_file)
        ca = self.field(p, doc, "clientCaFile", self.readable_file, None)
        version = self.field(p, doc, "minVersion", _choice("1.2", "1.3"), "1.2")
        if cert is None or key is None or len(self.problems) > before:
            return None
        settings = Tls(cert, key, ca, version)
        try:  # the files must work together, not only exist: a key that fits, a CA that parses
            loaded = tls.load(settings, now=self.now)
        except tls.TlsError as exc:
            self.bad(p, str(exc))
            return None
        return replace(settings, not_after=loaded.not_after)

    def upstream(self, value: object) -> Upstream | None:
        p = "sidecar.upstream"
        doc = self.obj(p, value, ["socket", "url", "protocol", "token", "timeout"])
        if doc is None:
            return None
        protocol = self.field(p, doc, "protocol", _choice("forward", "openclaw"), "forward")
        if "socket" in doc and "url" in doc:
            self.bad(p, "exactly one of 'socket' and 'url' is allowed")
            return None
        socket_path: str | None = None
        url: str | None = None
        host, port = "localhost", 80
        if "url" in doc:
            parsed = self.field(p, doc, "url", _http_url)
            if parsed is None:
                return None
            url, host, port = parsed
        else:
            socket_path = self.field(p, doc, "socket", _socket_path, DEFAULT_UPSTREAM_SOCKET)
            if socket_path is not None and not os.path.isabs(socket_path):
                socket_path = str(self.base / socket_path)
        token = (
            self.secret(f"{p}.token", doc["token"], "upstream", listed=False)
            if "token" in doc
            else None
        )
        if token is not None and any(c < 0x20 or c == 0x7F for c in token.value):
            # It becomes an HTTP header value: a line break would let it add headers.
            self.bad(f"{p}.token", "must not contain control characters")
            token = None
        if protocol == "openclaw" and "token" not in doc:
            self.bad(
                f"{p}.token", "is required with protocol 'openclaw' (the gateway's hooks.token)"
            )
        timeout = self.field(
            p, doc, "timeout", parse_duration, 20.0 if protocol == "openclaw" else 10.0
        )
        return Upstream(socket_path, url, host, port, protocol, token, timeout)

    def rate_limits(self, value: object) -> RateLimits | None:
        p = "sidecar.rateLimit"
        doc = self.obj(p, value, ["perIp", "global", "backend", "failOpen"])
        if doc is None:
            return None
        per_ip = self.rate_limit(f"{p}.perIp", doc["perIp"]) if "perIp" in doc else None
        glob = self.rate_limit(f"{p}.global", doc["global"]) if "global" in doc else None
        backend = self.field(p, doc, "backend", _backend, "memory")
        fail_open = self.field(p, doc, "failOpen", _bool, False)
        return RateLimits(per_ip, glob, backend, fail_open)

    def dedup(self, value: object, *, has_spool: bool) -> Dedup | None:
        p = "sidecar.dedup"
        doc = self.obj(p, value, ["backend", "maxEntries"])
        if doc is None:
            return None
        backend = self.field(p, doc, "backend", _dedup_backend, "memory")
        if backend == "sqlite" and not has_spool:  # the ids live in the spool's database
            self.bad(f"{p}.backend", "'sqlite' needs sidecar.spool")
        max_entries = self.field(p, doc, "maxEntries", _int_between(1, 100_000_000), 100_000)
        return Dedup(backend or "memory", max_entries)

    def lockout(self, value: object) -> Lockout | None:
        p = "sidecar.authLockout"
        doc = self.obj(p, value, ["maxFailures", "window", "duration"])
        if doc is None:
            return None
        return Lockout(
            self.field(p, doc, "maxFailures", _int_between(1, 10**6), 10),
            self.field(p, doc, "window", parse_duration, 60.0),
            self.field(p, doc, "duration", parse_duration, 300.0),
        )

    def limits(self, value: object) -> Limits | None:
        p = "sidecar.limits"
        keys = [
            "maxBodyBytes",
            "maxMessageChars",
            "headerTimeout",
            "bodyTimeout",
            "maxConnections",
            "maxConnectionsPerIp",
        ]
        doc = self.obj(p, value, keys)
        if doc is None:
            return None
        return Limits(
            self.field(p, doc, "maxBodyBytes", _int_between(64, 16 * 1024 * 1024), 65536),
            self.field(p, doc, "maxMessageChars", _int_between(1, 16 * 1024 * 1024), 32768),
            self.field(p, doc, "headerTimeout", parse_duration, 10.0),
            self.field(p, doc, "bodyTimeout", parse_duration, 10.0),
            self.field(p, doc, "maxConnections", _int_between(1, 1_000_000), 1024),
            self.field(p, doc, "maxConnectionsPerIp", _int_between(1, 1_000_000), 64),
        )

    def readable_file(self, value: object) -> Path:
        if not isinstance(value, str) or not value:
            raise ValueError("must be a file path")
        path = self.base / value
        if not os.access(path, os.R_OK) or not path.is_file():
            raise ValueError(f"cannot read file {path}")
        return path


_SIDECAR_KEYS = [
    "listen",
    "tls",
    "admin",
    "upstream",
    "allowIps",
    "trustedProxies",
    "rateLimit",
    "authLockout",
    "limits",
    "minSecretLength",
    "shutdownTimeout",
    "log",
    "workers",
    "dedup",
    "spool",
]
_AGENT_KEYS = [
    "sessionKey",
    "allowRequestSessionKey",
    "sessionKeyPrefixes",
    "rateLimit",
    "maxConcurrent",
    "agentId",
    "wakeText",
]


# --------------------------------------------------------------------------- converters


def _join(path: str, key: str) -> str:
    if not path:  # the top level: its keys stand alone ("webhook: unknown key")
        return key or '""'
    return f"{path}.{key}"


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def _int_between(low: int, high: int) -> Callable[[object], int]:
    def convert(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("must be a whole number")
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}")
        return value

    return convert


MAX_WORKERS = 64


def _workers(value: object) -> int:
    """A number of worker processes, or "auto": one per CPU this process may run on
    (its affinity mask, so ``taskset`` and cpusets count; a CFS quota does not)."""
    if value == "auto":
        return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))
    if isinstance(value, str):
        raise ValueError(f"must be a whole number between 1 and {MAX_WORKERS}, or 'auto'")
    return _int_between(1, MAX_WORKERS)(value)


def _text(low: int, high: int) -> Callable[[object], str]:
    def convert(value: object) -> str:
        if not isinstance(value, str):
            raise ValueError("must be a string")
        if not low <= len(value) <= high:
            raise ValueError(f"must be {low} to {high} characters long")
        return value

    return convert


def _matching(pattern: re.Pattern[str], what: str) -> Callable[[object], str]:
    def convert(value: object) -> str:
        if not isinstance(value, str):
            raise ValueError("must be a string")
        if not pattern.fullmatch(value):
            raise ValueError(f"{what} must match {pattern.pattern}")
        return value

    return convert


_session_key = _matching(SESSION_KEY, "session keys")
_agent_name = _matching(AGENT_NAME, "agent ids")
_secret_id = _matching(SECRET_ID, "secret ids")


def _string_list(value: object, item: Callable[[object], T]) -> list[T]:
    if not isinstance(value, list):
        raise ValueError("must be a list")
    out = []
    for index, entry in enumerate(value):
        try:
            out.append(item(entry))
        except ValueError as exc:
            raise ValueError(f"[{index}]: {exc}") from None
    return out


def _prefixes(value: object) -> tuple[str, ...]:
    def prefix(entry: object) -> str:
        if not isinstance(entry, str) or not entry or not SESSION_KEY.fullmatch(entry):
            raise ValueError("a prefix must be a non-empty start of a valid session key")
        return entry

    return tuple(_string_list(value, prefix))


def _agent_list(value: object) -> frozenset[str]:
    names = _string_list(value, _agent_name)
    if not names:
        raise ValueError("must name at least one agent (omit it to allow every agent)")
    return frozenset(names)


def _networks(value: object) -> tuple[IPNetwork, ...]:
    def network(entry: object) -> IPNetwork:
        if not isinstance(entry, str):
            raise ValueError("must be a string")
        try:
            return parse_network(entry)
        except ValueError:
            raise ValueError(f"not an IP address or CIDR network: {entry!r}") from None

    return tuple(_string_list(value, network))


def _listen(value: object) -> Listen:
    if not isinstance(value, str):
        raise ValueError("must be a string host:port")
    return parse_listen(value)


def _timestamp(value: object) -> float:
    message = "must be an RFC 3339 time with a zone, e.g. 2026-12-01T00:00:00Z"
    if not isinstance(value, str):
        raise ValueError(message)
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(message) from None
    if parsed.tzinfo is None:
        raise ValueError(message)
    return parsed.timestamp()


def _socket_path(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("must be a file path")
    if len(value.encode()) > 107:
        raise ValueError("Unix socket paths are limited to 107 bytes")
    return value


def _http_url(value: object) -> tuple[str, str, int]:
    if not isinstance(value, str):
        raise ValueError("must be a string")
    parts = urlsplit(value)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError("must be an http:// URL, e.g. http://127.0.0.1:18789")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ValueError("must be scheme, host and port only (the hook paths are fixed)")
    try:
        port = parts.port or 80
    except ValueError:
        raise ValueError("has an invalid port") from None
    try:  # what getaddrinfo will do with it: a bad name must fail here, not on each call
        parts.hostname.encode("idna")
    except UnicodeError:
        raise ValueError("has an invalid host name") from None
    return value.rstrip("/"), parts.hostname, port


def _backend(value: object) -> str:
    if value == "memory":
        return "memory"
    if isinstance(value, str) and value.startswith("redis://"):
        parts = urlsplit(value)
        try:
            parts.port  # noqa: B018 - validates the port
        except ValueError:
            raise ValueError("has an invalid port") from None
        if not parts.hostname or parts.path.strip("/") not in {"", *map(str, range(16))}:
            raise ValueError("must be redis://host:port/db")
        return value
    raise ValueError("must be 'memory' or a redis://host:port/db URL")


def _dedup_backend(value: object) -> str:
    if value == "sqlite":
        return "sqlite"
    try:
        return _backend(value)
    except ValueError:
        raise ValueError("must be 'memory', 'sqlite' or a redis://host:port/db URL") from None
