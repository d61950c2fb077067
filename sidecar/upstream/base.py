"""What every forwarder shares: one exchange with the runtime under ``upstream.timeout``,
transport failures mapped to docs/http-api.md codes, and the small helpers for building
requests and reading replies.

A forwarder turns a validated :class:`~sidecar.call.Call` into the parts of the
upstream request (``parts``: path, body, headers without the upstream token or the
``Idempotency-Key``), sends them with those two added (``exchange``) and maps the
reply (``reply``) to a runId or a :class:`~sidecar.call.Reject`. The spool stores
``parts`` and later calls ``exchange`` itself (docs/spool.md), so a spooled call
reaches the runtime byte for byte as a direct one would. Each protocol module
(``forward``, ``openclaw``) supplies ``parts`` and ``reply``; the transport side
is the same for both: no reply within the timeout is 504, no connection is 503,
an unparseable reply is 502.
"""

from __future__ import annotations

import asyncio
import json
import logging

from ..call import Call, Reject
from ..settings import Settings
from .pool import Pool, Response, UpstreamConnectError, UpstreamProtocolError

log = logging.getLogger("sidecar.upstream")

RETRY_AFTER_UNREACHABLE = "5"
# What the runtime receives, minus Authorization and Idempotency-Key: path, body, headers.
Parts = tuple[str, bytes, list[tuple[str, str]]]
UPSTREAM_TIMEOUT_MESSAGE = "the agent runtime did not answer in time"
_MAX_RUN_ID = 256


def unavailable(message: str, retry_after: str = RETRY_AFTER_UNREACHABLE) -> Reject:
    return Reject(503, "upstream_unavailable", message, {"Retry-After": retry_after})


def retry_after_of(response: Response) -> str:
    """The runtime's Retry-After if it is delta-seconds, else our default."""
    value = response.headers.get(b"retry-after", b"").strip()
    if value.isdigit() and len(value) <= 6:
        return value.decode()
    return RETRY_AFTER_UNREACHABLE


def json_object_of(response: Response) -> dict[str, object] | None:
    """The reply body as a JSON object, or None when it is not one."""
    if not response.body:
        return None
    try:
        body = json.loads(response.body)
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def run_id_of(response: Response) -> str | None:
    """A string ``runId`` from a JSON object reply, if there is one."""
    body = json_object_of(response)
    run_id = body.get("runId") if body is not None else None
    if isinstance(run_id, str) and 0 < len(run_id) <= _MAX_RUN_ID:
        return run_id
    return None


def request_bytes(
    path: str, host: str, headers: list[tuple[str, str]], body: bytes, method: str = "POST"
) -> bytes:
    head = [f"{method} {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}"]
    head += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


def header_value(value: bytes) -> str:
    """``value`` as a header value; refuses CR/LF/NUL, which would split or end headers."""
    if any(c in value for c in b"\r\n\0"):
        raise ValueError("header value contains a line break")
    return value.decode("latin-1")


def idempotency_key(key: str | None) -> list[tuple[str, str]]:
    """The ``Idempotency-Key`` header: the client's (validated by the body guard), the
    one a route made from the sender's delivery id (docs/upstream.md), or the spool's."""
    return [] if key is None else [("Idempotency-Key", key)]


class BaseForwarder:
    """Sends a validated call to the runtime and returns its runId, or raises a Reject.

    Subclasses say what the runtime receives (``build``) and what its replies mean
    (``reply``); sending, timeouts and transport failures are handled here.
    """

    def __init__(self, settings: Settings, pool: Pool) -> None:
        upstream = settings.sidecar.upstream
        self.pool = pool
        self.timeout = upstream.timeout
        self.host = upstream.host if upstream.url else "localhost"
        # Where the runtime was looked for, for the operator reading the log.
        self.where = upstream.url or upstream.socket or ""

    # Where Authorization goes: before the other headers (openclaw) or after them.
    auth_first = False
    auth_header: str | None = None

    def parts(self, call: Call) -> Parts:
        """Path, body and headers of the upstream request, without the upstream token
        and the Idempotency-Key (what the spool stores)."""
        raise NotImplementedError

    def reply(self, call: Call, response: Response) -> str | None:
        raise NotImplementedError

    def request(self, parts: Parts, auth: str | None, key: str | None) -> bytes:
        """The request bytes: ``parts`` with ``Authorization: auth`` and the key added."""
        path, body, headers = parts
        auth_header = [] if auth is None else [("Authorization", auth)]
        headers = auth_header + headers if self.auth_first else headers + auth_header
        return request_bytes(path, self.host, headers + idempotency_key(key), body)

    def build(self, call: Call) -> bytes:
        return self.request(self.parts(call), self.auth_header, call.idempotency_key)

    async def exchange(self, parts: Parts, key: str | None, request_id: str) -> Response:
        """One delivery of ``parts`` with the current upstream token; Rejects for
        transport failures (see :meth:`send`)."""
        return await self.send(self.request(parts, self.auth_header, key))

    async def __call__(self, call: Call) -> str | None:
        response = await self.exchange(self.parts(call), call.idempotency_key, call.request_id)
        return self.reply(call, response)

    async def send(self, raw: bytes) -> Response:
        """One exchange with the runtime under ``upstream.timeout``, failures as Rejects."""
        try:
            async with asyncio.timeout(self.timeout):
                return await self.pool.request(raw)
        except TimeoutError:
            raise Reject(504, "upstream_timeout", UPSTREAM_TIMEOUT_MESSAGE) from None
        except UpstreamConnectError as exc:
            log.warning(
                "runtime unreachable at %s: %s", self.where, exc, extra={"upstream": self.where}
            )
            raise unavailable("the agent runtime is not reachable") from None
        except UpstreamProtocolError as exc:
            log.warning("runtime reply unusable: %s", exc)
            raise Reject(502, "upstream_error", "the agent runtime sent an invalid reply") from None

    async def probe(self) -> None:
        """Raises UpstreamConnectError unless the runtime accepts a connection."""
        await self.pool.probe()
