"""Brute-force lockout (``sidecar.authLockout``).

After ``maxFailures`` failed authentications from one client address within a
sliding ``window``, that address is refused with 429 ``locked_out`` for
``duration`` — valid token or not: a lockout that still checks tokens would
tell an attacker when a guess was right (OpenClaw's gateway does exactly that).
A success does not reset the count: it may be a bystander behind the same NAT.

A lock is logged once, at warning, when it starts (a locked address is refused
before auth, so it adds no failures). An operator releases it with
``webhook-sidecar unlock`` (``POST /admin/unlock``, :func:`address_key`); a
reload (SIGHUP) does not: the table lives in the process state, not the config.

IPv6 clients are grouped by /64, the block one subscriber usually gets (one
host can walk through 2^64 addresses of its own).

Memory is bounded under a flood from many addresses, whatever the policy: a
record expires ``window`` after its last failure and a lock when it ends; at
most ``max_entries`` records and as many locks are kept, and at most
``max_times`` failure times in all (a record holds up to ``maxFailures - 1``),
the oldest forgotten first. Both tables are ``OrderedDict``s kept in time
order, so expiring and evicting cost O(1) per failure (a plain ``dict`` popped
from the front rescans its deleted slots on every ``next(iter())``: O(n) each).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import math
import time
from array import array
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Callable

from ..call import Call, Guard, Reject
from ..settings import Lockout, Settings

# About 15 MB for both tables at their worst (docs/threat-model.md; bench/lockout_memory.py),
# so a flood of addresses leaves the whole process near its usual size. More would
# not buy security: whoever makes 25k addresses fail within one window has 25k
# addresses, each with maxFailures guesses, whatever the table remembers.
log = logging.getLogger("sidecar.lockout")

DEFAULT_MAX_ENTRIES = 25_000
DEFAULT_MAX_TIMES = 250_000

FailureRecorder = Callable[[Call], None]


def client_key(call: Call) -> str:
    """The unit the lockout counts: the IPv4 address, or the IPv6 /64."""
    addr = call.client_addr
    if addr is None or addr.version == 4:
        return call.client_ip  # str(addr), or "unknown" for a malformed forwarded chain
    return _v6_key(addr)


def _v6_key(addr: ipaddress.IPv6Address) -> str:
    return str(ipaddress.IPv6Network((int(addr) >> 64 << 64, 64)))


def address_key(text: str) -> str:
    """The lockout key for an address an operator typed (``unlock``): an IPv4 address,
    an IPv6 address (its /64) or the /64 itself as the log spells it; an IPv4-mapped
    IPv6 address is its IPv4 address, as for calls. Raises ValueError otherwise."""
    text = text.strip()
    if "/" in text:
        network = ipaddress.ip_network(text, strict=False)
        if network.version != 6 or network.prefixlen != 64:
            raise ValueError("a network must be an IPv6 /64 (IPv4 addresses are locked alone)")
        return str(network)
    addr = ipaddress.ip_address(text)
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return _v6_key(addr)
    return str(addr)


class LockoutTable:
    """Recent failure times and lock expiries per client key (monotonic seconds).

    Lives in the process state, across config reloads; each call passes the
    policy of the config it runs under.
    """

    def __init__(
        self, max_entries: int = DEFAULT_MAX_ENTRIES, max_times: int = DEFAULT_MAX_TIMES
    ) -> None:
        self.max_entries = max_entries
        self.max_times = max_times
        # key -> the failure times still inside the window, oldest first; a lone
        # failure (what a many-address flood leaves) is a bare float, more are an
        # array of doubles (8 bytes a time instead of 32 for a list of floats).
        self._failures: OrderedDict[str, float | array[float]] = OrderedDict()
        # key -> when its lock ends, earliest locked first. Public so the guard's
        # common case (nobody locked) is one truth test.
        self.locks: OrderedDict[str, float] = OrderedDict()
        # Nothing in either table can expire before this time: _expire returns at once.
        # Entries only join at the back with later times, so it stays a lower bound.
        self._quiet_until = 0.0
        self._policy: Lockout | None = None  # the policy self._cap was computed for
        self._cap = max_entries

    def __len__(self) -> int:
        return len(self._failures) + len(self.locks)

    def locked_for(self, key: str, now: float) -> float:
        """Seconds left on ``key``'s lock; 0 when not locked."""
        until = self.locks.get(key)
        if until is None:
            return 0.0
        if until <= now:
            del self.locks[key]
            return 0.0
        return until - now

    def unlock(self, key: str, now: float) -> bool:
        """Forget ``key``'s lock and its failures; True when it was locked."""
        locked = self.locked_for(key, now) > 0  # an ended lock is dropped here too
        self.locks.pop(key, None)
        self._failures.pop(key, None)
        return locked

    def record_failure(self, key: str, policy: Lockout, now: float) -> bool:
        """Count one failure at ``now``; True when it locked ``key``."""
        self._expire(now, policy)
        horizon = now - policy.window
        failures = self._failures
        previous = failures.pop(key, None)
        if previous is None:
            recent: float | array[float] = now
            count = 1
        else:
            recent = array("d", (previous,)) if isinstance(previous, float) else previous
            # Times only grow: a sorted array, and usually its oldest is still live.
            stale = 0 if recent[0] > horizon else bisect_right(recent, horizon)
            # Trimming the front moves the whole array: done only once the stale times
            # are an eighth of it, so a large maxFailures costs O(1) per failure, not
            # O(maxFailures) (a record holds at most 8/7 of its live times).
            if stale * 8 >= len(recent):
                del recent[:stale]
                stale = 0
            recent.append(now)
            count = len(recent) - stale
        if count >= policy.max_failures:
            if len(self.locks) >= self.max_entries:
                self.locks.popitem(last=False)  # the lock that ends first
            self.locks[key] = now + policy.duration
            return True
        if policy is not self._policy:  # a record holds up to maxFailures - 1 times:
            self._policy = policy  # fewer records for a large policy
            self._cap = min(
                self.max_entries, max(1, self.max_times // max(1, policy.max_failures - 1))
            )
        cap = self._cap
        while len(failures) >= cap:
            failures.popitem(last=False)  # the least recently failed
        failures[key] = now if count == 1 else recent  # one live time: a bare float
        return False

    def _expire(self, now: float, policy: Lockout) -> None:
        """Drop records whose last failure left the window and locks that ended.

        Each table is ordered by time, so this stops at the first live entry:
        every entry is dropped once, O(1) per failure over time. It then notes
        when the first live entry (or one added from now on) can expire and does
        nothing until then. (After a reload that shortens the window or the
        duration, entries may outlive them by the old length: memory only, the
        lookups compare times themselves.)"""
        if now < self._quiet_until:
            return
        window = policy.window
        failures = self._failures
        horizon = now - window
        quiet_until = now + window
        while failures:
            key, times = next(iter(failures.items()))
            last = times if isinstance(times, float) else times[-1]
            if last > horizon:
                quiet_until = last + window
                break
            del failures[key]
        locks = self.locks
        lock_quiet = now + policy.duration
        while locks:
            key, until = next(iter(locks.items()))
            if until > now:
                lock_quiet = until
                break
            del locks[key]
        self._quiet_until = min(quiet_until, lock_quiet)


def auth_lockout(settings: Settings, table: LockoutTable) -> Guard:
    """429 ``locked_out`` with ``Retry-After`` while the client address is locked."""
    clock = time.monotonic
    locks = table.locks

    def guard(call: Call) -> None:
        if not locks:  # the common case costs one truth test
            return
        left = table.locked_for(client_key(call), clock())
        if left:
            raise Reject(
                429,
                "locked_out",
                "too many failed authentications from this address; try again later",
                {"Retry-After": str(math.ceil(left))},
            )

    return guard


def failure_recorder(settings: Settings, table: LockoutTable) -> FailureRecorder:
    """What bearer auth calls on every failed authentication: count it, and log the lock
    once, when it starts (a locked address is refused before auth, so it fails no more)."""
    policy = settings.sidecar.auth_lockout
    clock = time.monotonic

    def record(call: Call) -> None:
        key = client_key(call)
        if table.record_failure(key, policy, clock()):
            until = dt.datetime.fromtimestamp(time.time() + policy.duration, dt.UTC)
            stamp = until.isoformat(timespec="seconds").replace("+00:00", "Z")
            log.warning(
                "address locked out: %s failed to authenticate %d times within %gs; "
                "refused until %s (release: webhook-sidecar unlock -c FILE %s)",
                key, policy.max_failures, policy.window, stamp, key,
                extra={"address": key, "failures": policy.max_failures, "until": stamp},
            )  # fmt: skip

    return record
