"""Process-wide tuning applied once at start: the event loop and the allocator."""

from __future__ import annotations

import asyncio
import ctypes
import os


def install_uvloop() -> bool:
    """Use uvloop when it is installed: the same code, a faster event loop."""
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


# glibc's <malloc.h>: the size from which malloc() takes memory with mmap().
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 128 * 1024


def tune_allocator() -> bool:
    """Keep glibc from holding on to freed table memory (returns whether it applied).

    The lockout and rate-limit tables are dicts of up to 25k entries, whose
    hash tables are multi-MB blocks, reallocated as the tables churn under a
    many-address flood. glibc raises its mmap threshold each time such a block
    is freed (the "dynamic threshold", mallopt(3)), so the next ones come from
    the heap, whose freed holes it keeps: RSS then climbs for minutes with no
    more live data (bench/soak.py saw +10 MB over five minutes). A fixed
    threshold keeps big blocks in mmap(), given back to the system when freed.
    An operator's ``MALLOC_MMAP_THRESHOLD_`` wins; other C libraries are left alone.
    """
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
