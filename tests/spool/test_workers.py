"""Two ``sidecar.workers`` processes share one spool file: both accept, one delivers,
every answered event arrives once its turn comes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
from support.clients import post, until
from support.common import AGENT
from support.spool_runtime import RecordingRuntime, SpoolSidecar, spool_doc


@pytest.mark.slow
async def test_two_workers_share_one_spool(
    short_tmp: Path, recorder: RecordingRuntime, sidecars: Callable[..., SpoolSidecar]
) -> None:
    doc = spool_doc(short_tmp)
    doc["sidecar"]["workers"] = 2
    sidecar = sidecars(short_tmp, doc).start(timeout=30)
    await until(lambda: sidecar.admin("/readyz")[0] == 200, timeout=30)

    async def one(i: int) -> str:
        status, _, body = await post(
            sidecar.url + "/hooks/agent", {"agent": AGENT, "message": f"m{i}"}
        )
        assert status == 200, body
        return str(body["eventId"])

    ids = await asyncio.gather(*(one(i) for i in range(60)))
    await until(lambda: len({c["key"] for c in recorder.delivered}) == 60, timeout=30)
    assert {c["key"] for c in recorder.delivered} == {f"evt:{i}" for i in ids}
    assert sidecar.stop() == 0
