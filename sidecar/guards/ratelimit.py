"""Rate limits and back-pressure: ``sidecar.rateLimit`` and each agent's ``rateLimit`` /
``maxConcurrent``.

Two guards, at two places of the chain (docs/http-api.md):

- :func:`client_limits` right after bearer auth (only authenticated requests
  count; unauthenticated ones are the lockout's job): the per-IP bucket (IPv6
  grouped by /64) and the global bucket, charged together in one backend call.
- :func:`agent_limits` after the session-key policy, just before forwarding:
  the agent's own bucket, and ``maxConcurrent`` calls in flight to the runtime
  (agent runs are slow: a per-second rate alone is the wrong unit for them).

A refusal is 429 ``rate_limited`` with ``Retry-After`` and the IETF draft
headers ``RateLimit-Policy`` / ``RateLimit`` (draft-ietf-httpapi-ratelimit-headers);
never 503, which says "broken", not "slow down" (kubernetes/ingress-nginx#2824).
A success carries the ``RateLimit`` of its tightest policy. A shared backend
that cannot answer gives 503 ``limiter_unavailable``, or with ``failOpen`` lets
the request pass and counts it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web

from ..call import Call, Guard, Reject
from ..limiter import Check, Decision, Limiter, LimiterUnavailable, MemoryLimiter, Policy
from ..limiter.base import next_token_in, remaining, wait_for, whole_seconds
from ..metrics import Metrics
from ..settings import Settings
from .lockout import client_key

RETRY_AFTER_UNAVAILABLE = "5"
RETRY_AFTER_BUSY = "1"  # a slot frees when a call ends: there is no schedule to quote

# (remaining, seconds) of the tightest policy seen so far by this request.
_TIGHTEST: web.RequestKey[tuple[int, int, str]] = web.RequestKey("ratelimit_tightest")

Enforce = Callable[[Call, Sequence[Check]], Awaitable[None] | None]


def policy_field(policy: Policy) -> str:
    """The policy's ``RateLimit-Policy`` item: quota ``q`` per window ``w`` seconds.

    The draft has only whole-second windows, so ``per: "500ms"`` is shown as
    its equivalent per second.
    """
    limit = policy.limit
    window = max(1, math.ceil(limit.per))
    if window == limit.per:
        quota = limit.requests
    else:
        quota = math.floor(limit.requests * window / limit.per)
    return f'"{policy.name}";q={quota};w={window}'


class InFlight:
    """Calls in flight to the runtime, per agent.

    Per process on purpose: the runtime a sidecar protects is the one in its
    own pod, and a slot held in a shared store would leak when a replica dies.
    Lives across reloads, so calls started under the old config release theirs.
    """

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}

    def count(self, agent: str) -> int:
        return self._counts.get(agent, 0)

    def try_acquire(self, agent: str, limit: int) -> bool:
        held = self._counts.get(agent, 0)
        if held >= limit:
            return False
        self._counts[agent] = held + 1
        return True

    def release(self, agent: str) -> None:
        held = self._counts[agent] - 1
        if held:
            self._counts[agent] = held
        else:
            del self._counts[agent]


def client_limits(settings: Settings, limiter: Limiter, metrics: Metrics) -> Guard | None:
    """429 ``rate_limited`` past the per-IP or global limit; 503 ``limiter_unavailable``.

    ``None`` (no guard, no cost) when neither limit is configured.
    """
    config = settings.sidecar.rate_limit
    per_ip = Policy("ip", config.per_ip) if config.per_ip is not None else None
    glob: list[Check] = []
    if config.global_ is not None:
        glob.append((Policy("global", config.global_), "global"))
    if per_ip is None and not glob:
        return None
    enforce = _enforcer(limiter, config.fail_open, metrics, [per_ip, *(p for p, _ in glob)])
    if per_ip is None:
        return lambda call: enforce(call, glob)

    def guard(call: Call) -> Awaitable[None] | None:
        key = "ip:" + client_key(call)
        return enforce(call, [(per_ip, key), *glob])

    return guard


def agent_limits(
    settings: Settings, limiter: Limiter, in_flight: InFlight, metrics: Metrics
) -> Guard | None:
    """429 ``rate_limited`` past the agent's own limit or its ``maxConcurrent``.

    A slot is taken before the agent's bucket is charged and given back when
    the call ends, however it ends (``Call.on_done``). ``None`` when no agent
    has either setting.
    """
    checks: dict[str, list[Check]] = {}
    busy: dict[str, tuple[int, dict[str, str]]] = {}
    releases: dict[str, Callable[[], None]] = {}
    for name, agent in settings.webhooks.agents.items():
        if agent.rate_limit is not None:
            checks[name] = [(Policy("agent", agent.rate_limit), "agent:" + name)]
        if agent.max_concurrent is not None:
            cap = agent.max_concurrent
            busy[name] = (
                cap,
                {
                    "Retry-After": RETRY_AFTER_BUSY,
                    "RateLimit-Policy": f'"concurrency";q={cap};qu="concurrent-requests"',
                    "RateLimit": '"concurrency";r=0',
                },
            )
            releases[name] = functools.partial(in_flight.release, name)
    if not checks and not busy:
        return None
    policies = [c[0][0] for c in checks.values()]
    enforce = _enforcer(limiter, settings.sidecar.rate_limit.fail_open, metrics, policies)

    def guard(call: Call) -> Awaitable[None] | None:
        assert call.agent is not None
        name = call.agent.name
        limit = busy.get(name)
        if limit is not None:
            if not in_flight.try_acquire(name, limit[0]):
                raise Reject(
                    429,
                    "rate_limited",
                    f"agent {name!r} already has {limit[0]} calls in flight; retry shortly",
                    limit[1],
                )
            call.on_done(releases[name])
        mine = checks.get(name)
        return None if mine is None else enforce(call, mine)

    return guard


def _enforcer(
    limiter: Limiter, fail_open: bool, metrics: Metrics, policies: Sequence[Policy | None]
) -> Enforce:
    """Charge the buckets; refuse, or note the headroom for the response.

    The memory backend decides synchronously, so its guard costs no coroutine;
    the Redis one is awaited.
    """
    fields = {p: policy_field(p) for p in policies if p is not None}

    if isinstance(limiter, MemoryLimiter):
        take = limiter.take

        def enforce(call: Call, checks: Sequence[Check]) -> None:
            _conclude(call, checks, take(checks), fields)

        return enforce

    acquire = limiter.acquire
    fail_open_total = metrics.limiter_fail_open

    async def enforce_shared(call: Call, checks: Sequence[Check]) -> None:
        try:
            decision = await acquire(checks)
        except LimiterUnavailable:
            if fail_open:
                fail_open_total.inc()
                return
            raise Reject(
                503,
                "limiter_unavailable",
                "the rate limiter's shared backend is unreachable; retry later",
                {"Retry-After": RETRY_AFTER_UNAVAILABLE},
            ) from None
        _conclude(call, checks, decision, fields)

    return enforce_shared


def _conclude(
    call: Call, checks: Sequence[Check], decision: Decision, fields: dict[Policy, str]
) -> None:
    if not decision.allowed:
        raise _refusal(checks, decision, fields)
    # Allowed: keep the RateLimit of the tightest policy (fewest tokens left; on a
    # tie the longer wait) across both guards of this request.
    best: tuple[int, int, str] | None = None
    for (policy, _), ahead in zip(checks, decision.ahead, strict=True):
        left = remaining(policy, ahead)
        seconds = whole_seconds(next_token_in(policy, ahead))
        if best is None or (left, -seconds) < (best[0], -best[1]):
            best = (left, seconds, policy.name)
    assert best is not None
    headers = call.response_headers
    if headers is not None and "RateLimit" in headers:  # the first guard set one
        seen = call.request[_TIGHTEST]
        if (seen[0], -seen[1]) <= (best[0], -best[1]):
            return
    call.request[_TIGHTEST] = best
    call.add_header("RateLimit", f'"{best[2]}";r={best[0]};t={best[1]}')


def _refusal(checks: Sequence[Check], decision: Decision, fields: dict[Policy, str]) -> Reject:
    """429 naming the policy that makes the client wait longest."""
    waits = [wait_for(p, ahead) for (p, _), ahead in zip(checks, decision.ahead, strict=True)]
    worst = max(range(len(waits)), key=waits.__getitem__)
    policy = checks[worst][0]
    name = policy.name
    seconds = whole_seconds(waits[worst])
    return Reject(
        429,
        "rate_limited",
        f"rate limit {name!r} exceeded; retry in {seconds} s",
        {
            "Retry-After": str(seconds),
            "RateLimit-Policy": fields[policy],
            "RateLimit": f'"{name}";r=0;t={seconds}',
        },
    )
