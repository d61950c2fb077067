"""``protocol: "forward"``: the seed's API, normalized, to a runtime on a Unix socket or loopback.

What the runtime receives is built here from validated fields only: the
canonical path, a fresh JSON body, and a fixed set of headers. Nothing the
client sent (its Authorization, cookies, forwarding headers) is copied.

Replies map to SPEC §3: any 2xx is success (a string ``runId`` in a JSON body
is passed back); 429 and 503 mean "busy": 503 ``upstream_unavailable`` with the
runtime's ``Retry-After``; any other status is 502 ``upstream_error``; no
connection is 503 and no reply within ``upstream.timeout`` is 504.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from ..config import Settings
from ..pipeline import Call, Reject
from .pool import Pool, Response, UpstreamConnectError, UpstreamProtocolError

log = logging.getLogger("sidecar.upstream")

RETRY_AFTER_UNREACHABLE = "5"
_MAX_RUN_ID = 256


def unavailable(message: str, retry_after: str = RETRY_AFTER_UNREACHABLE) -> Reject:
    return Reject(503, "upstream_unavailable", message, {"Retry-After": retry_after})


UPSTREAM_TIMEOUT_MESSAGE = "the agent runtime did not answer in time"


def retry_after_of(response: Response) -> str:
    """The runtime's Retry-After if it is delta-seconds, else our default."""
    value = response.headers.get(b"retry-after", b"").strip()
    if value.isdigit() and len(value) <= 6:
        return value.decode()
    return RETRY_AFTER_UNREACHABLE


def run_id_of(response: Response) -> str | None:
    """A string ``runId`` from a JSON object reply, if there is one."""
    if not response.body:
        return None
    try:
        body = json.loads(response.body)
    except ValueError:
        return None
    run_id = body.get("runId") if isinstance(body, dict) else None
    if isinstance(run_id, str) and 0 < len(run_id) <= _MAX_RUN_ID:
        return run_id
    return None


def make_pool(settings: Settings) -> Pool:
    upstream = settings.sidecar.upstream
    if upstream.socket is not None:
        return Pool.unix(upstream.socket)
    return Pool.tcp(upstream.host, upstream.port)


def request_bytes(path: str, host: str, headers: list[tuple[str, str]], body: bytes) -> bytes:
    head = [f"POST {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}"]
    head += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


class Forwarder:
    """Sends a validated call to a ``forward``-protocol runtime; returns its runId."""

    def __init__(self, settings: Settings, pool: Pool) -> None:
        upstream = settings.sidecar.upstream
        self.pool = pool
        self.timeout = upstream.timeout
        self.host = upstream.host if upstream.url else "localhost"
        token = upstream.token
        # Header values are validated here once: a token with CR/LF would split headers.
        self.auth_header = None if token is None else _header_value(b"Bearer " + token.value)

    def build(self, call: Call) -> bytes:
        agent = call.agent
        assert agent is not None
        body: dict[str, Any] = {"agent": agent.name}
        if call.endpoint == "agent":
            body["message"] = call.body["message"]
        body["sessionKey"] = call.session
        body["requestId"] = call.request_id
        headers = [
            ("Content-Type", "application/json"),
            ("X-Request-Id", call.request_id),
            ("X-Forwarded-For", call.client_ip),
            ("X-Webhook-Secret-Id", call.secret.id if call.secret else ""),
        ]
        if self.auth_header is not None:
            headers.append(("Authorization", self.auth_header))
        idempotency_key = call.request.headers.get("Idempotency-Key")
        if idempotency_key is not None:  # validated by the body guard
            headers.append(("Idempotency-Key", idempotency_key))
        return request_bytes(f"/hooks/{call.endpoint}", self.host, headers, json.dumps(body).encode())

    async def __call__(self, call: Call) -> str | None:
        response = await self.send(self.build(call))
        if 200 <= response.status < 300:
            return run_id_of(response)
        if response.status in (429, 503):
            raise unavailable("the agent runtime is busy", retry_after_of(response))
        log.warning(
            "runtime answered %d", response.status,
            extra={"requestId": call.request_id, "upstreamStatus": response.status},
        )
        raise Reject(502, "upstream_error", f"the agent runtime answered {response.status}")

    async def send(self, raw: bytes) -> Response:
        """One exchange with the runtime under ``upstream.timeout``, failures as Rejects."""
        try:
            async with asyncio.timeout(self.timeout):
                return await self.pool.request(raw)
        except TimeoutError:
            raise Reject(504, "upstream_timeout", UPSTREAM_TIMEOUT_MESSAGE) from None
        except UpstreamConnectError as exc:
            log.warning("runtime unreachable: %s", exc)
            raise unavailable("the agent runtime is not reachable") from None
        except UpstreamProtocolError as exc:
            log.warning("runtime reply unusable: %s", exc)
            raise Reject(502, "upstream_error", "the agent runtime sent an invalid reply") from None

    async def probe(self) -> None:
        """Raises UpstreamConnectError unless the runtime accepts a connection."""
        await self.pool.probe()


def _header_value(value: bytes) -> str:
    if any(c in value for c in b"\r\n\0"):
        raise ValueError("header value contains a line break")
    return value.decode("latin-1")
