"""Request body: size, arrival time, media type, JSON syntax and the fields of each hook.

In docs/http-api.md order: 413 from ``Content-Length`` before a byte is read (and while
reading a chunked body), 408 when the body does not arrive within
``limits.bodyTimeout``, 415 unless ``application/json`` in UTF-8, 400
``invalid_json`` unless one JSON object without duplicate keys, NaN or
Infinity, 400 ``invalid_request`` naming the field that is missing, of the
wrong type, unknown or out of bounds.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from functools import partial
from typing import Any

from aiohttp import ClientPayloadError, HttpVersion11
from aiohttp.streams import EofStream

from ..call import Call, Guard, Reject
from ..settings import AGENT_NAME, SESSION_KEY, Settings

FIELDS = {
    "wake": {"agent": True, "sessionKey": False},
    "agent": {"agent": True, "message": True, "sessionKey": False},
}
IDEMPOTENCY_KEY_MAX = 256

_UNSUPPORTED = partial(
    Reject, 415, "unsupported_media_type", "Content-Type must be application/json (UTF-8)"
)
_INCOMPLETE = partial(
    Reject, 400, "invalid_request", "the connection closed before the body was complete"
)
_TIMEOUT = partial(Reject, 408, "request_timeout", "the request body did not arrive in time")


class _DuplicateKey(ValueError):
    pass


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _DuplicateKey("duplicate key")
    return obj


def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    # float("1e999") is inf: a number no JSON encoder can write back, so the runtime
    # would receive "Infinity" (not JSON) or a different value. Refused like NaN.
    value = float(text)
    if value in (_INF, -_INF):
        raise ValueError("number out of range")
    return value


_INF = float("inf")


# One decoder for the process: json.loads with hooks builds a new one (and its C scanner)
# on every call.
_DECODER = json.JSONDecoder(
    object_pairs_hook=_unique_object, parse_constant=_no_constants, parse_float=_finite_float
)


def decode_object(body: bytes) -> dict[str, Any]:
    """One JSON object from UTF-8 bytes, or ``Reject(400, invalid_json)``."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise _invalid_json("the body is not valid UTF-8") from None
    try:
        value = _DECODER.decode(text)
    except _DuplicateKey:
        raise _invalid_json("the body has a duplicate key") from None
    except RecursionError:
        raise _invalid_json("the body is nested too deeply") from None
    except ValueError:  # JSONDecodeError, NaN/Infinity, 1e999, over-long integers
        raise _invalid_json("the body is not valid JSON") from None
    if not isinstance(value, dict):
        raise _invalid_json("the body must be a JSON object")
    return value


def _invalid_json(message: str) -> Reject:
    return Reject(400, "invalid_json", message)


def invalid_request(message: str) -> Reject:
    return Reject(400, "invalid_request", message)


def _valid_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates such as "\ud800"
        return False
    return True


def validate_fields(endpoint: str, body: dict[str, Any], max_message_chars: int) -> None:
    """Raise ``invalid_request`` naming the first field that is not as the hook expects."""
    fields = FIELDS[endpoint]
    for key in body:
        if key not in fields:
            raise invalid_request(f"unknown field {key[:64]!r} for /hooks/{endpoint}")
    for key, required in fields.items():
        if required and key not in body:
            raise invalid_request(f"field {key!r} is required")
    agent = body["agent"]
    if not isinstance(agent, str) or not AGENT_NAME.fullmatch(agent):
        raise invalid_request("field 'agent' must be an agent name string")
    if "message" in fields:
        message = body["message"]
        if not isinstance(message, str) or not message.strip():
            raise invalid_request("field 'message' must be a non-empty string")
        if len(message) > max_message_chars:
            raise invalid_request(f"field 'message' is longer than {max_message_chars} characters")
        if not _valid_unicode(message):
            raise invalid_request("field 'message' is not valid Unicode")
    if "sessionKey" in body:  # present means a string: ``null`` is a wrong type, not "no key"
        session = body["sessionKey"]
        if not isinstance(session, str) or not SESSION_KEY.fullmatch(session):
            raise invalid_request(
                "field 'sessionKey' must be a string matching [A-Za-z0-9][A-Za-z0-9._:@-]{0,127}"
            )


def _check_idempotency_key(call: Call) -> None:
    keys = call.request.headers.getall("Idempotency-Key", ())
    if not keys:
        return
    if len(keys) > 1:
        raise invalid_request("header 'Idempotency-Key' must appear at most once")
    key = keys[0]
    if not 0 < len(key) <= IDEMPOTENCY_KEY_MAX or not key.isascii() or not key.isprintable():
        raise invalid_request(
            f"header 'Idempotency-Key' must be 1 to {IDEMPOTENCY_KEY_MAX} "
            "printable ASCII characters"
        )
    call.idempotency_key = key


def json_body(settings: Settings) -> Guard:
    """Reads and validates the body into ``call.body`` (async: it waits for the bytes)."""
    limits = settings.sidecar.limits
    max_bytes = limits.max_body_bytes
    too_large = partial(
        Reject, 413, "payload_too_large", f"the body is larger than {max_bytes} bytes"
    )

    async def guard(call: Call) -> None:
        request = call.request
        body = await read_body(request, max_bytes, limits.body_timeout, too_large)
        if request.content_type != "application/json":
            raise _UNSUPPORTED()
        check_utf8(request)
        _check_idempotency_key(call)
        decoded = decode_object(body)
        validate_fields(call.endpoint, decoded, limits.max_message_chars)
        call.body = decoded

    return guard


async def read_body(
    request: Any, max_bytes: int, timeout: float, too_large: Callable[[], Reject]
) -> bytes:
    """The whole body: 413 past ``max_bytes`` (from Content-Length before reading, and
    while reading), 408 when it does not arrive within ``timeout``."""
    length = request.content_length
    if length is not None and length > max_bytes:
        raise too_large()
    if request.headers.get("Expect") is not None:
        await _continue(request)
    stream = request.content
    try:
        if stream.is_eof():  # the whole body came with the head: take it, no waiting
            body: bytes = stream.read_nowait()
            if len(body) > max_bytes:
                raise too_large()
            return body
        async with asyncio.timeout(timeout):
            return await _read_limited(stream, max_bytes, too_large)
    except TimeoutError:
        raise _TIMEOUT() from None
    except (ConnectionError, EofStream, ClientPayloadError):
        # The client hung up (or broke the framing) mid-body: nobody will read
        # this answer, but the audit log records an incomplete request, not a bug.
        raise _INCOMPLETE() from None


def check_utf8(request: Any) -> None:
    """415 unless the body's charset is absent or UTF-8."""
    charset = request.charset
    if charset is not None and charset.lower() not in ("utf-8", "utf8"):
        raise _UNSUPPORTED()


async def _continue(request: Any) -> None:
    """Answer ``Expect: 100-continue`` (RFC 9110 §10.1.1) now that the body is wanted.

    Sent here rather than on arrival, so a call refused earlier (a bad token) is
    answered without the client sending its body. Other expectations are ignored,
    which the RFC allows (a 417 is a MAY)."""
    if request.version == HttpVersion11 and request.headers["Expect"].lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the interim response is not the answer's size


async def _read_limited(stream: Any, max_bytes: int, too_large: Callable[[], Reject]) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await stream.readany()
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > max_bytes:
            raise too_large()
        chunks.append(chunk)
