"""IP allowlist (``sidecar.allowIps``): 403 before anything else is looked at.

Runs on the address that :mod:`.clientip` resolved. An unknown address (a
malformed forwarded chain) is never allowed.
"""

from __future__ import annotations

from functools import lru_cache, partial

from ..config import IPAddress, Settings
from ..pipeline import Call, Guard, Reject
from .clientip import in_networks

_NOT_ALLOWED = partial(Reject, 403, "ip_not_allowed", "this client address may not call the hooks")


def ip_allowlist(settings: Settings) -> Guard | None:
    """403 ``ip_not_allowed`` outside ``allowIps``; no guard when ``allowIps`` is unset."""
    networks = settings.sidecar.allow_ips
    if networks is None:
        return None

    @lru_cache(maxsize=4096)
    def allowed(addr: IPAddress) -> bool:
        return in_networks(addr, networks)

    def guard(call: Call) -> None:
        addr = call.client_addr
        if addr is None or not allowed(addr):
            raise _NOT_ALLOWED()

    return guard
