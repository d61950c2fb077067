"""The frozen, typed settings every other module reads.

:mod:`sidecar.config` builds them from the JSON5 file once; the request path only
reads them. A reload builds a new :class:`Settings` and swaps it in with one
assignment; a request keeps the object it started with (docs/lifecycle.md).
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

from .secrets import Secret

if TYPE_CHECKING:
    from .routes.templates import Expression, Template

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

AGENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
SESSION_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")
SECRET_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")

DEFAULT_UPSTREAM_SOCKET = "/run/agent/hooks.sock"
DEFAULT_MIN_SECRET_LENGTH = 32
# The OpenClaw gateway refuses bodies over 256 KiB (413). What the sidecar sends it
# is the client's message plus at most ~400 bytes of fields it adds.
OPENCLAW_MAX_BODY_BYTES = 262_144
OPENCLAW_BODY_HEADROOM = 1024


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A token bucket: ``burst`` tokens, refilled at ``requests`` per ``per`` seconds."""

    requests: int
    per: float
    burst: int

    @property
    def rate(self) -> float:
        return self.requests / self.per


@dataclass(frozen=True, slots=True)
class Agent:
    name: str
    session_key: str
    allow_request_session_key: bool = True
    session_key_prefixes: tuple[str, ...] = ()
    rate_limit: RateLimit | None = None
    max_concurrent: int | None = None
    agent_id: str = ""  # the runtime's own id (openclaw protocol); defaults to name
    wake_text: str = ""  # the wake text (openclaw protocol)


@dataclass(frozen=True, slots=True)
class Webhooks:
    enabled: bool
    secrets: tuple[Secret, ...]
    agents: Mapping[str, Agent]
    # Signed senders on /hooks/<name> (docs/routes.md), keyed by their path.
    routes: Mapping[str, Route] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True, slots=True)
class Listen:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


DEFAULT_ADMIN_LISTEN = Listen("127.0.0.1", 9090)


@dataclass(frozen=True, slots=True)
class Tls:
    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None
    min_version: str = "1.2"
    not_after: float = math.inf  # when the certificate expires (checked when loaded)


@dataclass(frozen=True, slots=True)
class Upstream:
    socket: str | None
    url: str | None
    host: str  # for url: host to connect to and Host header; for socket: "localhost"
    port: int
    protocol: str  # "forward" or "openclaw"
    token: Secret | None
    timeout: float


@dataclass(frozen=True, slots=True)
class RateLimits:
    per_ip: RateLimit | None = None
    global_: RateLimit | None = None
    backend: str = "memory"
    fail_open: bool = False


@dataclass(frozen=True, slots=True)
class Lockout:
    max_failures: int = 10
    window: float = 60.0
    duration: float = 300.0


@dataclass(frozen=True, slots=True)
class Limits:
    max_body_bytes: int = 65536
    max_message_chars: int = 32768
    header_timeout: float = 10.0
    body_timeout: float = 10.0
    max_connections: int = 1024  # open public connections per process (docs/configuration.md)
    max_connections_per_ip: int = (
        64  # per peer address, trusted proxies exempt (docs/connections.md)
    )


@dataclass(frozen=True, slots=True)
class Log:
    level: str = "info"
    format: str = "json"


@dataclass(frozen=True, slots=True)
class Dedup:
    """Where delivery ids and Idempotency-Keys are remembered (docs/dedup.md)."""

    backend: str = "memory"  # "memory", "sqlite" (the spool's database) or a redis:// URL
    max_entries: int = 100_000  # the memory backend's bound: oldest first out


@dataclass(frozen=True, slots=True)
class Sidecar:
    listen: Listen
    admin_listen: Listen
    upstream: Upstream
    tls: Tls | None = None
    allow_ips: tuple[IPNetwork, ...] | None = None  # None: any address
    trusted_proxies: tuple[IPNetwork, ...] = ()
    rate_limit: RateLimits = field(default_factory=RateLimits)
    auth_lockout: Lockout = field(default_factory=Lockout)
    limits: Limits = field(default_factory=Limits)
    min_secret_length: int = DEFAULT_MIN_SECRET_LENGTH
    shutdown_timeout: float = 15.0
    log: Log = field(default_factory=Log)
    workers: int = 1  # processes serving the public port (docs/lifecycle.md)
    dedup: Dedup = field(default_factory=Dedup)
    spool: Spool | None = None  # durable acceptance (docs/spool.md); None: direct mode


@dataclass(frozen=True, slots=True)
class Settings:
    """One loaded config. Immutable: a reload builds a new one and swaps it in."""

    webhooks: Webhooks
    sidecar: Sidecar
    path: Path | None = None  # the config file it came from
    inline_secrets: tuple[str, ...] = ()  # ids of secrets written into the file itself

    @property
    def watched_files(self) -> tuple[Path, ...]:
        """Files whose change should trigger a reload: the config, secrets, token, certs."""
        files: list[Path] = [] if self.path is None else [self.path]
        sources = [s.source for s in self.webhooks.secrets]
        sources += [s.source for r in self.webhooks.routes.values() for s in r.secrets]
        if self.sidecar.upstream.token is not None:
            sources.append(self.sidecar.upstream.token.source)
        files += [Path(src.where) for src in sources if src.kind == "file"]
        tls = self.sidecar.tls
        if tls is not None:
            files += [tls.cert_file, tls.key_file]
            if tls.client_ca_file is not None:
                files.append(tls.client_ca_file)
        return tuple(dict.fromkeys(files))


@dataclass(frozen=True, slots=True)
class Verify:
    """How a route checks its sender (docs/routes.md): a provider profile, or the generic
    ``{hmac, header, prefix, encoding}`` form (``profile == "hmac"``)."""

    profile: str  # github, gitlab, stripe, slack, linear, sentry, standard-webhooks, bearer, hmac
    algorithm: str = "sha256"  # generic form: sha256 or sha1
    header: str = ""  # generic form: the signature header
    prefix: str = ""  # generic form: what precedes the signature in the header (may be empty)
    encoding: str = "hex"  # generic form: hex or base64


@dataclass(frozen=True, slots=True)
class Route:
    """One signed sender on ``POST /hooks/<name>`` and how its payload becomes a call."""

    name: str
    verify: Verify
    secrets: tuple[Secret, ...]
    agent: str
    action: str  # "agent" or "wake"
    message: Template | None  # required for action "agent"
    session_key: Template | None  # None: the agent's sessionKey
    when: Expression | None  # None: every delivery is forwarded
    tolerance: float = 300.0  # timestamped profiles: seconds either way
    dedup: float = 86400.0  # how long a delivery id is remembered; 0: off

    @property
    def path(self) -> str:
        return f"/hooks/{self.name}"


@dataclass(frozen=True, slots=True)
class SpoolRetry:
    initial: float = 1.0
    max: float = 300.0
    give_up_after: float = 86400.0


@dataclass(frozen=True, slots=True)
class Spool:
    """``sidecar.spool`` (docs/spool.md): absent means direct mode."""

    path: Path
    max_events: int = 100000
    retry: SpoolRetry = field(default_factory=SpoolRetry)
    concurrency: int = 8
