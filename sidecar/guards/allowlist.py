"""IP allowlist (``sidecar.allowIps``): 403 before anything else is looked at.

Runs on the address that :mod:`.clientip` resolved. An unknown address (a
malformed forwarded chain) is never allowed.
"""

from __future__ import annotations

from functools import partial

from ..call import Call, Guard, Reject
from ..settings import Settings
from .clientip import in_networks

_MAX_VERDICTS = 4096
_NOT_ALLOWED = partial(Reject, 403, "ip_not_allowed", "this client address may not call the hooks")


def ip_allowlist(settings: Settings) -> Guard | None:
    """403 ``ip_not_allowed`` outside ``allowIps``; no guard when ``allowIps`` is unset."""
    networks = settings.sidecar.allow_ips
    if networks is None:
        return None

    # Verdicts by the address's canonical text (call.client_ip): hashing a str is C,
    # hashing an ipaddress object is Python. Cleared when full: bounded under a flood.
    verdicts: dict[str, bool] = {}

    def guard(call: Call) -> None:
        addr = call.client_addr
        if addr is None:
            raise _NOT_ALLOWED()
        allowed = verdicts.get(call.client_ip)
        if allowed is None:
            allowed = in_networks(addr, networks)
            if len(verdicts) >= _MAX_VERDICTS:
                verdicts.clear()
            verdicts[call.client_ip] = allowed
        if not allowed:
            raise _NOT_ALLOWED()

    return guard
