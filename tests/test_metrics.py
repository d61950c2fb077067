"""docs/metrics.md metrics: names, types, labels, pre-initialised zeros, bounded label values,
and the values real traffic through the app leaves behind (read back with
prometheus_client's own text parser)."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from support.common import AGENT, OTHER_SECRET, SECRET, Runtime, base_doc, write_config
from support.scrape import Scrape
from support.senders import GH_SECRET, route

from sidecar import config
from sidecar.metrics import ENDPOINTS, ERROR_CODES, LATENCY_BUCKETS, STATUSES, Metrics
from sidecar.settings import Settings

SIDECAR_SRC = Path(__file__).resolve().parent.parent / "sidecar"
P = "webhook_sidecar_"

# docs/metrics.md, verbatim: family name -> (type, label names).
SPEC_METRICS = {
    P + "requests": ("counter", {"endpoint", "code"}),
    P + "request_duration_seconds": ("histogram", {"endpoint"}),
    P + "upstream_duration_seconds": ("histogram", {"endpoint"}),
    P + "rejections": ("counter", {"reason"}),
    P + "auth_success": ("counter", {"secret"}),
    P + "secret_not_after_timestamp_seconds": ("gauge", {"secret"}),
    P + "tls_cert_not_after_timestamp_seconds": ("gauge", set()),
    P + "config_reloads": ("counter", {"result"}),
    P + "in_flight_requests": ("gauge", set()),
    # docs/routes.md
    P + "route_requests": ("counter", {"route", "code"}),
    P + "route_ignored": ("counter", {"route"}),
    P + "duplicates": ("counter", {"route"}),  # docs/dedup.md
}
# docs/http-api.md: the status each error code is answered with.
SPEC_STATUS = {
    "ip_not_allowed": 403, "locked_out": 429, "not_found": 404, "method_not_allowed": 405,
    "token_in_query": 400, "unauthorized": 401, "rate_limited": 429, "limiter_unavailable": 503,
    "webhooks_disabled": 503, "payload_too_large": 413, "request_timeout": 408,
    "unsupported_media_type": 415, "invalid_json": 400, "invalid_request": 400,
    "agent_not_found": 404, "agent_not_permitted": 403, "session_key_not_allowed": 403,
    "upstream_error": 502, "upstream_unavailable": 503, "upstream_timeout": 504,
    "internal_error": 500, "duplicate_in_flight": 409, "dedup_unavailable": 503,
    # docs/routes.md
    "signature_invalid": 401, "signature_expired": 401, "template_error": 422,
    "spool_full": 503,  # docs/spool.md
    "spool_unavailable": 503,
}  # fmt: skip


def load(tmp: Path, doc: dict[str, Any]) -> Settings:
    return config.load(write_config(tmp, doc))


@contextlib.asynccontextmanager
async def hooks_runtime(path: Path, handler: Any) -> AsyncIterator[None]:
    """A runtime on a Unix socket answering every hook with ``handler``."""
    app = web.Application()
    app.router.add_post("/hooks/{hook}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.UnixSite(runner, str(path)).start()
    try:
        yield
    finally:
        await runner.cleanup()


def ts(rfc3339: str) -> float:
    return datetime.fromisoformat(rfc3339).timestamp()


def label_names(family: Any) -> set[str]:
    return {k for s in family.samples for k in s.labels if k != "le"}


# ---------------------------------------------------------------- the catalogue


def test_every_spec_metric_exists_with_its_type_and_labels(short_tmp: Path) -> None:
    metrics = Metrics()
    doc = base_doc(short_tmp / "x.sock")
    doc["webhooks"]["secrets"] = [
        {"id": "old", "env": "TEST_WEBHOOK_SECRET", "notAfter": "2099-01-01T00:00:00Z"}
    ]
    del doc["webhooks"]["secret"]
    doc["webhooks"]["routes"] = {"gh": route("github", GH_SECRET)}  # route_* series
    metrics.configure(load(short_tmp, doc))
    metrics.tls_cert_not_after.set(4102444800)
    scrape = Scrape.of(metrics.registry)
    for name, (kind, labels) in SPEC_METRICS.items():
        family = scrape.families[name]
        assert family.type == kind, name
        assert label_names(family) == labels, name
    # Nothing else but the documented extras (process collectors are off in tests).
    extras = {P + "limiter_fail_open", P + "unlocks"}
    assert set(scrape.families) == set(SPEC_METRICS) | extras


def test_spec_error_codes_and_statuses_are_the_bounded_label_sets() -> None:
    assert set(ERROR_CODES) == set(SPEC_STATUS)
    assert set(SPEC_STATUS.values()) | {200} == set(STATUSES)


def test_counters_start_at_zero_for_every_known_label_value() -> None:
    scrape = Scrape.of(Metrics().registry)
    for code in ERROR_CODES:
        assert scrape.value(P + "rejections_total", reason=code) == 0
    for endpoint in ENDPOINTS:
        for status in STATUSES:
            assert scrape.value(P + "requests_total", endpoint=endpoint, code=str(status)) == 0
        assert scrape.value(P + "request_duration_seconds_count", endpoint=endpoint) == 0
        assert scrape.value(P + "upstream_duration_seconds_count", endpoint=endpoint) == 0
    for result in ("success", "error"):
        assert scrape.value(P + "config_reloads_total", result=result) == 0
    assert scrape.value(P + "in_flight_requests") == 0
    assert not any(name.endswith("_created") for name, _ in scrape.samples)


def test_auth_success_starts_at_zero_for_every_configured_secret(short_tmp: Path) -> None:
    doc = base_doc(short_tmp / "x.sock")
    del doc["webhooks"]["secret"]
    doc["webhooks"]["secrets"] = [
        {"id": "current", "env": "TEST_WEBHOOK_SECRET"},
        {"id": "previous", "value": OTHER_SECRET},
    ]
    metrics = Metrics()
    metrics.configure(load(short_tmp, doc))
    scrape = Scrape.of(metrics.registry)
    assert scrape.series(P + "auth_success_total") == {
        frozenset({("secret", "current")}): 0, frozenset({("secret", "previous")}): 0,
    }  # fmt: skip


@given(st.lists(st.sampled_from([0.0, 0.0005, 0.25, 20.0, 21.0]) | st.floats(0, 60), max_size=40))
def test_histograms_expose_what_prometheus_clients_would(values: list[float]) -> None:
    """The lock-free histogram against prometheus_client's own, same observations."""
    ours, theirs = Metrics(), CollectorRegistry()
    reference = Histogram(
        P + "upstream_duration_seconds", "x", ["endpoint"], buckets=LATENCY_BUCKETS, registry=theirs
    )
    child = reference.labels("agent")
    for value in values:
        ours.observe_upstream("agent", value)
        child.observe(value)
    mine = Scrape.of(ours.registry).series(P + "upstream_duration_seconds_bucket")
    want = Scrape.of(theirs).series(P + "upstream_duration_seconds_bucket")
    assert {k: v for k, v in mine.items() if ("endpoint", "agent") in k} == want
    count = Scrape.of(ours.registry).value(P + "upstream_duration_seconds_count", endpoint="agent")
    total = Scrape.of(ours.registry).value(P + "upstream_duration_seconds_sum", endpoint="agent")
    assert count == len(values) and total == pytest.approx(sum(values))


def test_bucket_bounds_are_inclusive() -> None:
    metrics = Metrics()
    for value in (0.0005, 0.00051, 0.25, 20, 20.5):
        metrics.observe("wake", 200, None, value)
    s = Scrape.of(metrics.registry)

    def le(bound: str) -> float:
        return s.value(P + "request_duration_seconds_bucket", endpoint="wake", le=bound)

    assert (le("0.0005"), le("0.001"), le("0.25"), le("20.0"), le("+Inf")) == (1, 2, 3, 4, 5)


# ---------------------------------------------------------------- bounded label values


@pytest.mark.parametrize("status", [418, 299, 999, 0, 451])
def test_a_status_outside_the_spec_is_counted_as_other_never_as_itself(status: int) -> None:
    metrics = Metrics()
    metrics.observe("agent", status, None, 0.01)
    scrape = Scrape.of(metrics.registry)
    assert scrape.value(P + "requests_total", endpoint="agent", code="other") == 1
    assert str(status) not in scrape.label_values(P + "requests_total", "code")


def test_a_reject_code_missing_from_the_list_is_still_counted() -> None:
    metrics = Metrics()
    metrics.observe("wake", 400, "some_new_code", 0.01)
    assert Scrape.of(metrics.registry).value(P + "rejections_total", reason="some_new_code") == 1


def _reject_literals() -> list[tuple[str, int, object, object]]:
    found: list[tuple[str, int, object, object]] = []
    for path in SIDECAR_SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Reject":
                args = [a.value if isinstance(a, ast.Constant) else None for a in node.args[:2]]
                status, code = (*args, None, None)[:2]  # the status and the error code
                found.append((str(path.relative_to(SIDECAR_SRC)), node.lineno, status, code))
    return found


def test_every_reject_in_the_code_uses_a_spec_code_with_its_spec_status() -> None:
    """A guard added later with a new code or an odd status fails here, not on a dashboard."""
    literals = _reject_literals()
    assert len(literals) >= 15  # the scan really finds the guards' refusals
    for where, line, status, code in literals:
        if code is None:
            continue  # built from a variable (the Reject class itself)
        assert code in SPEC_STATUS, f"{where}:{line}: {code!r} is not a docs/http-api.md error code"
        if status is not None:
            assert status == SPEC_STATUS[code], (
                f"{where}:{line}: {code} must be {SPEC_STATUS[code]}"
            )


async def test_an_upstreams_odd_status_never_becomes_a_label(
    make_sidecar: Any, short_tmp: Path
) -> None:
    """A runtime answering 418, 299 or 599: the sidecar answers 502 or 200 and counts those."""
    statuses = iter([418, 299, 599])

    async def odd(request: web.Request) -> web.Response:
        return web.json_response({"ok": True}, status=next(statuses))

    async with hooks_runtime(short_tmp / "odd.sock", odd):
        sc = await make_sidecar(base_doc(short_tmp / "odd.sock"))
        answered = [(await sc.post("/hooks/wake", {"agent": AGENT}))[0] for _ in range(3)]
    assert answered == [502, 200, 502]
    scrape = Scrape.of(sc.state.metrics.registry)
    assert scrape.label_values(P + "requests_total", "code") <= {str(s) for s in STATUSES}
    assert scrape.value(P + "requests_total", endpoint="wake", code="502") == 2
    assert scrape.value(P + "rejections_total", reason="upstream_error") == 2


async def test_request_input_never_becomes_a_label(make_sidecar: Any, runtime: Runtime) -> None:
    sc = await make_sidecar(base_doc(runtime.path))
    for path in ["/hooks/agent/../../x", "/evil-path-label", "/hooks/wake?x=1"]:
        headers = {"X-Forwarded-For": "6.6.6.6", "X-Request-Id": "evil-rid-label"}
        await sc.post(
            path, {"agent": "evil-agent-label"}, token="evil-token-label", headers=headers
        )
    text = generate_latest(sc.state.metrics.registry).decode()
    for needle in ("evil", "6.6.6.6", "/hooks", SECRET):
        assert needle not in text


# ---------------------------------------------------------------- configure across reloads


def test_removed_secrets_disappear_from_secret_not_after(short_tmp: Path) -> None:
    doc = base_doc(short_tmp / "x.sock")
    del doc["webhooks"]["secret"]
    doc["webhooks"]["secrets"] = [
        {"id": "current", "env": "TEST_WEBHOOK_SECRET", "notAfter": "2099-06-01T00:00:00Z"},
        {"id": "previous", "value": OTHER_SECRET, "notAfter": "2099-01-01T00:00:00Z"},
    ]
    metrics = Metrics()
    metrics.configure(load(short_tmp, doc))
    metrics.authenticated("previous")
    before = Scrape.of(metrics.registry)
    assert before.value(P + "secret_not_after_timestamp_seconds", secret="previous") == ts(
        "2099-01-01T00:00:00Z"
    )
    assert before.value(P + "secret_not_after_timestamp_seconds", secret="current") == ts(
        "2099-06-01T00:00:00Z"
    )

    doc["webhooks"]["secrets"] = [
        {"id": "current", "env": "TEST_WEBHOOK_SECRET"}
    ]  # no notAfter now
    metrics.configure(load(short_tmp, doc))
    after = Scrape.of(metrics.registry)
    assert after.series(P + "secret_not_after_timestamp_seconds") == {}
    # Counters never go backwards: the retired secret's count stays for the rotation graph.
    assert after.value(P + "auth_success_total", secret="previous") == 1
    assert after.value(P + "auth_success_total", secret="current") == 0


def test_secret_without_not_after_has_no_expiry_series(short_tmp: Path) -> None:
    metrics = Metrics()
    metrics.configure(load(short_tmp, base_doc(short_tmp / "x.sock")))
    assert Scrape.of(metrics.registry).series(P + "secret_not_after_timestamp_seconds") == {}


def test_tls_expiry_is_absent_until_set_and_cleared_when_tls_is_off(short_tmp: Path) -> None:
    """A 0 would read as 'expired in 1970' and fire the certificate alert on plain HTTP."""
    metrics = Metrics()
    name = P + "tls_cert_not_after_timestamp_seconds"
    assert Scrape.of(metrics.registry).series(name) == {}
    metrics.tls_cert_not_after.set(1_900_000_000)
    assert Scrape.of(metrics.registry).value(name) == 1_900_000_000
    metrics.configure(load(short_tmp, base_doc(short_tmp / "x.sock")))  # a config without tls
    assert Scrape.of(metrics.registry).series(name) == {}


def test_a_secret_matched_just_before_a_reload_removed_it_is_still_counted() -> None:
    metrics = Metrics()
    metrics.authenticated("gone")
    assert Scrape.of(metrics.registry).value(P + "auth_success_total", secret="gone") == 1


def test_process_collectors_are_opt_in() -> None:
    families = Scrape.of(Metrics(CollectorRegistry(), process=True).registry).families
    assert "process_resident_memory_bytes" in families and "python_info" in families


# ---------------------------------------------------------------- values after real traffic


async def test_mixed_traffic_leaves_the_expected_values(
    make_sidecar: Any, runtime: Runtime
) -> None:
    doc = base_doc(runtime.path, allowIps=["127.0.0.0/8"], trustedProxies=["127.0.0.1/32"])
    del doc["webhooks"]["secret"]
    doc["webhooks"]["secrets"] = [
        {"id": "current", "env": "TEST_WEBHOOK_SECRET"},
        {"id": "previous", "value": OTHER_SECRET, "notAfter": "2099-01-01T00:00:00Z"},
    ]
    sc = await make_sidecar(doc)
    agent = {"agent": AGENT, "message": "hello"}
    assert (await sc.post("/hooks/agent", agent))[0] == 200
    assert (await sc.post("/hooks/agent", agent, token=OTHER_SECRET))[0] == 200
    assert (await sc.post("/hooks/wake", {"agent": AGENT}))[0] == 200
    assert (await sc.post("/hooks/wake", {"agent": AGENT}, token="wrong" * 10))[0] == 401
    assert (await sc.post("/hooks/agent", agent, token=None))[0] == 401
    outside = {"X-Forwarded-For": "203.0.113.9"}
    assert (await sc.post("/hooks/agent", agent, headers=outside))[0] == 403
    assert (await sc.post("/nope", agent))[0] == 404
    assert (await sc.post("/hooks/agent", {"agent": "ghost", "message": "x"}))[0] == 404
    await runtime.stop()
    assert (await sc.post("/hooks/wake", {"agent": AGENT}))[0] == 503

    s = Scrape.of(sc.state.metrics.registry)
    req = P + "requests_total"
    assert s.value(req, endpoint="agent", code="200") == 2
    assert s.value(req, endpoint="wake", code="200") == 1
    assert s.value(req, endpoint="wake", code="401") == 1
    assert s.value(req, endpoint="agent", code="401") == 1
    assert (
        s.value(req, endpoint="agent", code="403") == 1
    )  # refused before routing, labelled by path
    assert s.value(req, endpoint="other", code="404") == 1
    assert s.value(req, endpoint="agent", code="404") == 1
    assert s.value(req, endpoint="wake", code="503") == 1
    assert sum(s.series(req).values()) == 9
    rej = P + "rejections_total"
    assert s.value(rej, reason="unauthorized") == 2
    assert s.value(rej, reason="ip_not_allowed") == 1
    assert s.value(rej, reason="not_found") == 1
    assert s.value(rej, reason="agent_not_found") == 1
    assert s.value(rej, reason="upstream_unavailable") == 1
    assert sum(s.series(rej).values()) == 6
    assert s.value(P + "auth_success_total", secret="current") == 4  # 2 ok, agent_not_found, 503
    assert s.value(P + "auth_success_total", secret="previous") == 1
    assert s.value(P + "secret_not_after_timestamp_seconds", secret="previous") == ts(
        "2099-01-01T00:00:00Z"
    )
    assert s.get(P + "secret_not_after_timestamp_seconds", secret="current") is None
    assert s.value(P + "request_duration_seconds_count", endpoint="agent") == 5
    assert s.value(P + "request_duration_seconds_count", endpoint="wake") == 3
    assert s.value(P + "request_duration_seconds_count", endpoint="other") == 1
    # Only calls that reached the forwarder have an upstream duration.
    assert s.value(P + "upstream_duration_seconds_count", endpoint="agent") == 2
    assert s.value(P + "upstream_duration_seconds_count", endpoint="wake") == 2
    assert s.value(P + "upstream_duration_seconds_count", endpoint="other") == 0
    assert s.value(P + "in_flight_requests") == 0


async def test_in_flight_counts_calls_waiting_for_the_runtime(
    make_sidecar: Any, short_tmp: Path
) -> None:
    release = asyncio.Event()
    arrived = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        arrived.set()
        await release.wait()
        return web.json_response({"ok": True})

    async with hooks_runtime(short_tmp / "slow.sock", slow):
        sc = await make_sidecar(base_doc(short_tmp / "slow.sock"))
        call = asyncio.ensure_future(sc.post("/hooks/wake", {"agent": AGENT}))
        await asyncio.wait_for(arrived.wait(), 5)
        during = Scrape.of(sc.state.metrics.registry).value(P + "in_flight_requests")
        release.set()
        assert (await call)[0] == 200
    assert during == 1
    assert Scrape.of(sc.state.metrics.registry).value(P + "in_flight_requests") == 0


async def test_durations_measure_the_call(make_sidecar: Any, short_tmp: Path) -> None:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(0.3)
        return web.json_response({"ok": True})

    async with hooks_runtime(short_tmp / "slow.sock", slow):
        sc = await make_sidecar(base_doc(short_tmp / "slow.sock"))
        started = time.perf_counter()
        assert (await sc.post("/hooks/wake", {"agent": AGENT}))[0] == 200
        elapsed = time.perf_counter() - started
    s = Scrape.of(sc.state.metrics.registry)
    upstream = s.value(P + "upstream_duration_seconds_sum", endpoint="wake")
    total = s.value(P + "request_duration_seconds_sum", endpoint="wake")
    assert 0.29 <= upstream <= total <= elapsed
    assert s.value(P + "upstream_duration_seconds_bucket", endpoint="wake", le="0.25") == 0
    assert s.value(P + "upstream_duration_seconds_bucket", endpoint="wake", le="+Inf") == 1
