"""Accepting onto the spool and delivering from it, through real processes and sockets."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Callable
from pathlib import Path

from support.clients import post, until
from support.common import AGENT
from support.spool_runtime import RecordingRuntime, SpoolSidecar, spool_doc


async def test_answer_after_commit_then_delivered_with_event_key(
    short_tmp: Path, recorder: RecordingRuntime, sidecars: Callable[..., SpoolSidecar]
) -> None:
    sidecar = sidecars(short_tmp, spool_doc(short_tmp)).start()
    status, _, body = await post(sidecar.url + "/hooks/agent", {"agent": AGENT, "message": "hi"})
    assert status == 200, body
    assert body["queued"] is True and "runId" not in body
    event_id = body["eventId"]
    await until(lambda: recorder.delivered)
    call = recorder.delivered[0]
    assert call["key"] == f"evt:{event_id}"
    assert call["path"] == "/hooks/agent"
    assert call["body"] == {
        "agent": AGENT,
        "message": "hi",
        "sessionKey": "webhook-session",
        "requestId": body["requestId"],
    }
    # The client's own key is what the runtime sees.
    status, _, body = await post(
        sidecar.url + "/hooks/wake", {"agent": AGENT}, headers={"Idempotency-Key": "k-1"}
    )
    assert status == 200
    await until(lambda: len(recorder.delivered) == 2)
    assert recorder.delivered[1]["key"] == "k-1"


async def test_runtime_down_answers_from_disk_and_delivers_later(
    short_tmp: Path, recorder: RecordingRuntime, sidecars: Callable[..., SpoolSidecar]
) -> None:
    await recorder.stop()
    sidecar = sidecars(short_tmp, spool_doc(short_tmp)).start()
    answers = [
        await post(sidecar.url + "/hooks/agent", {"agent": AGENT, "message": f"m{i}"})
        for i in range(5)
    ]
    assert [a[0] for a in answers] == [200] * 5
    # Ready while the runtime is down: the spool can still accept; the body says how both are.
    status, ready = sidecar.admin("/readyz")
    assert status == 200, ready
    assert ready["spool"]["state"] == "ok" and ready["runtime"] != "ok"
    stats = sidecar.cli("stats", "--json")
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout)["pending"] == 5
    await recorder.start()
    await until(lambda: len(recorder.delivered) == 5, timeout=20)
    # One session: delivered in arrival order.
    assert [c["body"]["message"] for c in recorder.delivered] == [f"m{i}" for i in range(5)]
    await until(lambda: json.loads(sidecar.cli("stats", "--json").stdout)["pending"] == 0)
    metrics = sidecar.admin("/metrics")[1]
    assert 'webhook_sidecar_spool_deliveries_total{result="delivered"} 5.0' in metrics
    assert "webhook_sidecar_spool_commit_duration_seconds_count" in metrics


async def test_order_per_session_through_a_flapping_runtime(
    short_tmp: Path, recorder: RecordingRuntime, sidecars: Callable[..., SpoolSidecar]
) -> None:
    recorder.mode = "flap"  # every other call fails with 503: retried, order kept
    doc = spool_doc(short_tmp, retry={"initial": "10ms", "max": "50ms"}, concurrency=4)
    sidecar = sidecars(short_tmp, doc).start()
    sessions = ["s-a", "s-b", "s-c"]
    sent: dict[str, list[str]] = {s: [] for s in sessions}

    async def stream(session: str) -> None:
        for i in range(15):
            message = f"{session}-{i}"
            body = {"agent": AGENT, "message": message, "sessionKey": session}
            status, _, reply = await post(sidecar.url + "/hooks/agent", body)
            assert status == 200, reply
            sent[session].append(message)

    await asyncio.gather(*(stream(s) for s in sessions))
    await until(lambda: len(recorder.delivered) == 45, timeout=30)
    for session in sessions:
        got = [
            c["body"]["message"] for c in recorder.delivered if c["body"]["sessionKey"] == session
        ]
        assert got == sent[session]
    # Never two calls of one session at once: each call after the previous one's answer.
    assert len(recorder.calls) > 45  # the 503s were retried


async def test_retry_after_is_honoured(
    short_tmp: Path, recorder: RecordingRuntime, sidecars: Callable[..., SpoolSidecar]
) -> None:
    recorder.status, recorder.retry_after = 503, "2"
    sidecar = sidecars(short_tmp, spool_doc(short_tmp)).start()
    status, _, _ = await post(sidecar.url + "/hooks/wake", {"agent": AGENT})
    assert status == 200
    await until(lambda: len(recorder.calls) == 1)
    first = recorder.calls[0]["time"]
    recorder.status, recorder.retry_after = 200, None
    await until(lambda: recorder.delivered, timeout=10)
    # retry.max is 500ms: only the runtime's Retry-After explains the wait.
    assert recorder.delivered[0]["time"] - first >= 1.9
    assert recorder.delivered[0]["key"] == recorder.calls[0]["key"]


async def test_backoff_grows_without_retry_after(
    short_tmp: Path, recorder: RecordingRuntime, sidecars: Callable[..., SpoolSidecar]
) -> None:
    recorder.status = 500
    doc = spool_doc(short_tmp, retry={"initial": "200ms", "max": "1s"})
    sidecar = sidecars(short_tmp, doc).start()
    await post(sidecar.url + "/hooks/wake", {"agent": AGENT})
    await until(lambda: len(recorder.calls) >= 4, timeout=15)
    times = [c["time"] for c in recorder.calls[:4]]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(g >= 0.19 for g in gaps), gaps  # never faster than retry.initial
    assert all(g <= 1.5 for g in gaps), gaps  # never slower than retry.max (and some slack)
    assert len({c["key"] for c in recorder.calls}) == 1  # one key across retries


async def test_4xx_is_a_dead_letter_at_once_and_replay_brings_it_back(
    short_tmp: Path, recorder: RecordingRuntime, sidecars: Callable[..., SpoolSidecar]
) -> None:
    recorder.status = 422
    sidecar = sidecars(short_tmp, spool_doc(short_tmp)).start()
    status, _, body = await post(sidecar.url + "/hooks/agent", {"agent": AGENT, "message": "x"})
    assert status == 200
    event_id = body["eventId"]
    await until(lambda: json.loads(sidecar.cli("stats", "--json").stdout)["dead"] == 1)
    assert len(recorder.calls) == 1  # not retried
    listed = sidecar.cli("list", "--dead", "--json")
    dead = [json.loads(line) for line in listed.stdout.splitlines()]
    assert dead[0]["id"] == event_id and dead[0]["state"] == "dead"
    assert dead[0]["lastStatus"] == 422 and "422" in dead[0]["lastError"]
    assert dead[0]["attempts"] == 1
    metrics = sidecar.admin("/metrics")[1]
    assert 'webhook_sidecar_spool_deliveries_total{result="dead"} 1.0' in metrics
    recorder.status = 200
    replay = sidecar.cli("replay", event_id)
    assert replay.returncode == 0, replay.stderr
    await until(lambda: recorder.delivered, timeout=10)
    assert recorder.delivered[0]["key"] == f"evt:{event_id}"


async def test_give_up_after_moves_to_dead_letters(
    short_tmp: Path, recorder: RecordingRuntime, sidecars: Callable[..., SpoolSidecar]
) -> None:
    recorder.status = 503
    doc = spool_doc(short_tmp, retry={"initial": "100ms", "max": "200ms", "giveUpAfter": "1s"})
    sidecar = sidecars(short_tmp, doc).start()
    await post(sidecar.url + "/hooks/wake", {"agent": AGENT})
    await until(lambda: json.loads(sidecar.cli("stats", "--json").stdout)["dead"] == 1, 10)
    dead = json.loads(sidecar.cli("list", "--dead", "--json").stdout)
    assert dead["lastStatus"] == 503 and "gave up" in dead["lastError"]
    # A 503 is retried (a 4xx would be dead after one attempt), always with the same
    # key, and the event is given up only once giveUpAfter has passed. How many
    # retries fit into that second depends on the machine's load, so it is not counted.
    calls = recorder.calls
    assert dead["attempts"] == len(calls) >= 2
    assert {call["key"] for call in calls} == {f"evt:{dead['id']}"}
    assert calls[-1]["time"] - calls[0]["time"] >= 0.1  # at least one backoff apart


async def test_full_spool_refuses_with_retry_after_and_keeps_what_it_has(
    short_tmp: Path, recorder: RecordingRuntime, sidecars: Callable[..., SpoolSidecar]
) -> None:
    await recorder.stop()
    sidecar = sidecars(short_tmp, spool_doc(short_tmp, maxEvents=3)).start()
    for _ in range(3):
        assert (await post(sidecar.url + "/hooks/wake", {"agent": AGENT}))[0] == 200
    status, headers, body = await post(sidecar.url + "/hooks/wake", {"agent": AGENT})
    assert status == 503 and body["error"] == "spool_full"
    assert int(headers["Retry-After"]) > 0
    await until(lambda: sidecar.admin("/readyz")[0] == 503)
    assert "full" in sidecar.admin("/readyz")[1]["reason"]
    await recorder.start()
    await until(lambda: len(recorder.delivered) == 3, timeout=10)
    await until(lambda: sidecar.admin("/readyz")[0] == 200)
    assert (await post(sidecar.url + "/hooks/wake", {"agent": AGENT}))[0] == 200
