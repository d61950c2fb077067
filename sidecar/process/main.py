"""``webhook-sidecar run``: load the config, then serve in this process or, with
``sidecar.workers`` > 1, supervise that many worker processes (docs/lifecycle.md).

The process layer's entry point: it owns :mod:`.server` and :mod:`.workers`,
neither of which imports it back.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from .. import config, logs
from ..spool.store import SpoolError, connect
from . import fdlimit
from .fdlimit import raise_open_file_limit
from .server import serve
from .startup import log_startup
from .tuning import install_uvloop, tune_allocator
from .workers import supervise

EXIT_CONFIG = 2


def run(path: Path) -> int:
    """Load, serve until SIGTERM, exit 0 after the drain."""
    try:
        settings = config.load(path)
    except config.ConfigError as exc:
        for problem in exc.problems:
            print(f"config error: {problem}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    # Before workers start: they inherit the raised limit.
    too_many = fdlimit.problem(settings.sidecar.limits.max_connections, raise_open_file_limit())
    if too_many is not None:
        print(f"config error: {too_many}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    if settings.sidecar.spool is not None:
        try:  # before any worker starts: a bad spool file is a clear exit 2, not a crash loop
            connect(settings.sidecar.spool.path).close()
        except SpoolError as exc:
            print(f"spool error: {exc}", file=sys.stderr, flush=True)
            return EXIT_CONFIG
    if settings.sidecar.workers > 1:
        return supervise(settings)
    writer, audit = logs.setup(settings.sidecar.log.level, settings.sidecar.log.format)
    log_startup(settings)
    install_uvloop()
    tune_allocator()
    try:
        return asyncio.run(serve(settings, audit))
    finally:
        writer.close()
