#!/usr/bin/env python3
"""``webhook-sidecar`` whose dedup guard a call can pass by: the process that
bench/dedup_bench.py measures both sides of its ratio in. For benchmarks only.

A call with ``X-Bench-Dedup: skip`` does not meet the dedup guard: its
Idempotency-Key is validated and forwarded upstream, never claimed. Any other
call (the bench sends ``X-Bench-Dedup: keep``, the same bytes) meets the guard
exactly as in ``webhook-sidecar run``. Both kinds pay the one header lookup that
tells them apart, so the difference between them is the guard and nothing else,
measured in one process: two processes of the same tree differ by more than
that (docs/dedup.md, "Cost").

    PYTHONPATH=. python bench/dedup_switch.py run -c CONFIG
"""

from __future__ import annotations

import sys
from typing import Any

import sidecar.app
from sidecar.call import Call, Guard
from sidecar.cli import main

SWITCH = "X-Bench-Dedup"
_dedup = sidecar.app.dedup


def _switchable(*args: Any) -> Guard | None:
    guard = _dedup(*args)
    if guard is None:
        return None

    def switched(call: Call) -> Any:
        if call.request.headers.get(SWITCH) == "skip":
            return None
        return guard(call)

    return switched


setattr(sidecar.app, "dedup", _switchable)  # noqa: B010 - a patch, for benchmarks only

if __name__ == "__main__":
    sys.exit(main())
