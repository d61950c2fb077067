"""Property: for any request, the guard chain answers exactly what docs/http-api.md says, in the
the documented body shape with a matching ``X-Request-Id``, and the runtime sees a call only
when the request is valid — and then exactly the call it asked for.

Requests are generated as raw bytes (paths, methods, zero to two Authorization
headers, content types, Idempotency-Key, X-Request-Id, JSON bodies mixing valid and
wrong fields, non-JSON bodies) and sent over a real socket to the sidecar in front of
the reference runtime. :func:`expected` is an independent reading of docs/http-api.md: the
check order and each rule, written from docs/http-api.md, not from the guards.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.common import OTHER_SECRET, SECRET, MakeSidecar, Runtime, Sidecar, base_doc
from support.rawhttp import exchange, request

AGENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
SESSION_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")
REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
AGENTS = {  # name -> (default session, request keys allowed, prefixes)
    "my-agent": ("webhook-session", True, ("order-",)),
    "closed-agent": ("webhook:closed-agent", False, ()),
    "open-agent": ("webhook:open-agent", True, ()),
}
SECRETS = {SECRET: ("main", None), OTHER_SECRET: ("ci", {"closed-agent"})}
MAX_MESSAGE = 200
SPEC_CODES = {
    (404, "not_found"), (405, "method_not_allowed"), (400, "token_in_query"), (401, "unauthorized"),
    (415, "unsupported_media_type"), (400, "invalid_json"), (400, "invalid_request"),
    (404, "agent_not_found"), (403, "agent_not_permitted"), (403, "session_key_not_allowed"),
    (413, "payload_too_large"),
}  # fmt: skip


@pytest.fixture
async def sc(make_sidecar: MakeSidecar, runtime: Runtime) -> Sidecar:
    doc = base_doc(
        runtime.path, authLockout={"maxFailures": 10**6}, limits={"maxMessageChars": MAX_MESSAGE}
    )
    webhooks = doc["webhooks"]
    webhooks.pop("secret")
    webhooks["secrets"] = [
        {"id": "main", "env": "TEST_WEBHOOK_SECRET"},
        {"id": "ci", "value": OTHER_SECRET, "agents": ["closed-agent"]},
    ]
    webhooks["agents"] = {
        "my-agent": {"sessionKey": "webhook-session", "sessionKeyPrefixes": ["order-"]},
        "closed-agent": {"allowRequestSessionKey": False},
        "open-agent": {},
    }
    return await make_sidecar(doc)


# ---------------------------------------------------------------- generated requests

# Header text stays inside what HTTP/1.1 lets a field value hold (no CR, LF, NUL or
# other controls), so the framing is valid and every answer comes from the guards.
header_text = st.text(
    st.characters(codec="latin-1", exclude_categories=["Cc"]) | st.just("\t"), max_size=40
)


def mostly(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``good`` four times in five: valid requests must be common enough that the
    checks late in the chain (agents, sessions) and the success path are reached."""
    return st.integers(0, 9).flatmap(lambda i: good if i < 8 else bad)


tokens = (
    st.sampled_from(
        [SECRET, OTHER_SECRET, SECRET + "x", SECRET[:-1], SECRET.upper(), "", " " + SECRET]
    )
    | header_text
)
authorization = mostly(
    st.builds(lambda t: [f"Bearer {t}"], st.sampled_from([SECRET, SECRET, OTHER_SECRET])),
    st.lists(
        st.builds(
            lambda s, t: f"{s} {t}",
            st.sampled_from(["Bearer", "bearer", "BEARER", "Basic", "Bearer "]),
            tokens,
        )
        | header_text,
        max_size=2,
    ),
)
names = mostly(
    st.sampled_from([*AGENTS, "ghost"]),
    st.sampled_from(["MY-AGENT", "my-agent\n", "", "-x"]) | st.integers() | st.none(),
)
session_keys = mostly(
    st.sampled_from(["order-1", "order-x.y:z@w", "x", "webhook-session"]),
    st.sampled_from(["order-", "", "a" * 129, "ordér-1"]) | st.integers() | st.none(),
)
messages = mostly(
    st.text(min_size=1, max_size=12),
    st.text(max_size=2)
    | st.text(min_size=MAX_MESSAGE - 2, max_size=MAX_MESSAGE + 2)
    | st.sampled_from([" ", "\ud800", None, 1, ["x"]]),
)


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.binary(max_size=60))
    if kind == 1:
        return draw(
            st.sampled_from(
                [b"", b"[]", b'"x"', b"{", b'{"agent": NaN}', b'{"a": 1, "a": 2}', b"\xff{}"]
            )
        )
    body: dict[str, Any] = {}
    for key, strategy, often in (
        ("agent", names, 9),
        ("message", messages, 9),
        ("sessionKey", session_keys, 4),
    ):
        if draw(st.integers(0, 9)) < often:
            body[key] = draw(strategy)
    if draw(st.integers(0, 7)) == 0:
        body[draw(st.sampled_from(["extra", "Agent", "runId"]))] = draw(st.integers())
    return json.dumps(body).encode("utf-8", "surrogatepass")


@dataclass
class Req:
    method: str
    target: str
    authorization: list[str]
    content_type: str | None
    idempotency: list[str]
    request_id: str | None
    body: bytes

    def to_bytes(self) -> bytes:
        headers = [("Authorization", a) for a in self.authorization]
        if self.content_type is not None:
            headers.append(("Content-Type", self.content_type))
        headers += [("Idempotency-Key", k) for k in self.idempotency]
        if self.request_id is not None:
            headers.append(("X-Request-Id", self.request_id))
        encoded = [(k, v.encode("latin-1")) for k, v in headers]
        return request(self.target, encoded, self.body, method=self.method)


requests = st.builds(
    Req,
    method=mostly(st.just("POST"), st.sampled_from(["GET", "PUT"])),
    target=mostly(
        st.sampled_from(["/hooks/agent", "/hooks/wake", "/hooks/agent?x=1"]),
        st.sampled_from(
            ["/hooks/agent/", "/hooks", "/hooks/wake?token=t", "/hooks/agent?access_token=", "/x"]
        ),
    ),
    authorization=authorization,
    content_type=mostly(
        st.sampled_from(
            ["application/json", "application/json; charset=utf-8", "APPLICATION/JSON"]
        ),
        st.sampled_from(["application/json; charset=latin-1", "text/plain", None]),
    ),
    idempotency=mostly(st.just([]) | st.just(["deploy-42"]), st.lists(header_text, max_size=2)),
    request_id=st.none() | header_text | st.just("ci-run.7"),
    body=bodies(),
)


# ------------------------------------------------------ docs/http-api.md, read independently


def expected(req: Req) -> tuple[int, str, dict[str, Any] | None]:
    """(status, code, the call the runtime must receive or None)."""
    url = urlsplit(req.target)
    hook = {"/hooks/agent": "agent", "/hooks/wake": "wake"}.get(url.path)
    if hook is None:
        return 404, "not_found", None
    if req.method != "POST":
        return 405, "method_not_allowed", None
    query = parse_qs(url.query, keep_blank_values=True)
    names = {"token", "access_token", "secret", "key", "api_key", "apikey"}
    query_values = {v for vs in query.values() for v in vs}
    if any(k.lower() in names for k in query) or query_values & set(SECRETS):
        return 400, "token_in_query", None
    # RFC 9110 §5.5: the field value excludes leading and trailing whitespace.
    auth = [a.strip(" \t") for a in req.authorization]
    token = auth[0][7:] if len(auth) == 1 and auth[0][:7].lower() == "bearer " else None
    if token not in SECRETS:
        return 401, "unauthorized", None
    secret_id, scope = SECRETS[token]
    mime, _, params = (req.content_type or "").partition(";")
    charset = params.strip().lower().removeprefix("charset=") if params.strip() else None
    if mime.strip().lower() != "application/json" or charset not in (None, "utf-8"):
        return 415, "unsupported_media_type", None
    keys = [k.strip(" \t") for k in req.idempotency]
    if len(keys) > 1 or (
        keys and not (0 < len(keys[0]) <= 256 and keys[0].isascii() and keys[0].isprintable())
    ):
        return 400, "invalid_request", None
    try:
        body = json.loads(
            req.body.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constants
        )
    except (ValueError, RecursionError):
        return 400, "invalid_json", None
    if not isinstance(body, dict):
        return 400, "invalid_json", None
    allowed = {"agent", "sessionKey"} | ({"message"} if hook == "agent" else set())
    required = {"agent"} | ({"message"} if hook == "agent" else set())
    agent, message, session = body.get("agent"), body.get("message"), body.get("sessionKey")
    if (
        set(body) - allowed
        or required - set(body)
        or not (isinstance(agent, str) and AGENT_NAME.fullmatch(agent))
        or (hook == "agent" and not _good_message(message))
        or (
            "sessionKey" in body
            and not (isinstance(session, str) and SESSION_KEY.fullmatch(session))
        )
    ):
        return 400, "invalid_request", None
    if agent not in AGENTS:
        return 404, "agent_not_found", None
    if scope is not None and agent not in scope:
        return 403, "agent_not_permitted", None
    default, allow, prefixes = AGENTS[agent]
    if session is not None and (not allow or (prefixes and not session.startswith(prefixes))):
        return 403, "session_key_not_allowed", None
    call = {"hook": hook, "agent": agent, "sessionKey": session or default, "secretId": secret_id}
    if hook == "agent":
        call["message"] = message
    return 200, "ok", call


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    if len({k for k, _ in pairs}) != len(pairs):
        raise ValueError("duplicate")
    return dict(pairs)


def _no_constants(name: str) -> None:
    raise ValueError(name)


def _good_message(message: Any) -> bool:
    if not isinstance(message, str) or not message.strip() or len(message) > MAX_MESSAGE:
        return False
    try:
        message.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# ---------------------------------------------------------------- the property


# (secret id, hook, Idempotency-Key) answered 200, per sidecar (the fixture's id).
ANSWERED_KEYS: dict[int, set[tuple[str, str, str]]] = {}


@settings(
    max_examples=600, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(req=requests)
async def test_every_request_gets_the_spec_answer_and_only_valid_ones_reach_the_runtime(
    sc: Sidecar, runtime: Runtime, req: Req
) -> None:
    before = len(runtime.calls)
    responses, _ = await exchange(sc.client.port, req.to_bytes(), expect=1, timeout=10)
    assert len(responses) == 1, req
    resp = responses[0]
    status, code, call = expected(req)
    body = resp.json()
    rid = resp.header("X-Request-Id")
    assert body["requestId"] == rid
    # The test client is no trusted proxy: its own X-Request-Id is never adopted.
    client_rid = (req.request_id or "").strip(" \t")
    assert rid is not None and REQUEST_ID.fullmatch(rid) and len(rid) == 16
    if client_rid:
        assert rid != client_rid
    new_calls = runtime.calls[before:]
    if call is None:
        assert (resp.status, body.get("error")) == (status, code), (req, body)
        assert (resp.status, code) in SPEC_CODES
        assert body["status"] == "error" and isinstance(body["message"], str) and body["message"]
        assert set(body) == {"status", "error", "message", "requestId"}
        assert new_calls == [], "a refused request reached the runtime"
    else:
        assert resp.status == 200, (req, body)
        # Dedup (docs/dedup.md): a key this secret already had answered 200 on this
        # hook is answered as a duplicate, not forwarded. The sidecar lives across
        # examples, so the oracle remembers what it answered.
        keys = [k.strip(" \t") for k in req.idempotency]
        seen = ANSWERED_KEYS.setdefault(id(sc), set())
        dedup_key = (call["secretId"], call["hook"], keys[0]) if keys else None
        if dedup_key is not None and dedup_key in seen:
            assert body == {"status": "ok", "duplicate": True, "requestId": rid}, (req, body)
            assert new_calls == [], "a duplicate reached the runtime"
            return
        if dedup_key is not None:
            seen.add(dedup_key)
        assert body["status"] == "ok" and body["session"] == call["sessionKey"]
        [received] = new_calls
        assert {k: received.get(k) for k in call} == call
        assert received["requestId"] == rid
