"""Response bodies of the public API (SPEC §3), built with as little work as possible.

Error bodies differ only in their request id, so each (code, message) pair is
serialised once and the id is spliced in; request ids are restricted to
``[A-Za-z0-9._-]`` and need no escaping.
"""

from __future__ import annotations

import json
from functools import lru_cache

from aiohttp import web

from .pipeline import Reject

JSON = "application/json"


@lru_cache(maxsize=512)
def _error_prefix(code: str, message: str) -> bytes:
    text = json.dumps({"status": "error", "error": code, "message": message, "requestId": ""})
    return text[:-2].encode()  # cut the closing '"}'


def error_body(code: str, message: str, request_id: str) -> bytes:
    return _error_prefix(code, message) + request_id.encode() + b'"}'


def error_response(reject: Reject, request_id: str) -> web.Response:
    headers = {"X-Request-Id": request_id}
    if reject.headers:
        headers.update(reject.headers)
    return web.Response(
        status=reject.status,
        body=error_body(reject.code, reject.message, request_id),
        content_type=JSON,
        headers=headers,
    )


def ok_response(
    session: str, request_id: str, run_id: str | None, extra_headers: dict[str, str] | None
) -> web.Response:
    payload: dict[str, object] = {
        "status": "ok",
        "session": session,
        "queued": True,
        "requestId": request_id,
    }
    if run_id is not None:
        payload["runId"] = run_id
    headers = {"X-Request-Id": request_id}
    if extra_headers:
        headers.update(extra_headers)
    return web.Response(body=json.dumps(payload).encode(), content_type=JSON, headers=headers)


INTERNAL_ERROR = Reject(500, "internal_error", "internal error; see the sidecar log")
