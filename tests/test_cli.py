"""The command line (docs/cli.md) as users run it: real processes, real exit codes."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from support.common import AGENT, SECRET, base_doc, free_port, write_config

CLI = [sys.executable, "-m", "sidecar"]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})}
    )


def test_gen_secret_prints_64_fresh_hex_characters() -> None:
    first, second = run_cli("gen-secret"), run_cli("gen-secret")
    assert first.returncode == 0
    assert re.fullmatch(r"[0-9a-f]{64}\n", first.stdout)
    assert first.stdout != second.stdout


def test_console_script_is_installed() -> None:
    exe = Path(sys.executable).with_name("webhook-sidecar")
    result = subprocess.run([str(exe), "gen-secret"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and len(result.stdout.strip()) == 64


def test_no_command_is_a_usage_error_exit_2() -> None:
    result = run_cli()
    assert result.returncode == 2 and "usage:" in result.stderr


def test_run_without_config_is_exit_2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WEBHOOK_SIDECAR_CONFIG", raising=False)
    result = run_cli("run")
    assert result.returncode == 2 and "WEBHOOK_SIDECAR_CONFIG" in result.stderr


def strict_clean_doc(folder: Path) -> dict[str, Any]:
    """A config with nothing for a reviewer to flag."""
    doc = base_doc(folder / "rt.sock", listen="127.0.0.1:8080", allowIps=["10.0.0.0/8"])
    doc["webhooks"]["agents"][AGENT]["allowRequestSessionKey"] = False
    return doc


def test_check_config_valid_exit_0(short_tmp: Path) -> None:
    result = run_cli(
        "check-config", "-c", str(write_config(short_tmp, strict_clean_doc(short_tmp)))
    )
    assert result.returncode == 0, result.stdout
    assert result.stdout.strip().endswith("valid")


def test_check_config_takes_the_path_from_the_environment(short_tmp: Path) -> None:
    path = write_config(short_tmp, strict_clean_doc(short_tmp))
    result = run_cli("check-config", env={"WEBHOOK_SIDECAR_CONFIG": str(path)})
    assert result.returncode == 0


def test_check_config_prints_each_problem_and_exits_2(short_tmp: Path) -> None:
    doc = base_doc(short_tmp / "rt.sock")
    doc["webhooks"]["agents"][AGENT]["sessionKey"] = 5
    doc["webhooks"]["secret"] = "weak-but-secret-value"
    result = run_cli("check-config", "-c", str(write_config(short_tmp, doc)))
    assert result.returncode == 2
    lines = result.stdout.splitlines()
    assert "error: webhooks.agents.my-agent.sessionKey: must be a string" in lines
    assert any(line.startswith("error: webhooks.secret: ") for line in lines)
    assert "weak-but-secret-value" not in result.stdout + result.stderr


def test_check_config_warnings_pass_unless_strict(short_tmp: Path) -> None:
    path = write_config(
        short_tmp, base_doc(short_tmp / "rt.sock")
    )  # no allowIps, 0.0.0.0, any session key
    relaxed = run_cli("check-config", "-c", str(path))
    assert relaxed.returncode == 0
    warnings = [line for line in relaxed.stdout.splitlines() if line.startswith("warning: ")]
    assert any("sidecar.allowIps" in w for w in warnings)
    assert any("sidecar.listen" in w for w in warnings)
    assert any("webhooks.agents.my-agent" in w for w in warnings)
    strict = run_cli("check-config", "--strict", "-c", str(path))
    assert strict.returncode == 2
    assert SECRET not in relaxed.stdout + strict.stdout


def test_check_config_missing_file_exit_2(short_tmp: Path) -> None:
    result = run_cli("check-config", "-c", str(short_tmp / "missing.json5"))
    assert result.returncode == 2 and "cannot read config file" in result.stdout


def _post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_dev_runtime_accepts_the_forward_protocol_and_logs_json_lines(short_tmp: Path) -> None:
    sock = short_tmp / "dev.sock"
    proc = subprocess.Popen(
        [*CLI, "dev-runtime", "--socket", str(sock)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 15
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        body = json.dumps(
            {"agent": AGENT, "message": "hi", "sessionKey": "s", "requestId": "r1"}
        ).encode()
        request = (
            b"POST /hooks/agent HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(sock))
            s.sendall(request)
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 200")
        assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["runId"].startswith("run-")
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=15)
    assert proc.returncode == 0
    [line] = out.splitlines()
    assert json.loads(line)["requestId"] == "r1"


def test_demo_answers_its_own_curl_commands(short_tmp: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [*CLI, "demo", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        printed: list[str] = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            printed.append(line)
            if "Ctrl-C" in line:
                break
        secret = next(line.split()[-1] for line in printed if line.startswith("secret"))
        assert re.fullmatch(r"[0-9a-f]{64}", secret)
        # Where its config is, while it runs: a valid one, to start from.
        config_path = next(
            line.split(": ", 1)[1].strip() for line in printed if line.startswith("config: ")
        )
        assert run_cli("check-config", "-c", config_path).returncode == 0
        curls = [shlex.split(line.strip()) for line in printed if line.strip().startswith("curl ")]
        assert len(curls) == 3
        results = []
        for argv in curls:
            url = next(a for a in argv if a.startswith("http://"))
            headers = dict(argv[i + 1].split(": ", 1) for i, a in enumerate(argv) if a == "-H")
            body = argv[argv.index("-d") + 1].encode()
            results.append(_post(url, body, headers))
        assert [r[0] for r in results] == [200, 200, 200]
        assert [r[1]["session"] for r in results] == [
            "webhook-session",
            "webhook-session",
            "order-1234",
        ]
        received: list[str] = []
        while len(received) < 3:
            line = proc.stdout.readline()
            if line.strip():
                received.append(line)
        assert all(r.startswith("runtime received: ") for r in received)
        assert json.loads(received[2].split(": ", 1)[1])["sessionKey"] == "order-1234"
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=15)
    assert proc.returncode == 0


def test_demo_on_a_taken_port_exits_1_with_a_clear_message() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        result = run_cli("demo", "--port", str(busy.getsockname()[1]))
    assert result.returncode == 1
    assert "already in use" in result.stderr and "--port" in result.stderr


def test_version_prints_the_one_version() -> None:
    """``--version`` says the package's version, which the installed metadata (when there
    is one) takes from the same place: pyproject's dynamic version is ``__version__``."""
    import importlib.metadata

    import sidecar

    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout == f"webhook-sidecar {sidecar.__version__}\n"
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", sidecar.__version__)
    try:
        installed = importlib.metadata.version("webhook-sidecar")
    except importlib.metadata.PackageNotFoundError:
        installed = sidecar.__version__  # a checkout on PYTHONPATH: nothing else to agree with
    assert installed == sidecar.__version__
