"""One real OpenClaw gateway process for tests, and what it records.

``Gateway`` writes a private config/state/home folder, starts
``openclaw.mjs gateway run --bind loopback`` on a free 127.0.0.1 port in its
own process group with a minimal environment (no inherited credentials, no
proxies), waits until ``GET /hooks/wake`` answers 405 and ``GET /readyz``
answers 200, can rotate ``hooks.token`` (hot reload, no restart) and stops
everything it started: the process group, then any process that still carries
this gateway's marker variable in its environment (the gateway's spawn broker
runs in a session of its own).

Observation: ``hook_runs()`` / ``wait_for_hook_run()`` parse the gateway's
JSON log file (one ``hook agent run completed`` record per admitted run:
HookRun); ``sessions()`` / ``wait_for_session()`` read the agent's SQLite
session table (``session_nodes``: SessionRow).

``gateway_for_tests()``: require_install() (docs in install.py) and a started
Gateway, stopped afterwards.
"""

from __future__ import annotations

import atexit
import contextlib
import http.client
import json
import os
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from support.openclaw.install import GatewayInstall, require_install
from support.openclaw.model_stub import ModelStub

# Every process the gateway starts inherits this variable; stop() uses it to
# find stragglers that left the process group.
MARKER_ENV = "WEBHOOK_SIDECAR_TEST_GATEWAY"

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class GatewayStartError(RuntimeError):
    """The gateway did not become ready; the message carries its log tail."""


# --------------------------------------------------------------------------
# Observations from the gateway's own records
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class HookRun:
    """A ``hook agent run completed`` record from the gateway's JSON log."""

    run_id: str
    status: str  # ok | error | skipped
    agent_id: str | None
    name: str | None  # the request's "name" ("Hook" when absent)
    logical_session_key: str | None  # as requested, e.g. "hook:x" (case kept)
    session_key: str | None  # stored key, e.g. "agent:main:hook:x"
    session_id: str | None
    source_path: str | None  # "/hooks/agent"
    raw: dict[str, Any] = field(repr=False)


@dataclass(frozen=True)
class SessionRow:
    """A row of the agent's ``session_nodes`` table."""

    session_key: str  # "agent:<agentId>:hook:<key>" for webhook sessions
    session_id: str | None
    status: str | None
    created_via: str | None  # "cron" for hook agent runs
    external_source: str | None  # "webhook" for sessions created by /hooks/agent
    entry: dict[str, Any] = field(repr=False)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def marked_pids(marker_value: str) -> list[int]:
    """PIDs of live processes whose environment has MARKER_ENV=marker_value."""
    needle = f"{MARKER_ENV}={marker_value}".encode()
    found: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                env = fh.read()
        except OSError:
            continue
        if needle in env.split(b"\0"):
            found.append(int(entry))
    return found


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True  # gone


_RUNNING: set[Gateway] = set()


@atexit.register
def _stop_leftovers() -> None:  # a test run that died before its fixture teardown
    for gw in list(_RUNNING):
        with contextlib.suppress(Exception):
            gw.stop(timeout=5)


class Gateway:
    """One real OpenClaw gateway on 127.0.0.1, with private state.

    Use as a context manager, or call start()/stop(). All paths live in
    ``workdir`` (a fresh temporary folder unless given; removed on stop when
    it was created here and ``keep_workdir`` is false).
    """

    def __init__(
        self,
        install: GatewayInstall,
        *,
        hooks_token: str | None = None,
        allowed_agent_ids: Sequence[str] | None = ("main",),
        allow_request_session_key: bool = True,
        allowed_session_key_prefixes: Sequence[str] | None = ("hook:",),
        agents: Sequence[str] = ("main",),
        port: int | None = None,
        workdir: str | os.PathLike[str] | None = None,
        keep_workdir: bool = False,
        model_stub: ModelStub | bool = True,
        extra_config: Mapping[str, Any] | None = None,
        extra_env: Mapping[str, str] | None = None,
        startup_timeout: float = 90.0,
    ) -> None:
        self.install = install
        self.hooks_token = hooks_token or secrets.token_hex(32)
        self.gateway_token = secrets.token_hex(32)  # gateway.auth.token (WS/control UI)
        self.allowed_agent_ids = None if allowed_agent_ids is None else list(allowed_agent_ids)
        self.allow_request_session_key = allow_request_session_key
        self.allowed_session_key_prefixes = (
            None if allowed_session_key_prefixes is None else list(allowed_session_key_prefixes)
        )
        self.agents = list(agents)
        self.host = "127.0.0.1"
        self._fixed_port = port
        self.port = port or 0
        self._own_workdir = workdir is None
        self.workdir = (
            Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="openclaw-gw-"))
        )
        self.keep_workdir = keep_workdir
        if model_stub is True:
            self.model: ModelStub | None = ModelStub()
        elif model_stub is False:
            self.model = None
        else:
            self.model = model_stub
        self._own_model = model_stub is True
        self.extra_config = dict(extra_config or {})
        self.extra_env = dict(extra_env or {})
        self.startup_timeout = startup_timeout
        self.marker = uuid.uuid4().hex
        self.proc: subprocess.Popen[bytes] | None = None
        self._out: Any = None
        self.startup_seconds: float | None = None  # spawn until /readyz answered 200
        self.hooks_route_seconds: float | None = None  # spawn until GET /hooks/wake gave 405

    # ---- paths ----------------------------------------------------------
    @property
    def home_dir(self) -> Path:
        return self.workdir / "home"

    @property
    def state_dir(self) -> Path:
        return self.workdir / "state"

    @property
    def config_path(self) -> Path:
        return self.state_dir / "openclaw.json"

    @property
    def log_path(self) -> Path:
        """The gateway's structured JSON-lines log (``logging.file``)."""
        return self.workdir / "openclaw.log"

    @property
    def stdout_path(self) -> Path:
        """Console output (stdout+stderr, human format)."""
        return self.workdir / "gateway.out"

    def agent_db_path(self, agent_id: str = "main") -> Path:
        return self.state_dir / "agents" / agent_id / "agent" / "openclaw-agent.sqlite"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def auth_headers(self, token: str | None = None) -> dict[str, str]:
        return {
            "Authorization": f"Bearer {token or self.hooks_token}",
            "Content-Type": "application/json",
        }

    # ---- config -----------------------------------------------------------
    def build_config(self) -> dict[str, Any]:
        hooks: dict[str, Any] = {
            "enabled": True,
            "token": self.hooks_token,
            "path": "/hooks",
            "allowRequestSessionKey": self.allow_request_session_key,
        }
        if self.allowed_agent_ids is not None:
            hooks["allowedAgentIds"] = self.allowed_agent_ids
        if self.allowed_session_key_prefixes is not None:
            hooks["allowedSessionKeyPrefixes"] = self.allowed_session_key_prefixes
        config: dict[str, Any] = {
            "gateway": {
                "mode": "local",
                "port": self.port,
                "bind": "loopback",
                "auth": {"mode": "token", "token": self.gateway_token},
            },
            "hooks": hooks,
            "discovery": {"mdns": {"mode": "off"}},
            "logging": {"file": str(self.log_path)},
            "update": {"checkOnStart": False},
        }
        if self.model is not None:
            _deep_merge(config, self.model.config())
        if self.agents != ["main"]:
            agents_cfg = config.setdefault("agents", {})
            agents_cfg["entries"] = {agent: {} for agent in self.agents}
        _deep_merge(config, self.extra_config)
        return config

    def write_config(self, config: Mapping[str, Any] | None = None) -> None:
        """Write the config atomically (the gateway watches the file)."""
        data = json.dumps(config if config is not None else self.build_config(), indent=2) + "\n"
        tmp = self.config_path.with_name(f".{self.config_path.name}.{os.getpid()}.tmp")
        tmp.write_text(data)
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.config_path)

    def _env(self) -> dict[str, str]:
        # Minimal, explicit environment: nothing from the developer's shell
        # (model API keys, proxies, OPENCLAW_* settings) leaks into the gateway.
        path = os.pathsep.join(
            [str(self.install.node_bin_dir), "/usr/local/bin", "/usr/bin", "/bin"]
        )
        env = {
            "PATH": path,
            "HOME": str(self.home_dir),
            "LANG": "C.UTF-8",
            "TZ": "UTC",
            "TMPDIR": str(self.install.tmp_dir),
            "NO_COLOR": "1",
            "NO_PROXY": "127.0.0.1,localhost,::1",
            "no_proxy": "127.0.0.1,localhost,::1",
            "OPENCLAW_STATE_DIR": str(self.state_dir),
            "OPENCLAW_CONFIG_PATH": str(self.config_path),
            "OPENCLAW_DISABLE_BONJOUR": "1",
            "OPENCLAW_NO_RESPAWN": "1",  # keep the PID we started as the gateway
            "OPENCLAW_NO_AUTO_UPDATE": "1",
            "OPENCLAW_SKIP_GMAIL_WATCHER": "1",
            MARKER_ENV: self.marker,
        }
        env.update(self.extra_env)
        return env

    # ---- lifecycle ----------------------------------------------------------
    def start(self) -> Gateway:
        if self.proc is not None:
            raise RuntimeError("gateway already started")
        for d in (self.workdir, self.home_dir, self.state_dir, self.install.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)
        if self.model is not None and self.model._server is None:
            self.model.start()
            self._own_model = True  # started here, so stopped here
        attempts = 1 if self._fixed_port else 3
        for attempt in range(attempts):
            if not self._fixed_port:
                self.port = free_port(self.host)
            try:
                self._spawn_and_wait()
                return self
            except GatewayStartError as exc:
                port_race = "EADDRINUSE" in str(exc) or "already in use" in str(exc)
                self._terminate()
                if not port_race or attempt == attempts - 1:
                    self._cleanup_after_stop()
                    raise
        raise AssertionError("unreachable")

    def _spawn_and_wait(self) -> None:
        self.write_config()
        self._out = open(self.stdout_path, "ab")  # noqa: SIM115 - closed in _terminate
        started = time.monotonic()
        self.proc = subprocess.Popen(
            [
                str(self.install.node),
                str(self.install.entry),
                "gateway",
                "run",
                "--bind",
                "loopback",
                "--port",
                str(self.port),
            ],
            cwd=self.workdir,
            env=self._env(),
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        _RUNNING.add(self)
        deadline = started + self.startup_timeout
        hooks_up = False
        while True:
            code = self.proc.poll()
            if code is not None:
                raise GatewayStartError(
                    f"OpenClaw gateway exited with code {code} during startup "
                    f"(port {self.port}):\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise GatewayStartError(
                    f"OpenClaw gateway not ready within {self.startup_timeout:.0f}s "
                    f"(port {self.port}, hooks route up: {hooks_up}):\n{self.log_tail()}"
                )
            if not hooks_up:
                hooks_up = self._http_status("GET", "/hooks/wake") == 405
                if hooks_up:
                    self.hooks_route_seconds = time.monotonic() - started
            if hooks_up and self._http_status("GET", "/readyz") == 200:
                self.startup_seconds = time.monotonic() - started
                return
            time.sleep(0.1)

    def _http_status(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 2.0,
    ) -> int | None:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=dict(headers or {}))
            resp = conn.getresponse()
            resp.read()
            return resp.status
        except (OSError, http.client.HTTPException):
            return None
        finally:
            conn.close()

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def processes(self) -> list[int]:
        """PIDs of every live process this gateway started (found by marker)."""
        return [pid for pid in marked_pids(self.marker) if not _is_zombie(pid)]

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the process group, SIGKILL what is left, reap every marked process."""
        self._terminate(timeout)
        self._cleanup_after_stop()

    def _terminate(self, timeout: float = 15.0) -> None:
        proc = self.proc
        if self.model is not None:
            self.model.release()  # a run waiting on a slow model would hold up the drain
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)
            # Children that left the group (the spawn broker calls setsid).
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        started = time.monotonic()
        while True:
            left = [pid for pid in marked_pids(self.marker) if not _is_zombie(pid)]
            if not left:
                break
            waited = time.monotonic() - started
            if waited > 10:
                raise RuntimeError(f"OpenClaw gateway processes survived SIGKILL: {left}")
            sig = signal.SIGTERM if waited < 2 else signal.SIGKILL
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            time.sleep(0.1)
        self.proc = None
        if self._out is not None:
            self._out.close()
            self._out = None
        _RUNNING.discard(self)

    def _cleanup_after_stop(self) -> None:
        if self.model is not None and self._own_model:
            self.model.stop()
        if self._own_workdir and not self.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Gateway:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- logs -----------------------------------------------------------------
    def log_tail(self, lines: int = 60) -> str:
        """Last console lines (ANSI colours stripped), for error messages."""
        try:
            text = self.stdout_path.read_text(errors="replace")
        except OSError:
            return "(no gateway output)"
        return "\n".join(_ANSI.sub("", text).splitlines()[-lines:]) or "(no gateway output)"

    def log_records(self) -> list[dict[str, Any]]:
        """All records of the JSON log file (``logging.file``)."""
        records: list[dict[str, Any]] = []
        try:
            fh = open(self.log_path, encoding="utf-8", errors="replace")  # noqa: SIM115
        except OSError:
            return records
        with fh:
            for line in fh:
                if not line.endswith("\n"):
                    break  # partially written last line
                with contextlib.suppress(ValueError):
                    rec = json.loads(line)
                    if isinstance(rec, dict):
                        records.append(rec)
        return records

    def log_messages(self) -> list[str]:
        return [str(r.get("message", "")) for r in self.log_records()]

    def hook_runs(self) -> list[HookRun]:
        runs: list[HookRun] = []
        for rec in self.log_records():
            if not str(rec.get("message", "")).startswith("hook agent run completed"):
                continue
            data = rec.get("1")
            if not isinstance(data, dict) or "runId" not in data:
                continue
            runs.append(
                HookRun(
                    run_id=str(data["runId"]),
                    status=str(data.get("status")),
                    agent_id=data.get("agentId"),
                    name=data.get("name"),
                    logical_session_key=data.get("logicalSessionKey"),
                    session_key=data.get("sessionKey"),
                    session_id=data.get("sessionId"),
                    source_path=data.get("sourcePath"),
                    raw=data,
                )
            )
        return runs

    def wait_for_hook_run(self, run_id: str, timeout: float = 30.0) -> HookRun:
        """Wait until the run with this runId has completed (ok or error)."""
        deadline = time.monotonic() + timeout
        while True:
            for run in self.hook_runs():
                if run.run_id == run_id:
                    return run
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"no 'hook agent run completed' record for runId {run_id} "
                    f"within {timeout}s:\n{self.log_tail(20)}"
                )
            time.sleep(0.1)

    # ---- sessions (SQLite) ---------------------------------------------------------
    def sessions(self, agent_id: str = "main") -> dict[str, SessionRow]:
        """The agent's sessions by stored key (read-only SQLite read)."""
        db = self.agent_db_path(agent_id)
        if not db.exists():
            return {}
        rows: dict[str, SessionRow] = {}
        for attempt in range(20):
            try:
                conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=2)
                try:
                    cur = conn.execute(
                        "SELECT session_key, current_session_id, status, created_via, entry_json "
                        "FROM session_nodes"
                    )
                    for key, sid, status, via, entry_json in cur.fetchall():
                        try:
                            entry = json.loads(entry_json) if entry_json else {}
                        except ValueError:
                            entry = {}
                        rows[key] = SessionRow(
                            session_key=key,
                            session_id=sid,
                            status=status,
                            created_via=via,
                            external_source=entry.get("hookExternalContentSource"),
                            entry=entry,
                        )
                finally:
                    conn.close()
                return rows
            except sqlite3.OperationalError:
                if attempt == 19:
                    raise
                time.sleep(0.1)
        return rows

    def wait_for_session(
        self, session_key: str, agent_id: str = "main", timeout: float = 30.0
    ) -> SessionRow:
        """Wait for a stored session; ``session_key`` may be the logical ``hook:x``."""
        stored = (
            session_key
            if session_key.startswith("agent:")
            else (f"agent:{agent_id}:{session_key}".lower())
        )
        deadline = time.monotonic() + timeout
        while True:
            row = self.sessions(agent_id).get(stored)
            if row is not None:
                return row
            if time.monotonic() > deadline:
                raise TimeoutError(f"no session {stored!r} within {timeout}s")
            time.sleep(0.2)

    # ---- hooks token rotation -------------------------------------------------------
    def token_accepted(self, token: str) -> bool:
        """Does the gateway take this hooks token now? (side-effect free probe)

        An authenticated POST to an unknown hook path answers 404, an
        unauthenticated one 401. A 401 counts toward the gateway's failed-auth
        throttle (429 after 20 failures a minute; a success resets it).
        """
        status = self._http_status(
            "POST", "/hooks/__token_probe__", body=b"{}", headers=self.auth_headers(token)
        )
        if status not in (401, 404):
            raise RuntimeError(f"unexpected status {status} from the token probe")
        return status == 404

    def update_config(
        self, mutate: Callable[[dict[str, Any]], None], timeout: float = 15.0
    ) -> float:
        """Rewrite the config through ``mutate`` and wait for the hot reload.

        Returns the seconds from the write until the gateway logged
        ``config hot reload applied``; raises ValueError when it logged
        ``config reload skipped (invalid config)`` instead (it then keeps the
        old config). Changes that need a restart are not supported here.
        """
        config = json.loads(self.config_path.read_text())
        mutate(config)

        def outcomes() -> tuple[int, list[str]]:
            messages = self.log_messages()
            applied = sum(1 for m in messages if m.startswith("config hot reload applied"))
            return applied, [m for m in messages if m.startswith("config reload skipped")]

        applied_before, skipped_before = outcomes()
        started = time.monotonic()
        self.write_config(config)
        while True:
            applied, skipped = outcomes()
            if applied > applied_before:
                return time.monotonic() - started
            if len(skipped) > len(skipped_before):
                # The gateway keeps running on its previous config.
                raise ValueError(f"the gateway refused the new config: {skipped[-1]}")
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"no hot reload within {timeout}s:\n{self.log_tail(20)}")
            time.sleep(0.02)

    def set_hooks_token(self, token: str, timeout: float = 15.0) -> float:
        """Rotate ``hooks.token`` without a restart; returns the seconds it took.

        Waits for the reload record in the log, then confirms with one probe.
        """

        def mutate(config: dict[str, Any]) -> None:
            config["hooks"]["token"] = token

        seconds = self.update_config(mutate, timeout)
        self.hooks_token = token
        deadline = time.monotonic() + timeout
        while not self.token_accepted(token):
            if time.monotonic() > deadline:
                raise TimeoutError("the gateway reloaded but does not accept the new token")
            time.sleep(0.2)
        return seconds


def _deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value


@contextlib.contextmanager
def gateway_for_tests(**kwargs: Any) -> Iterator[Gateway]:
    """require_install() + a started Gateway(**kwargs), stopped afterwards.

    Meant for a module-scoped fixture; one gateway costs ~10 s and ~1 GB RSS.
    """
    install = require_install(kwargs.pop("cache_dir", None))
    gw = Gateway(install, **kwargs)
    gw.start()
    try:
        yield gw
    finally:
        gw.stop()
