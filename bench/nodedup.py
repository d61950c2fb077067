#!/usr/bin/env python3
"""``webhook-sidecar`` with the dedup guard left out of every guard chain: the
baseline of bench/dedup_bench.py (the same tree, the same keyed calls, forwarded
with their Idempotency-Key, but never claimed). For benchmarks only.

    PYTHONPATH=. python bench/nodedup.py run -c CONFIG
"""

from __future__ import annotations

import sys
from typing import Any

import sidecar.app
from sidecar.cli import main


def _no_dedup(*args: Any) -> None:
    return None  # the chains drop a guard that is None


setattr(sidecar.app, "dedup", _no_dedup)  # noqa: B010 - a patch, for benchmarks only

if __name__ == "__main__":
    sys.exit(main())
