"""Forwarders to the agent runtime, one per ``upstream.protocol``, over one pooled client.

``make_pool`` and ``make_forwarder`` are what the app calls on every (re)load: the
pool lives as long as the upstream address stays the same, a forwarder as long
as one config.
"""

from __future__ import annotations

from ..settings import Settings
from .base import BaseForwarder
from .forward import Forwarder
from .openclaw import OpenClawForwarder
from .pool import Pool


def make_pool(settings: Settings) -> Pool:
    """A keep-alive pool to ``upstream.socket`` or ``upstream.url``'s host and port."""
    upstream = settings.sidecar.upstream
    if upstream.socket is not None:
        return Pool.unix(upstream.socket)
    return Pool.tcp(upstream.host, upstream.port)


def make_forwarder(
    settings: Settings, pool: Pool, previous: BaseForwarder | None = None
) -> BaseForwarder:
    """The forwarder for ``upstream.protocol``. ``previous`` is the one it replaces on a
    reload: an OpenClaw forwarder keeps its upstream token at hand while the gateway's
    token is being rotated (see openclaw.Tokens)."""
    if settings.sidecar.upstream.protocol == "openclaw":
        return OpenClawForwarder(settings, pool, previous)
    return Forwarder(settings, pool)
