"""What ``run`` says when it starts (docs/operations.md): one log line each for the config
path, the listen addresses, the agents and routes, the upstream and whether it answers
now, the spool (when there is one), then every security warning ``check-config`` would
print.

An operator reading the first lines of a pod's log should see where the config came
from, what it serves and what is wrong with it, before the first call fails. Under
``sidecar.workers`` > 1 the supervisor says this once, not every worker.
"""

from __future__ import annotations

import logging
import os
import socket

from .. import config
from ..settings import Settings, Upstream
from ..spool.store import sqlite_temp_dir

log = logging.getLogger("sidecar")

# The upstream check must never hold up the start for long: a runtime that is not up
# yet is normal (it may start after the sidecar), it only earns a warning.
PROBE_TIMEOUT = 1.0


NO_TEMP_DIR = (
    "SQLite has no writable directory for temporary files (a read-only root file system "
    "without /tmp?): large transactions, such as a burst of big calls or a replay of many "
    "dead letters, will fail with 503 spool_unavailable; set SQLITE_TMPDIR to a writable "
    "directory, e.g. the spool's own"
)


def upstream_problem(upstream: Upstream, timeout: float = PROBE_TIMEOUT) -> str | None:
    """Why a connection to the upstream fails right now, or None when it is accepted."""
    try:
        if upstream.socket is not None:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(timeout)
                sock.connect(upstream.socket)
        else:
            with socket.create_connection((upstream.host, upstream.port), timeout=timeout):
                pass
    except TimeoutError:
        return f"no connection within {timeout:g}s"
    except OSError as exc:
        return os.strerror(exc.errno) if exc.errno else str(exc)
    return None


def log_startup(settings: Settings) -> None:
    """Log the start-up summary, in this order: config path, listen addresses, agents and
    routes, upstream (connecting once, at most ``PROBE_TIMEOUT``), security warnings."""
    s = settings.sidecar
    log.info("config %s", settings.path, extra={"config": str(settings.path)})
    scheme = "https" if s.tls is not None else "http"
    public, admin = f"{scheme}://{s.listen}", f"http://{s.admin_listen}"
    log.info("listen %s, admin %s", public, admin, extra={"public": public, "admin": admin})
    agents = sorted(settings.webhooks.agents)
    routes: list[str] = sorted(getattr(settings, "routes", None) or ())  # docs/configuration.md
    log.info(
        "agents: %s; routes: %s",
        ", ".join(agents) or "(none)",
        ", ".join(routes) or "(none)",
        extra={"agents": agents, "routes": routes},
    )
    up = s.upstream
    where = up.socket or up.url
    fields = {"upstream": where, "protocol": up.protocol}
    problem = upstream_problem(up)
    if problem is None:
        log.info("upstream %s: answering", where, extra=fields)
    else:
        log.warning("upstream %s: not answering (%s)", where, problem, extra=fields)
    if s.spool is not None:
        spool_problem = None if (temp := sqlite_temp_dir()) is not None else NO_TEMP_DIR
        extra = {"spool": str(s.spool.path), "tempDir": temp}
        if spool_problem is None:
            log.info("spool %s (temporary files in %s)", s.spool.path, temp, extra=extra)
        else:
            log.warning("spool %s: %s", s.spool.path, spool_problem, extra=extra)
    for warning in config.security_warnings(settings):
        log.warning("%s", warning, extra={"securityWarning": True})
