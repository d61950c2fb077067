"""Reload (docs/configuration.md): on SIGHUP, and by itself when a watched file changes.

The watched files are :attr:`Settings.watched_files`: the config, the secret
files, the upstream token file and the TLS files. They are polled, not watched
with inotify: Kubernetes replaces a mounted ConfigMap or Secret by pointing the
``..data`` symlink at a new timestamped folder, so the file a path resolves to
changes without any write to it (inotify on the path sees nothing; see
kubernetes/kubernetes#112677). Each poll follows the symlinks and fingerprints
what the path resolves to now: device, inode, size, mtime and a digest of the
content. A change is acted on once two polls agree, so a file caught half-way
through a non-atomic write is not loaded; with the default 1 s interval a
change is live within about 2 s.

A reload is all or nothing: the new config is validated completely (TLS files
included) before anything is swapped, otherwise it is refused, logged without
secrets and counted, and the running config stays. One exception fails closed:
a secret whose file was deleted or emptied is revoked (left out, logged at
warning with its id), the other secrets stay valid; with none left, hooks
answer 401 and ``/readyz`` 503 (docs/connections.md). Requests in flight keep the
runtime they started with (see :mod:`sidecar.app`).

Some keys take effect only on restart: the listen addresses, ``sidecar.workers`` and
where the spool is (``sidecar.spool.path``, or turning the spool on or off: its file
is opened once, at start). A reload that changes one is applied for everything else
and logs a warning naming the key, at every reload while the running process still
differs from its config.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import resource
import stat
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path

from aiohttp import web

from .. import config, tls
from ..app import State
from ..settings import Settings
from ..settings import Spool as SpoolSettings
from . import fdlimit

log = logging.getLogger("sidecar.reload")

POLL_INTERVAL = 1.0
MAX_DIGEST_BYTES = 1024 * 1024  # larger files are judged by their metadata alone

Fingerprint = tuple[int, int, int, int, bytes]
Fingerprints = dict[Path, Fingerprint | None]
CleanupCtx = Callable[[web.Application], AsyncIterator[None]]


def fingerprint(path: Path) -> Fingerprint | None:
    """What ``path`` resolves to now, or ``None`` when it cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO must not block
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(fd)
            digest = b""
            if stat.S_ISREG(st.st_mode) and st.st_size <= MAX_DIGEST_BYTES:
                digest = hashlib.blake2b(f.read(MAX_DIGEST_BYTES + 1), digest_size=16).digest()
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, digest)


def fingerprints(paths: Iterable[Path]) -> Fingerprints:
    return {path: fingerprint(path) for path in paths}


def _log_revoked(old: Settings, new: Settings) -> None:
    """One warning per secret a reload revoked: its file is gone or empty now."""
    kept = {s.id for s in new.webhooks.secrets}
    for secret in old.webhooks.secrets:
        if secret.id in kept or secret.source.kind != "file":
            continue
        where = Path(secret.source.where)
        if not where.exists() or where.stat().st_size == 0 or where.read_bytes().strip() == b"":
            log.warning(
                "secret %r revoked: its file was deleted or emptied",
                secret.id,
                extra={"secretId": secret.id, "file": str(where), "secretsLeft": len(kept)},
            )
    if old.webhooks.secrets and not new.webhooks.secrets:
        log.warning("no webhook secret is left: every hook call answers 401 until one is added")


def _warn_spool_change(state: State, configured: SpoolSettings | None) -> None:
    """The spool file is opened at start and kept (docs/spool.md): a reload that moves
    the spool or turns it on or off is applied for the rest, and said loudly here.
    Compared with the spool this process has open, not with the last config loaded,
    so the warning comes back at each reload until the process is restarted."""
    running = state.spool.path if state.spool is not None else None
    wanted = configured.path if configured is not None else None
    if running == wanted:
        return
    extra = {"key": "sidecar.spool.path", "running": running, "configured": wanted}
    if running is None:
        log.warning(
            "sidecar.spool added (path %s): it takes effect on restart; until then this "
            "process forwards calls directly, without a spool",
            wanted,
            extra=extra,
        )
    elif wanted is None:
        log.warning(
            "sidecar.spool removed: it takes effect on restart; until then this process "
            "keeps spooling to %s (events left in that file are delivered only by a "
            "process that runs with a spool at that path)",
            running,
            extra=extra,
        )
    else:
        log.warning(
            "sidecar.spool.path changed from %s to %s: it takes effect on restart; until "
            "then this process keeps spooling to %s (events left in it are delivered only "
            "by a process that runs with a spool at that path)",
            running,
            wanted,
            running,
            extra=extra,
        )


class Reloader:
    """Loads the config file again on request and swaps it in when it is valid."""

    def __init__(
        self,
        state: State,
        path: Path | None,
        serving: tls.ServingTls | None,
        on_applied: Callable[[Settings], None] = lambda settings: None,
    ) -> None:
        self.state = state
        self.path = path
        self.serving = serving
        self.on_applied = on_applied  # process-wide settings (logging), the server's part
        # The files as the running config was loaded from. Taken now, before anything
        # listens: a baseline taken later by the watcher could already include a change.
        self.seen: Fingerprints = fingerprints(state.settings.watched_files)
        self._lock = asyncio.Lock()

    async def reload(self, reason: str = "SIGHUP") -> bool:
        """Load and swap in the config file; False (and the old config kept) if it is bad."""
        if self.path is None:
            return False
        async with self._lock:
            metrics = self.state.metrics
            # Fingerprinted before reading: a write during the load shows up as a change.
            before = await asyncio.to_thread(fingerprints, self.state.settings.watched_files)
            try:
                settings, loaded = await asyncio.to_thread(self._load, self.path)
                self.state.apply(settings)
            except config.ConfigError as exc:
                self.seen = before  # retried on the next change, not on every poll
                metrics.config_reloads.labels("error").inc()
                log.error(
                    "reload refused, keeping the running config",
                    extra={"reason": reason, "problems": exc.problems},
                )
                return False
            except Exception:  # a bug must not take the running config down with it
                self.seen = before
                metrics.config_reloads.labels("error").inc()
                log.exception("reload failed, keeping the running config", extra={"reason": reason})
                return False
            if loaded is not None and self.serving is not None:
                self.serving.use(loaded)
                metrics.tls_cert_not_after.set(loaded.not_after)
            self.on_applied(settings)
            new = [p for p in settings.watched_files if p not in before]
            self.seen = before | await asyncio.to_thread(fingerprints, new)
            metrics.config_reloads.labels("success").inc()
            log.info("config reloaded", extra={"reason": reason, "path": str(self.path)})
            return True

    def _load(self, path: Path) -> tuple[Settings, tls.Loaded | None]:
        """Everything that can fail, done before anything is swapped (runs in a thread)."""
        settings = config.load(path, revoke=True)
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if (
            too_many := fdlimit.problem(settings.sidecar.limits.max_connections, limit)
        ) is not None:
            raise config.ConfigError([too_many])
        old = self.state.settings.sidecar
        new = settings.sidecar
        if (old.tls is None) != (new.tls is None):
            raise config.ConfigError(["sidecar.tls: turning TLS on or off needs a restart"])
        for key, was, now in (
            ("sidecar.listen", old.listen, new.listen),
            ("sidecar.admin.listen", old.admin_listen, new.admin_listen),
            ("sidecar.workers", old.workers, new.workers),
        ):
            if was != now:
                log.warning("%s changed from %s to %s: it takes effect on restart", key, was, now)
        _warn_spool_change(self.state, new.spool)
        loaded = None
        if new.tls is not None:
            try:
                loaded = tls.load(new.tls)
            except tls.TlsError as exc:  # the files changed since config.load checked them
                raise config.ConfigError([f"sidecar.tls: {exc}"]) from None
        _log_revoked(self.state.settings, settings)  # nothing can refuse the reload now
        return settings, loaded

    async def watch(self, interval: float = POLL_INTERVAL) -> None:
        """Poll the watched files forever; reload once a change has settled."""
        pending: Fingerprints | None = None
        while True:
            await asyncio.sleep(interval)
            files = self.state.settings.watched_files
            now = await asyncio.to_thread(fingerprints, files)
            if all(self.seen.get(p) == fp for p, fp in now.items()):
                pending = None
            elif now != pending:
                pending = now  # changed since the last poll: wait for the writer to finish
            else:
                pending = None
                changed = sorted(str(p) for p, fp in now.items() if self.seen.get(p) != fp)
                log.info("watched files changed", extra={"files": changed})
                await self.reload("file change")

    def watching(self, interval: float = POLL_INTERVAL) -> CleanupCtx:
        """The file watcher as an aiohttp ``cleanup_ctx`` entry: runs while the app does."""

        async def ctx(app: web.Application) -> AsyncIterator[None]:
            task = asyncio.create_task(self.watch(interval), name="config-file-watcher")
            yield
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

        return ctx
