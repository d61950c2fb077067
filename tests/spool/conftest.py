"""Fixtures of the spool's tests: a recording runtime, and real sidecar processes with a
spool file in a short temporary folder."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.spool_runtime import RecordingRuntime, SpoolSidecar


@pytest.fixture
async def recorder(short_tmp: Path) -> AsyncIterator[RecordingRuntime]:
    rt = RecordingRuntime(short_tmp / "rt.sock")
    await rt.start()
    yield rt
    await rt.stop()


@pytest.fixture
def sidecars() -> Iterator[Callable[..., SpoolSidecar]]:
    """Start real sidecars; every one still running is stopped at the end."""
    started: list[SpoolSidecar] = []

    def make(folder: Path, doc: dict[str, Any], **kwargs: Any) -> SpoolSidecar:
        sidecar = SpoolSidecar(folder, doc, **kwargs)
        started.append(sidecar)
        return sidecar

    yield make
    for sidecar in started:
        if sidecar.proc is not None and sidecar.proc.poll() is None:
            sidecar.proc.kill()
            sidecar.wait()
