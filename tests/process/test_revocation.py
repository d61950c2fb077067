"""Revocation fails closed (docs/connections.md): deleting or emptying a secret's file
revokes that secret at the next reload, the others stay valid; with none left, hooks
answer 401 and /readyz 503. Against a real ``webhook-sidecar run`` process."""

from __future__ import annotations

import asyncio
import secrets
import signal
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from support.clients import listening_doc, post, public_url, until
from support.common import Runtime, write_config

from sidecar.config import ConfigError, load

pytestmark = pytest.mark.slow

LEAKED, KEPT = secrets.token_hex(32), secrets.token_hex(32)


def two_secret_doc(runtime: Runtime, folder: Path) -> dict[str, Any]:
    (folder / "leaked").write_text(LEAKED + "\n")
    (folder / "kept").write_text(KEPT + "\n")
    doc = listening_doc(runtime.path)
    del doc["webhooks"]["secret"]
    doc["webhooks"]["secrets"] = [
        {"id": "leaked", "file": str(folder / "leaked")},
        {"id": "kept", "file": str(folder / "kept")},
    ]
    return doc


def readyz(doc: dict[str, Any]) -> int:
    try:
        with urllib.request.urlopen(
            f"http://{doc['sidecar']['admin']['listen']}/readyz", timeout=5
        ) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def revoked_lines(proc: Any) -> list[dict[str, Any]]:
    return [e for e in proc.json_lines() if "revoked" in e.get("msg", "")]


@pytest.mark.parametrize("how", ["delete", "empty"])
async def test_a_deleted_or_emptied_secret_file_revokes_that_secret_only(
    runtime: Runtime, short_tmp: Path, sidecar_process: Any, how: str
) -> None:
    doc = two_secret_doc(runtime, short_tmp)
    admin = int(doc["sidecar"]["admin"]["listen"].rsplit(":", 1)[1])
    proc = sidecar_process(write_config(short_tmp, doc), admin)
    url = public_url(doc)
    assert (await post(url, token=LEAKED))[0] == 200
    if how == "delete":
        (short_tmp / "leaked").unlink()
    else:
        (short_tmp / "leaked").write_text("")
    proc.signal(signal.SIGHUP)
    try:
        await until(lambda: revoked_lines(proc))
    except AssertionError:
        raise AssertionError(proc.output()) from None
    await asyncio.sleep(0.2)
    assert (await post(url, token=LEAKED))[0] == 401
    assert (await post(url, token=KEPT))[0] == 200
    assert await asyncio.to_thread(readyz, doc) == 200
    [line] = revoked_lines(proc)
    assert line["level"] == "warning" and line["secretId"] == "leaked"
    everything = "\n".join(proc.lines + proc.stdout_lines)
    assert LEAKED not in everything and KEPT not in everything

    # The last one goes too: every hook call is 401 and the process is not ready.
    (short_tmp / "kept").unlink()
    proc.signal(signal.SIGHUP)
    await until(lambda: len(revoked_lines(proc)) == 2)
    await asyncio.sleep(0.2)
    assert (await post(url, token=KEPT))[0] == 401
    assert (await post(url, token=LEAKED))[0] == 401
    assert await asyncio.to_thread(readyz, doc) == 503


def test_at_start_a_missing_secret_file_is_still_a_config_error(short_tmp: Path) -> None:
    doc = listening_doc(short_tmp / "rt.sock")
    doc["webhooks"]["secret"] = {"file": str(short_tmp / "absent")}
    with pytest.raises(ConfigError, match=r"webhooks\.secret\.file: cannot read"):
        load(write_config(short_tmp, doc))
    (short_tmp / "absent").write_text("")
    with pytest.raises(ConfigError, match=r"webhooks\.secret\.file: secret is empty"):
        load(write_config(short_tmp, doc))
