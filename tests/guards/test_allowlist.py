"""The IP allowlist (``sidecar.allowIps``): 403 ``ip_not_allowed`` before anything else,
judged on real sockets from 127.0.0.1 and 127.0.0.2, over IPv4, IPv6 and mapped spellings."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import web
from support.clients import post
from support.common import ListWriter, PublicTestServer, Runtime, base_doc, write_config

from sidecar import config
from sidecar.app import State, create_app
from sidecar.logs import AuditLog
from sidecar.metrics import Metrics


async def test_only_listed_addresses_reach_the_hooks(make_sidecar: Any, runtime: Runtime) -> None:
    sc = await make_sidecar(base_doc(runtime.path, allowIps=["127.0.0.1", "192.0.2.0/24"]))
    url = str(sc.client.make_url("/hooks/wake"))
    assert (await post(url, source="127.0.0.1"))[0] == 200
    status, headers, body = await post(url, source="127.0.0.2")
    assert (status, body["error"]) == (403, "ip_not_allowed")
    assert body["requestId"] == headers["X-Request-Id"]
    assert len(runtime.calls) == 1
    assert sc.audit.entries()[1]["clientIp"] == "127.0.0.2"


@pytest.mark.parametrize(
    ("path", "token"),
    [("/hooks/wake", None), ("/nope", None), ("/hooks/wake?token=x", "wrong")],
)
async def test_refused_before_any_other_check(
    make_sidecar: Any, runtime: Runtime, path: str, token: str | None
) -> None:
    """No token, an unknown path or a token in the URL: an outsider learns only 403."""
    sc = await make_sidecar(base_doc(runtime.path, allowIps=["127.0.0.1/32"]))
    status, _, body = await post(str(sc.client.make_url(path)), token=token, source="127.0.0.2")
    assert (status, body["error"]) == (403, "ip_not_allowed")


async def test_outsiders_do_not_feed_the_lockout(make_sidecar: Any, runtime: Runtime) -> None:
    doc = base_doc(runtime.path, allowIps=["127.0.0.1/32"], authLockout={"maxFailures": 1})
    sc = await make_sidecar(doc)
    url = str(sc.client.make_url("/hooks/wake"))
    for _ in range(3):
        assert (await post(url, token="wrong", source="127.0.0.2"))[0] == 403
    assert len(sc.state.lockout) == 0


async def test_ipv4_mapped_entry_allows_the_ipv4_peer(make_sidecar: Any, runtime: Runtime) -> None:
    sc = await make_sidecar(base_doc(runtime.path, allowIps=["::ffff:127.0.0.1"]))
    url = str(sc.client.make_url("/hooks/wake"))
    assert (await post(url, source="127.0.0.1"))[0] == 200
    assert (await post(url, source="127.0.0.2"))[0] == 403


@pytest.mark.parametrize(("allow", "expected"), [(["::1/128"], 200), (["2001:db8::/32"], 403)])
async def test_ipv6_peers(
    short_tmp: Any, runtime: Runtime, allow: list[str], expected: int
) -> None:
    settings = config.load(write_config(short_tmp, base_doc(runtime.path, allowIps=allow)))
    state = State(settings, Metrics(), AuditLog(ListWriter()))
    app: web.Application = create_app(state)
    server = PublicTestServer(app, host="::1")
    await server.start_server()
    try:
        status, _, body = await post(str(server.make_url("/hooks/wake")))
    finally:
        await server.close()
    assert status == expected, body


def test_an_empty_list_is_a_config_error(short_tmp: Any) -> None:
    with pytest.raises(config.ConfigError) as err:
        config.load(write_config(short_tmp, base_doc("/x.sock", allowIps=[])))
    assert err.value.problems == [
        "sidecar.allowIps: must list one network at least (omit it to allow any)"
    ]


@pytest.mark.parametrize("entry", ["10.0.0.0/33", "10.0.0.256", "example.com", "fe80::1%eth0", 7])
def test_bad_entries_are_config_errors_naming_the_entry(short_tmp: Any, entry: Any) -> None:
    with pytest.raises(config.ConfigError) as err:
        config.load(write_config(short_tmp, base_doc("/x.sock", allowIps=["10.0.0.0/8", entry])))
    [problem] = err.value.problems
    assert problem.startswith("sidecar.allowIps: [1]: ")


def test_no_allowlist_means_no_guard(short_tmp: Any) -> None:
    from sidecar.guards.allowlist import ip_allowlist

    settings = config.load(write_config(short_tmp, base_doc("/x.sock")))
    assert ip_allowlist(settings) is None


def test_verdicts_stay_right_past_the_cache_bound(short_tmp: Any) -> None:
    """The guard remembers verdicts per address and forgets them all when it holds
    4096: a flood of addresses bounds its memory, and no verdict leaks across."""
    import ipaddress

    from sidecar.call import Call, Reject
    from sidecar.guards.allowlist import ip_allowlist

    settings = config.load(write_config(short_tmp, base_doc("/x.sock", allowIps=["10.0.0.0/8"])))
    guard = ip_allowlist(settings)
    assert guard is not None

    def verdict(text: str) -> bool:
        call = Call.__new__(Call)
        call.client_addr, call.client_ip = ipaddress.ip_address(text), text
        try:
            guard(call)
        except Reject as reject:
            assert reject.code == "ip_not_allowed"
            return False
        return True

    for i in range(3 * 4096):  # in and out of the list, past the bound several times
        assert verdict(f"10.{i >> 8 & 255}.{i & 255}.1") is True
        assert verdict(f"11.{i >> 8 & 255}.{i & 255}.1") is False
    assert verdict("10.0.0.1") is True
    assert verdict("192.0.2.1") is False
