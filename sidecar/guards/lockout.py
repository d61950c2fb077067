"""Brute-force lockout (``sidecar.authLockout``).

After ``maxFailures`` failed authentications from one client address within a
sliding ``window``, that address is refused with 429 ``locked_out`` for
``duration`` — valid token or not: a lockout that still checks tokens would
tell an attacker when a guess was right (OpenClaw's gateway does exactly that).
A success does not reset the count: it may be a bystander behind the same NAT.

IPv6 clients are grouped by /64, the block one subscriber usually gets. State
is bounded: entries expire, and past ``max_entries`` the least recently failed
address is forgotten first.
"""

from __future__ import annotations

import ipaddress
import itertools
import math
import time
from collections import deque
from collections.abc import Callable

from ..config import IPAddress, Lockout, Settings
from ..pipeline import Call, Guard, Reject

DEFAULT_MAX_ENTRIES = 50_000

FailureRecorder = Callable[[Call], None]


def client_key(addr: IPAddress | None, fallback: str) -> str:
    """The unit a limit applies to: the IPv4 address, or the IPv6 /64."""
    if addr is None:
        return fallback
    if addr.version == 6:
        return str(ipaddress.IPv6Network((int(addr) >> 64 << 64, 64)))
    return str(addr)


class LockoutTable:
    """Failure times and lock expiries per client key. Lives across config reloads."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self._failures: dict[str, deque[float]] = {}
        self._locked: dict[str, float] = {}  # key -> monotonic time the lock ends

    def __len__(self) -> int:
        return len(self._failures) + len(self._locked)

    def locked_for(self, key: str, now: float) -> float:
        """Seconds left on ``key``'s lock; 0 when not locked."""
        until = self._locked.get(key)
        if until is None:
            return 0.0
        if until <= now:
            del self._locked[key]
            return 0.0
        return until - now

    def record_failure(self, key: str, policy: Lockout, now: float) -> bool:
        """Count one failure; returns True when this failure locked the address."""
        times = self._failures.pop(key, None)
        if times is None:
            times = deque(maxlen=policy.max_failures)
            if len(self._failures) >= self.max_entries:
                self._evict()
        elif times.maxlen != policy.max_failures:  # the policy changed on reload
            times = deque(times, maxlen=policy.max_failures)
        times.append(now)
        horizon = now - policy.window
        while times and times[0] <= horizon:
            times.popleft()
        if len(times) >= policy.max_failures:
            self._locked.pop(key, None)
            self._locked[key] = now + policy.duration
            if len(self._locked) > self.max_entries:
                del self._locked[next(iter(self._locked))]
            return True
        self._failures[key] = times  # re-inserted: dict order is least recently failed first
        return False

    def _evict(self) -> None:
        """Forget the least recently failed tenth: expired records come first in that
        order, and evicting in batches keeps a many-address flood at O(1) per failure."""
        for key in list(itertools.islice(self._failures, max(1, self.max_entries // 10))):
            del self._failures[key]


def auth_lockout(settings: Settings, table: LockoutTable) -> Guard:
    """429 ``locked_out`` with ``Retry-After`` while the client address is locked."""
    clock = time.monotonic

    def guard(call: Call) -> None:
        if not table._locked:  # the common case costs one attribute read
            return
        left = table.locked_for(client_key(call.client_addr, call.client_ip), clock())
        if left:
            raise Reject(
                429,
                "locked_out",
                "too many failed authentications from this address; try again later",
                {"Retry-After": str(math.ceil(left))},
            )

    return guard


def failure_recorder(settings: Settings, table: LockoutTable) -> FailureRecorder:
    """What bearer auth calls on every failed authentication."""
    policy = settings.sidecar.auth_lockout
    clock = time.monotonic

    def record(call: Call) -> None:
        table.record_failure(client_key(call.client_addr, call.client_ip), policy, clock())

    return record

