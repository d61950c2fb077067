"""Key-value backends shared by the guards that remember things across requests:
delivery-id dedup today (docs/routes.md); memory, Redis and SQLite (the spool's database)."""

from __future__ import annotations

from .base import Claim, DedupStore, DedupUnavailable
from .memory import DEFAULT_MAX_ENTRIES, MemoryDedupStore

__all__ = [
    "DEFAULT_MAX_ENTRIES", "Claim", "DedupStore", "DedupUnavailable", "MemoryDedupStore",
    "open_dedup_store",
]  # fmt: skip


def open_dedup_store(backend: str, max_entries: int = DEFAULT_MAX_ENTRIES) -> DedupStore:
    """The store for ``sidecar.dedup.backend`` (already validated by config).

    Opens no connection: a Redis pool connects on first use, on the running loop.
    """
    if backend == "memory":
        return MemoryDedupStore(max_entries)
    if backend.startswith("redis://"):
        from .redis import RedisDedupStore  # redis-py is imported only when it is used

        return RedisDedupStore(backend)
    # "sqlite" lives in the spool's database (docs/dedup.md): the spool opens it.
    raise ValueError(f"unknown dedup backend {backend!r}")
