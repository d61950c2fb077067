"""Atheris (libFuzzer) harness for the request parsing path.

What a client controls before any guard has vouched for it, and the pure functions
that parse it: the JSON body (``guards.body.decode_object`` / ``validate_fields``),
the ``Authorization`` header (``guards.auth.parse_bearer``) and the addresses a
peer or proxy writes (``guards.clientip.parse_address`` / ``resolve``). The first
byte of an input picks the target, the rest is its input. A finding is any
exception other than the documented refusal the function is allowed to raise, or a
broken invariant (an ``AssertionError``).

    python fuzz/fuzz_request.py -max_total_time=60 fuzz/corpus      # atheris
    tests/test_fuzz_harness.py                                       # CI: bounded run

:func:`test_one_input` needs nothing from atheris, so the same harness also runs
under hypothesis where atheris cannot be installed (see the test).
"""

from __future__ import annotations

import ipaddress
import json
import sys

if __name__ == "__main__":  # instrument what is fuzzed, so libFuzzer sees its branches
    import atheris

    with atheris.instrument_imports(include=["sidecar"]):
        from sidecar.call import Reject
        from sidecar.guards import auth, body, clientip
else:
    from sidecar.call import Reject
    from sidecar.guards import auth, body, clientip

TRUSTED = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32"))
MAX_MESSAGE = 64


def _text(data: bytes) -> str:
    # How aiohttp hands header values to the guards: UTF-8 with surrogateescape.
    return data.decode("utf-8", "surrogateescape")


def fuzz_body(data: bytes) -> None:
    endpoint = "agent" if len(data) % 2 else "wake"
    try:
        decoded = body.decode_object(data)
    except Reject as reject:
        assert (reject.status, reject.code) == (400, "invalid_json"), reject.code
        return
    assert isinstance(decoded, dict)
    try:
        body.validate_fields(endpoint, decoded, MAX_MESSAGE)
    except Reject as reject:
        assert (reject.status, reject.code) == (400, "invalid_request"), reject.code
        reject.message.encode("utf-8")  # the message quotes field names: must be sendable
        return
    # Valid: what the forwarder builds from it must serialise, and be what was sent.
    forwarded = {k: decoded[k] for k in ("agent", "message", "sessionKey") if k in decoded}
    assert json.loads(json.dumps(forwarded).encode()) == forwarded
    assert len(decoded.get("message", "")) <= MAX_MESSAGE


def fuzz_bearer(data: bytes) -> None:
    values = [_text(v) for v in data.split(b"\n")[:3]] if data else []
    token = auth.parse_bearer(values)
    if token is None:
        return
    assert len(values) == 1
    value = values[0]
    assert value[:6].lower() == "bearer" and value[6] == " "
    assert token == value[7:].encode("utf-8", "surrogateescape") and token


def fuzz_address(data: bytes) -> None:
    addr = clientip.parse_address(_text(data))
    if addr is None:
        return
    assert isinstance(addr, ipaddress.IPv4Address | ipaddress.IPv6Address)
    if isinstance(addr, ipaddress.IPv6Address):
        assert addr.ipv4_mapped is None and addr.scope_id is None
    assert clientip.parse_address(str(addr)) == addr  # the canonical form parses to itself


def fuzz_resolve(data: bytes) -> None:
    peer, _, rest = data.partition(b"\n")
    hops = [_text(h) for h in rest.split(b"\n")[:4]] if rest else []
    addr = clientip.resolve(_text(peer), hops, TRUSTED)
    peer_addr = clientip.parse_address(_text(peer))
    if peer_addr is None or not clientip.in_networks(peer_addr, TRUSTED):
        assert addr == peer_addr  # an untrusted peer's X-Forwarded-For is never read
    elif addr is not None and hops:
        # The client is either the peer or one of the hops, never an invented address.
        parsed = {clientip.parse_address(h) for h in ",".join(hops).split(",")}
        assert addr == peer_addr or addr in parsed


TARGETS = (fuzz_body, fuzz_bearer, fuzz_address, fuzz_resolve)


def test_one_input(data: bytes) -> None:
    if not data:
        return
    TARGETS[data[0] % len(TARGETS)](data[1:])


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
