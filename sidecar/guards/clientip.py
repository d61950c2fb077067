"""Who is calling: the TCP peer, or behind trusted proxies the right-most untrusted hop.

``X-Forwarded-For`` is read only when the TCP peer is one of
``sidecar.trustedProxies`` (oauth2-proxy believed every peer by default:
GHSA-7x63-xv5r-3p2x). The list is walked right to left, skipping trusted
proxies; the first address that is not one is the client, because everything
left of it was written by someone we do not trust. A malformed hop where the
walk stops never grants anything: the client becomes ``unknown``, which no
allowlist contains. IPv4-mapped IPv6 addresses (``::ffff:10.0.0.1``) count as
the IPv4 address they carry, so one allowlist entry covers both spellings.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from functools import lru_cache

from ..call import Call, Guard
from ..settings import IPAddress, IPNetwork, Settings

UNKNOWN = "unknown"
# The longest spelling of an address a peer or proxy writes: "[" v6-with-v4-tail "]:65535".
# Anything longer is malformed, and refusing it first keeps junk out of the parse cache.
_MAX_ADDRESS_CHARS = 56
_OWS = " \t"  # RFC 9110 optional whitespace around list elements


def parse_address(text: str) -> IPAddress | None:
    """An address as a peer or a proxy writes it (``v4``, ``v4:port``, ``v6``, ``[v6]:port``);
    ``None`` when it is anything else (``unknown``, an obfuscated name, a zone id)."""
    if len(text) > _MAX_ADDRESS_CHARS:
        return None
    return _parse(text.strip(_OWS))


@lru_cache(maxsize=4096)
def _parse(text: str) -> IPAddress | None:
    if text.startswith("["):
        end = text.find("]")
        rest = text[end + 1 :]
        if end < 0 or (rest and not (rest[0] == ":" and _is_port(rest[1:]))):
            return None
        text = text[1:end]
    elif text.count(":") == 1:  # v4:port
        text, _, port = text.partition(":")
        if not _is_port(port):
            return None
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.scope_id is not None:
            return None
        if addr.ipv4_mapped is not None:
            return addr.ipv4_mapped
    return addr


def _is_port(text: str) -> bool:
    # str.isdigit() alone would take "²" or Arabic-Indic digits.
    return 0 < len(text) <= 5 and text.isascii() and text.isdigit()


def in_networks(addr: IPAddress, networks: Sequence[IPNetwork]) -> bool:
    return any(addr.version == net.version and addr in net for net in networks)


def resolve(
    peer: str, forwarded_for: Sequence[str], trusted: Sequence[IPNetwork]
) -> IPAddress | None:
    """The client address, or ``None`` when it cannot be known (malformed hop)."""
    addr = parse_address(peer)
    if addr is None or not trusted or not forwarded_for or not in_networks(addr, trusted):
        return addr
    hops = ",".join(forwarded_for).split(",")
    for hop in reversed(hops):
        hop_addr = parse_address(hop)
        if hop_addr is None:
            return None
        addr = hop_addr
        if not in_networks(addr, trusted):
            return addr
    return addr  # every hop was a trusted proxy: the left-most one is the origin


@lru_cache(maxsize=4096)
def _peer(text: str) -> tuple[IPAddress | None, str]:
    """The TCP peer's address and its canonical spelling (``str()`` of an address
    costs as much as the rest of this guard: done once per peer)."""
    addr = parse_address(text)
    return addr, UNKNOWN if addr is None else str(addr)


def client_address(settings: Settings) -> Guard:
    """Sets ``call.client_ip`` / ``call.client_addr`` and settles the request id (the
    client's ``X-Request-Id`` is adopted only from a trusted proxy); never refuses."""
    trusted = settings.sidecar.trusted_proxies

    def guard(call: Call) -> None:
        if not trusted:
            call.client_addr, call.client_ip = _peer(call.client_ip)
            call.adopt_request_id(False)
            return
        peer, _ = _peer(call.client_ip)
        call.adopt_request_id(peer is not None and in_networks(peer, trusted))
        forwarded = call.request.headers.getall("X-Forwarded-For", ())
        addr = resolve(call.client_ip, forwarded, trusted)
        call.client_addr = addr
        call.client_ip = UNKNOWN if addr is None else str(addr)

    return guard
