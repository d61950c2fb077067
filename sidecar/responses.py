"""Response bodies of the public API (SPEC §3), built with as little work as possible.

Error bodies differ only in their request id, so each (code, message) pair is
serialised once and the id is spliced in; request ids are restricted to
``[A-Za-z0-9._-]`` and need no escaping. Success bodies are spelled out with
the C string encoder, byte for byte what ``json.dumps`` wrote. Content-Type is
passed as a header: aiohttp's ``content_type=`` argument parses it again on
every response.
"""

from __future__ import annotations

import json
from functools import lru_cache

from aiohttp import web

from .pipeline import Reject

JSON = "application/json"
_quote = json.encoder.encode_basestring_ascii  # what json.dumps uses for str


@lru_cache(maxsize=512)
def _error_prefix(code: str, message: str) -> bytes:
    text = json.dumps({"status": "error", "error": code, "message": message, "requestId": ""})
    return text[:-2].encode()  # cut the closing '"}'


def error_body(code: str, message: str, request_id: str) -> bytes:
    return _error_prefix(code, message) + request_id.encode() + b'"}'


def error_response(reject: Reject, request_id: str) -> web.Response:
    headers = {"Content-Type": JSON, "X-Request-Id": request_id}
    if reject.headers:
        headers.update(reject.headers)
    return web.Response(
        status=reject.status,
        body=error_body(reject.code, reject.message, request_id),
        headers=headers,
    )


def ok_response(
    session: str, request_id: str, run_id: str | None, extra_headers: dict[str, str] | None
) -> web.Response:
    body = (
        f'{{"status": "ok", "session": {_quote(session)}, "queued": true, '
        f'"requestId": {_quote(request_id)}'
    )
    body += "}" if run_id is None else f', "runId": {_quote(run_id)}}}'
    headers = {"Content-Type": JSON, "X-Request-Id": request_id}
    if extra_headers:
        headers.update(extra_headers)
    return web.Response(body=body.encode(), headers=headers)


INTERNAL_ERROR = Reject(500, "internal_error", "internal error; see the sidecar log")
