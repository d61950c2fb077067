"""``webhook-sidecar check-config``: each security warning (and its absence when the config is
tight), exit codes 0 and 2, ``--strict``; problems and warnings never print a secret."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from support.common import SECRET, SEED_EXAMPLE, base_doc, write_config

from sidecar import cli, config
from sidecar.certs import write_demo_pki

INLINE = "9c4e1f7a2b8d3e6f0a5c9b1d4e7f2a8c3b6d9e0f1a4c7b2d5e8f3a6c9b0d2e4f"


def tight_doc(folder: Path, **sidecar: Any) -> dict[str, Any]:
    """A config a security reviewer has nothing to say about."""
    doc = base_doc(
        folder / "rt.sock",
        listen="127.0.0.1:8080",
        allowIps=["10.0.0.0/8"],
        **sidecar,
    )
    doc["webhooks"]["agents"]["my-agent"]["sessionKeyPrefixes"] = ["order-"]
    return doc


@pytest.fixture
def run(short_tmp: Path, capsys: pytest.CaptureFixture[str]) -> Any:
    """check-config on a document (or JSON5 text): (exit code, stdout lines)."""

    def go(doc: dict[str, Any] | str, *args: str) -> tuple[int, list[str]]:
        path = short_tmp / "config.json5"
        if isinstance(doc, str):
            path.write_text(doc)
        else:
            write_config(short_tmp, doc)
        code = cli.main(["check-config", "-c", str(path), *args])
        out = capsys.readouterr()
        assert SECRET not in out.out + out.err and INLINE not in out.out + out.err
        return code, out.out.splitlines()

    return go


def warnings(lines: list[str]) -> list[str]:
    return [line.removeprefix("warning: ") for line in lines if line.startswith("warning: ")]


def test_a_tight_config_is_valid_without_warnings(run: Any, short_tmp: Path) -> None:
    code, lines = run(tight_doc(short_tmp))
    assert code == 0
    assert lines == [f"{short_tmp / 'config.json5'}: valid"]
    assert run(tight_doc(short_tmp), "--strict")[0] == 0


@pytest.mark.parametrize(
    ("change", "warning"),
    [
        (
            lambda d: d["sidecar"].pop("allowIps"),
            "sidecar.allowIps: not set, any address may call the hooks",
        ),
        (
            lambda d: d["sidecar"].update(listen="0.0.0.0:8080"),
            "sidecar.listen: 0.0.0.0:8080 is reachable from the network without TLS and without "
            "trustedProxies (tokens would cross the network in clear text)",
        ),
        (
            lambda d: d["sidecar"].update(listen="[::]:8080"),
            "sidecar.listen: [::]:8080 is reachable from the network without TLS and without "
            "trustedProxies (tokens would cross the network in clear text)",
        ),
        (
            lambda d: d["webhooks"]["agents"]["my-agent"].pop("sessionKeyPrefixes"),
            "webhooks.agents.my-agent: requests may choose any sessionKey; "
            "set sessionKeyPrefixes or allowRequestSessionKey: false",
        ),
        (
            lambda d: d["webhooks"].update(secret=INLINE),
            "webhooks: secret 'default' is written in the config file; "
            "prefer {file: ...} or {env: ...}",
        ),
        (
            lambda d: d["sidecar"]["upstream"].update(token={"value": "upstream-token"}),
            "sidecar.upstream.token: written in the config file; prefer {file: ...} or {env: ...}",
        ),
        (  # a second agent that reaches the runtime's "my-agent" shares its sessions
            lambda d: d["webhooks"]["agents"].update(
                {"ops": {"agentId": "my-agent", "allowRequestSessionKey": False}}
            ),
            "webhooks.agents: 'my-agent', 'ops' map to the same runtime agentId 'my-agent' "
            "and share its sessions; give each its own agentId",
        ),
    ],
)
def test_each_warning_alone(run: Any, short_tmp: Path, change: Any, warning: str) -> None:
    doc = tight_doc(short_tmp)
    change(doc)
    code, lines = run(doc)
    assert code == 0
    assert warnings(lines) == [warning]
    assert lines[-1].endswith(": valid, 1 warning(s)")
    assert run(doc, "--strict")[0] == 2


@pytest.mark.parametrize(
    "sidecar",
    [
        {"listen": "0.0.0.0:8080", "trustedProxies": ["10.0.0.5"]},  # behind a proxy
        {"listen": "127.0.0.1:8080"},
        {"listen": "localhost:8080"},
        {"listen": "[::1]:8080"},
    ],
)
def test_no_clear_text_warning_when_not_exposed(run: Any, short_tmp: Path, sidecar: Any) -> None:
    doc = tight_doc(short_tmp)
    doc["sidecar"].update(sidecar)
    assert warnings(run(doc)[1]) == []


def test_no_clear_text_warning_with_tls(run: Any, short_tmp: Path) -> None:
    write_demo_pki(short_tmp / "pki", ["localhost"])
    tls = {"certFile": "pki/server.pem", "keyFile": "pki/server-key.pem"}
    doc = tight_doc(short_tmp, tls=tls)
    doc["sidecar"]["listen"] = "0.0.0.0:8443"
    assert warnings(run(doc)[1]) == []


def test_agent_that_refuses_request_keys_needs_no_prefixes(run: Any, short_tmp: Path) -> None:
    doc = tight_doc(short_tmp)
    doc["webhooks"]["agents"]["my-agent"] = {"allowRequestSessionKey": False}
    assert warnings(run(doc)[1]) == []


def rfc3339(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).isoformat()


@pytest.mark.parametrize(
    ("not_after", "warning"),
    [
        (time.time() + 3 * 86400, "webhooks.secrets: secret 'previous' expires in 3.0 days"),
        (time.time() + 6.9 * 86400, "webhooks.secrets: secret 'previous' expires in 6.9 days"),
        (time.time() + 8 * 86400, None),
        (time.time() - 60, "webhooks.secrets: secret 'previous' has expired; remove it"),
    ],
)
def test_secret_expiry(run: Any, short_tmp: Path, not_after: float, warning: str | None) -> None:
    (short_tmp / "previous").write_text(INLINE)
    doc = tight_doc(short_tmp)
    del doc["webhooks"]["secret"]
    doc["webhooks"]["secrets"] = [
        {"id": "current", "env": "TEST_WEBHOOK_SECRET"},
        {"id": "previous", "file": "previous", "notAfter": rfc3339(not_after)},
    ]
    assert warnings(run(doc)[1]) == ([warning] if warning else [])


def test_certificate_expiring_within_a_week(short_tmp: Path) -> None:
    write_demo_pki(short_tmp / "pki", ["localhost"])
    tls = {"certFile": "pki/server.pem", "keyFile": "pki/server-key.pem"}
    settings = config.load(write_config(short_tmp, tight_doc(short_tmp, tls=tls)))
    assert settings.sidecar.tls is not None
    expires = settings.sidecar.tls.not_after
    assert config.security_warnings(settings, now=expires - 8 * 86400) == []
    assert config.security_warnings(settings, now=expires - 2 * 86400) == [
        "sidecar.tls.certFile: the certificate expires in 2.0 days"
    ]


def test_problems_are_exit_2_one_per_line(run: Any, short_tmp: Path) -> None:
    doc = tight_doc(short_tmp)
    doc["webhooks"]["secret"] = INLINE[:16]
    doc["sidecar"]["allowIps"] = ["10.0.0.0/99"]
    code, lines = run(doc)
    assert code == 2
    assert lines == [
        "error: sidecar.allowIps: [0]: not an IP address or CIDR network: '10.0.0.0/99'",
        "error: webhooks.secret: secret 'default' is shorter than minSecretLength (32 characters); "
        "generate one with `webhook-sidecar gen-secret`",
    ]


def test_the_seeds_example_with_its_weak_secret_is_refused(run: Any) -> None:
    seed = SEED_EXAMPLE % "your-secret-key-here"
    code, lines = run(seed)
    assert code == 2
    assert any("shorter than minSecretLength" in line for line in lines)
    assert all("your-secret-key-here" not in line for line in lines)


def test_the_real_command_and_its_exit_codes(short_tmp: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != cli.CONFIG_ENV}

    def command(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "sidecar", "check-config", *args],
            capture_output=True, text=True, timeout=60, env=env,
        )  # fmt: skip

    path = write_config(short_tmp, tight_doc(short_tmp))
    assert command("-c", str(path)).returncode == 0
    loose = tight_doc(short_tmp)
    del loose["sidecar"]["allowIps"]
    write_config(short_tmp, loose)
    result = command("-c", str(path))
    assert result.returncode == 0 and "warning: sidecar.allowIps" in result.stdout
    assert command("-c", str(path), "--strict").returncode == 2
    missing = command("-c", str(short_tmp / "none.json5"))
    assert missing.returncode == 2 and "cannot read config file" in missing.stdout
    assert command().returncode == 2  # no config named anywhere: a usage error


def test_a_lone_surrogate_in_a_key_is_printed_escaped_not_a_traceback(short_tmp: Path) -> None:
    """The real process: stdout is strict UTF-8, so an unescaped surrogate would raise."""
    path = short_tmp / "config.json5"
    path.write_text(f'{{webhooks: {{secret: "{INLINE}", agents: {{"\\ud800": {{}}}}}}}}')
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "check-config", "-c", str(path)],
        capture_output=True, text=True, timeout=30, env={**os.environ, "PYTHONIOENCODING": "utf-8"},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "error: webhooks.agents.\\ud800: agent names must match" in result.stdout


LOCKOUT_PER_WORKER = (
    "sidecar.authLockout: counted in each worker's memory; with 3 workers an address "
    "may fail up to 3x maxFailures times before it is locked out everywhere"
)


def test_several_workers_warn_about_what_each_keeps_in_memory(run: Any, short_tmp: Path) -> None:
    doc = tight_doc(short_tmp, workers=3, rateLimit={"perIp": {"requests": 5, "per": "1m"}})
    doc["webhooks"]["agents"]["my-agent"]["maxConcurrent"] = 2
    code, lines = run(doc)
    assert code == 0
    assert warnings(lines) == [
        LOCKOUT_PER_WORKER,
        "sidecar.rateLimit.backend: 'memory' keeps one set of buckets per worker; with 3 "
        "workers the effective limits are up to 3x the configured ones (use a redis:// "
        "backend for exact shared limits)",
        "webhooks.agents.*.maxConcurrent: counted per worker; with 3 workers up to 3x the "
        "configured calls may be in flight",
        "sidecar.dedup.backend: 'memory' keeps the delivery ids each worker has seen; with 3 "
        "workers a retry that reaches another worker is forwarded again (use a redis:// "
        "backend to share them)",
    ]
    assert run(doc, "--strict")[0] == 2


def test_several_workers_with_redis_limits_warn_only_about_the_lockout(
    run: Any, short_tmp: Path
) -> None:
    redis = "redis://127.0.0.1:6379/0"
    limits = {"backend": redis, "global": {"requests": 5, "per": "1s"}}
    dedup = {"backend": redis}
    doc = tight_doc(short_tmp, workers=3, rateLimit=limits, dedup=dedup)
    assert warnings(run(doc)[1]) == [LOCKOUT_PER_WORKER]
    assert warnings(run(tight_doc(short_tmp, workers=1, rateLimit=limits))[1]) == []


def test_no_agent_is_a_warning(run: Any, short_tmp: Path) -> None:
    """Valid, but every hook can only answer agent_not_found: check-config says so."""
    doc = tight_doc(short_tmp)
    doc["webhooks"]["agents"] = {}
    code, lines = run(doc, "--strict")
    assert code == 2
    assert lines == [
        "warning: webhooks.agents: no agent is configured; every call to /hooks/wake and "
        "/hooks/agent answers 404 agent_not_found"
    ]
    assert run(tight_doc(short_tmp), "--strict")[0] == 0  # one agent: nothing to say
