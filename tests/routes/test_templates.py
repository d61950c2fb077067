"""Route templates in Jinja2's immutable sandbox: absent fields and null render empty,
the sandbox holds, syntax errors are config errors naming the key, runtime failures
are template errors naming the template (and never quoting the payload)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from support.common import AGENT, SECRET, Runtime
from support.senders import (
    GH_SECRET,
    GITHUB_PUSH,
    deliver,
    encode,
    github_headers,
    route,
    route_doc,
)

from sidecar.config.parser import ConfigError, loads
from sidecar.routes.templates import Expression, RenderError, Template, TemplateSyntaxError

CTX: dict[str, Any] = {
    "body": {"a": {"b": "deep"}, "n": None, "list": [1, 2], "text": "hi"},
    "headers": {"x-event": "push"},
    "route": "gh",
}


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("{{ body.a.b }}", "deep"),
        ("{{ body['a']['b'] }}", "deep"),
        ("[{{ body.missing }}]", "[]"),
        ("[{{ body.missing.deeper.still }}]", "[]"),
        ("[{{ body.n }}]", "[]"),
        ("{{ headers['x-event'] }}/{{ headers['x-none'] }}", "push/"),
        ("{{ route }}", "gh"),
        ("{{ body.list | length }}", "2"),
        ("{{ body.text | upper }}", "HI"),
        ("{{ body.missing | default('fallback') }}", "fallback"),
        ("<{{ body.text }}>", "<hi>"),  # no HTML escaping: a message, not a page
    ],
)
def test_rendering(source: str, expected: str) -> None:
    assert Template("message", source).render(CTX) == expected


@pytest.mark.parametrize(
    "source",
    [
        "{{ body.__class__.__mro__[1].__subclasses__() }}",
        "{{ body.update({'x': 1}) }}",  # the payload is read-only
        "{{ body.list.append(3) }}",
        "{{ ''.__class__.__base__ }}",
    ],
)
def test_the_sandbox_holds(source: str) -> None:
    template = Template("message", source)
    try:
        out = template.render(CTX)
    except RenderError as exc:
        assert "message" in str(exc)
        return
    assert "class" not in out and "object" not in out  # rendered empty, not the object
    assert CTX["body"]["list"] == [1, 2]


def test_render_errors_name_the_template_not_the_payload() -> None:
    template = Template("sessionKey", "{{ body.text + 1 }}")
    with pytest.raises(RenderError) as err:
        template.render(CTX)
    assert "sessionKey" in str(err.value) and "hi" not in str(err.value)


def test_syntax_errors() -> None:
    with pytest.raises(TemplateSyntaxError, match="line 1"):
        Template("message", "{{ body.x ")
    with pytest.raises(TemplateSyntaxError):
        Expression("body.x ==")


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("headers['x-event'] in ['push', 'pull_request']", True),
        ("body.a.b == 'deep' and route == 'gh'", True),
        ("body.missing.x == 'y'", False),
        ("body.missing", False),
        ("{{ body.a.b == 'deep' }}", True),  # braces are tolerated
        ("body.list | length > 5", False),
    ],
)
def test_when_expressions(source: str, expected: bool) -> None:
    assert Expression(source)(CTX) is expected


def config(route_spec: dict[str, Any]) -> str:
    return json.dumps(
        {
            "webhooks": {
                "secret": SECRET,
                "agents": {AGENT: {}},
                "routes": {"github": route_spec},
            }
        }
    )


@pytest.mark.parametrize("key", ["message", "sessionKey", "when"])
def test_a_syntax_error_is_a_config_error_naming_the_key(key: str) -> None:
    spec = route("github", GH_SECRET, when="true")
    spec[key] = "{{ body.x " if key != "when" else "body.x =="
    with pytest.raises(ConfigError) as err:
        loads(config(spec))
    assert f"webhooks.routes.github.{key}:" in str(err.value)


async def test_a_failing_when_is_a_template_error(make_sidecar: Any, runtime: Runtime) -> None:
    spec = route("github", GH_SECRET, when="body.ref + 1")
    sc = await make_sidecar(route_doc(runtime.path, {"github": spec}))
    body = encode(GITHUB_PUSH)
    status, _, reply = await deliver(sc, "/hooks/github", body, github_headers(body))
    assert (status, reply["error"]) == (422, "template_error")
    assert "when" in reply["message"] and "refs/heads" not in reply["message"]


async def test_headers_never_hold_credentials_or_the_signature(
    make_sidecar: Any, runtime: Runtime
) -> None:
    spec = route("github", GH_SECRET, message="{{ headers | dictsort | list }}", when="true")
    sc = await make_sidecar(route_doc(runtime.path, {"github": spec}))
    body = encode(GITHUB_PUSH)
    headers = {**github_headers(body), "Cookie": "session=abc", "Authorization": "Bearer zzz"}
    status, _, reply = await deliver(sc, "/hooks/github", body, headers)
    assert status == 200, reply
    message = runtime.calls[0]["message"]
    assert "x-github-event" in message and "x-github-delivery" in message
    for hidden in ("x-hub-signature", "cookie", "authorization", "session=abc", "zzz"):
        assert hidden not in message
