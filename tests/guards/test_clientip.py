"""Who the client is (docs/http-api.md "Client address"): the TCP peer, or behind trusted
proxies the right-most untrusted X-Forwarded-For hop. Truth tables for the parsing and the walk,
then real sockets: the sidecar on 127.0.0.1 trusting 127.0.0.1, clients bound to 127.0.0.1 (the
proxy) or 127.0.0.2 (an untrusted peer)."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from support.clients import post
from support.common import Runtime, base_doc

from sidecar.config import parse_network
from sidecar.guards.clientip import parse_address, resolve

TRUSTED = (parse_network("10.0.0.0/8"), parse_network("2001:db8::/32"))
PROXY = "10.0.0.5"


def ip(text: str) -> Any:
    return ipaddress.ip_address(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("198.51.100.7", "198.51.100.7"),
        ("198.51.100.7:5000", "198.51.100.7"),
        (" 198.51.100.7\t", "198.51.100.7"),  # optional whitespace around a list element
        ("2001:db8::1", "2001:db8::1"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("[2001:db8::1]:443", "2001:db8::1"),
        ("::ffff:198.51.100.7", "198.51.100.7"),  # IPv4-mapped counts as IPv4
        ("[::ffff:198.51.100.7]:80", "198.51.100.7"),
        ("::ffff:c633:6407", "198.51.100.7"),  # the same, in hex
        ("", None),
        ("unknown", None),  # what some proxies write when they do not know
        ("_hidden", None),  # RFC 7239 obfuscated identifier
        ("example.com", None),
        ("198.51.100", None),
        ("127.1", None),  # inet_aton shorthand
        ("0x7f.0.0.1", None),
        ("010.0.0.1", None),  # leading zeros: octal to some parsers, decimal to others
        ("198.51.100.7:", None),
        ("198.51.100.7:http", None),
        ("198.51.100.7:\u00b2", None),  # "²".isdigit() is True
        ("198.51.100.7:123456", None),
        ("[2001:db8::1", None),
        ("[2001:db8::1]x", None),
        ("[2001:db8::1]:", None),
        ("fe80::1%eth0", None),  # a zone id names an interface of the proxy, not a client
        ("198.51.100.7/32", None),
        ("\u00a0198.51.100.7", None),  # only SP and HTAB are optional whitespace
        ("1" * 60, None),  # too long to be an address: refused before parsing
    ],
)
def test_parse_address(text: str, expected: str | None) -> None:
    result = parse_address(text)
    assert (str(result) if result is not None else None) == expected
    if expected is not None:
        assert result == ip(expected)


@pytest.mark.parametrize(
    ("peer", "forwarded", "expected"),
    [
        # An untrusted peer: X-Forwarded-For is not read at all.
        ("203.0.113.9", ["198.51.100.7"], "203.0.113.9"),
        ("203.0.113.9", ["garbage"], "203.0.113.9"),
        # A trusted proxy without the header is the client itself.
        (PROXY, [], PROXY),
        # The right-most untrusted hop wins; trusted hops are skipped.
        (PROXY, ["198.51.100.7"], "198.51.100.7"),
        (PROXY, ["198.51.100.7, 10.0.0.9"], "198.51.100.7"),
        (PROXY, ["198.51.100.7,10.0.0.9,10.1.2.3"], "198.51.100.7"),
        (PROXY, ["6.6.6.6, 198.51.100.7"], "198.51.100.7"),  # spoofed left part ignored
        (PROXY, ["garbage, 198.51.100.7"], "198.51.100.7"),  # junk left of the client too
        (PROXY, ["6.6.6.6", "198.51.100.7"], "198.51.100.7"),  # two headers = one list
        (PROXY, ["6.6.6.6, 198.51.100.7", "10.0.0.9"], "198.51.100.7"),
        (PROXY, ["198.51.100.7:5000, 10.0.0.9"], "198.51.100.7"),
        (PROXY, ["[2001:db9::7]:443, 2001:db8::5"], "2001:db9::7"),
        (PROXY, ["::ffff:198.51.100.7"], "198.51.100.7"),
        (PROXY, ["198.51.100.7, ::ffff:10.0.0.9"], "198.51.100.7"),  # mapped proxy is trusted
        # Every hop a trusted proxy: the left-most is where the request came from.
        (PROXY, ["10.0.0.1, 10.0.0.2"], "10.0.0.1"),
        # A malformed hop where the walk stops never grants anything: unknown.
        (PROXY, ["garbage"], None),
        (PROXY, [""], None),
        (PROXY, ["198.51.100.7, garbage"], None),
        (PROXY, ["198.51.100.7,,10.0.0.9"], None),
        (PROXY, ["198.51.100.7, unknown"], None),
        (PROXY, ["198.51.100.7, 10.0.0.9, "], None),
        (PROXY, ["x" * 5000], None),
        # The peer itself as the socket reports it: mapped, v6, or nothing (a Unix socket).
        ("::ffff:10.0.0.5", ["198.51.100.7"], "198.51.100.7"),
        ("::ffff:203.0.113.9", ["198.51.100.7"], "203.0.113.9"),
        ("2001:db8::5", ["198.51.100.7"], "198.51.100.7"),
        ("", ["198.51.100.7"], None),
    ],
)
def test_resolve_truth_table(peer: str, forwarded: list[str], expected: str | None) -> None:
    result = resolve(peer, forwarded, TRUSTED)
    assert (str(result) if result is not None else None) == expected


def test_without_trusted_proxies_the_header_is_never_read() -> None:
    assert resolve(PROXY, ["198.51.100.7"], ()) == ip(PROXY)


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("10.0.0.5", "10.0.0.5/32"),  # a single address
        ("10.1.2.3/8", "10.0.0.0/8"),  # host bits ignored
        ("2001:db8::/32", "2001:db8::/32"),
        ("::ffff:10.0.0.0/104", "10.0.0.0/8"),  # mapped networks count as IPv4
        ("::ffff:10.0.0.5", "10.0.0.5/32"),
    ],
)
def test_network_entries(entry: str, expected: str) -> None:
    assert str(parse_network(entry)) == expected


# ---------------------------------------------------------------- real sockets


def proxy_doc(runtime: Runtime, **sidecar: Any) -> dict[str, Any]:
    return base_doc(runtime.path, trustedProxies=["127.0.0.1/32"], **sidecar)


@pytest.mark.parametrize(
    ("source", "chain", "client"),
    [
        # An untrusted peer's header changes nothing: the runtime is told the TCP peer.
        ("127.0.0.2", "10.0.0.1, 198.51.100.7", "127.0.0.2"),
        # From the trusted proxy: the right-most untrusted hop, not the spoofed 6.6.6.6.
        ("127.0.0.1", "6.6.6.6, 198.51.100.7, 127.0.0.1", "198.51.100.7"),
    ],
    ids=["untrusted-peer", "trusted-proxy"],
)
async def test_the_client_address_reaching_the_runtime_and_the_audit_log(
    make_sidecar: Any, runtime: Runtime, source: str, chain: str, client: str
) -> None:
    sc = await make_sidecar(proxy_doc(runtime))
    url = str(sc.client.make_url("/hooks/wake"))
    status, _, body = await post(url, headers={"X-Forwarded-For": chain}, source=source)
    assert status == 200, body
    [call] = runtime.calls
    assert call["forwardedFor"] == client
    [entry] = sc.audit.entries()
    assert entry["clientIp"] == client


async def test_malformed_chain_from_a_proxy_is_unknown(make_sidecar: Any, runtime: Runtime) -> None:
    sc = await make_sidecar(proxy_doc(runtime))
    url = str(sc.client.make_url("/hooks/wake"))
    status, _, _ = await post(url, headers={"X-Forwarded-For": "198.51.100.7, bogus"})
    assert status == 200  # no allowlist here: unknown is let through, but named as such
    assert runtime.calls[0]["forwardedFor"] == "unknown"
    assert sc.audit.entries()[0]["clientIp"] == "unknown"


async def test_header_ignored_when_no_proxy_is_trusted(make_sidecar: Any, runtime: Runtime) -> None:
    sc = await make_sidecar(base_doc(runtime.path))
    url = str(sc.client.make_url("/hooks/wake"))
    status, _, _ = await post(url, headers={"X-Forwarded-For": "198.51.100.7"}, source="127.0.0.1")
    assert status == 200
    assert runtime.calls[0]["forwardedFor"] == "127.0.0.1"


async def test_allowlist_judges_the_resolved_address(make_sidecar: Any, runtime: Runtime) -> None:
    sc = await make_sidecar(proxy_doc(runtime, allowIps=["198.51.100.0/24"]))
    url = str(sc.client.make_url("/hooks/wake"))
    inside = {"X-Forwarded-For": "198.51.100.7"}
    # Through the trusted proxy: the client's own address is judged, and it is inside.
    assert (await post(url, headers=inside, source="127.0.0.1"))[0] == 200
    # The same header sent directly by an untrusted peer grants nothing.
    status, _, body = await post(url, headers=inside, source="127.0.0.2")
    assert (status, body["error"]) == (403, "ip_not_allowed")
    # A malformed hop right of the client grants nothing either.
    status, _, body = await post(url, headers={"X-Forwarded-For": "198.51.100.7, ::zz"})
    assert (status, body["error"]) == (403, "ip_not_allowed")
    assert len(runtime.calls) == 1
