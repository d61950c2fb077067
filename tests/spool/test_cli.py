"""``webhook-sidecar spool stats|list|show|replay|drop`` against a running sidecar."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from support.clients import post
from support.common import AGENT
from support.spool_runtime import RecordingRuntime, SpoolSidecar, spool_doc

SECRET_TEXT = "the-message-only-show-prints"


async def test_cli_while_the_server_runs(
    short_tmp: Path, recorder: RecordingRuntime, sidecars: Callable[..., SpoolSidecar]
) -> None:
    await recorder.stop()
    sidecar = sidecars(short_tmp, spool_doc(short_tmp)).start()
    ids = []
    for i in range(3):
        body = {"agent": AGENT, "message": SECRET_TEXT, "sessionKey": f"s{i}"}
        status, _, reply = await post(sidecar.url + "/hooks/agent", body)
        assert status == 200
        ids.append(reply["eventId"])
    stats = sidecar.cli("stats", "--json")
    assert stats.returncode == 0, stats.stderr
    doc = json.loads(stats.stdout)
    assert set(doc) == {"pending", "dead", "oldestPendingAgeSeconds", "bytes"}
    assert doc["pending"] == 3 and doc["dead"] == 0 and doc["bytes"] > 0
    assert doc["oldestPendingAgeSeconds"] >= 0
    listed = sidecar.cli("list", "--json", "--limit", "2")
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [r["id"] for r in rows] == ids[:2]  # oldest first, limited
    assert set(rows[0]) == {
        "id", "state", "endpoint", "route", "agent", "sessionKey", "attempts", "ageSeconds",
        "lastStatus", "lastError",
    }  # fmt: skip
    assert rows[0]["state"] == "pending" and rows[0]["endpoint"] == "agent"
    text = sidecar.cli("list")
    assert ids[0] in text.stdout
    for out in (stats, listed, text):
        assert SECRET_TEXT not in out.stdout + out.stderr  # only show prints message text
    shown = sidecar.cli("show", ids[0])
    assert shown.returncode == 0 and SECRET_TEXT in shown.stdout
    assert "Authorization" not in shown.stdout  # the upstream token is never stored
    assert sidecar.cli("show", "nope").returncode == 1
    dropped = sidecar.cli("drop", ids[1])
    assert dropped.returncode == 0, dropped.stderr
    audit = json.loads(dropped.stderr.splitlines()[-1])
    assert audit["action"] == "spool_drop" and audit["ids"] == [ids[1]]
    assert json.loads(sidecar.cli("stats", "--json").stdout)["pending"] == 2
    assert sidecar.cli("replay").returncode == 2  # ids or --all-dead
    assert sidecar.cli("replay", "--all-dead").returncode == 0
    await recorder.start()
    from support.clients import until

    expected = {f"evt:{ids[0]}", f"evt:{ids[2]}"}
    await until(lambda: expected <= {c["key"] for c in recorder.delivered}, timeout=20)
    await until(lambda: json.loads(sidecar.cli("stats", "--json").stdout)["pending"] == 0)
