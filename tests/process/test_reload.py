"""Reload without downtime (docs/configuration.md, docs/lifecycle.md): the file watcher follows
Kubernetes' ``..data`` swap, a broken config is refused while the running one keeps serving, and
requests in flight finish under the config they started with. In this process (``Server``, fast
polling) and in a real ``webhook-sidecar run`` process (default polling, SIGHUP)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from support.clients import ProjectedVolume, listening_doc, post, public_url, running_server, until
from support.common import SECRET, Runtime, base_doc, free_port, write_config

from sidecar.process.reload import fingerprint

S1, S2, S3 = (secrets.token_hex(32) for _ in range(3))


# ---------------------------------------------------------------- fingerprints


def test_fingerprint_follows_the_kubernetes_symlink_swap(tmp_path: Path) -> None:
    volume = ProjectedVolume(tmp_path / "vol", {"current": b"one"})
    before = fingerprint(volume.folder / "current")
    volume.update({"current": b"two"})
    assert fingerprint(volume.folder / "current") not in (None, before)


def test_fingerprint_sees_a_rewrite_that_keeps_size_and_mtime(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_bytes(b"aaaa")
    stat = path.stat()
    before = fingerprint(path)
    path.write_bytes(b"bbbb")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert fingerprint(path) != before


def test_fingerprint_of_a_missing_or_special_file(tmp_path: Path) -> None:
    assert fingerprint(tmp_path / "none") is None
    os.mkfifo(tmp_path / "fifo")
    assert fingerprint(tmp_path / "fifo") is not None  # and it did not block


# ---------------------------------------------------------------- in this process


def slot_doc(runtime_path: Path, folder: Path) -> dict[str, Any]:
    """Two secret slots in one Secret volume, the way deploy/ rotates."""
    doc = listening_doc(runtime_path)
    del doc["webhooks"]["secret"]
    doc["webhooks"]["secrets"] = [
        {"id": "current", "file": str(folder / "current")},
        {"id": "previous", "file": str(folder / "previous")},
    ]
    return doc


def reloads(server: Any) -> tuple[float, float]:
    counter = server.state.metrics.config_reloads
    return counter.labels("success")._value.get(), counter.labels("error")._value.get()


async def test_rewritten_secret_file_is_live_without_a_signal(
    runtime: Runtime, short_tmp: Path
) -> None:
    volume = ProjectedVolume(
        short_tmp / "secrets", {"current": S1.encode(), "previous": S2.encode()}
    )
    doc = slot_doc(runtime.path, volume.folder)
    async with running_server(short_tmp, doc) as (server, _):
        assert (await post(public_url(doc), token=S3))[0] == 401
        volume.update({"current": S3.encode(), "previous": S1.encode()})
        # Wait on the reload, not by trying S3: failed tries would feed the lockout.
        await until(lambda: reloads(server) == (1, 0))
        assert (await post(public_url(doc), token=S3))[0] == 200
        assert (await post(public_url(doc), token=S1))[0] == 200  # S1 moved to "previous"
        assert (await post(public_url(doc), token=S2))[0] == 401  # S2 is gone
        assert reloads(server) == (1, 0)
        assert [c["secretId"] for c in runtime.calls][-2:] == ["current", "previous"]


async def test_broken_config_is_refused_and_the_running_one_serves_on(
    runtime: Runtime, short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    doc = listening_doc(runtime.path)
    path = write_config(short_tmp, doc)
    async with running_server(short_tmp, doc) as (server, _):
        broken = json.loads(json.dumps(doc))
        broken["webhooks"]["secret"] = S1[:20]  # too short, and inline
        broken["webhooks"]["agents"]["my-agent"]["sessionKey"] = 5
        path.write_text(json.dumps(broken))

        async def refused() -> bool:
            return reloads(server)[1] == 1

        await until(refused)
        await asyncio.sleep(1.0)  # five more polls: the same broken file is not retried
        assert reloads(server) == (0, 1)
        assert (await post(public_url(doc)))[0] == 200  # the old secret still works
        assert (await post(public_url(doc), token=S1[:20]))[0] == 401
        [record] = [r for r in caplog.records if r.getMessage().startswith("reload refused")]
        assert record.problems == [  # type: ignore[attr-defined]
            "webhooks.agents.my-agent.sessionKey: must be a string",
            "webhooks.secret: secret 'default' is shorter than minSecretLength (32 characters); "
            "generate one with `webhook-sidecar gen-secret`",
        ]
        assert S1[:20] not in caplog.text
        path.write_text("{webhooks: {")  # not even JSON5
        await until(lambda: reloads(server)[1] == 2)
        write_config(short_tmp, doc)  # fixed: taken at once
        await until(lambda: reloads(server) == (1, 2))


async def test_a_secret_file_added_by_a_reload_is_watched(
    runtime: Runtime, short_tmp: Path
) -> None:
    doc = listening_doc(runtime.path)
    async with running_server(short_tmp, doc) as (server, _):
        (short_tmp / "ci").write_text(S1)
        doc["webhooks"]["secrets"] = [
            {"id": "default", "env": "TEST_WEBHOOK_SECRET"},
            {"id": "ci", "file": "ci"},
        ]
        del doc["webhooks"]["secret"]
        write_config(short_tmp, doc)
        assert await server.reload()
        assert (await post(public_url(doc), token=S1))[0] == 200
        (short_tmp / "ci").write_text(S2)  # only the new file changes
        await until(lambda: reloads(server) == (2, 0))
        assert (await post(public_url(doc), token=S2))[0] == 200
        assert (await post(public_url(doc), token=S1))[0] == 401


class SlowRuntime:
    """A forward-protocol runtime that holds each call until released."""

    def __init__(self) -> None:
        self.arrived = asyncio.Event()
        self.release = asyncio.Event()
        self.seen: list[dict[str, Any]] = []

    async def hook(self, request: web.Request) -> web.Response:
        self.seen.append({"auth": request.headers.get("Authorization"), **await request.json()})
        self.arrived.set()
        await self.release.wait()
        return web.json_response({"ok": True, "runId": "slow-run"})


@contextlib.asynccontextmanager
async def slow_runtime(path: Path) -> AsyncIterator[SlowRuntime]:
    slow = SlowRuntime()
    app = web.Application()
    app.router.add_post("/hooks/wake", slow.hook)
    runner = web.AppRunner(app, shutdown_timeout=1)
    await runner.setup()
    await web.UnixSite(runner, str(path)).start()
    try:
        yield slow
    finally:
        slow.release.set()
        await runner.cleanup()


async def test_a_call_in_flight_finishes_under_the_config_it_started_with(
    runtime: Runtime, short_tmp: Path
) -> None:
    """Old upstream, old upstream token, old secret id: all kept by the call in flight,
    while the new config (other runtime, other token, other secret, other agent) serves
    everything that starts after the reload."""
    (short_tmp / "token").write_text("old-upstream-token")
    doc = listening_doc(short_tmp / "slow.sock")
    doc["sidecar"]["upstream"]["token"] = {"file": "token"}
    async with (
        slow_runtime(short_tmp / "slow.sock") as slow,
        running_server(short_tmp, doc) as (server, audit),
    ):
        first = asyncio.create_task(post(public_url(doc)))
        await asyncio.wait_for(slow.arrived.wait(), 10)
        new = base_doc(runtime.path, listen=doc["sidecar"]["listen"], admin=doc["sidecar"]["admin"])
        new["webhooks"]["secret"] = {"value": S1}
        new["webhooks"]["agents"] = {"other-agent": {}}
        new["sidecar"]["upstream"]["token"] = {"value": "new-upstream-token"}
        write_config(short_tmp, new)
        assert await server.reload()
        # After the reload: the new config, the new runtime.
        assert (await post(public_url(doc), token=S1, body={"agent": "other-agent"}))[0] == 200
        assert (await post(public_url(doc)))[0] == 401  # the old secret is gone
        slow.release.set()
        status, _, body = await first
    assert (status, body.get("runId")) == (200, "slow-run")
    assert slow.seen == [
        {"auth": "Bearer old-upstream-token", "agent": "my-agent", "sessionKey": "webhook-session",
         "requestId": body["requestId"]},
    ]  # fmt: skip
    assert [c["agent"] for c in runtime.calls] == ["other-agent"]
    first_line = [e for e in audit.entries() if e["requestId"] == body["requestId"]]
    assert first_line[0]["secretId"] == "default" and first_line[0]["outcome"] == "forwarded"


async def test_a_request_still_uploading_keeps_its_config(
    runtime: Runtime, short_tmp: Path
) -> None:
    """The body arrives after the reload; the agent it names exists only in the old config."""
    doc = listening_doc(runtime.path)
    async with running_server(short_tmp, doc) as (server, _):
        go = asyncio.Event()

        async def body() -> AsyncIterator[bytes]:
            yield b'{"agent": '
            await go.wait()
            yield b'"my-agent"}'

        async def upload() -> int:
            headers = {"Authorization": f"Bearer {SECRET}", "Content-Type": "application/json"}
            async with (
                aiohttp.ClientSession() as session,
                session.post(public_url(doc), data=body(), headers=headers) as resp,
            ):
                return resp.status

        pending = asyncio.create_task(upload())
        registry = server.state.metrics.registry
        await until(lambda: registry.get_sample_value("webhook_sidecar_in_flight_requests") == 1)
        new = json.loads(json.dumps(doc))
        new["webhooks"]["agents"] = {"other-agent": {}}
        write_config(short_tmp, new)
        assert await server.reload()
        assert (await post(public_url(doc)))[2]["error"] == "agent_not_found"
        go.set()
        assert await pending == 200
    assert [c["agent"] for c in runtime.calls] == ["my-agent"]


@pytest.mark.parametrize("key", ["listen", "workers"])
async def test_restart_only_changes_are_named_as_needing_a_restart(
    runtime: Runtime, short_tmp: Path, caplog: pytest.LogCaptureFixture, key: str
) -> None:
    doc = listening_doc(runtime.path)
    async with running_server(short_tmp, doc) as (server, _):
        changed = json.loads(json.dumps(doc))
        changed["sidecar"][key] = f"127.0.0.1:{free_port()}" if key == "listen" else 2
        write_config(short_tmp, changed)
        assert await server.reload()
        assert "takes effect on restart" in caplog.text
        assert (await post(public_url(doc)))[0] == 200  # still where it was
        if key == "workers":
            assert "sidecar.workers changed from 1 to 2" in caplog.text
            assert server.state.settings.sidecar.workers == 2  # the rest of the config applies


# The spool file is opened once, at start (docs/spool.md): moving it, or turning the spool
# on or off, needs a restart. A reload that does it is applied for everything else, says
# so at warning, and leaves the process with the spool it started with.
SPOOL_CHANGES = {
    "path": ("a.db", "b.db", "sidecar.spool.path changed from"),
    "added": (None, "b.db", "sidecar.spool added"),
    "removed": ("a.db", None, "sidecar.spool removed"),
}


@pytest.mark.parametrize("change", list(SPOOL_CHANGES))
async def test_spool_changes_are_named_as_needing_a_restart(
    runtime: Runtime, short_tmp: Path, caplog: pytest.LogCaptureFixture, change: str
) -> None:
    before, after, message = SPOOL_CHANGES[change]
    doc = listening_doc(runtime.path)
    if before is not None:
        doc["sidecar"]["spool"] = {"path": str(short_tmp / before)}
    async with running_server(short_tmp, doc) as (server, _):
        changed = json.loads(json.dumps(doc))
        changed["sidecar"].pop("spool", None)
        if after is not None:
            changed["sidecar"]["spool"] = {"path": str(short_tmp / after), "maxEvents": 5}
        changed["webhooks"]["agents"]["other-agent"] = {}  # the rest of the config applies
        write_config(short_tmp, changed)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="sidecar.reload"):
            assert await server.reload()
        warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any(message in m and "takes effect on restart" in m for m in warned), warned
        assert "other-agent" in server.state.settings.webhooks.agents
        # Still the mode and the file it started with, and no call breaks on the change.
        for agent in ("my-agent", "other-agent"):
            status, _, body = await post(
                public_url(doc, path="/hooks/agent"), {"agent": agent, "message": "hi"}
            )
            assert status == 200, body
            assert ("eventId" in body) == (before is not None), body
        if after is not None:
            assert not (short_tmp / after).exists(), "the new file is opened on restart"
        if before is not None:
            spool = server.state.spool
            assert spool is not None
            assert spool.path == short_tmp / before
            # maxEvents, retry and concurrency do follow a reload; without a spool block
            # in the new config, the last ones stay.
            assert spool.spool_settings().max_events == (5 if after is not None else 100000)
            await until(lambda: len(runtime.calls) == 2)  # delivered from the old file
        # Said again at every reload while it still differs: not a one-off line to miss.
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="sidecar.reload"):
            assert await server.reload()
        assert any(message in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------- a real process


@pytest.mark.slow
async def test_rotation_in_a_real_process_without_signal_or_failed_request(
    runtime: Runtime, short_tmp: Path, sidecar_process: Any
) -> None:
    """The runbook, end to end: S1 -> S2 -> S3 through the Secret volume only. Callers
    keep sending the whole time; none of their requests fails."""
    volume = ProjectedVolume(
        short_tmp / "secrets", {"current": S1.encode(), "previous": S3.encode()}
    )
    doc = slot_doc(runtime.path, volume.folder)
    admin = int(doc["sidecar"]["admin"]["listen"].rsplit(":", 1)[1])
    proc = sidecar_process(write_config(short_tmp, doc), admin)
    url = public_url(doc)
    caller = {"token": S1}
    statuses: list[tuple[str, int]] = []
    stop = asyncio.Event()

    async def callers() -> None:
        while not stop.is_set():
            token = caller["token"]
            statuses.append((token, (await post(url, token=token))[0]))
            await asyncio.sleep(0.05)

    def reloaded() -> list[dict[str, Any]]:
        return [e for e in proc.json_lines() if e.get("msg") == "config reloaded"]

    traffic = asyncio.create_task(callers())
    try:
        # 1. Add the new secret: S2 becomes current, S1 moves to previous, in one swap.
        volume.update({"current": S2.encode(), "previous": S1.encode()})
        took = await until(lambda: len(reloaded()) == 1)
        assert took < 10
        assert (await post(url, token=S2))[0] == 200
        # 2. Callers move to S2.  3. The next rotation retires S1.
        caller["token"] = S2
        volume.update({"current": S3.encode(), "previous": S2.encode()})
        took = await until(lambda: len(reloaded()) == 2)
        assert took < 10
        assert (await post(url, token=S1))[0] == 401
        await asyncio.sleep(0.3)
    finally:
        stop.set()
        await traffic
    assert {status for _, status in statuses} == {200}, statuses
    assert {token for token, _ in statuses} == {S1, S2}
    assert [e["reason"] for e in reloaded()] == ["file change", "file change"]
    text = "\n".join(proc.lines)
    assert all(s not in text for s in (S1, S2, S3))


@pytest.mark.slow
async def test_sighup_reloads_and_a_broken_file_keeps_the_old_config(
    runtime: Runtime, short_tmp: Path, sidecar_process: Any
) -> None:
    doc = listening_doc(runtime.path)
    admin = int(doc["sidecar"]["admin"]["listen"].rsplit(":", 1)[1])
    path = write_config(short_tmp, doc)
    proc = sidecar_process(path, admin)
    url = public_url(doc)
    metrics = f"http://127.0.0.1:{admin}/metrics"

    async def reload_counts() -> tuple[str, str]:
        async with aiohttp.ClientSession() as session, session.get(metrics) as resp:
            text = await resp.text()
        lines = dict(
            line.rsplit(" ", 1) for line in text.splitlines() if "config_reloads_total{" in line
        )
        return (
            lines['webhook_sidecar_config_reloads_total{result="success"}'],
            lines['webhook_sidecar_config_reloads_total{result="error"}'],
        )

    # Write the new config and signal at once: SIGHUP does not wait for the poll.
    doc["webhooks"]["agents"]["new-agent"] = {}
    path.write_text(json.dumps(doc))
    proc.signal(signal.SIGHUP)
    await until(lambda: _accepted_agent(url, "new-agent"), timeout=5)
    broken = path.read_text().replace('"enabled": true', '"enabled": "yes"')
    path.write_text(broken)
    proc.signal(signal.SIGHUP)

    async def counted() -> bool:
        return (await reload_counts())[1] == "1.0"

    await until(counted)
    assert (await post(url, {"agent": "new-agent"}))[0] == 200
    assert proc.proc is not None and proc.proc.poll() is None

    # One reload per signal: the file watcher did not load the same change a second time.
    def outcomes() -> list[tuple[str, str]]:
        return [(e["msg"], e["reason"]) for e in proc.json_lines() if "reason" in e]

    await until(lambda: len(outcomes()) >= 2)  # log lines are written off the loop, in batches
    assert outcomes() == [
        ("config reloaded", "SIGHUP"),
        ("reload refused, keeping the running config", "SIGHUP"),
    ]


async def _accepted_agent(url: str, agent: str) -> bool:
    return (await post(url, {"agent": agent}))[0] == 200


async def test_the_log_level_follows_the_reload(runtime: Runtime, short_tmp: Path) -> None:
    root = logging.getLogger()
    saved = root.level
    doc = listening_doc(runtime.path)
    try:
        async with running_server(short_tmp, doc) as (server, _):
            doc["sidecar"]["log"] = {"level": "error"}
            write_config(short_tmp, doc)
            assert await server.reload()
            assert root.level == logging.ERROR
    finally:
        root.setLevel(saved)
