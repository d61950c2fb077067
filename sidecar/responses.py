"""Responses of the public API (docs/http-api.md), written with as little work as possible.

Every reply of the public listener is a small JSON document with a handful of
headers that this module knows in advance. :class:`JsonReply` therefore writes
its whole head in one formatted string and skips aiohttp's general response
machinery (a header multidict, content-type parsing, per-header validation and
serialisation, the compression and chunking branches): about a third of the
cost of a refusal on the framework's own path (docs/performance.md).

Error bodies differ only in their request id, so each (code, message) pair is
serialised once and the id is spliced in; request ids are restricted to
``[A-Za-z0-9._-]`` and need no escaping. Success bodies are spelled out with
the C string encoder, byte for byte what ``json.dumps`` wrote.

Header values come only from this package (constants, numbers, validated
request ids), never from the request, so they cannot carry a CR or LF.
"""

from __future__ import annotations

import json
import time
from email.utils import formatdate
from functools import lru_cache
from http import HTTPStatus

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from multidict import CIMultiDict, CIMultiDictProxy

from .call import Answer, Reject

_quote = json.encoder.encode_basestring_ascii  # what json.dumps uses for str
_REASONS = {s.value: s.phrase for s in HTTPStatus}


class _Date:
    """The ``Date`` header (RFC 9110 §6.6.1), formatted once per second."""

    second = -1
    text = ""

    @classmethod
    def now(cls) -> str:
        second = int(time.time())
        if second != cls.second:
            cls.text = formatdate(second, usegmt=True)
            cls.second = second
        return cls.text


class JsonReply(web.StreamResponse):
    """A complete ``application/json`` response written with one transport write.

    aiohttp's request handler only calls :meth:`prepare` and :meth:`write_eof` and
    then reads :attr:`keep_alive`; this class does the same job as ``web.Response``
    for the one shape of reply the public API has. What aiohttp decides per request
    is kept: the HTTP version of the status line, keep-alive and the ``Connection``
    header (RFC 9112 §9.3), no body for ``HEAD`` (RFC 9110 §9.3.2) and waiting for
    the client to read when the transport's buffer is full (back-pressure).
    No ``Server`` header: the framework's version is nobody's business.
    """

    # Read-only: aiohttp adding a header to this response would be a bug to hear about.
    _headers: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())  # type: ignore[assignment]

    def __init__(self, status: int, body: bytes, request_id: str, headers: str = "") -> None:
        # Not StreamResponse.__init__: its header multidict and state mapping are never
        # used here, and building them was a fifth of this class's cost. The class-level
        # defaults of StreamResponse cover every other attribute aiohttp reads.
        reason = _REASONS.get(status, "")
        self._status, self._reason = status, reason
        self._reply = body
        self._head = (
            f" {status} {reason}\r\nContent-Type: application/json\r\n"
            f"X-Request-Id: {request_id}\r\n{headers}Content-Length: {len(body)}\r\n"
        )

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if self._eof_sent:
            return None
        keep_alive = self._keep_alive
        if keep_alive is None:
            keep_alive = self._keep_alive = request.keep_alive
        minor = request.version.minor
        if keep_alive:
            connection = "Connection: keep-alive\r\n" if minor == 0 else ""
        else:
            connection = "Connection: close\r\n" if minor == 1 else ""
        head = f"HTTP/1.{minor}{self._head}Date: {_Date.now()}\r\n{connection}\r\n".encode()
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client has gone")  # aiohttp: "reset", no reply
        transport.write(head if request.method == "HEAD" else head + self._reply)
        self._eof_sent = True
        writer = request.writer
        if transport.get_write_buffer_size():  # the client is not reading as fast:
            await writer.drain()  # wait if the transport paused us (back-pressure)
        return writer


@lru_cache(maxsize=512)
def _error_prefix(code: str, message: str) -> bytes:
    text = json.dumps({"status": "error", "error": code, "message": message, "requestId": ""})
    return text[:-2].encode()  # cut the closing '"}'


def error_body(code: str, message: str, request_id: str) -> bytes:
    return _error_prefix(code, message) + request_id.encode() + b'"}'


def header_lines(headers: dict[str, str] | None) -> str:
    """``Name: value\\r\\n`` for each header (names and values from this package only)."""
    if not headers:
        return ""
    return "".join([f"{name}: {value}\r\n" for name, value in headers.items()])


def error_response(reject: Reject, request_id: str) -> JsonReply:
    body = error_body(reject.code, reject.message, request_id)
    return JsonReply(reject.status, body, request_id, header_lines(reject.headers))


def ok_response(
    session: str,
    request_id: str,
    run_id: str | None,
    extra_headers: dict[str, str] | None,
    event_id: str | None = None,
) -> JsonReply:
    body = (
        f'{{"status": "ok", "session": {_quote(session)}, "queued": true, '
        f'"requestId": {_quote(request_id)}'
    )
    if event_id is not None:  # spooled (docs/spool.md): on disk, not yet delivered
        body += f', "eventId": {_quote(event_id)}'

    body += "}" if run_id is None else f', "runId": {_quote(run_id)}}}'
    return JsonReply(200, body.encode(), request_id, header_lines(extra_headers))


def answer_response(answer: Answer, request_id: str) -> JsonReply:
    """A 200 that was not forwarded (:class:`Answer`)."""
    doc: dict[str, object] = {} if answer.bare else {"status": "ok"}
    doc.update(answer.fields)
    if not answer.bare:
        doc["requestId"] = request_id
    return JsonReply(200, json.dumps(doc).encode(), request_id)


INTERNAL_ERROR = Reject(500, "internal_error", "internal error; see the sidecar log")
