"""Bearer auth over several secrets: the header grammar, validity windows that open and
close while the sidecar runs (no reload), agent scopes, and what auth tells the lockout,
the metrics and the log."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from prometheus_client import generate_latest
from support.clients import post
from support.common import AGENT, SECRET, Runtime, base_doc

from sidecar.guards.auth import parse_bearer

SOON = secrets.token_hex(32)
ENDING = secrets.token_hex(32)
CI = secrets.token_hex(32)


def rfc3339(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).isoformat(timespec="milliseconds")


@pytest.mark.parametrize(
    ("values", "token"),
    [
        (["Bearer abc"], b"abc"),
        (["bearer abc"], b"abc"),  # the scheme is case-insensitive (RFC 7235 §2.1)
        (["BEARER abc"], b"abc"),
        (["Bearer  abc"], b" abc"),  # only the one space is the separator: no trimming
        (["Bearer abc "], b"abc "),
        (["Bearer \udcff"], b"\xff"),  # raw header bytes come back byte for byte
        ([], None),
        (["Bearer abc", "Bearer abc"], None),  # two headers: refused, not "first wins"
        (["Bearer "], None),
        (["Bearer"], None),
        (["Basic abc"], None),
        (["Bearerabc"], None),
        (["Bearer\tabc"], None),
        (["Token abc"], None),
    ],
)
def test_parse_bearer(values: list[str], token: bytes | None) -> None:
    assert parse_bearer(values) == token


def windows_doc(runtime: Runtime, opens: float, closes: float) -> dict[str, Any]:
    doc = base_doc(runtime.path)
    del doc["webhooks"]["secret"]
    doc["webhooks"]["agents"]["devops-agent"] = {}
    doc["webhooks"]["secrets"] = [
        {"id": "current", "env": "TEST_WEBHOOK_SECRET"},
        {"id": "next", "value": SOON, "notBefore": rfc3339(opens)},
        {"id": "previous", "value": ENDING, "notAfter": rfc3339(closes)},
        {"id": "ci", "value": CI, "agents": ["devops-agent"]},
    ]
    return doc


async def test_windows_open_and_close_while_running(make_sidecar: Any, runtime: Runtime) -> None:
    """No reload: each request checks the windows against the clock."""
    edge = time.time() + 1.5
    sc = await make_sidecar(windows_doc(runtime, edge, edge))
    url = str(sc.client.make_url("/hooks/wake"))
    status, headers, body = await post(url, token=SOON)
    assert (status, body["error"]) == (401, "unauthorized")  # not yet valid
    assert headers["WWW-Authenticate"] == 'Bearer realm="webhooks"'
    assert (await post(url, token=ENDING))[0] == 200
    await asyncio.sleep(max(0.0, edge - time.time()) + 0.1)
    assert (await post(url, token=SOON))[0] == 200
    status, _, body = await post(url, token=ENDING)
    assert (status, body["error"]) == (401, "unauthorized")  # expired
    assert [c["secretId"] for c in runtime.calls] == ["previous", "next"]


async def test_a_match_outside_its_window_is_logged_by_id_and_counts_as_a_failure(
    make_sidecar: Any, runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    doc = windows_doc(runtime, opens=time.time() + 3600, closes=time.time() - 1)
    doc["sidecar"]["authLockout"] = {"maxFailures": 2}
    sc = await make_sidecar(doc)
    url = str(sc.client.make_url("/hooks/wake"))
    with caplog.at_level(logging.WARNING, logger="sidecar.auth"):
        assert (await post(url, token=ENDING))[0] == 401
        assert (await post(url, token=SOON))[0] == 401
    assert (await post(url))[0] == 429  # two failures: even the current secret is locked out
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "'previous' outside its validity window" in logged
    assert "'next' outside its validity window" in logged
    assert ENDING not in caplog.text and SOON not in caplog.text


async def test_scoped_secret_works_for_its_agent_only(make_sidecar: Any, runtime: Runtime) -> None:
    doc = windows_doc(runtime, time.time() + 3600, time.time() + 7200)
    doc["sidecar"]["authLockout"] = {"maxFailures": 1}
    sc = await make_sidecar(doc)
    url = str(sc.client.make_url("/hooks/wake"))
    assert (await post(url, {"agent": "devops-agent"}, token=CI))[0] == 200
    status, _, body = await post(url, {"agent": AGENT}, token=CI)
    assert (status, body["error"]) == (403, "agent_not_permitted")
    # Out of scope is not a failed authentication: no lockout from it.
    assert (await post(url, {"agent": AGENT}))[0] == 200
    assert [c["secretId"] for c in runtime.calls] == ["ci", "current"]


async def test_each_use_is_counted_by_secret_id(make_sidecar: Any, runtime: Runtime) -> None:
    """What a rotation watches fall to zero: auth_success_total{secret=...}."""
    sc = await make_sidecar(windows_doc(runtime, time.time() + 3600, time.time() + 7200))
    url = str(sc.client.make_url("/hooks/wake"))
    for token in (SECRET, ENDING, ENDING):
        assert (await post(url, token=token))[0] == 200
    await post(url, token="wrong")
    text = generate_latest(sc.state.metrics.registry).decode()
    assert 'webhook_sidecar_auth_success_total{secret="current"} 1.0' in text
    assert 'webhook_sidecar_auth_success_total{secret="previous"} 2.0' in text
    assert 'webhook_sidecar_auth_success_total{secret="next"} 0.0' in text
    assert 'webhook_sidecar_secret_not_after_timestamp_seconds{secret="previous"}' in text
