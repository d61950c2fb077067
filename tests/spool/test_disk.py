"""Spool files and disks that cannot be used: a clear exit 2 naming the path at start,
503 spool_unavailable while running, and never a 200 without the commit."""

from __future__ import annotations

import contextlib
import json
import resource
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support.clients import post, until
from support.common import AGENT, write_config
from support.spool_runtime import RecordingRuntime, SpoolSidecar, spool_cli, spool_doc

from sidecar.spool.store import SCHEMA_VERSION


def run_briefly(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "run", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )


def small_files(limit: int) -> Callable[[], None]:
    """In the child: files may not grow past ``limit`` bytes, and a write past it fails
    with EFBIG instead of killing the process (SIGXFSZ ignored)."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


async def test_file_size_limit_gives_spool_unavailable_never_a_200_without_commit(
    short_tmp: Path, recorder: RecordingRuntime, sidecars: Callable[..., SpoolSidecar]
) -> None:
    await recorder.stop()  # nothing leaves the spool: it only grows
    doc = spool_doc(short_tmp)
    sidecar = sidecars(short_tmp, doc, preexec_fn=small_files(192 * 1024)).start()
    answered: list[str] = []
    refused = None
    message = "x" * 2000
    for _ in range(1000):
        status, headers, body = await post(
            sidecar.url + "/hooks/agent", {"agent": AGENT, "message": message}
        )
        if status == 200:
            answered.append(body["eventId"])
            continue
        refused = (status, headers, body)
        break
    assert refused is not None, "the file size limit was never reached"
    status, headers, body = refused
    assert status == 503 and body["error"] == "spool_unavailable", body
    assert int(headers["Retry-After"]) > 0
    assert str(short_tmp) not in json.dumps(body)  # no paths or SQL in answers
    assert answered, "some calls fit before the limit"
    # Still serving: each call is answered 200 (committed) or 503, nothing else.
    for _ in range(20):
        status, _, body = await post(
            sidecar.url + "/hooks/agent", {"agent": AGENT, "message": message}
        )
        assert status in (200, 503), body
        if status == 200:
            answered.append(body["eventId"])
        else:
            assert body["error"] == "spool_unavailable"
    kill_and_check_answered_on_disk(sidecar, answered)


def kill_and_check_answered_on_disk(sidecar: SpoolSidecar, answered: list[str]) -> None:
    """SIGKILL the sidecar, then read its file: every call answered 200 is in it."""
    assert sidecar.proc is not None
    sidecar.proc.kill()
    sidecar.wait()
    listed = spool_cli(sidecar.config_path, "list", "--json", "--limit", "100000")
    assert listed.returncode == 0, listed.stderr
    on_disk = {json.loads(line)["id"] for line in listed.stdout.splitlines()}
    assert set(answered) <= on_disk


@contextlib.contextmanager
def tmpfs(folder: Path, options: str) -> Iterator[Path]:
    """A real tmpfs at ``folder`` (read-only, or tiny: a disk that fails for real).
    Permission bits do not stop root, a read-only file system does."""
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_read_only_file_system_is_exit_2_naming_the_path(short_tmp: Path) -> None:
    with tmpfs(short_tmp / "ro", "ro,size=1m") as folder:
        doc = spool_doc(short_tmp, path=str(folder / "spool.db"))
        result = run_briefly(write_config(short_tmp, doc))
    assert result.returncode == 2, result.stderr
    assert str(folder / "spool.db") in result.stderr


async def test_full_disk_gives_spool_unavailable_never_a_200_without_commit(
    short_tmp: Path, recorder: RecordingRuntime, sidecars: Callable[..., SpoolSidecar]
) -> None:
    await recorder.stop()
    with tmpfs(short_tmp / "small", "size=256k") as folder:
        doc = spool_doc(short_tmp, path=str(folder / "spool.db"))
        sidecar = sidecars(short_tmp, doc).start()
        answered: list[str] = []
        refused = None
        for _ in range(1000):
            status, _, body = await post(
                sidecar.url + "/hooks/agent", {"agent": AGENT, "message": "y" * 2000}
            )
            if status != 200:
                refused = body
                break
            answered.append(body["eventId"])
        assert refused is not None and refused["error"] == "spool_unavailable", refused
        await until(lambda: sidecar.admin("/readyz")[0] == 503)
        kill_and_check_answered_on_disk(sidecar, answered)


def _sqlite_file(path: Path, user_version: int, application_id: int, table: str) -> None:
    conn = sqlite3.connect(path)
    conn.execute(f"CREATE TABLE {table} (x)")
    conn.execute(f"PRAGMA user_version = {user_version}")
    conn.execute(f"PRAGMA application_id = {application_id}")
    conn.commit()
    conn.close()


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("garbage", "not a usable spool file"),
        ("foreign", "not a webhook-sidecar spool"),
        ("newer", "newer webhook-sidecar"),
    ],
)
def test_unusable_file_is_exit_2_naming_the_path_and_left_alone(
    short_tmp: Path, kind: str, expected: str
) -> None:
    path = short_tmp / "spool.db"
    if kind == "garbage":
        path.write_bytes(b"this is not a database, but somebody's data\n" * 100)
    elif kind == "foreign":
        _sqlite_file(path, 3, 0, "accounts")
    else:
        from sidecar.spool.store import APPLICATION_ID

        _sqlite_file(path, SCHEMA_VERSION + 1, APPLICATION_ID, "events")
    before = path.read_bytes()
    config = write_config(short_tmp, spool_doc(short_tmp, path=str(path)))
    result = run_briefly(config)
    assert result.returncode == 2, result.stderr
    assert str(path) in result.stderr and expected in result.stderr
    assert path.read_bytes() == before  # never deleted nor rewritten
    cli = spool_cli(config, "stats")
    assert cli.returncode == 2 and str(path) in cli.stderr


# SQLite's WAL grows by about five 4 KiB pages per commit and is folded back into the
# database only at 1000 pages (~4 MiB): a disk must be large next to that, or the spool
# fills any freed space again by itself. docs/spool.md asks for that much headroom.
RECOVERY_DISK = "24m"
BALLAST = 8 * 1024 * 1024  # what the operator frees
BIG_MESSAGE = "z" * 30000


@pytest.mark.parametrize(
    "workers",
    [
        1,
        # A worker that does not hold the delivery lease writes nothing by itself: it
        # finds out that the disk takes writes again only by probing (spool.service).
        pytest.param(2, marks=pytest.mark.slow),
    ],
)
async def test_full_disk_recovers_once_space_is_freed_without_a_restart(
    short_tmp: Path,
    recorder: RecordingRuntime,
    sidecars: Callable[..., SpoolSidecar],
    workers: int,
) -> None:
    """The disk fills (the spool grows next to a ballast file), the sidecar answers 503
    spool_unavailable and turns not ready. The ballast is deleted, and the SAME process
    turns ready again by itself (in Kubernetes a pod that is not ready gets no calls, so
    waiting for an accept to succeed would never end), accepts with 200, and once the
    runtime is back every call answered 200 arrives under its own Idempotency-Key."""
    await recorder.stop()  # nothing leaves the spool while the disk fills
    with tmpfs(short_tmp / "disk", f"size={RECOVERY_DISK}") as folder:
        ballast = folder / "ballast"
        ballast.write_bytes(b"\0" * BALLAST)
        doc = spool_doc(short_tmp, path=str(folder / "spool.db"))
        if workers > 1:
            doc["sidecar"]["workers"] = workers
        sidecar = sidecars(short_tmp, doc).start(timeout=30)
        await until(lambda: sidecar.admin("/readyz")[0] == 200, timeout=30)
        pids = _worker_pids(sidecar)
        answered: dict[str, str] = {}  # requestId -> eventId of every 200
        refused: list[str] = []  # requestIds answered 503

        async def call() -> int:
            status, _, body = await post(
                sidecar.url + "/hooks/agent", {"agent": AGENT, "message": BIG_MESSAGE}
            )
            assert status in (200, 503), body
            if status == 200:
                answered[body["requestId"]] = body["eventId"]
            else:
                assert body["error"] == "spool_unavailable", body
                refused.append(body["requestId"])
            return status

        for _ in range(2000):
            if await call() == 503 and len(refused) >= 2 * workers:
                break  # each call on a fresh connection: every worker gets some
        assert refused, "the disk never filled"
        before = dict(answered)
        assert len(before) > 100, "the spool filled the disk, not the ballast"
        # Not ready, for the disk: "spool unavailable", or "worker N: spool unavailable".
        await until(lambda: sidecar.admin("/readyz")[0] == 503)
        assert sidecar.admin("/readyz")[1]["reason"].endswith("spool unavailable")

        ballast.unlink()  # space is free again; the sidecar is not restarted
        # Ready again with no call in between: readiness finds out by itself.
        await until(lambda: sidecar.admin("/readyz")[0] == 200)
        for _ in range(5):
            assert await call() == 200
        assert sidecar.proc is not None and sidecar.proc.poll() is None, "never restarted"
        assert _worker_pids(sidecar) == pids, "no worker was restarted either"

        await recorder.start()
        await until(
            lambda: set(answered) <= {c["body"]["requestId"] for c in recorder.delivered},
            timeout=60,
        )
        for request_id, event_id in answered.items():
            # Exactly its own key, however often it was tried.
            assert recorder.keys_of(request_id) == {f"evt:{event_id}"}, request_id
        # A 503 is a transaction rolled back: that call is not in the spool, never sent.
        assert {c["body"]["requestId"] for c in recorder.calls}.isdisjoint(refused)
        # And the deliveries were recorded: the spool empties.
        await until(lambda: json.loads(sidecar.cli("stats", "--json").stdout)["pending"] == 0)
        assert sidecar.proc.poll() is None


def _worker_pids(sidecar: SpoolSidecar) -> set[int]:
    """The processes serving: the one process, or the supervisor's workers."""
    assert sidecar.proc is not None
    children = Path(f"/proc/{sidecar.proc.pid}/task/{sidecar.proc.pid}/children")
    return {sidecar.proc.pid, *(int(p) for p in children.read_text().split())}


def test_start_warns_when_sqlite_has_no_temporary_directory(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A read-only root file system with nothing on /tmp (deploy/ without SQLITE_TMPDIR):
    large transactions would fail later, so the start says so now, and how to fix it."""
    from sidecar import config
    from sidecar.process import startup
    from sidecar.spool import store

    settings = config.load(write_config(short_tmp, spool_doc(short_tmp)))
    monkeypatch.delenv("TMPDIR", raising=False)
    monkeypatch.setenv("SQLITE_TMPDIR", str(short_tmp / "absent"))
    monkeypatch.setattr(store, "SQLITE_TEMP_DIRS", (str(short_tmp / "also-absent"),))
    assert store.sqlite_temp_dir() is None
    with caplog.at_level("INFO", logger="sidecar"):
        startup.log_startup(settings)
    [line] = [r for r in caplog.records if r.getMessage().startswith("spool ")]
    assert line.levelname == "WARNING" and "SQLITE_TMPDIR" in line.getMessage()
    # With SQLITE_TMPDIR on a writable folder (what deploy/ sets): one line at info.
    monkeypatch.setenv("SQLITE_TMPDIR", str(short_tmp))
    caplog.clear()
    with caplog.at_level("INFO", logger="sidecar"):
        startup.log_startup(settings)
    [line] = [r for r in caplog.records if r.getMessage().startswith("spool ")]
    assert line.levelname == "INFO" and str(short_tmp) in line.getMessage()
