"""Hostile requests as raw bytes over real sockets (docs/http-api.md "Hardening details").

Every case states what the client gets — a docs/http-api.md code with the JSON error body,
or the bare 400/413/431 the HTTP layer may give for broken framing — and how many
calls the runtime (the ``runtime`` fixture records each one) must have seen: only
requests that are valid reach it. Path variants are either refused or decoded to a
canonical hook and then walk the same guard chain (auth first), never a bypass.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from support.common import (
    AGENT,
    SECRET,
    MakeSidecar,
    Runtime,
    Sidecar,
    base_doc,
    free_port,
    write_config,
)
from support.rawhttp import RawResponse, chunked, exchange, request

AUTH = ("Authorization", f"Bearer {SECRET}")
JSON_TYPE = ("Content-Type", "application/json")
AGENT_BODY = json.dumps({"agent": AGENT, "message": "deploy finished"}).encode()
BARE = "bare"  # the HTTP layer refused the framing: 400/413/431, no JSON body required


def good(
    target: str = "/hooks/agent",
    body: bytes = AGENT_BODY,
    extra: list[tuple[str, str]] | None = None,
    **kw: Any,
) -> bytes:
    """A valid call, with ``extra`` headers after the usual two."""
    return request(target, [AUTH, JSON_TYPE, *(extra or [])], body, **kw)


def assert_spec_error(resp: RawResponse, status: int, code: str) -> None:
    body = resp.json()
    assert (resp.status, body["error"]) == (status, code), body
    assert body["status"] == "error" and isinstance(body["message"], str) and body["message"]
    assert body["requestId"] == resp.header("X-Request-Id")


def assert_outcome(resp: RawResponse, want: tuple[int, str] | str | int) -> None:
    if want == BARE:
        assert resp.status in (400, 413, 431), (resp.status, resp.body)
    elif want == 200:
        assert resp.status == 200, resp.body
        body = resp.json()
        assert body["status"] == "ok" and body["requestId"] == resp.header("X-Request-Id")
    else:
        assert isinstance(want, tuple)
        assert_spec_error(resp, *want)


@pytest.fixture
async def sc(make_sidecar: MakeSidecar, runtime: Runtime) -> Sidecar:
    """The default sidecar, with a lockout loose enough for a table of refusals."""
    return await make_sidecar(base_doc(runtime.path, authLockout={"maxFailures": 10_000}))


async def send(sc: Sidecar, data: bytes, expect: int = 1) -> list[RawResponse]:
    responses, _ = await exchange(sc.client.port, data, expect=expect, timeout=10)
    return responses


async def until_closed(sc: Sidecar, data: bytes) -> list[RawResponse]:
    """Every response to ``data`` followed by a last request that closes the connection
    (its 404 ends the list): nothing after it can be missed, and nothing waits."""
    closer = request("/end", [("Connection", "close")])
    responses, closed = await exchange(sc.client.port, data + closer, timeout=10)
    assert closed, "the connection was not closed after the last request"
    return responses


async def one(sc: Sidecar, data: bytes) -> RawResponse:
    responses = await send(sc, data)
    assert len(responses) == 1, responses
    return responses[0]


# ---------------------------------------------------------------- framing and smuggling

FRAMING = {
    "content-length and chunked": request(
        headers=[AUTH, JSON_TYPE, ("Content-Length", "4"), ("Transfer-Encoding", "chunked")],
        body=chunked(AGENT_BODY),
        length=False,
    ),
    "chunked and content-length": request(
        headers=[AUTH, JSON_TYPE, ("Transfer-Encoding", "chunked"), ("Content-Length", "0")],
        body=chunked(AGENT_BODY),
        length=False,
    ),
    "two different content-lengths": request(
        headers=[
            AUTH,
            JSON_TYPE,
            ("Content-Length", str(len(AGENT_BODY))),
            ("Content-Length", "5"),
        ],
        body=AGENT_BODY,
        length=False,
    ),
    "two equal content-lengths": request(
        headers=[AUTH, JSON_TYPE, ("Content-Length", str(len(AGENT_BODY)))] * 2,
        body=AGENT_BODY,
        length=False,
    ),
    "content-length list": request(
        headers=[AUTH, JSON_TYPE, ("Content-Length", f"{len(AGENT_BODY)}, {len(AGENT_BODY)}")],
        body=AGENT_BODY,
        length=False,
    ),
    "content-length with a sign": request(
        headers=[AUTH, JSON_TYPE, ("Content-Length", f"+{len(AGENT_BODY)}")],
        body=AGENT_BODY,
        length=False,
    ),
    "content-length in hex": request(
        headers=[AUTH, JSON_TYPE, ("Content-Length", hex(len(AGENT_BODY)))],
        body=AGENT_BODY,
        length=False,
    ),
    "chunked not last": request(
        headers=[AUTH, JSON_TYPE, ("Transfer-Encoding", "chunked, identity")],
        body=chunked(AGENT_BODY),
        length=False,
    ),
    "unknown transfer-coding": request(
        headers=[AUTH, JSON_TYPE, ("Transfer-Encoding", "xchunked")],
        body=chunked(AGENT_BODY),
        length=False,
    ),
    "space before the colon": request(
        headers=[AUTH, JSON_TYPE, ("Transfer-Encoding ", "chunked")],
        body=chunked(AGENT_BODY),
        length=False,
    ),
    "obs-fold continuing the token": request(
        headers=[("Authorization", f"Bearer {SECRET[:10]}\r\n {SECRET[10:]}"), JSON_TYPE],
        body=AGENT_BODY,
    ),
    "obs-fold on another header": good(extra=[("X-A", "b\r\n\tfolded")]),
    "bare LF line ends": good(eol=b"\n"),
    "bare LF after one header": good().replace(b"Host: 127.0.0.1\r\n", b"Host: 127.0.0.1\n"),
    "bare CR in a header": good(extra=[("X-A", "b\rc")]),
    "bare LF after a chunk size": request(
        headers=[AUTH, JSON_TYPE, ("Transfer-Encoding", "chunked")],
        body=b"%x\n%s\r\n0\r\n\r\n" % (len(AGENT_BODY), AGENT_BODY),
        length=False,
    ),
    "NUL in a header name": good(extra=[("X-\x00A", "b")]),
    "NUL in the token": request(
        headers=[("Authorization", f"Bearer {SECRET}\x00"), JSON_TYPE], body=AGENT_BODY
    ),
    "control byte in the token": request(
        headers=[("Authorization", f"Bearer {SECRET[:5]}\x01{SECRET[5:]}"), JSON_TYPE],
        body=AGENT_BODY,
    ),
    "header line over 8190 bytes": good(extra=[("X-Big", "a" * 9000)]),
    "request line over 8190 bytes": good(target="/hooks/agent?x=" + "a" * 9000),
    "thousands of headers": good(extra=[(f"X-H{i}", "v") for i in range(2000)]),
    "asterisk-form target": good(target="*"),
    "relative target": good(target="hooks/agent"),
    "space inside the target": good(target="/hooks/agent x"),
}


@pytest.mark.parametrize("name", list(FRAMING))
async def test_ambiguous_framing_is_a_bare_refusal_and_forwards_nothing(
    sc: Sidecar, runtime: Runtime, name: str
) -> None:
    resp = await one(sc, FRAMING[name])
    assert_outcome(resp, BARE)
    assert runtime.calls == []


async def test_a_request_hidden_in_a_body_is_only_a_body(sc: Sidecar, runtime: Runtime) -> None:
    """The smuggled call is the body of an unauthenticated request: one 401, no call."""
    inner = good()
    outer = request("/hooks/agent", [JSON_TYPE], inner)
    responses = await until_closed(sc, outer + request("/hooks/wake", [JSON_TYPE], b"{}"))
    assert [r.status for r in responses] == [401, 401, 404]
    assert runtime.calls == []


async def test_a_request_hidden_in_a_chunked_body_is_only_a_body(
    sc: Sidecar, runtime: Runtime
) -> None:
    outer = request(
        "/hooks/agent", [JSON_TYPE, ("Transfer-Encoding", "chunked")], chunked(good()), length=False
    )
    responses = await until_closed(sc, outer)
    assert [r.status for r in responses] == [401, 404]
    assert runtime.calls == []


async def test_a_lower_case_method_is_refused_or_walks_the_chain(
    sc: Sidecar, runtime: Runtime
) -> None:
    """Methods are case-sensitive (RFC 9110 §9.1); llhttp refuses ``post``, aiohttp's
    Python parser upper-cases it. Either way a token is still needed."""
    resp = await one(sc, request("/hooks/agent", [JSON_TYPE], AGENT_BODY, method="post"))
    assert resp.status in (400, 401) and runtime.calls == []


async def test_a_get_body_is_consumed_not_run(sc: Sidecar, runtime: Runtime) -> None:
    """405 without reading the body must still skip the body on a kept-alive connection."""
    responses = await until_closed(sc, request("/hooks/agent", [AUTH], good(), method="GET"))
    assert [r.status for r in responses] == [405, 404]
    assert runtime.calls == []


async def test_pipelined_calls_each_walk_the_whole_chain(sc: Sidecar, runtime: Runtime) -> None:
    """Bytes after a declared body are the next request: the harness sees pipelining, and
    a second request without a token is refused even behind a valid one."""
    unauthenticated = request("/hooks/agent", [JSON_TYPE], AGENT_BODY)
    responses = await until_closed(sc, good() + unauthenticated + good())
    assert [r.status for r in responses] == [200, 401, 200, 404]
    assert len(runtime.calls) == 2


async def test_body_longer_than_content_length_starts_a_new_request(
    sc: Sidecar, runtime: Runtime
) -> None:
    """The declared body is cut one byte short: the rest is a malformed next request. The
    cut body is not JSON, and the tail never joins it (aiohttp may even drop the first
    request along with the bad tail it arrived with): only 400s, nothing forwarded."""
    data = good(body=AGENT_BODY[:-1]) + b"} GARBAGE"
    responses = await send(sc, data, expect=2)
    assert responses and all(r.status == 400 for r in responses)
    for resp in responses:
        if resp.body.startswith(b"{"):
            assert_spec_error(resp, 400, "invalid_json")
    assert runtime.calls == []


async def test_chunked_call_with_extensions_and_trailers_is_accepted(
    sc: Sidecar, runtime: Runtime
) -> None:
    """Chunked framing done right works (so the refusals above are about ambiguity)."""
    body = (
        b"10;ext=1\r\n"
        + AGENT_BODY[:16]
        + b"\r\n"
        + chunked(AGENT_BODY[16:])[:-2]
        + b"X-T: 1\r\n\r\n"
    )
    resp = await one(
        sc,
        request(
            headers=[AUTH, JSON_TYPE, ("Transfer-Encoding", "chunked")], body=body, length=False
        ),
    )
    assert_outcome(resp, 200)
    assert [c["message"] for c in runtime.calls] == ["deploy finished"]


async def test_many_headers_below_the_limit_are_fine(sc: Sidecar, runtime: Runtime) -> None:
    resp = await one(sc, good(extra=[(f"X-H{i}", "v" * 50) for i in range(100)]))
    assert_outcome(resp, 200)
    assert len(runtime.calls) == 1


# ---------------------------------------------------------------- Authorization

AUTH_CASES: dict[str, tuple[list[tuple[str, str]], tuple[int, str] | int | str]] = {
    "two identical headers": ([AUTH, AUTH], (401, "unauthorized")),
    "valid and empty": ([AUTH, ("Authorization", "")], (401, "unauthorized")),
    "empty and valid": ([("Authorization", ""), AUTH], (401, "unauthorized")),
    "valid and wrong": ([AUTH, ("Authorization", "Bearer nope")], (401, "unauthorized")),
    "two tokens in one header": (
        [("Authorization", f"Bearer {SECRET}, Bearer {SECRET}")],
        (401, "unauthorized"),
    ),
    "lower-case header name": ([("authorization", f"Bearer {SECRET}")], 200),
    "scheme lower case": ([("Authorization", f"bearer {SECRET}")], 200),
    "scheme upper case": ([("Authorization", f"BEARER {SECRET}")], 200),
    # RFC 9110 §5.5: leading and trailing whitespace is not part of a field value.
    "whitespace around the value": ([("Authorization", f" \t Bearer {SECRET} \t ")], 200),
    "tab after the scheme": ([("Authorization", f"Bearer\t{SECRET}")], (401, "unauthorized")),
    "two spaces after the scheme": (
        [("Authorization", f"Bearer  {SECRET}")],
        (401, "unauthorized"),
    ),
    "tab before the token": ([("Authorization", f"Bearer \t{SECRET}")], (401, "unauthorized")),
    "space inside the token": (
        [("Authorization", f"Bearer {SECRET[:8]} {SECRET[8:]}")],
        (401, "unauthorized"),
    ),
    "no space": ([("Authorization", f"Bearer{SECRET}")], (401, "unauthorized")),
    "colon": ([("Authorization", f"Bearer:{SECRET}")], (401, "unauthorized")),
    "scheme only": ([("Authorization", "Bearer")], (401, "unauthorized")),
    "scheme and space": ([("Authorization", "Bearer ")], (401, "unauthorized")),
    "Basic": ([("Authorization", f"Basic {SECRET}")], (401, "unauthorized")),
    "Bearer in another header": ([("X-Authorization", f"Bearer {SECRET}")], (401, "unauthorized")),
    "Proxy-Authorization": ([("Proxy-Authorization", f"Bearer {SECRET}")], (401, "unauthorized")),
    "non-ASCII scheme": ([("Authorization", f"Beärer {SECRET}")], (401, "unauthorized")),
    "dotless-i scheme": (
        [("Authorization", f"BEARER {SECRET}".replace("E", "\u0130", 1))],
        (401, "unauthorized"),
    ),
    "UTF-8 after the token": ([("Authorization", f"Bearer {SECRET}é")], (401, "unauthorized")),
    "UTF-8 token": ([("Authorization", "Bearer " + "é" * 32)], (401, "unauthorized")),
    "fullwidth digits": (
        [("Authorization", "Bearer " + SECRET.translate({ord("8"): "\uff18"}))],
        (401, "unauthorized"),
    ),
    "DEL in the token": ([("Authorization", f"Bearer {SECRET}\x7f")], (401, "unauthorized")),
}


@pytest.mark.parametrize("name", list(AUTH_CASES))
async def test_authorization_variants(sc: Sidecar, runtime: Runtime, name: str) -> None:
    headers, want = AUTH_CASES[name]
    target = "/hooks/agent?x=1"
    data = request(target, [*headers, JSON_TYPE], AGENT_BODY)
    resp = await one(sc, data)
    if name in (
        "DEL in the token",
        "UTF-8 after the token",
        "UTF-8 token",
        "non-ASCII scheme",
    ) and (resp.status == 400 and not resp.body.startswith(b"{")):
        want = BARE  # the HTTP layer may refuse non-token bytes itself; either way no call
    assert_outcome(resp, want)
    if resp.status == 401:
        assert resp.header("WWW-Authenticate") == 'Bearer realm="webhooks"'
    assert len(runtime.calls) == (1 if want == 200 else 0)


async def test_invalid_utf8_in_the_token_is_401(sc: Sidecar, runtime: Runtime) -> None:
    data = request(
        headers=[("Authorization", b"Bearer " + SECRET.encode() + b"\xff"), JSON_TYPE],
        body=AGENT_BODY,
    )
    assert_outcome(await one(sc, data), (401, "unauthorized"))
    data = request(
        headers=[("Authorization", b"Bearer \xc3" + SECRET.encode()[1:]), JSON_TYPE],
        body=AGENT_BODY,
    )
    assert_outcome(await one(sc, data), (401, "unauthorized"))
    assert runtime.calls == []


# ---------------------------------------------------------------- paths

# Decoded by the HTTP layer to a canonical hook: they must walk the whole chain.
SAME_HOOK = [
    "/hooks/%61gent",
    "/hooks%2Fagent",
    "/hooks%2fagent",
    "/%68ooks/agent",
    "/hooks/agent#fragment",
    "/hooks/agent?x",
    "/hooks/agent?",
    "http://evil.example/hooks/agent",
    "http://127.0.0.1:1/hooks/agent",
]
REFUSED = [
    "/hooks/agent/",
    "/hooks/agent%2F",
    "//hooks/agent",
    "/hooks//agent",
    "/./hooks/agent",
    "/hooks/./agent",
    "/hooks/x/../agent",
    "/hooks/x/%2e%2e/agent",
    "/hooks/x/%2E%2E/agent",
    "/hooks/x%2F..%2Fagent",
    "/x/../hooks/agent",
    "/HOOKS/AGENT",
    "/Hooks/Agent",
    "/hooks/AGENT",
    "/hooks/agent;x",
    "/hooks/agent;",
    "/hooks/agent%3Bx",
    "/hooks/agent%3Fx",
    "/hooks/agent%23x",
    "/hooks/agent%00",
    "/hooks/agent%20",
    "/hooks/agent%09",
    "/hooks/agent.",
    "/hooks/agent%",
    "/hooks/agen%74%",
    "/hooks/ag%C3%A9nt",
    "/hooks/\u0430gent",  # Cyrillic a
    "/hooks/agent\\",
    "/hooks\\agent",
    "/hooks/agent%5C",
    "http://evil.example//hooks/agent",
]


@pytest.mark.parametrize("target", SAME_HOOK)
async def test_decoded_path_variants_still_need_a_token(
    sc: Sidecar, runtime: Runtime, target: str
) -> None:
    resp = await one(sc, request(target, [JSON_TYPE], AGENT_BODY))
    assert_outcome(resp, (401, "unauthorized"))
    assert runtime.calls == []


@pytest.mark.parametrize("target", SAME_HOOK)
async def test_decoded_path_variants_are_forwarded_to_the_canonical_hook(
    sc: Sidecar, runtime: Runtime, target: str
) -> None:
    resp = await one(sc, good(target))
    assert_outcome(resp, 200)
    [call] = runtime.calls
    assert call["hook"] == "agent" and call["message"] == "deploy finished"


@pytest.mark.parametrize("target", REFUSED)
async def test_near_miss_paths_are_refused_even_with_a_valid_token(
    sc: Sidecar, runtime: Runtime, target: str
) -> None:
    resp = await one(sc, good(target))
    if resp.status == 400 and not resp.body.startswith(b"{"):
        assert_outcome(resp, BARE)  # the HTTP layer refused the request target itself
    else:
        assert_outcome(resp, (404, "not_found"))
    assert runtime.calls == []


@pytest.mark.parametrize(
    "head",
    [
        b"CONNECT 127.0.0.1:1 HTTP/1.1",
        b"CONNECT evil.example:443 HTTP/1.1",
        b"OPTIONS * HTTP/1.1",
        b"POST http://evil.example HTTP/1.1",
        b"POST http://evil.example?token=x HTTP/1.1",
    ],
)
async def test_targets_the_router_cannot_match_still_get_a_spec_404_and_an_audit_line(
    sc: Sidecar, runtime: Runtime, head: bytes
) -> None:
    data = head + b"\r\nHost: x\r\n" + f"Authorization: Bearer {SECRET}\r\n".encode() + b"\r\n"
    resp = await one(sc, data)
    assert_outcome(resp, (404, "not_found"))
    [entry] = sc.audit.entries()
    assert (entry["status"], entry["error"], entry["endpoint"]) == (404, "not_found", "other")
    assert runtime.calls == []


@pytest.mark.parametrize(
    "method", ["GET", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE", "CONNECT"]
)
async def test_other_methods_are_405_even_with_a_valid_call(
    sc: Sidecar, runtime: Runtime, method: str
) -> None:
    target = "127.0.0.1:1" if method == "CONNECT" else "/hooks/agent"
    responses, _ = await exchange(
        sc.client.port, good(target, method=method), expect=1, head=method == "HEAD"
    )
    if method == "CONNECT":  # authority-form has no path: nothing routes it
        assert responses == [] or responses[0].status in (400, 404, 405)
    elif method == "HEAD":  # no body follows a HEAD response
        assert responses[0].status == 405 and responses[0].header("Allow") == "POST"
    else:
        assert_outcome(responses[0], (405, "method_not_allowed"))
        assert responses[0].header("Allow") == "POST"
    assert runtime.calls == []


# ---------------------------------------------------------------- bodies

NESTED = (
    b'{"agent": "my-agent", "message": "x", "sessionKey": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
)
BODY_CASES: dict[str, tuple[bytes, tuple[int, str] | int]] = {
    "deeply nested arrays": (b"[" * 30_000 + b"]" * 30_000, (400, "invalid_json")),
    "deeply nested objects": (b'{"a":' * 10_000 + b"1" + b"}" * 10_000, (400, "invalid_json")),
    "deeply nested in a field": (NESTED[:65_000], (400, "invalid_json")),
    "nested below the recursion limit": (
        b'{"agent": "my-agent", "message": ' + b"[" * 200 + b"]" * 200 + b"}",
        (400, "invalid_request"),
    ),
    "duplicate key, second wins": (
        b'{"agent": "other", "agent": "my-agent", "message": "x"}',
        (400, "invalid_json"),
    ),
    "duplicate key, same value": (
        b'{"agent": "my-agent", "agent": "my-agent", "message": "x"}',
        (400, "invalid_json"),
    ),
    "duplicate key nested": (
        b'{"agent": "my-agent", "message": "x", "sessionKey": {"a": 1, "a": 2}}',
        (400, "invalid_json"),
    ),
    "duplicate key by escape": (
        b'{"agent": "my-agent", "\\u0061gent": "x", "message": "x"}',
        (400, "invalid_json"),
    ),
    "NaN": (b'{"agent": "my-agent", "message": NaN}', (400, "invalid_json")),
    "Infinity": (b'{"agent": "my-agent", "message": Infinity}', (400, "invalid_json")),
    "-Infinity": (b'{"agent": "my-agent", "message": -Infinity}', (400, "invalid_json")),
    # Overflows to infinity: no JSON encoder could send it on (docs/http-api.md).
    "huge exponent": (b'{"agent": "my-agent", "message": 1e999}', (400, "invalid_json")),
    "huge negative exponent": (b'{"agent": "my-agent", "extra": -1e999}', (400, "invalid_json")),
    "infinite in a nested value": (
        b'{"agent": "my-agent", "message": "x", "meta": {"a": [1, 1E400]}}',
        (400, "invalid_json"),
    ),
    "huge integer": (
        b'{"agent": "my-agent", "message": ' + b"9" * 5000 + b"}",
        (400, "invalid_json"),
    ),
    "agent as a number": (b'{"agent": 1, "message": "x"}', (400, "invalid_request")),
    "agent as true": (b'{"agent": true, "message": "x"}', (400, "invalid_request")),
    "agent as a list": (b'{"agent": ["my-agent"], "message": "x"}', (400, "invalid_request")),
    "agent as an object": (
        b'{"agent": {"name": "my-agent"}, "message": "x"}',
        (400, "invalid_request"),
    ),
    "agent null": (b'{"agent": null, "message": "x"}', (400, "invalid_request")),
    "message as a number": (b'{"agent": "my-agent", "message": 42}', (400, "invalid_request")),
    "message as a list": (b'{"agent": "my-agent", "message": ["x"]}', (400, "invalid_request")),
    "message null": (b'{"agent": "my-agent", "message": null}', (400, "invalid_request")),
    "message blank": (b'{"agent": "my-agent", "message": " \\t\\n "}', (400, "invalid_request")),
    "sessionKey as a number": (
        b'{"agent": "my-agent", "message": "x", "sessionKey": 7}',
        (400, "invalid_request"),
    ),
    "sessionKey null": (
        b'{"agent": "my-agent", "message": "x", "sessionKey": null}',
        (400, "invalid_request"),
    ),
    "sessionKey with a newline": (
        b'{"agent": "my-agent", "message": "x", "sessionKey": "a\\n"}',
        (400, "invalid_request"),
    ),
    "unknown field": (
        b'{"agent": "my-agent", "message": "x", "admin": true}',
        (400, "invalid_request"),
    ),
    "top-level array": (b'[{"agent": "my-agent", "message": "x"}]', (400, "invalid_json")),
    "top-level string": (b'"my-agent"', (400, "invalid_json")),
    "two objects": (AGENT_BODY + AGENT_BODY, (400, "invalid_json")),
    "trailing garbage": (AGENT_BODY + b"x", (400, "invalid_json")),
    "empty": (b"", (400, "invalid_json")),
    "UTF-8 BOM": (b"\xef\xbb\xbf" + AGENT_BODY, (400, "invalid_json")),
    "UTF-16": (AGENT_BODY.decode().encode("utf-16"), (400, "invalid_json")),
    "invalid UTF-8": (b'{"agent": "my-agent", "message": "\xff"}', (400, "invalid_json")),
    "overlong UTF-8 quote": (b'{"agent": "my-agent", "message": "\xc0\xa2}', (400, "invalid_json")),
    "raw control char in a string": (
        b'{"agent": "my-agent", "message": "a\x01b"}',
        (400, "invalid_json"),
    ),
    "lone surrogate in message": (
        b'{"agent": "my-agent", "message": "\\ud800"}',
        (400, "invalid_request"),
    ),
    "lone surrogate in agent": (
        b'{"agent": "my-agent\\udfff", "message": "x"}',
        (400, "invalid_request"),
    ),
    "agent with a newline": (b'{"agent": "my-agent\\n", "message": "x"}', (400, "invalid_request")),
    "agent with a combining mark": (
        b'{"agent": "my-agent\\u0301", "message": "x"}',
        (400, "invalid_request"),
    ),
    "agent in another case": (b'{"agent": "MY-AGENT", "message": "x"}', (404, "agent_not_found")),
    "agent with a NUL": (b'{"agent": "my-agent\\u0000", "message": "x"}', (400, "invalid_request")),
    "single quotes (JSON5)": (b"{'agent': 'my-agent', 'message': 'x'}", (400, "invalid_json")),
    "comment (JSON5)": (b'{"agent": "my-agent", /* c */ "message": "x"}', (400, "invalid_json")),
    "trailing comma (JSON5)": (b'{"agent": "my-agent", "message": "x",}', (400, "invalid_json")),
}


@pytest.mark.parametrize("name", list(BODY_CASES))
async def test_hostile_bodies(sc: Sidecar, runtime: Runtime, name: str) -> None:
    body, want = BODY_CASES[name]
    resp = await one(sc, good(body=body))
    assert_outcome(resp, want)
    assert runtime.calls == []


async def test_escaped_control_and_non_ascii_text_is_forwarded_exactly(
    sc: Sidecar, runtime: Runtime
) -> None:
    message = "naïve ☃ \U0001f680 \u202e right-to-left \x00 nul \x1b[31m ansi \u2028 line"
    resp = await one(sc, good(body=json.dumps({"agent": AGENT, "message": message}).encode()))
    assert_outcome(resp, 200)
    assert [c["message"] for c in runtime.calls] == [message]


async def test_a_1_mib_message_is_413_before_auth_reads_it(sc: Sidecar, runtime: Runtime) -> None:
    big = json.dumps({"agent": AGENT, "message": "x" * (1 << 20)}).encode()
    assert_outcome(await one(sc, good(body=big)), (413, "payload_too_large"))
    chunked_big = request(
        headers=[AUTH, JSON_TYPE, ("Transfer-Encoding", "chunked")],
        body=chunked(*[big[i : i + 8192] for i in range(0, len(big), 8192)]),
        length=False,
    )
    assert_outcome(await one(sc, chunked_big), (413, "payload_too_large"))
    # Without a token, authentication comes first: nothing about the body is judged.
    assert_outcome(await one(sc, request(headers=[JSON_TYPE], body=big)), (401, "unauthorized"))
    assert runtime.calls == []


async def test_a_1_mib_message_under_a_larger_body_limit_is_too_long(
    make_sidecar: Any, runtime: Runtime
) -> None:
    sc = await make_sidecar(base_doc(runtime.path, limits={"maxBodyBytes": 2 << 20}))
    big = json.dumps({"agent": AGENT, "message": "x" * (1 << 20)}).encode()
    resp = await one(sc, good(body=big))
    assert_outcome(resp, (400, "invalid_request"))
    assert "message" in resp.json()["message"]
    assert runtime.calls == []


@pytest.mark.parametrize(
    ("content_type", "want"),
    [
        ("application/json; charset=utf-8", 200),
        ("application/json; charset=UTF-8", 200),
        ("Application/JSON", 200),
        ("application/json; charset=latin-1", (415, "unsupported_media_type")),
        ("application/json; charset=utf-16", (415, "unsupported_media_type")),
        ("application/jsonx", (415, "unsupported_media_type")),
        ("application/json-seq", (415, "unsupported_media_type")),
        ("text/json", (415, "unsupported_media_type")),
        ("text/plain", (415, "unsupported_media_type")),
        ("multipart/form-data; boundary=x", (415, "unsupported_media_type")),
        ("application/x-www-form-urlencoded", (415, "unsupported_media_type")),
        ("", (415, "unsupported_media_type")),
    ],
)
async def test_content_type_variants(
    sc: Sidecar, runtime: Runtime, content_type: str, want: Any
) -> None:
    resp = await one(sc, request(headers=[AUTH, ("Content-Type", content_type)], body=AGENT_BODY))
    assert_outcome(resp, want)
    assert len(runtime.calls) == (1 if want == 200 else 0)


async def test_missing_content_type_is_415(sc: Sidecar, runtime: Runtime) -> None:
    assert_outcome(
        await one(sc, request(headers=[AUTH], body=AGENT_BODY)), (415, "unsupported_media_type")
    )
    assert runtime.calls == []


# ---------------------------------------------------------------- logs


@pytest.mark.slow
async def test_refused_raw_bytes_and_tokens_never_reach_the_log(
    runtime: Runtime, short_tmp: Path, sidecar_process: Any
) -> None:
    """aiohttp logs a parse error with the offending bytes (and writes them into its bare
    400): the sidecar's log must carry neither the token nor anything the client sent."""
    port, admin = free_port(), free_port()
    doc = base_doc(runtime.path, listen=f"127.0.0.1:{port}", admin={"listen": f"127.0.0.1:{admin}"})
    doc["sidecar"]["log"] = {"level": "debug"}
    proc = sidecar_process(write_config(short_tmp, doc), admin)
    marker = "Zq7MarkerXw"
    for data in [
        *FRAMING.values(),
        good(f"/hooks/agent?{marker}=1").replace(b"HTTP/1.1", b"HTTP/1.1 " + marker.encode()),
        request(
            headers=[("Authorization", f"Bearer {SECRET}{marker}"), ("X-M", marker)],
            body=b"{}",
            eol=b"\n",
        ),
        request(f"/{marker}", [AUTH, (marker, f"{marker}\x01")], body=b"{}"),
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"
        + marker.encode()
        + SECRET.encode(),  # TLS to HTTP
        marker.encode() + b" / HTTP/1.1\r\nAuthorization: Bearer " + SECRET.encode() + b"\r\n\r\n",
    ]:
        await exchange(port, data, expect=1, timeout=5)
    resp = await one_to(
        port, good(body=b'{"agent": "my-agent", "message": "%s"}' % marker.encode())
    )
    assert resp.status == 200  # the process still serves, and its audit line is written
    proc.stop()
    log = "\n".join(proc.lines)
    assert "Error handling request" in log or "malformed" in log  # the refusals were logged
    assert SECRET not in log
    assert marker not in log
    assert SECRET[:16] not in log and SECRET[-16:] not in log


async def one_to(port: int, data: bytes) -> RawResponse:
    responses, _ = await exchange(port, data, expect=1)
    return responses[0]


@pytest.mark.slow
async def test_framing_is_refused_by_aiohttps_pure_python_parser_too(
    runtime: Runtime, short_tmp: Path, sidecar_process: Any
) -> None:
    """Where aiohttp's C extensions are missing (AIOHTTP_NO_EXTENSIONS, an unusual
    platform) its Python parser runs instead: the same requests must be refused."""
    port, admin = free_port(), free_port()
    doc = base_doc(runtime.path, listen=f"127.0.0.1:{port}", admin={"listen": f"127.0.0.1:{admin}"})
    sidecar_process(write_config(short_tmp, doc), admin, env={"AIOHTTP_NO_EXTENSIONS": "1"})
    answered = {name: (await one_to(port, data)).status for name, data in FRAMING.items()}
    assert {n: s for n, s in answered.items() if s not in (400, 413, 431)} == {}
    assert runtime.calls == []
    assert_outcome(await one_to(port, good()), 200)
    assert len(runtime.calls) == 1
