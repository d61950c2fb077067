"""SIGKILL at random moments while calls stream in: every call answered 200 reaches the
runtime after a restart, never under a new Idempotency-Key (docs/spool.md)."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
from support.clients import until
from support.common import AGENT, SECRET
from support.spool_runtime import RecordingRuntime, SpoolSidecar, spool_doc

ROUNDS = 3
CLIENTS = 6


async def stream_until_killed(
    sidecar: SpoolSidecar, tag: str, answered: dict[str, str], rng: random.Random
) -> None:
    """Several clients post as fast as answers come; the sidecar is SIGKILLed after a
    random moment. ``answered`` gets requestId -> eventId of every 200."""
    stop = asyncio.Event()

    async def client(n: int) -> None:
        timeout = aiohttp.ClientTimeout(total=5)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            i = 0
            while not stop.is_set():
                rid = f"{tag}-{n}-{i}"
                i += 1
                session_key = f"s{rng.randrange(3)}"
                body = {"agent": AGENT, "message": rid, "sessionKey": session_key}
                headers = {"Authorization": f"Bearer {SECRET}"}
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with session.post(
                        sidecar.url + "/hooks/agent", json=body, headers=headers
                    ) as resp:
                        if resp.status == 200:
                            # The sidecar's own id: a client's X-Request-Id is adopted
                            # only from a trusted proxy (docs/connections.md).
                            reply = await resp.json()
                            answered[reply["requestId"]] = reply["eventId"]
                        else:
                            await asyncio.sleep(0.01)

    tasks = [asyncio.create_task(client(n)) for n in range(CLIENTS)]
    await asyncio.sleep(rng.uniform(0.2, 1.2))
    assert sidecar.proc is not None
    sidecar.proc.kill()
    await asyncio.to_thread(sidecar.wait)
    stop.set()
    await asyncio.gather(*tasks)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["down", "flap", "stall"])
async def test_sigkill_loses_no_answered_event_and_keeps_its_key(
    mode: str,
    short_tmp: Path,
    recorder: RecordingRuntime,
    sidecars: Callable[..., SpoolSidecar],
) -> None:
    rng = random.Random()
    if mode == "down":
        await recorder.stop()
    else:
        recorder.mode = mode  # flap: every other delivery 503; stall: no answer in time
    doc = spool_doc(short_tmp, retry={"initial": "50ms", "max": "200ms"}, concurrency=4)
    doc["sidecar"]["upstream"]["timeout"] = "300ms"
    answered: dict[str, str] = {}
    for round_ in range(ROUNDS):
        sidecar = sidecars(short_tmp, doc).start()
        await stream_until_killed(sidecar, f"{mode}{round_}", answered, rng)
    assert len(answered) > 20, "the stream must have been answered before the kills"
    if mode == "down":
        await recorder.start()
    recorder.mode = "ok"
    sidecars(short_tmp, doc).start()

    def all_delivered() -> bool:
        return set(answered) <= {c["body"]["requestId"] for c in recorder.delivered}

    await until(all_delivered, timeout=60)
    for rid, event_id in answered.items():
        # Every attempt of an answered event, before and after the kills, used one key.
        assert recorder.keys_of(rid) == {f"evt:{event_id}"}, rid
