"""``webhooks.routes``: what loads, every config error naming its key path (without
printing a secret), route secrets under the webhooks.secrets rules, the watched files,
and the check-config warnings for routes (through the real CLI)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from support.common import AGENT, SECRET, write_config
from support.senders import GH_OLD_SECRET, GH_SECRET, route

from sidecar.config import warnings
from sidecar.config.parser import ConfigError, loads


def doc(routes: Any, **webhooks: Any) -> dict[str, Any]:
    return {
        "webhooks": {"secret": SECRET, "agents": {AGENT: {}}, "routes": routes, **webhooks},
        "sidecar": {"upstream": {"socket": "/tmp/rt.sock"}},
    }


def problems(routes: Any) -> str:
    with pytest.raises(ConfigError) as err:
        loads(json.dumps(doc(routes)))
    text = str(err.value)
    assert GH_SECRET not in text and GH_OLD_SECRET not in text
    return text


def test_a_full_route_loads_with_its_defaults() -> None:
    settings = loads(json.dumps(doc({"github": route("github", GH_SECRET)})))
    [(path, r)] = settings.webhooks.routes.items()
    assert path == "/hooks/github" and r.name == "github"
    assert r.verify.profile == "github" and r.agent == AGENT and r.action == "agent"
    assert r.tolerance == 300.0 and r.dedup == 86400.0
    assert [s.id for s in r.secrets] == ["r1"]


@pytest.mark.parametrize(
    ("value", "seconds"), [("72h", 259200.0), ("0s", 0.0), (0, 0.0), ("0", 0.0), (90, 90.0)]
)
def test_dedup_durations(value: Any, seconds: float) -> None:
    settings = loads(json.dumps(doc({"github": route("github", GH_SECRET, dedup=value)})))
    assert settings.webhooks.routes["/hooks/github"].dedup == seconds


def test_the_generic_form() -> None:
    verify = {"hmac": "sha1", "header": "X-Sig", "prefix": "", "encoding": "base64"}
    settings = loads(json.dumps(doc({"c": route(verify, GH_SECRET)})))
    v = settings.webhooks.routes["/hooks/c"].verify
    assert (v.profile, v.algorithm, v.header, v.prefix, v.encoding) == (
        "hmac", "sha1", "X-Sig", "", "base64",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("routes", "expected"),
    [
        ({"wake": route("github", GH_SECRET)}, "webhooks.routes.wake: the route name 'wake'"),
        ({"agent": route("github", GH_SECRET)}, "webhooks.routes.agent: the route name"),
        ({"a/b": route("github", GH_SECRET)}, "webhooks.routes.a/b: route names must match"),
        ({"-x": route("github", GH_SECRET)}, "webhooks.routes.-x: route names must match"),
        ({"gh": route("gihtub", GH_SECRET)}, "webhooks.routes.gh.verify: must be one of"),
        ({"gh": route({"hmac": "md5", "header": "X"}, GH_SECRET)}, "gh.verify.hmac: must be one"),
        ({"gh": route({"hmac": "sha256"}, GH_SECRET)}, "gh.verify.header: is required"),
        ({"gh": route({"hmac": "sha256", "header": "A B"}, GH_SECRET)}, "gh.verify.header: must"),
        ({"gh": route({"hmac": "sha256", "header": "X", "encoding": "b32"}, GH_SECRET)},
         "gh.verify.encoding"),
        ({"gh": route({"hmac": "sha256", "header": "X", "algo": "x"}, GH_SECRET)},
         "gh.verify.algo: unknown key"),
        ({"gh": route("github", GH_SECRET, agent="nobody")},
         "webhooks.routes.gh.agent: no agent named 'nobody'"),
        ({"gh": route("github", GH_SECRET, action="sleep")}, "webhooks.routes.gh.action"),
        ({"gh": route("github", GH_SECRET, action="wake")}, "gh.message: does not apply"),
        ({"gh": {k: v for k, v in route("github", GH_SECRET).items() if k != "message"}},
         "webhooks.routes.gh.message: is required"),
        ({"gh": route("github", GH_SECRET, tolerance="soon")}, "webhooks.routes.gh.tolerance"),
        ({"gh": route("github", GH_SECRET, dedup=-1)}, "webhooks.routes.gh.dedup"),
        ({"gh": route("github", GH_SECRET, when="")}, "webhooks.routes.gh.when: must be"),
        ({"gh": route("github", GH_SECRET, mesage="x")}, "gh.mesage: unknown key (did you mean"),
        ({"gh": route("github", "short")}, "gh.secrets[0]: secret 'r1' is shorter"),
        ({"gh": route("github", SECRET)}, "has the same value as a secret of webhooks"),
        ({"gh": route("github", GH_SECRET), "gh2": route("github", GH_SECRET)},
         "has the same value as a secret of webhooks.routes.gh"),
        ({"gh": {**route("github", GH_SECRET), "secrets": []}}, "gh.secrets: must be a non-empty"),
        ({"gh": {**route("github", GH_SECRET), "secrets": [{"value": GH_SECRET}]}},
         "gh.secrets[0].id: is required"),
        ({"gh": {**route("github", GH_SECRET),
                 "secrets": [{"id": "a", "value": GH_SECRET, "notAfter": "2020-01-01T00:00:00Z"}]}},
         "gh.secrets: no secret is valid now"),
        ({"gh": {**route("github", GH_SECRET),
                 "secrets": [{"id": "a", "value": GH_SECRET, "agents": [AGENT]}]}},
         "'agents' does not apply to route secrets"),
        ([], "webhooks.routes: must be an object"),
    ],
)  # fmt: skip
def test_config_errors_name_the_key(routes: Any, expected: str) -> None:
    assert expected in problems(routes)


def test_route_secret_files_are_watched(tmp_path: Path) -> None:
    secret_file = tmp_path / "github.secret"
    secret_file.write_text(GH_SECRET + "\n")
    spec = {**route("github", GH_SECRET), "secrets": [{"id": "f", "file": str(secret_file)}]}
    path = write_config(tmp_path, doc({"github": spec}))
    from sidecar import config

    settings = config.load(path)
    assert secret_file in settings.watched_files
    assert settings.webhooks.routes["/hooks/github"].secrets[0].value == GH_SECRET.encode()


def test_warnings() -> None:
    routes = {
        "gh": route("github", GH_SECRET),
        "gh-filtered": route("github", GH_OLD_SECRET, when="true"),
        "am": route("bearer", "am-token-2f4e6a8c0b1d3f5e7a9c2b4d6f8e0a1c3b5d"),
        "old": route(
            {"hmac": "sha1", "header": "X-Sig"}, "custom-1e3d5c7b9a0f2e4d6c8b0a1f3e5d7c9b"
        ),
    }
    out = warnings.security_warnings(loads(json.dumps(doc(routes))))
    text = "\n".join(out)
    assert "webhooks.routes.gh: no 'when' filter" in text
    assert "webhooks.routes.gh-filtered: no 'when'" not in text
    assert "webhooks.routes.am: no 'when'" not in text  # one sender, one kind of call
    assert "webhooks.routes.old.verify: hmac 'sha1' is weak" in text


def test_check_config_prints_route_warnings_and_strict_fails(tmp_path: Path) -> None:
    path = write_config(tmp_path, doc({"gh": route("github", GH_SECRET)}))
    cmd = [sys.executable, "-m", "sidecar", "check-config", "-c", str(path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "webhooks.routes.gh: no 'when' filter" in done.stdout + done.stderr
    assert GH_SECRET not in done.stdout + done.stderr
    strict = subprocess.run([*cmd, "--strict"], capture_output=True, text=True, timeout=60)
    assert strict.returncode == 2
    bad = write_config(tmp_path, doc({"gh": route("github", GH_SECRET, message="{{ x ")}))
    done = subprocess.run(
        [sys.executable, "-m", "sidecar", "check-config", "-c", str(bad)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert "webhooks.routes.gh.message: template syntax error" in done.stdout + done.stderr
