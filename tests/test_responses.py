"""Response bodies: the hand-spelled success body is what json.dumps would write."""

from __future__ import annotations

import json

import pytest

from sidecar.pipeline import Reject
from sidecar.responses import error_response, ok_response


@pytest.mark.parametrize(
    ("session", "run_id"),
    [
        ("webhook-session", "r1"),
        ("hook:a", None),
        ('quo"te\\back', 'ru"n\n\u00e9'),
        ("\u2028", "\ud800"),
    ],
)
def test_ok_body_is_byte_for_byte_json_dumps(session: str, run_id: str | None) -> None:
    response = ok_response(session, "rid-1", run_id, {"RateLimit": '"ip";r=1;t=0'})
    want: dict[str, object] = {
        "status": "ok",
        "session": session,
        "queued": True,
        "requestId": "rid-1",
    }
    if run_id is not None:
        want["runId"] = run_id
    assert response.body == json.dumps(want).encode()
    assert response.content_type == "application/json"
    assert response.headers["X-Request-Id"] == "rid-1"
    assert response.headers["RateLimit"] == '"ip";r=1;t=0'


def test_error_response_carries_its_headers_and_json_type() -> None:
    response = error_response(Reject(429, "rate_limited", "slow", {"Retry-After": "3"}), "rid-2")
    assert response.status == 429
    assert response.content_type == "application/json"
    assert response.headers["Retry-After"] == "3"
    assert json.loads(response.body) == {  # type: ignore[arg-type]
        "status": "error",
        "error": "rate_limited",
        "message": "slow",
        "requestId": "rid-2",
    }
