"""Open files: raise the limit at start, and refuse a ``maxConnections`` it cannot hold.

Every public connection is a file descriptor, and a connection whose call is
being forwarded holds a second one to the runtime. A ``maxConnections`` above
what the open-file limit allows is not a cap at all: ``accept()`` fails with
EMFILE first, and the forwarder cannot reach the runtime either. So the soft
limit is raised to the hard limit at start (the default soft limit is often
1024), and a config that still does not fit is refused, naming the key
(docs/connections.md).
"""

from __future__ import annotations

import resource

# Descriptors the process needs besides connections: listeners, the admin app, the
# log, the event loop, Redis, reload's file reads, the idle upstream pool.
HEADROOM = 128


def raise_open_file_limit() -> int:
    """Set the soft ``RLIMIT_NOFILE`` to the hard one; return the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass  # e.g. a sandbox that forbids it: judged against what we have
    return soft


def needed(max_connections: int) -> int:
    """Descriptors for ``max_connections`` public connections, each with a call in flight."""
    return 2 * max_connections + HEADROOM


def problem(max_connections: int, limit: int) -> str | None:
    """The config error when ``max_connections`` does not fit in ``limit`` open files."""
    if limit == resource.RLIM_INFINITY or needed(max_connections) <= limit:
        return None
    fits = max((limit - HEADROOM) // 2, 0)
    return (
        f"sidecar.limits.maxConnections: {max_connections} needs up to "
        f"{needed(max_connections)} open files (one per connection, one more per call "
        f"to the runtime, {HEADROOM} for the rest) but the open-file limit is {limit}; "
        f"set maxConnections to at most {fits} or raise the limit (ulimit -n, LimitNOFILE=)"
    )
