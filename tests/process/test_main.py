"""``webhook-sidecar run``'s start-up log (docs/operations.md): config path, listen addresses,
agents and routes, the upstream and whether it answers, the security warnings; once under
workers. Real processes, their real stderr."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.common import AGENT, SidecarProcess, base_doc, free_port, write_config

from sidecar import config

StartProcess = Callable[..., SidecarProcess]


def doc_for(upstream: Path, **sidecar: Any) -> dict[str, Any]:
    doc = base_doc(
        upstream,
        listen=f"127.0.0.1:{free_port()}",
        admin={"listen": f"127.0.0.1:{free_port()}"},
        **sidecar,
    )
    doc["webhooks"]["agents"]["zz-second"] = {"sessionKey": "second"}
    return doc


def admin_port(doc: dict[str, Any]) -> int:
    return int(doc["sidecar"]["admin"]["listen"].rsplit(":", 1)[1])


def startup_lines(proc: SidecarProcess) -> list[dict[str, Any]]:
    """The log lines before the listeners are up (the summary), once they are all written."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        lines = proc.json_lines()
        done = [i for i, line in enumerate(lines) if line["msg"].startswith("listening")]
        if done:
            return lines[: done[0]]
        time.sleep(0.05)
    raise AssertionError(proc.output())


@pytest.fixture
def listening_socket(short_tmp: Path) -> Iterator[Path]:
    """A Unix socket that accepts connections (the kernel's backlog answers for us)."""
    path = short_tmp / "up.sock"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        server.listen()
        yield path


def test_start_logs_config_listen_agents_upstream_and_every_warning(
    short_tmp: Path, sidecar_process: StartProcess
) -> None:
    missing = short_tmp / "no-runtime.sock"
    doc = doc_for(missing)
    path = write_config(short_tmp, doc)
    proc = sidecar_process(path, admin_port(doc))
    lines = startup_lines(proc)
    s = doc["sidecar"]
    assert [line["msg"] for line in lines[:4]] == [
        f"config {path}",
        f"listen http://{s['listen']}, admin http://{s['admin']['listen']}",
        f"agents: {AGENT}, zz-second; routes: (none)",
        f"upstream {missing}: not answering (No such file or directory)",
    ]
    assert lines[0]["config"] == str(path)
    assert (lines[2]["agents"], lines[2]["routes"]) == ([AGENT, "zz-second"], [])
    assert lines[3]["level"] == "warning"
    assert (lines[3]["upstream"], lines[3]["protocol"]) == (str(missing), "forward")
    # Exactly what check-config prints, each at warning level.
    expected = config.security_warnings(config.load(path))
    assert len(expected) >= 2  # allowIps unset; agents choose any sessionKey
    warnings = lines[4:]
    assert [w["msg"] for w in warnings] == expected
    assert {w["level"] for w in warnings} == {"warning"}


def test_an_answering_upstream_is_logged_at_info(
    short_tmp: Path, listening_socket: Path, sidecar_process: StartProcess
) -> None:
    doc = doc_for(listening_socket)
    proc = sidecar_process(write_config(short_tmp, doc), admin_port(doc))
    [upstream] = [line for line in startup_lines(proc) if line["msg"].startswith("upstream")]
    assert upstream["msg"] == f"upstream {listening_socket}: answering"
    assert upstream["level"] == "info"


def test_a_refused_url_upstream_names_the_url(
    short_tmp: Path, sidecar_process: StartProcess
) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    doc = doc_for(short_tmp / "unused.sock")
    doc["sidecar"]["upstream"] = {"url": url}
    proc = sidecar_process(write_config(short_tmp, doc), admin_port(doc))
    [upstream] = [line for line in startup_lines(proc) if line["msg"].startswith("upstream")]
    assert upstream["msg"] == f"upstream {url}: not answering (Connection refused)"


def test_under_workers_the_supervisor_says_it_once(
    short_tmp: Path, listening_socket: Path, sidecar_process: StartProcess
) -> None:
    doc = doc_for(listening_socket, workers=2)
    proc = sidecar_process(write_config(short_tmp, doc), admin_port(doc))
    deadline = time.monotonic() + 15
    while sum(line["msg"] == "listening" for line in proc.json_lines()) < 2:
        assert time.monotonic() < deadline, proc.output()
        time.sleep(0.05)
    messages = [line["msg"] for line in proc.json_lines()]
    for first_word in ("config ", "listen http", "agents: ", "upstream "):
        assert sum(m.startswith(first_word) for m in messages) == 1, (first_word, messages)
    worker_warning = next(w for w in config.security_warnings(config.load(proc.config_path))
                          if w.startswith("sidecar.authLockout"))  # fmt: skip
    assert messages.count(worker_warning) == 1
