"""Brute-force lockout (``sidecar.authLockout``): over real sockets, the lock engages after
exactly ``maxFailures``, refuses the valid token too, is per client address (the resolved
one, behind a trusted proxy) and ends after ``duration``; the table stays bounded. The real
process logs a lock once and ``webhook-sidecar unlock`` releases it, under workers too."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import subprocess
import sys
import time
import tracemalloc
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from support.clients import post
from support.common import AGENT, SECRET, Runtime, base_doc, free_port, write_config

from sidecar.guards.lockout import LockoutTable, client_key
from sidecar.settings import Lockout


def lockout_doc(runtime: Runtime, **policy: Any) -> dict[str, Any]:
    return base_doc(runtime.path, authLockout={"maxFailures": 3, **policy})


async def test_locks_after_exactly_max_failures_and_refuses_the_valid_token(
    make_sidecar: Any, runtime: Runtime
) -> None:
    sc = await make_sidecar(lockout_doc(runtime, window="1m", duration="5m"))
    url = str(sc.client.make_url("/hooks/wake"))
    assert (await post(url, token=None))[0] == 401  # missing counts
    assert (await post(url, token="wrong"))[0] == 401
    assert (await post(url))[0] == 200  # a success between does not reset the count
    status, headers, body = await post(url, token="wrong-again")
    assert (status, body["error"]) == (401, "unauthorized")  # the third failure itself is 401
    for token in (SECRET, "wrong", None):  # from now on: 429, valid token or not
        status, headers, body = await post(url, token=token)
        assert (status, body["error"]) == (429, "locked_out"), token
        assert 299 <= int(headers["Retry-After"]) <= 300
    assert len(runtime.calls) == 1
    assert [e["status"] for e in sc.audit.entries()] == [401, 401, 200, 401, 429, 429, 429]


async def test_one_address_locked_is_not_everyone_locked(
    make_sidecar: Any, runtime: Runtime
) -> None:
    sc = await make_sidecar(lockout_doc(runtime))
    url = str(sc.client.make_url("/hooks/wake"))
    for _ in range(3):
        await post(url, token="wrong", source="127.0.0.2")
    assert (await post(url, source="127.0.0.2"))[0] == 429
    assert (await post(url, source="127.0.0.1"))[0] == 200


async def test_behind_a_proxy_the_forwarded_client_is_locked(
    make_sidecar: Any, runtime: Runtime
) -> None:
    doc = lockout_doc(runtime)
    doc["sidecar"]["trustedProxies"] = ["127.0.0.1/32"]
    sc = await make_sidecar(doc)
    url = str(sc.client.make_url("/hooks/wake"))
    attacker = {"X-Forwarded-For": "198.51.100.66"}
    bystander = {"X-Forwarded-For": "198.51.100.7"}
    for _ in range(3):
        await post(url, token="wrong", headers=attacker)
    assert (await post(url, headers=attacker))[0] == 429
    assert (await post(url, headers=bystander))[0] == 200  # the proxy itself is not locked


async def test_failures_older_than_the_window_do_not_count(
    make_sidecar: Any, runtime: Runtime
) -> None:
    sc = await make_sidecar(lockout_doc(runtime, maxFailures=2, window="300ms"))
    url = str(sc.client.make_url("/hooks/wake"))
    for _ in range(3):
        assert (await post(url, token="wrong"))[0] == 401
        await asyncio.sleep(0.4)  # each failure leaves the window before the next
    assert (await post(url))[0] == 200


async def test_the_lock_ends_after_duration(make_sidecar: Any, runtime: Runtime) -> None:
    sc = await make_sidecar(lockout_doc(runtime, maxFailures=1, duration="500ms"))
    url = str(sc.client.make_url("/hooks/wake"))
    assert (await post(url, token="wrong"))[0] == 401
    status, headers, _ = await post(url)
    assert status == 429 and headers["Retry-After"] == "1"  # rounded up, never 0
    await asyncio.sleep(0.6)
    assert (await post(url))[0] == 200


async def test_lockout_survives_a_reload(make_sidecar: Any, runtime: Runtime) -> None:
    """The table lives in the process state: reloading the config is no way out."""
    sc = await make_sidecar(lockout_doc(runtime, maxFailures=1))
    url = str(sc.client.make_url("/hooks/wake"))
    await post(url, token="wrong")
    sc.state.apply(sc.state.settings)
    assert (await post(url))[0] == 429


# ---------------------------------------------------------------- the table

POLICY = Lockout(max_failures=3, window=60.0, duration=300.0)


def test_sliding_window_counts_only_recent_failures() -> None:
    table = LockoutTable()
    assert not table.record_failure("a", POLICY, 0.0)
    assert not table.record_failure("a", POLICY, 50.0)
    assert not table.record_failure("a", POLICY, 61.0)  # the one at 0 has left the window
    assert table.record_failure("a", POLICY, 62.0)  # 50, 61, 62: three within 60 s
    assert table.locked_for("a", 62.0) == 300.0
    assert table.locked_for("a", 361.9) == pytest.approx(0.1)
    assert table.locked_for("a", 362.0) == 0.0
    assert len(table) == 0  # the ended lock is gone, and the count started over


def test_stale_times_kept_for_a_while_are_not_counted() -> None:
    """A record drops its stale front in batches (an eighth of it at a time): the ones it
    still holds must not count towards the lock."""
    policy = Lockout(max_failures=20, window=10.0, duration=1.0)
    table = LockoutTable()
    for t in range(10):  # 0..9: ten failures
        assert not table.record_failure("a", policy, float(t))
    # From here the one at 0 is out of the window but still in the record (1/11 stale).
    for i in range(10):  # ten more: 19 live (1..9, then these), the 20th locks
        assert not table.record_failure("a", policy, 10.5 + i * 0.01)
    assert table.record_failure("a", policy, 10.7)


def test_records_expire_without_further_traffic_from_that_address() -> None:
    table = LockoutTable()
    for i in range(100):
        table.record_failure(f"10.0.0.{i}", POLICY, float(i))
    table.record_failure("x", POLICY, 200.0)  # any later failure sweeps the expired ones
    assert len(table) == 1


def test_entries_are_capped_oldest_first() -> None:
    table = LockoutTable(max_entries=100)
    for i in range(1000):
        table.record_failure(str(i), POLICY, 1.0 + i * 1e-3)
    assert len(table) == 100
    assert not table.record_failure("999", POLICY, 2.0)  # the newest are remembered:
    assert table.record_failure("999", POLICY, 2.0)  # 1 + 2 failures lock it
    assert not table.record_failure("0", POLICY, 2.0)  # the oldest was forgotten:
    assert not table.record_failure("0", POLICY, 2.0)  # 1 + 2 failures would have locked it


def test_a_large_max_failures_keeps_fewer_records() -> None:
    """Records hold up to maxFailures - 1 times; the total is capped, not per record."""
    table = LockoutTable(max_entries=1000, max_times=1000)
    policy = Lockout(max_failures=101, window=60.0, duration=1.0)
    for i in range(50):
        for j in range(100):
            table.record_failure(str(i), policy, i + j * 1e-3)
    assert len(table) == 10  # 1000 times / 100 per record


def test_locks_are_capped_too() -> None:
    table = LockoutTable(max_entries=10)
    for i in range(50):
        table.record_failure(str(i), Lockout(1, 60.0, 300.0), float(i))
    assert len(table.locks) == 10
    assert table.locked_for("49", 50.0) > 0


class FakeCall:
    def __init__(self, text: str) -> None:
        self.client_ip = text
        self.client_addr = None if text == "unknown" else ipaddress.ip_address(text)


@pytest.mark.parametrize(
    ("client", "key"),
    [
        ("198.51.100.7", "198.51.100.7"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),  # the same subscriber
        ("unknown", "unknown"),
    ],
)
def test_client_key(client: str, key: str) -> None:
    assert client_key(FakeCall(client)) == key  # type: ignore[arg-type]


@pytest.mark.slow
def test_memory_stays_bounded_under_a_many_address_flood() -> None:
    """120k distinct failing addresses against the default caps (README: the 2M figure)."""
    tracemalloc.start()
    try:
        table = LockoutTable()
        start = tracemalloc.get_traced_memory()[0]
        base = int(ipaddress.IPv4Address("10.0.0.0"))
        t0 = time.perf_counter()
        for i in range(120_000):
            table.record_failure(str(ipaddress.IPv4Address(base + i)), POLICY, 1.0 + i * 1e-5)
        elapsed = time.perf_counter() - t0
        used = tracemalloc.get_traced_memory()[0] - start
    finally:
        tracemalloc.stop()
    assert len(table) == table.max_entries == 25_000
    assert used < 10e6, used  # measured about 6 MB
    assert elapsed < 60  # O(1) per failure; a quadratic eviction takes far longer


# ------------------------------------------- the real process: logged once, `unlock` CLI


def call(port: int, token: str) -> int:
    """One wake on a fresh connection (under workers: any worker the kernel picks)."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/hooks/wake",
        data=json.dumps({"agent": AGENT}).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def ready(admin: int) -> None:
    """Wait for /readyz 200: under workers the supervisor answers /healthz before them."""
    deadline = time.monotonic() + 15
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=2):
                return
        except OSError:
            assert time.monotonic() < deadline, "not ready"
            time.sleep(0.05)


def unlock_cli(config_path: Path, address: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "unlock", "-c", str(config_path), address],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def process_doc(runtime: Runtime, **sidecar: Any) -> dict[str, Any]:
    return base_doc(
        runtime.path,
        listen=f"127.0.0.1:{free_port()}",
        admin={"listen": f"127.0.0.1:{free_port()}"},
        authLockout={"maxFailures": 3, "duration": "5m"},
        **sidecar,
    )


def ports(doc: dict[str, Any]) -> tuple[int, int]:
    s = doc["sidecar"]
    return int(s["listen"].rsplit(":", 1)[1]), int(s["admin"]["listen"].rsplit(":", 1)[1])


async def test_a_lock_is_logged_once_and_the_unlock_cli_releases_it(
    runtime: Runtime, short_tmp: Path, sidecar_process: Any
) -> None:
    doc = process_doc(runtime)
    port, admin = ports(doc)
    path = write_config(short_tmp, doc)
    proc = sidecar_process(path, admin)
    statuses = [await asyncio.to_thread(call, port, "wrong") for _ in range(5)]
    assert statuses == [401, 401, 401, 429, 429]
    assert await asyncio.to_thread(call, port, SECRET) == 429
    before = time.time()
    await asyncio.sleep(0.2)  # the log writer is a thread
    [locked] = [e for e in proc.json_lines() if e.get("msg", "").startswith("address locked out")]
    assert locked["level"] == "warning"
    assert (locked["address"], locked["failures"]) == ("127.0.0.1", 3)
    until = datetime.fromisoformat(locked["until"])  # RFC 3339, UTC
    assert locked["until"].endswith("Z") and until.tzinfo is not None
    assert before + 290 < until.timestamp() < before + 301
    assert SECRET not in proc.output()

    result = await asyncio.to_thread(unlock_cli, path, "127.0.0.1")
    assert (result.returncode, result.stdout) == (0, "127.0.0.1: unlocked\n"), result.stderr
    assert await asyncio.to_thread(call, port, SECRET) == 200
    result = await asyncio.to_thread(unlock_cli, path, "::ffff:127.0.0.1")  # mapped spelling
    assert (result.returncode, result.stdout) == (0, "::ffff:127.0.0.1: was not locked "
                                                     "(nothing to release)\n")  # fmt: skip
    await asyncio.sleep(0.2)
    unlocks = [e for e in proc.json_lines() if e.get("msg", "").startswith("unlock 127.0.0.1")]
    assert [(e["level"], e["unlocked"]) for e in unlocks] == [("warning", True), ("warning", False)]


async def test_unlock_cli_errors(runtime: Runtime, short_tmp: Path, sidecar_process: Any) -> None:
    doc = process_doc(runtime)
    admin = ports(doc)[1]
    path = write_config(short_tmp, doc)
    down = await asyncio.to_thread(unlock_cli, path, "127.0.0.1")  # nothing runs yet
    assert down.returncode == 1
    assert f"cannot reach the admin listener at http://127.0.0.1:{admin}/admin/unlock" in (
        down.stderr
    )
    sidecar_process(path, admin)
    bad = await asyncio.to_thread(unlock_cli, path, "not-an-address")
    assert bad.returncode == 2 and "400" in bad.stderr and "address:" in bad.stderr
    missing = await asyncio.to_thread(unlock_cli, short_tmp / "nope.json5", "127.0.0.1")
    assert missing.returncode == 2 and "cannot read config file" in missing.stderr


async def test_under_workers_the_unlock_reaches_every_worker(
    runtime: Runtime, short_tmp: Path, sidecar_process: Any
) -> None:
    """Each worker keeps its own lockout table; the supervisor's admin passes the unlock
    on to all of them. New connections are spread over the workers by the kernel, so 30
    failures lock the address in both (each needs 3), and 12 valid calls after the unlock
    would meet a worker still locking it if the unlock reached only one."""
    doc = process_doc(runtime, workers=2)
    port, admin = ports(doc)
    path = write_config(short_tmp, doc)
    proc = sidecar_process(path, admin)
    await asyncio.to_thread(ready, admin)
    for _ in range(30):
        await asyncio.to_thread(call, port, "wrong")
    assert [await asyncio.to_thread(call, port, SECRET) for _ in range(12)] == [429] * 12
    result = await asyncio.to_thread(unlock_cli, path, "127.0.0.1")
    assert (result.returncode, result.stdout) == (0, "127.0.0.1: unlocked\n"), result.stderr
    assert [await asyncio.to_thread(call, port, SECRET) for _ in range(12)] == [200] * 12
    await asyncio.sleep(0.2)
    unlocks = [e for e in proc.json_lines() if e.get("msg", "").startswith("unlock ")]
    assert len(unlocks) == 1 and "worker" not in unlocks[0]  # the supervisor's, once
    metrics = await asyncio.to_thread(
        lambda: urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5).read()
    )
    assert b"webhook_sidecar_unlocks_total 1.0" in metrics
