"""The connection cap (``sidecar.limits.maxConnections``): a per-process bound on open
public connections.

docs/http-api.md bounds how long a slow client may hold a connection (header and body
timeouts), not how many it may hold. Without a bound, a client that opens
connections faster than those timeouts close them spends the process's file
descriptors; once they are gone, ``accept()`` fails and asyncio stops accepting
for a second at a time, and the forwarder cannot open a socket to the runtime
either — every caller fails, not just the abusive one. Beyond the cap a new
connection is accepted and reset at once (a refusal, like a full backlog),
before a byte of it is read, so the descriptors that remain serve the runtime
and the admin listener. The cap is read from the current settings on every
accept, so a reload changes it. Tests: tests/test_slow_clients.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

log = logging.getLogger("sidecar")

WARN_EVERY = 60.0  # seconds between two "cap reached" lines under a flood


def cap_connections(server: web.Server, limit: Callable[[], int]) -> None:
    """Reset connections beyond ``limit()`` open ones as soon as ``server`` accepts them.

    Hooks the two callbacks every aiohttp ``RequestHandler`` makes on its
    ``Server`` (``connection_made`` / ``connection_lost``): aiohttp has no
    option for this, and wrapping the protocol factory would mean copying
    ``TCPSite.start``."""
    made, lost = server.connection_made, server.connection_lost
    open_now: set[RequestHandler] = set()
    warned = [-WARN_EVERY]

    def connection_made(handler: RequestHandler, transport: asyncio.Transport) -> None:
        made(handler, transport)
        if len(open_now) >= limit():
            transport.abort()  # RST: the client sees a refusal and may retry elsewhere
            now = time.monotonic()
            if now - warned[0] >= WARN_EVERY:
                warned[0] = now
                log.warning(
                    "connection cap reached: refusing new connections",
                    extra={"maxConnections": limit()},
                )
            return
        open_now.add(handler)

    def connection_lost(handler: RequestHandler, exc: BaseException | None = None) -> None:
        open_now.discard(handler)
        lost(handler, exc)

    server.connection_made = connection_made  # type: ignore[method-assign]
    server.connection_lost = connection_lost  # type: ignore[method-assign]
