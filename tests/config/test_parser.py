"""Config loading (docs/configuration.md): the seed's example loads, every mistake names its
key path, and no message ever contains a secret."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from support.common import OTHER_SECRET, SECRET, SEED_EXAMPLE

from sidecar import config
from sidecar.certs import write_demo_pki
from sidecar.config import ConfigError, load, loads, parse_duration
from sidecar.settings import Lockout, RateLimit, Settings

STRONG = "8f3a1c2e9b7d4f6a0c5e8b1d3f7a9c2e4b6d8f0a1c3e5b7d9f2a4c6e8b0d1f3a"


def problems(doc: Any, **kwargs: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        loads(json.dumps(doc) if not isinstance(doc, str) else doc, **kwargs)
    return info.value.problems


def minimal(**webhooks: Any) -> dict[str, Any]:
    return {"webhooks": {"secret": STRONG, "agents": {"my-agent": {}}, **webhooks}}


def test_the_seeds_example_loads_unchanged_with_a_strong_secret() -> None:
    text = SEED_EXAMPLE % STRONG
    settings = loads(text)
    assert settings.webhooks.enabled
    assert settings.webhooks.agents["alert-handler"].session_key == "alert-session"
    [secret] = settings.webhooks.secrets
    assert secret.id == "default" and secret.value == STRONG.encode()
    s = settings.sidecar
    assert (str(s.listen), str(s.admin_listen)) == ("0.0.0.0:8080", "127.0.0.1:9090")
    assert s.upstream.socket == "/run/agent/hooks.sock" and s.upstream.protocol == "forward"
    assert s.upstream.timeout == 10.0 and s.limits.max_body_bytes == 65536


def test_the_seeds_weak_demo_secret_fails_with_a_clear_message() -> None:
    [problem] = problems(minimal(secret="your-secret-token"))
    assert problem.startswith("webhooks.secret: ")
    assert "minSecretLength" in problem and "gen-secret" in problem
    assert "your-secret-token" not in problem


def test_the_full_spec_example_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "current").write_text(SECRET + "\n")
    (tmp_path / "previous").write_text(OTHER_SECRET)
    (tmp_path / "upstream-token").write_text("gateway-token\n")
    write_demo_pki(tmp_path, ["localhost"])  # TLS files are loaded, not only found
    for name, pem in (("cert.pem", "server.pem"), ("key.pem", "server-key.pem")):
        (tmp_path / pem).rename(tmp_path / name)
    monkeypatch.setenv("CI_WEBHOOK_SECRET", "c1" * 8 + "0123456789abcdef" * 3)
    text = """{
      webhooks: {
        enabled: true,
        secrets: [
          { id: "2026-11", file: "current" },
          { id: "2026-10", file: "previous", notAfter: "2099-12-01T00:00:00Z" },
          { id: "ci", env: "CI_WEBHOOK_SECRET", agents: ["devops-agent"] },
        ],
        agents: {
          "my-agent": {
            sessionKey: "webhook-session",
            allowRequestSessionKey: true,
            sessionKeyPrefixes: ["order-"],
            rateLimit: { requests: 10, per: "1m", burst: 5 },
            maxConcurrent: 4,
            agentId: "main",
            wakeText: "Webhook wake",
          },
          "devops-agent": {},
        },
      },
      sidecar: {
        listen: "0.0.0.0:8080",
        tls: {
          certFile: "cert.pem", keyFile: "key.pem", clientCaFile: "ca.pem", minVersion: "1.2",
        },
        admin: { listen: "127.0.0.1:9090" },
        upstream: {
          socket: "/run/agent/hooks.sock", protocol: "forward",
          token: { file: "upstream-token" }, timeout: "10s",
        },
        allowIps: ["10.0.0.0/8", "2001:db8::/32"],
        trustedProxies: ["10.0.0.5/32"],
        rateLimit: {
          perIp: { requests: 60, per: "1m", burst: 20 },
          global: { requests: 100, per: "1s" },
          backend: "memory",
          failOpen: false,
        },
        authLockout: { maxFailures: 10, window: "1m", duration: "5m" },
        limits: {
          maxBodyBytes: 65536, maxMessageChars: 32768, headerTimeout: "10s", bodyTimeout: "10s",
        },
        minSecretLength: 32,
        shutdownTimeout: "15s",
        log: { level: "info", format: "json" },
      },
    }"""
    path = tmp_path / "config.json5"
    path.write_text(text)
    s = load(path)
    assert [x.id for x in s.webhooks.secrets] == ["2026-11", "2026-10", "ci"]
    assert s.webhooks.secrets[0].value == SECRET.encode()  # trailing newline dropped
    assert s.webhooks.secrets[2].agents == frozenset({"devops-agent"})
    agent = s.webhooks.agents["my-agent"]
    assert agent.rate_limit == RateLimit(10, 60.0, 5) and agent.max_concurrent == 4
    assert agent.agent_id == "main" and agent.session_key_prefixes == ("order-",)
    assert s.sidecar.rate_limit.global_ == RateLimit(100, 1.0, 100)  # burst defaults to requests
    assert s.sidecar.auth_lockout == Lockout(10, 60.0, 300.0)
    assert (
        s.sidecar.upstream.token is not None and s.sidecar.upstream.token.value == b"gateway-token"
    )
    assert tmp_path / "current" in s.watched_files and tmp_path / "cert.pem" in s.watched_files


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(30, 30.0), (1.5, 1.5), ("500ms", 0.5), ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0)],
)
def test_durations(value: Any, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", [0, -1, "5", "5 minutes", "1d", True, None, [], "nan"])
def test_bad_durations(value: Any) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        ({**minimal(), "extra": 1}, "extra: unknown key"),
        ({**minimal(), "webhook": {}}, "webhook: unknown key (did you mean 'webhooks'?)"),
        ({**minimal(), "Sidecar": {}}, "Sidecar: unknown key (did you mean 'sidecar'?)"),
        (minimal(enabeld=True), "webhooks.enabeld: unknown key (did you mean 'enabled'?)"),
        (
            {**minimal(), "sidecar": {"listn": "x"}},
            "sidecar.listn: unknown key (did you mean 'listen'?)",
        ),
        (minimal(enabled="yes"), "webhooks.enabled: must be true or false"),
        (
            minimal(agents={"my-agent": {"sessionKey": 5}}),
            "webhooks.agents.my-agent.sessionKey: must be a string",
        ),
        (
            minimal(agents={"my-agent": {"sessionKey": "has space"}}),
            "webhooks.agents.my-agent.sessionKey: session keys must match",
        ),
        (minimal(agents={"bad name": {}}), "webhooks.agents.bad name: agent names must match"),
        (
            minimal(agents={"my-agent": {"maxConcurrent": 0}}),
            "webhooks.agents.my-agent.maxConcurrent: must be between 1",
        ),
        (
            minimal(agents={"my-agent": {"rateLimit": {"requests": 5, "per": "soon"}}}),
            "webhooks.agents.my-agent.rateLimit.per: must be a duration",
        ),
        (
            minimal(agents={"my-agent": {"sessionKeyPrefixes": "order-"}}),
            "webhooks.agents.my-agent.sessionKeyPrefixes: must be a list",
        ),
        (minimal(agents=[]), "webhooks.agents: must be an object"),
        (
            {"webhooks": {"agents": {}}},
            "webhooks: exactly one of 'secret' and 'secrets' is required",
        ),
        (
            minimal(secrets=[{"id": "a", "value": STRONG}]),
            "webhooks: exactly one of 'secret' and 'secrets'",
        ),
        ({"webhooks": {"secrets": [], "agents": {}}}, "webhooks.secrets: must be a non-empty list"),
        (
            {"webhooks": {"secrets": [{"value": STRONG}], "agents": {}}},
            "webhooks.secrets[0].id: is required",
        ),
        (
            {"webhooks": {"secrets": [{"id": "bad id", "value": STRONG}], "agents": {}}},
            "webhooks.secrets[0].id: secret ids must match",
        ),
        (
            {"webhooks": {"secrets": [{"id": "a", "value": STRONG, "file": "x"}], "agents": {}}},
            "webhooks.secrets[0]: needs exactly one of 'value', 'file', 'env'",
        ),
        (
            {
                "webhooks": {
                    "secrets": [{"id": "a", "value": STRONG}, {"id": "a", "value": STRONG[::-1]}],
                    "agents": {},
                }
            },
            "webhooks.secrets[1].id: duplicate secret id 'a'",
        ),
        (
            {
                "webhooks": {
                    "secrets": [{"id": "a", "value": STRONG}, {"id": "b", "value": STRONG}],
                    "agents": {},
                }
            },
            "webhooks.secrets[1]: secret 'b' has the same value as secret 'a'",
        ),
        (
            {
                "webhooks": {
                    "secrets": [{"id": "a", "value": STRONG, "agents": ["ghost"]}],
                    "agents": {},
                }
            },
            "webhooks.secrets[0].agents: unknown agent 'ghost'",
        ),
        (
            {
                "webhooks": {
                    "secrets": [{"id": "a", "value": STRONG, "notAfter": "2020-01-01"}],
                    "agents": {},
                }
            },
            "webhooks.secrets[0].notAfter: must be an RFC 3339 time with a zone",
        ),
        (
            {
                "webhooks": {
                    "secrets": [{"id": "a", "value": STRONG, "notAfter": "2020-01-01T00:00:00Z"}],
                    "agents": {},
                }
            },
            "webhooks.secrets: no secret is valid now",
        ),
        (
            {
                "webhooks": {
                    "secrets": [
                        {
                            "id": "a",
                            "value": STRONG,
                            "notBefore": "2030-01-01T00:00:00Z",
                            "notAfter": "2029-01-01T00:00:00Z",
                        }
                    ],
                    "agents": {},
                }
            },
            "webhooks.secrets[0].notAfter: must be later than notBefore",
        ),
        (
            minimal(secret="a" * 40),
            "webhooks.secret: secret 'default' is weak: it is one block repeated",
        ),
        (
            minimal(secret={"env": "WHS_UNSET_VARIABLE"}),
            "webhooks.secret.env: environment variable WHS_UNSET_VARIABLE is not set",
        ),
        (
            minimal(secret={"file": "/nonexistent/secret"}),
            "webhooks.secret.file: cannot read /nonexistent/secret",
        ),
        (
            minimal(secret=5),
            "webhooks.secret: must be a string, {file: PATH}, {env: NAME} or {value: ...}",
        ),
        (
            {"webhooks": {"secrets": ["a-secret-string"], "agents": {}}},
            "webhooks.secrets[0]: must be an object: {id: ..., file: PATH}, {id: ..., env: NAME}",
        ),
        (
            {**minimal(), "sidecar": {"upstream": {"socket": "/x.sock", "token": 5}}},
            "sidecar.upstream.token: must be a string, {file: PATH}, {env: NAME} or {value: ...}",
        ),
        ({**minimal(), "sidecar": {"listen": "8080"}}, "sidecar.listen: must be host:port"),
        (
            {**minimal(), "sidecar": {"listen": "example.com:80"}},
            "sidecar.listen: host must be an IP address",
        ),
        (
            {**minimal(), "sidecar": {"admin": {"listen": "0.0.0.0:8080"}}},
            "sidecar.admin.listen: must not share the public port",
        ),
        (
            {**minimal(), "sidecar": {"allowIps": ["10.0.0.0/33"]}},
            "sidecar.allowIps: [0]: not an IP address or CIDR network",
        ),
        (
            {**minimal(), "sidecar": {"trustedProxies": "10.0.0.1"}},
            "sidecar.trustedProxies: must be a list",
        ),
        (
            {**minimal(), "sidecar": {"upstream": {"socket": "/a", "url": "http://127.0.0.1:1"}}},
            "sidecar.upstream: exactly one of 'socket' and 'url'",
        ),
        (
            {**minimal(), "sidecar": {"upstream": {"url": "https://127.0.0.1:1"}}},
            "sidecar.upstream.url: must be an http:// URL",
        ),
        (
            {**minimal(), "sidecar": {"upstream": {"url": "http://127.0.0.1:1/hooks"}}},
            "sidecar.upstream.url: must be scheme, host and port only",
        ),
        (
            {**minimal(), "sidecar": {"upstream": {"socket": "/" + "s" * 120}}},
            "sidecar.upstream.socket: Unix socket paths are limited to 107 bytes",
        ),
        (
            {**minimal(), "sidecar": {"upstream": {"protocol": "grpc"}}},
            "sidecar.upstream.protocol: must be one of 'forward', 'openclaw'",
        ),
        (
            {
                **minimal(),
                "sidecar": {"upstream": {"url": "http://127.0.0.1:18789", "protocol": "openclaw"}},
            },
            "sidecar.upstream.token: is required with protocol 'openclaw'",
        ),
        (
            {**minimal(), "sidecar": {"upstream": {"token": "line\nbreak"}}},
            "sidecar.upstream.token: must not contain control characters",
        ),
        (
            {**minimal(), "sidecar": {"rateLimit": {"backend": "memcached://x"}}},
            "sidecar.rateLimit.backend: must be 'memory' or a redis://host:port/db URL",
        ),
        (
            {**minimal(), "sidecar": {"rateLimit": {"perIp": {"per": "1s"}}}},
            "sidecar.rateLimit.perIp.requests: is required",
        ),
        (
            {**minimal(), "sidecar": {"rateLimit": {"global": {"requests": 1.5}}}},
            "sidecar.rateLimit.global.requests: must be a whole number",
        ),
        (
            {**minimal(), "sidecar": {"authLockout": {"maxFailures": 0}}},
            "sidecar.authLockout.maxFailures: must be between 1",
        ),
        (
            {**minimal(), "sidecar": {"limits": {"maxBodyBytes": "64k"}}},
            "sidecar.limits.maxBodyBytes: must be a whole number",
        ),
        (
            {**minimal(), "sidecar": {"shutdownTimeout": 10**400}},
            "sidecar.shutdownTimeout: must be at most 1 year",
        ),
        (
            {**minimal(), "sidecar": {"upstream": {"timeout": 1e308}}},
            "sidecar.upstream.timeout: must be at most 1 year",
        ),
        (
            {**minimal(), "sidecar": {"rateLimit": {"perIp": {"requests": 1, "per": "9999999h"}}}},
            "sidecar.rateLimit.perIp.per: must be at most 1 year",
        ),
        (minimal(secret={"file": "a\x00b"}), "webhooks.secret.file: cannot read"),
        (minimal(secret={"file": "\ud800"}), "webhooks.secret.file: cannot read"),
        (
            minimal(secret="\ud800" + STRONG),
            "webhooks.secret.value: the value is not valid Unicode",
        ),
        (
            minimal(secret={"env": "\ud800"}),
            "webhooks.secret.env: the variable name is not valid Unicode",
        ),
        (
            {**minimal(), "sidecar": {"upstream": {"token": "\udfff" + STRONG}}},
            "sidecar.upstream.token.value: the value is not valid Unicode",
        ),
        (
            {**minimal(), "sidecar": {"upstream": {"url": "http://" + "x" * 64 + ":1"}}},
            "sidecar.upstream.url: has an invalid host name",
        ),
        (
            {**minimal(), "sidecar": {"upstream": {"url": "http://a..b:1"}}},
            "sidecar.upstream.url: has an invalid host name",
        ),
        (
            {**minimal(), "sidecar": {"listen": "127.0.0.1:\u0668\u0660"}},
            "sidecar.listen: must be host:port",
        ),
        (
            {**minimal(), "sidecar": {"listen": "127.0.0.1:" + "9" * 5000}},
            "sidecar.listen: must be host:port",
        ),
        (
            {**minimal(), "sidecar": {"workers": 0}},
            "sidecar.workers: must be between 1 and 64",
        ),
        (
            {**minimal(), "sidecar": {"workers": 65}},
            "sidecar.workers: must be between 1 and 64",
        ),
        (
            {**minimal(), "sidecar": {"workers": "all"}},
            "sidecar.workers: must be a whole number between 1 and 64, or 'auto'",
        ),
        (
            {**minimal(), "sidecar": {"workers": 2.5}},
            "sidecar.workers: must be a whole number",
        ),
        (
            {**minimal(), "sidecar": {"workers": True}},
            "sidecar.workers: must be a whole number",
        ),
        (
            {**minimal(), "sidecar": {"limits": {"maxConnections": 0}}},
            "sidecar.limits.maxConnections: must be between 1 and 1000000",
        ),
        (
            {**minimal(), "sidecar": {"limits": {"maxConnections": "1k"}}},
            "sidecar.limits.maxConnections: must be a whole number",
        ),
        (
            {
                **minimal(),
                "sidecar": {"tls": {"certFile": "/nonexistent.pem", "keyFile": "/nonexistent.pem"}},
            },
            "sidecar.tls.certFile: cannot read file",
        ),
        (
            {
                **minimal(),
                "sidecar": {
                    "tls": {
                        "certFile": "/etc/hostname",
                        "keyFile": "/etc/hostname",
                        "minVersion": "1.1",
                    }
                },
            },
            "sidecar.tls.minVersion: must be one of '1.2', '1.3'",
        ),
        ({**minimal(), "sidecar": {"log": {"level": "loud"}}}, "sidecar.log.level: must be one of"),
        (
            {**minimal(), "sidecar": {"shutdownTimeout": -5}},
            "sidecar.shutdownTimeout: must be a positive duration",
        ),
        ([], "config: must be an object"),
        ({}, "webhooks: is required"),
    ],
)
def test_each_mistake_names_its_key_path(doc: Any, expected: str) -> None:
    found = problems(doc)
    assert any(p.startswith(expected) for p in found), found


def test_all_problems_are_reported_together() -> None:
    found = problems(
        {
            "webhooks": {"enabled": 1, "secret": "short", "agents": {"a": {"sessionKey": 5}}},
            "sidecar": {"listn": 1},
        }
    )
    assert len(found) == 4


def test_not_json5_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.json5"
    path.write_text("{webhooks: ")
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.problems[0].startswith(f"{path}: not valid JSON5")


def test_json5_syntax_error_names_the_file_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "bad.json5"
    path.write_text('{\n  webhooks: {\n    secret: "x",\n  }},\n}\n')
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.problems == [f'{path}: not valid JSON5 at line 4, column 5: Unexpected ","']
    assert "<string>" not in str(info.value)


def test_duplicate_keys_in_the_file_are_refused() -> None:
    text = f'{{webhooks: {{secret: "{STRONG}", secret: "{STRONG[::-1]}", agents: {{}}}}}}'
    [problem] = problems(text)
    assert "not valid JSON5" in problem and STRONG not in problem


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load(tmp_path / "nope.json5")


def test_secret_values_never_appear_in_messages_or_repr(tmp_path: Path) -> None:
    weak = "hunter2-weak-secret"
    found = problems(
        {
            "webhooks": {
                "secrets": [{"id": "a", "value": weak}, {"id": "b", "value": weak}],
                "agents": {},
            }
        }
    )
    assert found and all(weak not in p for p in found)
    settings = loads(json.dumps(minimal()))
    assert STRONG not in repr(settings) and STRONG not in str(settings.webhooks.secrets[0])


def test_file_secret_keeps_inner_whitespace_but_drops_one_trailing_newline(tmp_path: Path) -> None:
    (tmp_path / "s").write_text(STRONG + "\n\n")
    settings = load_doc(tmp_path, minimal(secret={"file": "s"}))
    assert settings.webhooks.secrets[0].value == (STRONG + "\n").encode()


def load_doc(folder: Path, doc: dict[str, Any]) -> Settings:
    path = folder / "config.json5"
    path.write_text(json.dumps(doc))
    return load(path)


def test_min_secret_length_can_be_lowered() -> None:
    settings = loads(
        json.dumps({**minimal(secret="your-secret-token"), "sidecar": {"minSecretLength": 8}})
    )
    assert settings.webhooks.secrets[0].value == b"your-secret-token"


def test_ipv4_mapped_networks_count_as_ipv4() -> None:
    settings = loads(
        json.dumps({**minimal(), "sidecar": {"allowIps": ["::ffff:10.0.0.0/104", "192.0.2.7"]}})
    )
    assert [str(n) for n in settings.sidecar.allow_ips or ()] == ["10.0.0.0/8", "192.0.2.7/32"]


def test_openclaw_defaults_to_a_20s_timeout() -> None:
    doc = {
        **minimal(),
        "sidecar": {
            "upstream": {
                "url": "http://127.0.0.1:18789",
                "protocol": "openclaw",
                "token": "gw-token",
            }
        },
    }
    up = loads(json.dumps(doc)).sidecar.upstream
    assert (up.timeout, up.host, up.port, up.socket) == (20.0, "127.0.0.1", 18789, None)


@pytest.mark.parametrize(
    ("protocol", "max_body", "warned"),
    [("openclaw", 262_144, True), ("openclaw", 261_120, False), ("forward", 1_000_000, False)],
)
def test_body_limit_above_the_openclaw_gateways_cap_is_a_warning(
    protocol: str, max_body: int, warned: bool
) -> None:
    doc = minimal()
    doc["sidecar"] = {
        "upstream": {"url": "http://127.0.0.1:18789", "protocol": protocol, "token": OTHER_SECRET},
        "limits": {"maxBodyBytes": max_body},
    }
    found = [w for w in config.security_warnings(loads(json.dumps(doc))) if "maxBodyBytes" in w]
    assert len(found) == int(warned)
    assert all("262144" in w and OTHER_SECRET not in w for w in found)


def test_max_connections_defaults_to_1024_and_can_be_set() -> None:
    assert loads(json.dumps(minimal())).sidecar.limits.max_connections == 1024
    doc = {**minimal(), "sidecar": {"limits": {"maxConnections": 50}}}
    assert loads(json.dumps(doc)).sidecar.limits.max_connections == 50


def test_problems_escape_what_a_terminal_cannot_take() -> None:
    """A key quoted from the file may hold a lone surrogate or an escape sequence: the
    problem line shows it escaped, so printing it neither raises nor drives a terminal."""
    found = problems(minimal(agents={"\ud800\x1b[2J": {}}))
    assert found == [
        "webhooks.agents.\\ud800\\x1b[2J: agent names must match [A-Za-z0-9][A-Za-z0-9._-]{0,63}"
    ]
    assert all(p.isprintable() for p in found)


def test_workers_defaults_to_1_and_auto_is_one_per_usable_cpu() -> None:
    assert loads(json.dumps(minimal())).sidecar.workers == 1
    assert loads(json.dumps({**minimal(), "sidecar": {"workers": 4}})).sidecar.workers == 4
    auto = loads(json.dumps({**minimal(), "sidecar": {"workers": "auto"}})).sidecar.workers
    assert auto == min(64, len(os.sched_getaffinity(0)))
