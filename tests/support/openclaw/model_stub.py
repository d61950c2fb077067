"""The model stub: an OpenAI-compatible chat-completions server on loopback.

The gateway uses it as its only model provider (``ModelStub.config()``), so
agent runs complete (``status=ok``) without credentials or network, and tests
can read exactly what reached the model: the hook message (inside OpenClaw's
EXTERNAL_UNTRUSTED_CONTENT wrapper), the ``session=agent:main:hook:...`` line
and, for persistent sessions, the earlier turns.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class ModelRequest:
    """One request the gateway sent to the model stub."""

    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    raw: str
    received_at: float

    @property
    def messages(self) -> list[dict[str, Any]]:
        msgs = self.body.get("messages")
        return msgs if isinstance(msgs, list) else []

    def texts(self, role: str | None = None) -> list[str]:
        """Message contents as plain strings (list contents are joined)."""
        out: list[str] = []
        for msg in self.messages:
            if role is not None and msg.get("role") != role:
                continue
            content = msg.get("content")
            if isinstance(content, list):
                content = "\n".join(
                    str(part.get("text", "")) for part in content if isinstance(part, dict)
                )
            out.append(str(content))
        return out

    def contains(self, needle: str) -> bool:
        return any(needle in text for text in self.texts())


class ModelStub:
    """Fake model provider: records every request, answers with a fixed reply.

    The default reply ``NO_REPLY`` is OpenClaw's "nothing to say" token, so a
    finished hook run does not cause a follow-up announcement turn.
    """

    model_id = "echo"
    provider = "stub"

    def __init__(self, reply: str = "NO_REPLY", delay: float = 0.0) -> None:
        self.reply = reply
        self.delay = delay  # seconds before answering a completion (slow-model trials)
        self._release = threading.Event()  # set on stop: delayed answers go out at once
        self._requests: list[ModelRequest] = []
        self._cond = threading.Condition()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._server is not None, "ModelStub not started"
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> ModelStub:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _reply_json(self, status: int, payload: Any) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                stub._record(self, "")
                if self.path.rstrip("/").endswith("/models"):
                    self._reply_json(
                        200,
                        {
                            "object": "list",
                            "data": [{"id": stub.model_id, "object": "model", "owned_by": "stub"}],
                        },
                    )
                else:
                    self._reply_json(404, {"error": {"message": "not found"}})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length).decode("utf-8", "replace")
                body = stub._record(self, raw)
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._reply_json(404, {"error": {"message": "not found"}})
                    return
                if stub.delay > 0:
                    stub._release.wait(stub.delay)
                created = int(time.time())
                base = {"id": "chatcmpl-stub", "created": created, "model": stub.model_id}
                usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
                if not body.get("stream"):
                    self._reply_json(
                        200,
                        {
                            **base,
                            "object": "chat.completion",
                            "choices": [
                                {
                                    "index": 0,
                                    "finish_reason": "stop",
                                    "message": {"role": "assistant", "content": stub.reply},
                                }
                            ],
                            "usage": usage,
                        },
                    )
                    return
                chunks = [
                    {
                        "index": 0,
                        "delta": {"role": "assistant", "content": stub.reply},
                        "finish_reason": None,
                    },
                    {"index": 0, "delta": {}, "finish_reason": "stop"},
                ]
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Connection", "close")
                self.end_headers()
                for i, choice in enumerate(chunks):
                    event = {**base, "object": "chat.completion.chunk", "choices": [choice]}
                    if i == len(chunks) - 1:
                        event["usage"] = usage
                    self.wfile.write(b"data: " + json.dumps(event).encode() + b"\n\n")
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
                self.close_connection = True

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, name="openclaw-model-stub", daemon=True
        )
        self._thread.start()
        return self

    def _record(self, handler: BaseHTTPRequestHandler, raw: str) -> dict[str, Any]:
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = {}
        if not isinstance(body, dict):
            body = {}
        req = ModelRequest(
            path=handler.path,
            headers=dict(handler.headers.items()),
            body=body,
            raw=raw,
            received_at=time.time(),
        )
        with self._cond:
            self._requests.append(req)
            self._cond.notify_all()
        return body

    def release(self) -> None:
        """Answer all delayed requests now (and later ones without delay)."""
        self._release.set()

    @contextlib.contextmanager
    def slowed(self, delay: float) -> Iterator[None]:
        """Inside the block the model answers after ``delay`` seconds; on exit
        the waiting answers go out at once. Keeps an agent run busy."""
        self._release.clear()
        self.delay = delay
        try:
            yield
        finally:
            self.delay = 0.0
            self._release.set()

    def stop(self) -> None:
        self.release()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    @property
    def requests(self) -> list[ModelRequest]:
        with self._cond:
            return list(self._requests)

    def completions(self) -> list[ModelRequest]:
        return [r for r in self.requests if r.path.rstrip("/").endswith("/chat/completions")]

    def wait_for(self, needle: str, timeout: float = 30.0) -> ModelRequest:
        """First chat-completions request whose messages contain ``needle``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for req in self._requests:
                    if req.path.rstrip("/").endswith("/chat/completions") and req.contains(needle):
                        return req
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"no model request containing {needle!r} "
                        f"within {timeout}s ({len(self._requests)} requests)"
                    )
                self._cond.wait(min(left, 0.5))

    def config(self) -> dict[str, Any]:
        """The gateway config that makes this stub the only model provider."""
        return {
            "agents": {"defaults": {"model": {"primary": f"{self.provider}/{self.model_id}"}}},
            "models": {
                "mode": "replace",
                "providers": {
                    self.provider: {
                        "baseUrl": self.base_url,
                        "apiKey": "stub-key-not-a-secret",
                        "api": "openai-completions",
                        "models": [
                            {
                                "id": self.model_id,
                                "name": "Stub echo model",
                                "reasoning": False,
                                "input": ["text"],
                                "cost": {"input": 0, "output": 0, "cacheRead": 0, "cacheWrite": 0},
                                "contextWindow": 200000,
                                "maxTokens": 4096,
                            }
                        ],
                    }
                },
            },
        }
