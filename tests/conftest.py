"""Shared fixtures; the helpers they build on live in tests/support/."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.common import (
    SECRET,
    ListWriter,
    MakeSidecar,
    PublicTestServer,
    Runtime,
    Sidecar,
    SidecarProcess,
    base_doc,
    write_config,
)
from support.fake_gateway import FakeGateway
from support.openclaw import install as openclaw_install
from support.redis_server import RedisServer, running_redis_server

from sidecar import config
from sidecar.app import State, create_app
from sidecar.logs import AuditLog
from sidecar.metrics import Metrics


def pytest_configure(config: pytest.Config) -> None:
    # The OpenClaw download (~900 MB) is announced past the output capture.
    openclaw_install.use_pytest_config(config)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short folder for Unix sockets (paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="whs-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True)
def _secret_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_WEBHOOK_SECRET", SECRET)


@pytest.fixture
async def runtime(short_tmp: Path) -> AsyncIterator[Runtime]:
    rt = Runtime(short_tmp / "rt.sock")
    await rt.start()
    yield rt
    await rt.stop()


@pytest.fixture
async def gateway() -> AsyncIterator[FakeGateway]:
    """The fake OpenClaw gateway (support/fake_gateway.py). Modules that test against
    the real gateway define a ``gateway`` fixture of their own, which wins there."""
    gw = FakeGateway()
    await gw.start()
    yield gw
    await gw.stop()


@pytest.fixture
async def make_sidecar(aiohttp_client: Any, short_tmp: Path) -> MakeSidecar:
    """Build a sidecar from a config document, loaded from a file like in production."""

    async def make(doc: dict[str, Any], now: float | None = None) -> Sidecar:
        settings = config.load(write_config(short_tmp, doc), now=now)
        audit = ListWriter()
        state = State(settings, Metrics(), AuditLog(audit))
        client = await aiohttp_client(PublicTestServer(create_app(state)))
        return Sidecar(client, state, audit)

    return make


@pytest.fixture
async def sidecar(make_sidecar: MakeSidecar, runtime: Runtime) -> Sidecar:
    """The default sidecar in front of the reference runtime."""
    return await make_sidecar(base_doc(runtime.path))


@pytest.fixture
def sidecar_process() -> Iterator[Callable[..., SidecarProcess]]:
    """Start real sidecar processes; every one is stopped at the end of the test."""
    started: list[SidecarProcess] = []

    def start(
        config_path: Path, admin_port: int, env: dict[str, str] | None = None
    ) -> SidecarProcess:
        proc = SidecarProcess(config_path, admin_port, env)
        started.append(proc)
        return proc.start()

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A private redis-server for one test (tests/support/redis_server.py)."""
    with running_redis_server() as server:
        yield server
