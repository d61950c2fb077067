"""Security warnings: what a reviewer would flag in a valid config.

``check-config`` prints them, ``run`` logs them at start (docs/operations.md).
"""

from __future__ import annotations

import ipaddress
import time

from ..settings import (
    DEFAULT_MIN_SECRET_LENGTH,
    OPENCLAW_BODY_HEADROOM,
    OPENCLAW_MAX_BODY_BYTES,
    Settings,
)

SOON = 7 * 86400  # warn about secrets and certificates that expire within a week


def security_warnings(settings: Settings, *, now: float | None = None) -> list[str]:
    """What a security reviewer would flag in a valid config, one line each."""
    now = time.time() if now is None else now
    s = settings.sidecar
    out: list[str] = []
    if s.allow_ips is None:
        out.append("sidecar.allowIps: not set, any address may call the hooks")
    if (
        s.tls is None
        and not s.trusted_proxies
        and not ipaddress.ip_address(_resolve_host(s.listen.host)).is_loopback
    ):
        out.append(
            f"sidecar.listen: {s.listen} is reachable from the network without TLS "
            "and without trustedProxies (tokens would cross the network in clear text)"
        )
    if not settings.webhooks.agents:
        out.append(
            "webhooks.agents: no agent is configured; every call to /hooks/wake and "
            "/hooks/agent answers 404 agent_not_found"
        )
    for agent in settings.webhooks.agents.values():
        if agent.allow_request_session_key and not agent.session_key_prefixes:
            out.append(
                f"webhooks.agents.{agent.name}: requests may choose any sessionKey; "
                "set sessionKeyPrefixes or allowRequestSessionKey: false"
            )
    out.extend(_shared_agent_ids(settings))
    for secret in settings.webhooks.secrets:
        if secret.not_after is None:
            continue
        if secret.not_after <= now:
            out.append(f"webhooks.secrets: secret {secret.id!r} has expired; remove it")
        elif secret.not_after < now + SOON:
            days = (secret.not_after - now) / 86400
            out.append(f"webhooks.secrets: secret {secret.id!r} expires in {days:.1f} days")
    for secret_id in settings.inline_secrets:
        out.append(
            f"webhooks: secret {secret_id!r} is written in the config file; "
            "prefer {file: ...} or {env: ...}"
        )
    if s.upstream.token is not None and s.upstream.token.source.kind == "value":
        out.append(
            "sidecar.upstream.token: written in the config file; prefer {file: ...} or {env: ...}"
        )
    if s.tls is not None and s.tls.not_after < now + SOON:
        days = (s.tls.not_after - now) / 86400
        out.append(f"sidecar.tls.certFile: the certificate expires in {days:.1f} days")
    up = s.upstream
    if up.url is not None and not ipaddress.ip_address(_resolve_host(up.host)).is_loopback:
        out.append(f"sidecar.upstream.url: {up.host} is not a loopback address")
    if up.protocol == "openclaw" and (
        s.limits.max_body_bytes > OPENCLAW_MAX_BODY_BYTES - OPENCLAW_BODY_HEADROOM
    ):
        out.append(
            f"sidecar.limits.maxBodyBytes: {s.limits.max_body_bytes} is above what the OpenClaw "
            f"gateway accepts ({OPENCLAW_MAX_BODY_BYTES} bytes, less "
            f"{OPENCLAW_BODY_HEADROOM} for the fields the sidecar adds); larger calls get 502"
        )
    if s.min_secret_length < DEFAULT_MIN_SECRET_LENGTH:
        out.append(f"sidecar.minSecretLength: {s.min_secret_length} is below the recommended 32")
    if not settings.webhooks.enabled:
        out.append("webhooks.enabled: false, every hook answers 503")
    out += _worker_warnings(settings)
    out += _route_warnings(settings, now)
    return out


# Senders that post many kinds of event to one URL: without `when`, each wakes the agent.
MANY_EVENT_PROFILES = frozenset(
    {"github", "gitlab", "slack", "sentry", "linear", "stripe", "standard-webhooks"}
)


def _route_warnings(settings: Settings, now: float) -> list[str]:
    """Routes (docs/routes.md): SHA-1 signatures, a many-event sender without ``when``,
    route secrets that expire soon."""
    out = []
    for route in settings.webhooks.routes.values():
        path = f"webhooks.routes.{route.name}"
        if route.verify.algorithm == "sha1":
            out.append(f"{path}.verify: hmac 'sha1' is weak; use 'sha256' if the sender can")
        if route.when is None and route.verify.profile in MANY_EVENT_PROFILES:
            out.append(
                f"{path}: no 'when' filter: every event type the {route.verify.profile} sender "
                "posts triggers the agent (e.g. when: \"headers['x-github-event'] == 'push'\")"
            )
        for secret in route.secrets:
            if secret.not_after is not None and secret.not_after < now + SOON:
                out.append(
                    f"{path}.secrets: secret {secret.id!r} has expired or expires within 7 days"
                )
    return out


def _shared_agent_ids(settings: Settings) -> list[str]:
    """Agents that reach the same runtime agent share its sessions: one caller's
    context (and what it was told) leaks into the other's runs."""
    by_id: dict[str, list[str]] = {}
    for agent in settings.webhooks.agents.values():
        by_id.setdefault(agent.agent_id or agent.name, []).append(agent.name)
    return [
        f"webhooks.agents: {', '.join(repr(n) for n in sorted(names))} map to the same "
        f"runtime agentId {agent_id!r} and share its sessions; give each its own agentId"
        for agent_id, names in sorted(by_id.items())
        if len(names) > 1
    ]


def _worker_warnings(settings: Settings) -> list[str]:
    """With several workers, what is kept in each process's memory is per worker."""
    s = settings.sidecar
    n = s.workers
    if n == 1:
        return []
    out = [
        f"sidecar.authLockout: counted in each worker's memory; with {n} workers an address "
        f"may fail up to {n}x maxFailures times before it is locked out everywhere"
    ]
    agents = settings.webhooks.agents.values()
    limited = s.rate_limit.per_ip or s.rate_limit.global_ or any(a.rate_limit for a in agents)
    if s.rate_limit.backend == "memory" and limited:
        out.append(
            f"sidecar.rateLimit.backend: 'memory' keeps one set of buckets per worker; with {n} "
            f"workers the effective limits are up to {n}x the configured ones "
            "(use a redis:// backend for exact shared limits)"
        )
    if any(a.max_concurrent for a in agents):
        out.append(
            f"webhooks.agents.*.maxConcurrent: counted per worker; with {n} workers up to "
            f"{n}x the configured calls may be in flight"
        )
    if s.dedup.backend == "memory":  # docs/dedup.md
        out.append(
            f"sidecar.dedup.backend: 'memory' keeps the delivery ids each worker has seen; with "
            f"{n} workers a retry that reaches another worker is forwarded again "
            "(use a redis:// backend to share them)"
        )
    return out


def _resolve_host(host: str) -> str:
    if host == "localhost":
        return "127.0.0.1"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return "0.0.0.0"  # a name: treat as not loopback
    return host
