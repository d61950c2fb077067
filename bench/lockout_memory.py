"""How much memory the auth lockout holds under a flood of failures from many addresses.

    python bench/lockout_memory.py [--addresses 2000000]

Three floods against one ``LockoutTable`` each, with the default caps and the
default policy (10 failures in 1 min lock for 5 min):

- ``spray``: every address fails once (a botnet spraying guesses);
- ``near``: every address fails maxFailures - 1 times (the most a record holds);
- ``lock``: every address fails maxFailures times (every one gets locked).

Memory is what tracemalloc sees allocated by the table (keys included) at the
end; time is without tracemalloc, per failure.
"""

from __future__ import annotations

import argparse
import ipaddress
import time
import tracemalloc

from sidecar.guards.lockout import LockoutTable
from sidecar.settings import Lockout

POLICY = Lockout()  # the defaults: 10 failures in 60 s, locked for 300 s
BASE = int(ipaddress.IPv4Address("10.0.0.0"))


def flood(addresses: int, per_address: int, measure: bool) -> tuple[LockoutTable, float, int]:
    if measure:
        tracemalloc.start()
    table = LockoutTable()
    start = time.perf_counter()
    now = 1000.0
    for i in range(addresses):
        key = str(ipaddress.IPv4Address(BASE + i))
        for _ in range(per_address):
            now += 1e-6  # all within one window: nothing expires, only the caps hold
            table.record_failure(key, POLICY, now)
    elapsed = time.perf_counter() - start
    used = 0
    if measure:
        used = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
    return table, elapsed, used


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--addresses", type=int, default=2_000_000)
    args = parser.parse_args()
    n = args.addresses
    print(f"{'flood':<6} {'addresses':>10} {'failures':>10} {'records':>8} {'locks':>8} "
          f"{'memory':>9} {'per failure':>12}")  # fmt: skip
    floods = (("spray", 1), ("near", POLICY.max_failures - 1), ("lock", POLICY.max_failures))
    for name, per in floods:
        count = n if per == 1 else n // per
        _, elapsed, _ = flood(count, per, measure=False)
        table, _, used = flood(count, per, measure=True)
        print(
            f"{name:<6} {count:>10,} {count * per:>10,} {len(table) - len(table.locks):>8,} "
            f"{len(table.locks):>8,} {used / 1e6:>7.1f}MB {elapsed / (count * per) * 1e6:>9.2f} us"
        )


if __name__ == "__main__":
    main()
