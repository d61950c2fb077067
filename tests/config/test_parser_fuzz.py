"""Property: whatever the config document, the loader answers with settings or with a
:class:`ConfigError` whose every problem starts with a key path — never another
exception, never a secret in a problem, never a line a terminal cannot print.

Documents come from the docs/configuration.md schema: each known key is left out, given a value
of the right kind (often a wrong one of that kind: a bad duration, a short secret),
or given any JSON value at all; unknown and misspelt keys are mixed in. They are
written as JSON or as JSON5 (unquoted keys, single quotes, comments, trailing
commas, hex, NaN), and sometimes cut short or spliced.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Sequence
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.common import SECRET, ListWriter

from sidecar import config
from sidecar.app import State
from sidecar.logs import AuditLog
from sidecar.metrics import Metrics
from sidecar.settings import Settings

# Distinctive secret values: none may be quoted back in a problem.
SECRETS = [
    SECRET,
    "WEAKSECRET-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "ShortSecretXYZ",
    "\ud800" + SECRET,
]
OLD_SECRET = "9c4e1f7a2b8d3e6f0a5c9b1d4e7f2a8c3b6d9e0f1a4c7b2d5e8f3a6c9b0d2e4f"
KEY_PATH = re.compile(r"(config|webhooks|sidecar)([.\[:]|$)")
TOP_LEVEL_TYPO = re.compile(
    r".+: unknown key( \(did you mean '(webhooks|sidecar)'\?\))?", re.DOTALL
)

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.sampled_from([10**400, -(10**400), 0, -1, 2**63])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
)
any_json = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)

durations = st.sampled_from(
    [
        "1s",
        "500ms",
        "5m",
        "1h",
        5,
        0.25,
        0,
        -1,
        "1d",
        "5 s",
        "",
        "1e3s",
        1e308,
        10**400,
        "9" * 400 + "h",
    ]
)
secret_values = st.sampled_from(SECRETS)
secret_sources = st.one_of(
    secret_values,
    st.fixed_dictionaries({"value": secret_values}),
    st.sampled_from(
        [
            {"env": "TEST_WEBHOOK_SECRET"},
            {"env": "WHS_UNSET"},
            {"env": ""},
            {"env": "A\x00B"},
            {"file": "/nonexistent/secret"},
            {"file": "/dev/zero"},
            {"file": "/etc"},
            {"file": "a\x00b"},
            {"file": "\ud800"},
            {"value": SECRET, "env": "TEST_WEBHOOK_SECRET"},
            {},
        ]
    ),
)
timestamps = st.sampled_from(
    [
        "2020-01-01T00:00:00Z",
        "2999-01-01T00:00:00+01:00",
        "2026-13-01T00:00:00Z",
        "2026-01-01",
        "9999-12-31T23:59:59-23:59",
        "x",
    ]
)
names = st.sampled_from(
    ["my-agent", "a", "A.b_c-1", "-bad", "", "x" * 65, "\ud800", "sp ace", "\x1b[2J"]
)
session_keys = st.sampled_from(
    ["s", "webhook-session", "order-1", "a:b@c", "-x", "", "x" * 129, "é"]
)
networks = st.sampled_from(
    [
        "10.0.0.0/8",
        "127.0.0.1",
        "::1",
        "2001:db8::/32",
        "::ffff:10.0.0.0/104",
        "10.0.0.0/33",
        "fe80::1%eth0",
        "x",
        "",
        "\ud800",
    ]
)
listens = st.sampled_from(
    [
        "127.0.0.1:8080",
        "0.0.0.0:0",
        "[::1]:9090",
        "localhost:1",
        "127.0.0.1:99999",
        "8080",
        ":80",
        "example.com:80",
        "127.0.0.1:" + "9" * 5000,
        "127.0.0.1:\u0668\u0660",
    ]
)
urls = st.sampled_from(
    [
        "http://127.0.0.1:18789",
        "http://[::1]:1",
        "https://127.0.0.1:1",
        "http://localhost",
        "http://127.0.0.1:99999",
        "http://x" * 2,
        "http://" + "x" * 64 + ":1",
        "http://\ud800:1",
        "http://[::1:1",
        "http://u:p@127.0.0.1:1",
        "http://127.0.0.1:1/p",
    ]
)
backends = st.sampled_from(
    [
        "memory",
        "redis://127.0.0.1:6379/0",
        "redis://:pw@127.0.0.1:1/15",
        "redis://h:0/0",
        "redis://h/16",
        "redis://[::1:1/0",
        "memcached://x",
        "",
    ]
)
ints = st.integers(min_value=-5, max_value=2 * 10**9) | st.sampled_from([10**400, 1.5, True, "5"])


def maybe(value: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly the right kind of value, sometimes any JSON value."""
    return st.one_of(value, value, value, any_json)


def obj(
    fields: dict[str, st.SearchStrategy[Any]], misspell: Sequence[str] = ()
) -> st.SearchStrategy[dict[str, Any]]:
    """An object with any subset of ``fields`` (each ``maybe``), and now and then an
    unknown key or a misspelling of a known one."""
    extra = st.sampled_from([*misspell, "unknown", "__proto__", "", "\ud800"])

    @st.composite
    def build(draw: Any) -> dict[str, Any]:
        doc = {}
        for key, strategy in fields.items():
            if draw(st.booleans()):
                doc[key] = draw(maybe(strategy))
        if draw(st.integers(0, 5)) == 0:
            doc[draw(extra)] = draw(any_json)
        return doc

    return build()


rate_limit = obj({"requests": ints, "per": durations, "burst": ints}, ["request"])
agent = obj(
    {
        "sessionKey": session_keys,
        "allowRequestSessionKey": st.booleans(),
        "sessionKeyPrefixes": st.lists(session_keys, max_size=3),
        "rateLimit": rate_limit,
        "maxConcurrent": ints,
        "agentId": names,
        "wakeText": st.text(max_size=10),
    },
    ["sessionkey", "session_key"],
)
secret_entry = st.builds(
    lambda source, extra: {**(source if isinstance(source, dict) else {"value": source}), **extra},
    secret_sources,
    obj(
        {
            "id": names,
            "notBefore": timestamps,
            "notAfter": timestamps,
            "agents": st.lists(names, max_size=2),
        }
    ),
)
webhooks = obj(
    {
        "enabled": st.booleans(),
        "secret": secret_sources,
        "secrets": st.lists(secret_entry, max_size=3),
        "agents": st.dictionaries(names, agent, max_size=3),
    },
    ["secrte", "agent"],
)
sidecar = obj(
    {
        "listen": listens,
        "tls": obj(
            {
                "certFile": st.sampled_from(["/nonexistent.pem", "", "a\x00"]),
                "keyFile": st.just("/nonexistent"),
                "minVersion": st.sampled_from(["1.2", "1.3", "1.1"]),
            }
        ),
        "admin": obj({"listen": listens}),
        "upstream": obj(
            {
                "socket": st.sampled_from(
                    ["/run/x.sock", "", "/" + "s" * 120, "/x\x00", "/x\ud800"]
                ),
                "url": urls,
                "protocol": st.sampled_from(["forward", "openclaw", "grpc"]),
                "token": secret_sources,
                "timeout": durations,
            }
        ),
        "allowIps": st.lists(networks, max_size=3),
        "trustedProxies": st.lists(networks, max_size=3),
        "rateLimit": obj(
            {
                "perIp": rate_limit,
                "global": rate_limit,
                "backend": backends,
                "failOpen": st.booleans(),
            }
        ),
        "authLockout": obj({"maxFailures": ints, "window": durations, "duration": durations}),
        "limits": obj(
            {
                "maxBodyBytes": ints,
                "maxMessageChars": ints,
                "headerTimeout": durations,
                "bodyTimeout": durations,
                "maxConnections": ints,
            }
        ),
        "minSecretLength": ints,
        "shutdownTimeout": durations,
        "log": obj(
            {
                "level": st.sampled_from(["debug", "info", "loud"]),
                "format": st.sampled_from(["json", "text", "xml"]),
            }
        ),
    },
    ["listn", "rateLimits"],
)

# A complete valid document (every docs/configuration.md key but tls, which needs files); most
# generated documents are this with a few mutations, so they get deep into the
# loader instead of stopping at the first missing key.
VALID: dict[str, Any] = {
    "webhooks": {
        "enabled": True,
        "secrets": [
            {"id": "current", "env": "TEST_WEBHOOK_SECRET"},
            {
                "id": "old",
                "value": OLD_SECRET,
                "notAfter": "2999-01-01T00:00:00Z",
                "agents": ["my-agent"],
            },
        ],
        "agents": {
            "my-agent": {
                "sessionKey": "s",
                "allowRequestSessionKey": True,
                "sessionKeyPrefixes": ["order-"],
                "rateLimit": {"requests": 10, "per": "1m", "burst": 5},
                "maxConcurrent": 4,
                "agentId": "main",
                "wakeText": "wake",
            },
            "other": {},
        },
    },
    "sidecar": {
        "listen": "127.0.0.1:8080",
        "admin": {"listen": "127.0.0.1:9090"},
        "upstream": {
            "socket": "/run/x.sock",
            "protocol": "forward",
            "token": {"value": "upstream-token-1"},
            "timeout": "10s",
        },
        "allowIps": ["10.0.0.0/8"],
        "trustedProxies": ["127.0.0.1"],
        "rateLimit": {
            "perIp": {"requests": 60, "per": "1m", "burst": 20},
            "global": {"requests": 100, "per": "1s"},
            "backend": "memory",
            "failOpen": False,
        },
        "authLockout": {"maxFailures": 10, "window": "1m", "duration": "5m"},
        "limits": {
            "maxBodyBytes": 65536,
            "maxMessageChars": 32768,
            "headerTimeout": "10s",
            "bodyTimeout": "10s",
            "maxConnections": 1024,
        },
        "minSecretLength": 32,
        "shutdownTimeout": "15s",
        "log": {"level": "info", "format": "json"},
    },
}
LEAF = {
    "enabled": st.booleans(),
    "secret": secret_sources,
    "sessionKey": session_keys,
    "sessionKeyPrefixes": st.lists(session_keys, max_size=3),
    "agentId": names,
    "id": names,
    "notAfter": timestamps,
    "notBefore": timestamps,
    "agents": st.lists(names, max_size=2),
    "value": secret_values,
    "env": st.sampled_from(["TEST_WEBHOOK_SECRET", "WHS_UNSET", "\ud800"]),
    "listen": listens,
    "socket": st.sampled_from(["/x.sock", "", "/x\x00", "/" + "s" * 120]),
    "url": urls,
    "token": secret_sources,
    "backend": backends,
    "allowIps": st.lists(networks, max_size=3),
    "trustedProxies": st.lists(networks, max_size=3),
    "protocol": st.sampled_from(["forward", "openclaw", "x"]),
    "requests": ints,
    "burst": ints,
    "maxConcurrent": ints,
    "maxFailures": ints,
    "maxBodyBytes": ints,
    "maxMessageChars": ints,
    "maxConnections": ints,
    "minSecretLength": ints,
    "per": durations,
    "timeout": durations,
    "window": durations,
    "duration": durations,
    "headerTimeout": durations,
    "bodyTimeout": durations,
    "shutdownTimeout": durations,
}


def paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix] if prefix else []
    if isinstance(doc, dict):
        for k, v in doc.items():
            found += paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            found += paths(v, (*prefix, i))
    return found


@st.composite
def mutated(draw: Any) -> Any:
    """``VALID`` with up to four edits: a key set to a value of its kind (or any JSON),
    removed, misspelt, or a stranger added beside it."""
    doc = json.loads(json.dumps(VALID))
    for _ in range(draw(st.integers(0, 4))):
        path = draw(st.sampled_from(paths(doc) or [()]))
        if not path:
            break
        parent = doc
        for step in path[:-1]:
            parent = parent[step]
        key = path[-1]
        action = draw(st.integers(0, 4))
        if action == 0 and isinstance(parent, dict):
            del parent[key]
        elif action == 1 and isinstance(parent, dict):
            parent[str(key) + draw(st.sampled_from(["s", "x", "_"]))] = parent.pop(key)
        elif action == 2 and isinstance(parent, dict):
            parent[draw(st.text(max_size=6))] = draw(any_json)
        else:
            parent[key] = draw(maybe(LEAF.get(str(key), any_json)))
    return doc


documents = st.one_of(
    mutated(),
    mutated(),
    obj({"webhooks": webhooks, "sidecar": sidecar}, ["webhook"]),
    any_json,
)


def json5(value: Any, draw: Any) -> str:
    """``value`` in JSON5 spellings chosen by ``draw``."""
    if isinstance(value, dict):
        items = []
        for k, v in value.items():
            key = (
                k
                if re.fullmatch(r"[A-Za-z_$][A-Za-z0-9_$]*", k) and draw(st.booleans())
                else json.dumps(k)
            )
            items.append(f"{key}: {json5(v, draw)}")
        comma = "," if items and draw(st.booleans()) else ""
        return "{" + ", ".join(items) + comma + "}"
    if isinstance(value, list):
        return "[" + ", ".join(json5(v, draw) for v in value) + "]"
    if isinstance(value, str) and "'" not in value and "\\" not in value and draw(st.booleans()):
        return "'" + json.dumps(value)[1:-1].replace('\\"', '"') + "'"
    if (
        isinstance(value, int)
        and not isinstance(value, bool)
        and 0 <= value < 10**20
        and draw(st.booleans())
    ):
        return hex(value)
    text = json.dumps(value)
    return text + (" // c\n" if draw(st.integers(0, 9)) == 0 else "")


@st.composite
def texts(draw: Any) -> str:
    doc = draw(documents)
    text = (
        json5(doc, draw)
        if draw(st.booleans())
        else json.dumps(doc, ensure_ascii=draw(st.booleans()))
    )
    mutation = draw(st.integers(0, 9))
    if mutation == 0 and text:
        text = text[: draw(st.integers(0, len(text) - 1))]  # cut short
    elif mutation == 1:
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.text(max_size=4)) + text[at:]  # spliced
    return text


def check(text: str) -> None:
    try:
        loaded = config.loads(text)
    except config.ConfigError as exc:
        assert exc.problems, "a ConfigError without problems"
        for problem in exc.problems:
            assert KEY_PATH.match(problem) or TOP_LEVEL_TYPO.fullmatch(problem), problem
            assert problem.isprintable(), f"not printable: {problem!r}"
            assert "Traceback" not in problem
            for secret in SECRETS:
                assert secret not in problem and secret[:16] not in problem, problem
        return
    for warning in config.security_warnings(loaded):  # check-config's other half
        assert KEY_PATH.match(warning) and SECRET not in warning, warning
    asyncio.run(build(loaded))


async def build(loaded: Settings) -> None:
    """What `run` does next with a config that loaded: build the guards, the forwarder,
    the pool and the limiter (no connection is opened). It must not fail either."""
    state = State(loaded, Metrics(), AuditLog(ListWriter()))
    state.apply(loaded)
    state.close()
    await state.close_backends()


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(texts())
def test_any_document_loads_or_names_its_key_paths(text: str) -> None:
    check(text)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_any_text_loads_or_names_its_key_paths(text: str) -> None:
    check(text)


def test_the_generator_reaches_valid_documents_too() -> None:
    """The property is only as good as its documents: some must load, or the loader's
    later stages (secrets, agents, warnings) would never be exercised."""
    loaded = 0

    @settings(
        max_examples=100, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(mutated())
    def count(doc: dict[str, Any]) -> None:
        nonlocal loaded
        try:
            config.loads(json.dumps(doc))
            loaded += 1
        except config.ConfigError:
            pass

    count()
    assert loaded > 0
