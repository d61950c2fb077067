"""Rate-limit guards end to end on the memory backend (docs/http-api.md): real loopback sockets
in front of a real runtime on a Unix socket. The Redis backend: test_limiter_redis.py."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from support.clients import until
from support.common import AGENT, OTHER_SECRET, Runtime, Sidecar, base_doc, serve_unix

from sidecar import config
from sidecar.guards.ratelimit import InFlight, policy_field
from sidecar.limiter import MemoryLimiter, Policy
from sidecar.settings import RateLimit

WAKE = {"agent": AGENT}
OTHER = "other-agent"


def limited_doc(runtime_path: Path, **rate_limit: Any) -> dict[str, Any]:
    doc = base_doc(runtime_path, rateLimit=rate_limit, trustedProxies=["127.0.0.1"])
    doc["webhooks"]["agents"][OTHER] = {}
    return doc


def from_ip(ip: str) -> dict[str, str]:
    """Headers of a request that reached us through the trusted proxy (127.0.0.1)."""
    return {"X-Forwarded-For": ip}


async def statuses(sc: Sidecar, n: int, body: Any = WAKE, **kwargs: Any) -> list[int]:
    return [(await sc.post("/hooks/wake", body, **kwargs))[0] for _ in range(n)]


# ---------------------------------------------------------------- refusals and headers


async def test_after_the_burst_429_with_three_headers_and_waiting_retry_after_passes(
    make_sidecar: Any, runtime: Runtime
) -> None:
    sc = await make_sidecar(limited_doc(runtime.path, perIp={"requests": 2, "per": "1s"}))
    assert await statuses(sc, 2) == [200, 200]
    status, headers, body = await sc.post("/hooks/wake", WAKE)
    assert (status, body["error"]) == (429, "rate_limited")
    assert body["requestId"] == headers["X-Request-Id"]
    assert headers["Retry-After"] == "1"  # a token every 0.5 s, rounded up
    assert headers["RateLimit-Policy"] == '"ip";q=2;w=1'
    assert headers["RateLimit"] == '"ip";r=0;t=1'
    assert len(runtime.calls) == 2
    await asyncio.sleep(int(headers["Retry-After"]))
    status, headers, _ = await sc.post("/hooks/wake", WAKE)
    assert status == 200
    assert headers["RateLimit"] == '"ip";r=1;t=1'  # both tokens were back: one left


async def test_retry_after_is_the_time_to_the_next_token_rounded_up(
    make_sidecar: Any, runtime: Runtime
) -> None:
    sc = await make_sidecar(limited_doc(runtime.path, perIp={"requests": 1, "per": "10s"}))
    assert await statuses(sc, 1) == [200]
    started = time.monotonic()
    _, headers, _ = await sc.post("/hooks/wake", WAKE)
    elapsed = time.monotonic() - started
    assert 10 - elapsed - 1 <= int(headers["Retry-After"]) <= 10
    assert headers["RateLimit-Policy"] == '"ip";q=1;w=10'


async def test_success_carries_the_ratelimit_of_the_tightest_policy(
    make_sidecar: Any, runtime: Runtime
) -> None:
    doc = limited_doc(
        runtime.path,
        perIp={"requests": 100, "per": "1m", "burst": 3},
        **{"global": {"requests": 1000, "per": "1m", "burst": 5}},
    )
    doc["webhooks"]["agents"][AGENT]["rateLimit"] = {"requests": 10, "per": "1h", "burst": 10}
    sc = await make_sidecar(doc)
    # Left after each: ip 2, 1, 0; global 4, 3, 2; agent 9, 8, 7. The agent's
    # bucket, checked later, does not displace the tighter per-IP one.
    seen = [(await sc.post("/hooks/wake", WAKE))[1]["RateLimit"] for _ in range(3)]
    assert seen == ['"ip";r=2;t=1', '"ip";r=1;t=1', '"ip";r=0;t=1']
    # Another address: ip 2, global 1, agent 6.
    _, headers, _ = await sc.post("/hooks/wake", WAKE, headers=from_ip("192.0.2.9"))
    assert headers["RateLimit"] == '"global";r=1;t=1'
    # The other agent has no limit of its own: ip 2, global 0.
    _, headers, _ = await sc.post("/hooks/wake", {"agent": OTHER}, headers=from_ip("192.0.2.10"))
    assert headers["RateLimit"] == '"global";r=0;t=1'


async def test_agent_bucket_is_reported_when_it_is_the_tightest(
    make_sidecar: Any, runtime: Runtime
) -> None:
    doc = limited_doc(runtime.path, perIp={"requests": 100, "per": "1m"})
    doc["webhooks"]["agents"][AGENT]["rateLimit"] = {"requests": 2, "per": "1h"}
    sc = await make_sidecar(doc)
    _, headers, _ = await sc.post("/hooks/wake", WAKE)
    assert headers["RateLimit"] == '"agent";r=1;t=1800'
    _, headers, _ = await sc.post("/hooks/wake", WAKE)
    assert headers["RateLimit"] == '"agent";r=0;t=1800'
    status, headers, body = await sc.post("/hooks/wake", WAKE)
    assert (status, body["error"]) == (429, "rate_limited")
    assert headers["RateLimit-Policy"] == '"agent";q=2;w=3600'
    assert headers["RateLimit"] == f'"agent";r=0;t={headers["Retry-After"]}'
    assert 1799 <= int(headers["Retry-After"]) <= 1800


async def test_no_limits_configured_means_no_guards_and_no_headers(
    sidecar: Sidecar,
) -> None:
    status, headers, _ = await sidecar.post("/hooks/wake", WAKE)
    assert status == 200 and "RateLimit" not in headers
    assert sidecar.state.runtime is not None
    assert "ratelimit" not in " ".join(g.__module__ for g in sidecar.state.runtime.guards)


def test_policy_field_shows_whole_second_windows() -> None:
    assert policy_field(Policy("ip", RateLimit(60, 60.0, 20))) == '"ip";q=60;w=60'
    assert policy_field(Policy("global", RateLimit(10, 0.5, 10))) == '"global";q=20;w=1'
    assert policy_field(Policy("agent", RateLimit(3, 1.5, 3))) == '"agent";q=4;w=2'


# ---------------------------------------------------------------- what is counted, and where


async def test_unauthenticated_requests_are_not_counted(
    make_sidecar: Any, runtime: Runtime
) -> None:
    sc = await make_sidecar(limited_doc(runtime.path, perIp={"requests": 2, "per": "1h"}))
    assert await statuses(sc, 5, token="wrong-" + OTHER_SECRET[6:]) == [401] * 5
    assert await statuses(sc, 3) == [200, 200, 429]


async def test_per_ip_and_global_come_before_webhooks_disabled(
    make_sidecar: Any, runtime: Runtime
) -> None:
    doc = limited_doc(runtime.path, perIp={"requests": 1, "per": "1h"})
    doc["webhooks"]["enabled"] = False
    sc = await make_sidecar(doc)
    assert await statuses(sc, 2) == [503, 429]


async def test_invalid_bodies_count_against_the_client_limits(
    make_sidecar: Any, runtime: Runtime
) -> None:
    sc = await make_sidecar(limited_doc(runtime.path, **{"global": {"requests": 2, "per": "1h"}}))
    assert await statuses(sc, 2, body={"agent": AGENT, "extra": 1}) == [400, 400]
    assert await statuses(sc, 1) == [429]


async def test_each_client_address_has_its_own_bucket(make_sidecar: Any, runtime: Runtime) -> None:
    sc = await make_sidecar(limited_doc(runtime.path, perIp={"requests": 1, "per": "1h"}))
    assert await statuses(sc, 2, headers=from_ip("192.0.2.1")) == [200, 429]
    assert await statuses(sc, 2, headers=from_ip("192.0.2.2")) == [200, 429]
    # One IPv6 subscriber (a /64) is one client, whatever address it picks in it.
    assert await statuses(sc, 1, headers=from_ip("2001:db8:1:2::1")) == [200]
    assert await statuses(sc, 1, headers=from_ip("2001:db8:1:2:ffff::9")) == [429]
    assert await statuses(sc, 1, headers=from_ip("2001:db8:1:3::1")) == [200]


async def test_global_limit_is_shared_by_all_addresses(make_sidecar: Any, runtime: Runtime) -> None:
    sc = await make_sidecar(limited_doc(runtime.path, **{"global": {"requests": 2, "per": "1h"}}))
    got = [await statuses(sc, 1, headers=from_ip(f"192.0.2.{i}")) for i in range(1, 4)]
    assert got == [[200], [200], [429]]


# ---------------------------------------------------------------- per agent


async def test_one_agents_limit_does_not_touch_another(make_sidecar: Any, runtime: Runtime) -> None:
    doc = limited_doc(runtime.path)
    doc["webhooks"]["agents"][AGENT]["rateLimit"] = {"requests": 1, "per": "1h"}
    doc["webhooks"]["agents"][OTHER]["rateLimit"] = {"requests": 3, "per": "1h"}
    sc = await make_sidecar(doc)
    assert await statuses(sc, 2) == [200, 429]
    assert await statuses(sc, 4, body={"agent": OTHER}) == [200, 200, 200, 429]
    assert await statuses(sc, 1) == [429]


async def test_agent_limit_comes_after_the_session_key_policy(
    make_sidecar: Any, runtime: Runtime
) -> None:
    """Refused calls (unknown agent, forbidden session key) spend no agent budget."""
    doc = limited_doc(runtime.path)
    doc["webhooks"]["agents"][AGENT].update(
        rateLimit={"requests": 1, "per": "1h"}, sessionKeyPrefixes=["order-"]
    )
    sc = await make_sidecar(doc)
    forbidden = {"agent": AGENT, "message": "m", "sessionKey": "admin"}
    for _ in range(3):
        status, _, body = await sc.post("/hooks/agent", forbidden)
        assert (status, body["error"]) == (403, "session_key_not_allowed")
    assert await statuses(sc, 1, body={"agent": "nobody"}) == [404]
    assert await statuses(sc, 2) == [200, 429]


async def test_reload_keeps_the_buckets(make_sidecar: Any, runtime: Runtime) -> None:
    doc = limited_doc(runtime.path, perIp={"requests": 1, "per": "1h"})
    sc = await make_sidecar(doc)
    limiter = sc.state.limiter
    assert await statuses(sc, 1) == [200]
    doc["sidecar"]["rateLimit"]["perIp"]["burst"] = 2
    sc.state.apply(config.loads(json.dumps(doc)))
    assert sc.state.limiter is limiter and isinstance(limiter, MemoryLimiter)
    # A fresh bucket of 2 would allow two; the request made before the reload counts.
    assert await statuses(sc, 2) == [200, 429]


# ---------------------------------------------------------------- maxConcurrent


class SlowRuntime:
    """A runtime on a Unix socket that holds every call until released."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.waiting = 0
        self.release = asyncio.Event()
        self.status = 200
        self.runner: web.AppRunner | None = None

    async def hook(self, request: web.Request) -> web.Response:
        self.waiting += 1
        try:
            await self.release.wait()
        finally:
            self.waiting -= 1
        return web.json_response({"ok": self.status == 200}, status=self.status)

    async def start(self) -> None:
        self.runner = await serve_unix(self.path, self.hook)


@pytest.fixture
async def slow_runtime(short_tmp: Path) -> AsyncIterator[SlowRuntime]:
    rt = SlowRuntime(short_tmp / "slow.sock")
    await rt.start()
    yield rt
    rt.release.set()
    assert rt.runner is not None
    await rt.runner.cleanup()


async def until_waiting(rt: SlowRuntime, n: int) -> None:
    await until(lambda: rt.waiting >= n)


async def test_max_concurrent_refuses_past_the_calls_in_flight(
    make_sidecar: Any, slow_runtime: SlowRuntime
) -> None:
    doc = limited_doc(slow_runtime.path)
    doc["webhooks"]["agents"][AGENT]["maxConcurrent"] = 2
    sc = await make_sidecar(doc)
    held = [asyncio.ensure_future(sc.post("/hooks/wake", WAKE)) for _ in range(2)]
    await until_waiting(slow_runtime, 2)
    status, headers, body = await sc.post("/hooks/wake", WAKE)
    assert (status, body["error"]) == (429, "rate_limited")
    assert "2 calls in flight" in body["message"]
    assert headers["Retry-After"] == "1"
    assert headers["RateLimit-Policy"] == '"concurrency";q=2;qu="concurrent-requests"'
    assert headers["RateLimit"] == '"concurrency";r=0'
    # Another agent is not held back by this one's slots.
    other = asyncio.ensure_future(sc.post("/hooks/wake", {"agent": OTHER}))
    await until_waiting(slow_runtime, 3)
    slow_runtime.release.set()
    assert [(await f)[0] for f in [*held, other]] == [200, 200, 200]
    assert sc.state.in_flight.count(AGENT) == 0
    assert await statuses(sc, 1) == [200]


async def test_slots_are_given_back_however_the_call_ends(
    make_sidecar: Any, slow_runtime: SlowRuntime
) -> None:
    doc = limited_doc(slow_runtime.path)
    doc["sidecar"]["upstream"]["timeout"] = "300ms"
    doc["webhooks"]["agents"][AGENT].update(maxConcurrent=1, rateLimit={"requests": 1, "per": "1h"})
    sc = await make_sidecar(doc)
    status, _, body = await sc.post("/hooks/wake", WAKE)  # held past the timeout
    assert (status, body["error"]) == (504, "upstream_timeout")
    assert sc.state.in_flight.count(AGENT) == 0
    status, _, body = await sc.post("/hooks/wake", WAKE)  # a slot, then the agent's bucket
    assert (status, body["error"]) == (429, "rate_limited")
    assert sc.state.in_flight.count(AGENT) == 0
    slow_runtime.release.set()
    slow_runtime.status = 500
    status, _, body = await sc.post("/hooks/wake", {"agent": OTHER})
    assert (status, body["error"]) == (502, "upstream_error")
    assert sc.state.in_flight.count(OTHER) == 0


def test_in_flight_counts_per_agent_and_forgets_idle_agents() -> None:
    slots = InFlight()
    assert slots.try_acquire("a", 2) and slots.try_acquire("a", 2)
    assert not slots.try_acquire("a", 2)
    assert slots.try_acquire("b", 1)
    slots.release("a")
    assert slots.count("a") == 1 and slots.try_acquire("a", 2)
    for agent in ("a", "a", "b"):
        slots.release(agent)
    assert slots._counts == {}
