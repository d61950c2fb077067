"""deploy/grafana-dashboard.json and deploy/prometheus-rules.yaml against the metrics the
sidecar really exports: every metric, label and label value an expression names must
exist in a live registry, so a renamed metric breaks this test, not a dashboard at 3am.
With promtool on PATH (Debian package ``prometheus``), the rules are also checked and
unit-tested: each alert fires on the series it is for."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.common import SECRET, base_doc, write_config
from support.senders import GH_SECRET, route

from sidecar import config
from sidecar.metrics import (
    ENDPOINTS,
    ERROR_CODES,
    RELOAD_RESULTS,
    SPOOL_RESULTS,
    SPOOL_STATES,
    STATUSES,
    Metrics,
)

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
DASHBOARD = DEPLOY / "grafana-dashboard.json"
RULES = DEPLOY / "prometheus-rules.yaml"

# PromQL functions, aggregations and keywords the files may use.
PROMQL_WORDS = {
    "sum", "min", "max", "avg", "count", "topk", "bottomk", "rate", "irate", "increase",
    "histogram_quantile", "time", "abs", "clamp_min", "clamp_max", "and", "or", "unless",
    "offset", "bool", "label_values", "vector", "scalar", "absent", "delta", "deriv",
}  # fmt: skip
TARGET_LABELS = {"job", "instance"}  # added by Prometheus to every scraped series
KNOWN_VALUES = {
    "reason": set(ERROR_CODES),
    "endpoint": set(ENDPOINTS),
    "code": {str(s) for s in STATUSES},
    "result": set(RELOAD_RESULTS),
    "state": set(SPOOL_STATES),
}
# A label whose values depend on the metric: looked up here first.
METRIC_VALUES = {
    ("webhook_sidecar_spool_deliveries_total", "result"): set(SPOOL_RESULTS),
}

_SELECTOR = re.compile(r"(?<![\w:])([a-zA-Z_:][\w:]*)\s*\{([^}]*)\}")
_MATCHER = re.compile(r'\s*([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*,?')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_WORD = re.compile(r"(?<![\w:.])([a-zA-Z_:][\w:]*)")


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> dict[str, set[str]]:
    """Sample name -> label names, from the registry the real process serves (process
    collectors on, a secret with notAfter, the TLS gauge set: every family has samples)."""
    folder = tmp_path_factory.mktemp("cfg")
    doc = base_doc(folder / "x.sock")
    del doc["webhooks"]["secret"]
    doc["webhooks"]["secrets"] = [{"id": "a", "value": SECRET, "notAfter": "2099-01-01T00:00:00Z"}]
    doc["webhooks"]["routes"] = {"gh": route("github", GH_SECRET)}  # route_* series
    metrics = Metrics(process=True)
    metrics.configure(config.load(write_config(folder, doc)))
    metrics.tls_cert_not_after.set(4102444800)
    metrics.spool().gauges(1, 1, 1.0)  # registered with sidecar.spool (docs/spool.md)
    names: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


def dashboard_exprs() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in board["templating"]["list"] if v["type"] == "query"]
    return exprs


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def references(expr: str) -> tuple[list[tuple[str, list[tuple[str, str, str]]]], set[str]]:
    """(metric name, its label matchers) for every series an expression reads, and the
    labels it groups or matches on. Raises AssertionError on anything unrecognised."""
    text = expr.replace("$__rate_interval", "5m")
    found: list[tuple[str, list[tuple[str, str, str]]]] = []
    grouping: set[str] = set()
    # Grafana's label_values(selector, label): the label is read from the selector's series.
    values_of = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", text.strip())
    if values_of:
        text, label = values_of.groups()
        grouping.add(label)

    def selector(m: re.Match[str]) -> str:
        body = m.group(2)
        matchers = _MATCHER.findall(body)
        assert _MATCHER.sub("", body).strip() == "", f"unparsed matchers {body!r} in {expr!r}"
        found.append((m.group(1), matchers))
        return " "

    text = _SELECTOR.sub(selector, text)
    for _, labels in _GROUPING.findall(text):
        grouping |= {label.strip() for label in labels.split(",") if label.strip()}
    text = _STRING.sub(" ", _GROUPING.sub(" ", text))
    for word in _WORD.findall(text):
        if word not in PROMQL_WORDS:
            found.append((word, []))  # a bare metric name
    return found, grouping


def check(expr: str, live: dict[str, set[str]]) -> set[str]:
    """Assert every metric, label and value ``expr`` names exists; returns the metrics."""
    refs, grouping = references(expr)
    assert refs, f"no metric in {expr!r}"
    labels_here = set(TARGET_LABELS)
    for name, matchers in refs:
        assert name in live, f"{name} (in {expr!r}) is not exported"
        labels_here |= live[name]
        for label, op, value in matchers:
            assert label in live[name] | TARGET_LABELS, f"{name} has no label {label!r}"
            known = METRIC_VALUES.get((name, label), KNOWN_VALUES.get(label))
            if known is None or "$" in value:
                continue
            if op == "=":
                assert value in known, f"{name}{{{label}={value!r}}} can never match"
            elif op == "=~":
                matching = {v for v in known if re.fullmatch(value, v)}
                assert matching, f"{name}{{{label}=~{value!r}}} matches nothing"
                if re.fullmatch(r"[\w|]+", value):  # a plain alternation: every branch must exist
                    assert set(value.split("|")) <= known, f"{value!r} names an unknown {label}"
    assert grouping <= labels_here, (
        f"{expr!r} groups by labels its metrics lack: {grouping - labels_here}"
    )
    return {name for name, _ in refs}


# ---------------------------------------------------------------- the checker checks


def test_the_checker_catches_typos(live: dict[str, set[str]]) -> None:
    for bad in (
        "rate(webhook_sidecar_request_total[5m])",  # missing s
        'webhook_sidecar_rejections_total{reason="unauthorised"}',
        'webhook_sidecar_rejections_total{code="401"}',
        "sum by (secret) (rate(webhook_sidecar_requests_total[5m]))",
        "webhook_sidecar_request_duration_seconds_bukket",
        'webhook_sidecar_rejections_total{reason=~"upstream_eror|upstream_timeout"}',
        'webhook_sidecar_spool_events{state="pendin"}',
        # a reload's result, not a delivery's
        'webhook_sidecar_spool_deliveries_total{result="success"}',
        'webhook_sidecar_config_reloads_total{result="delivered"}',
        "webhook_sidecar_spool_oldest_pending_age",
    ):
        with pytest.raises(AssertionError):
            check(bad, live)
    assert check(
        "histogram_quantile(0.9, sum by (le) "
        "(rate(webhook_sidecar_upstream_duration_seconds_bucket[5m])))",
        live,
    ) == {"webhook_sidecar_upstream_duration_seconds_bucket"}


# ---------------------------------------------------------------- the dashboard


def test_dashboard_references_only_exported_metrics(live: dict[str, set[str]]) -> None:
    used = set()
    for expr in dashboard_exprs():
        used |= check(expr, live)
    # Every docs/metrics.md metric has a panel.
    for metric in (
        "requests_total", "request_duration_seconds_bucket", "upstream_duration_seconds_bucket",
        "rejections_total", "auth_success_total", "secret_not_after_timestamp_seconds",
        "tls_cert_not_after_timestamp_seconds", "config_reloads_total", "in_flight_requests",
        "duplicates_total", "spool_events", "spool_oldest_pending_age_seconds",
        "spool_deliveries_total", "spool_commit_duration_seconds_bucket",
    ):  # fmt: skip
        assert "webhook_sidecar_" + metric in used, metric


def test_dashboard_shows_the_spool_backlog(live: dict[str, set[str]]) -> None:
    """docs/spool.md: pending and dead events, the oldest pending event's age, and
    deliveries by result, each in a panel of its own kind."""
    exprs = dashboard_exprs()

    def panels_with(metric: str, grouped_by: str | None = None) -> list[str]:
        found = []
        for expr in exprs:
            refs, grouping = references(expr)
            if any(name == metric for name, _ in refs) and (
                grouped_by is None or grouped_by in grouping
            ):
                found.append(expr)
        return found

    # Pending and dead apart (by state), and the dead letters on their own.
    assert panels_with("webhook_sidecar_spool_events", grouped_by="state")
    assert any('state="dead"' in e for e in panels_with("webhook_sidecar_spool_events"))
    assert panels_with("webhook_sidecar_spool_oldest_pending_age_seconds")
    # A counter: shown as a rate, split by delivered / retried / dead.
    deliveries = panels_with("webhook_sidecar_spool_deliveries_total", grouped_by="result")
    assert deliveries and all("rate(" in e for e in deliveries)


def test_dashboard_is_importable() -> None:
    board = json.loads(DASHBOARD.read_text())
    assert board["uid"] == "webhook-sidecar" and board["schemaVersion"] >= 36
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource"
        and variables["datasource"]["query"] == "prometheus"
    )
    for panel in board["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"] and all('job=~"$job"' in t["expr"] for t in panel["targets"]), (
            panel["title"]
        )


# ---------------------------------------------------------------- the alert rules


def test_rules_reference_only_exported_metrics(live: dict[str, set[str]]) -> None:
    for rule in rules():
        check(rule["expr"], live)


def test_rules_file_is_a_plain_rules_file_with_labelled_alerts() -> None:
    doc = yaml.safe_load(RULES.read_text())
    assert set(doc) == {"groups"}
    groups = [group["name"] for group in doc["groups"]]
    assert len(groups) == len(set(groups))
    names = [rule["alert"] for rule in rules()]
    assert len(names) == len(set(names))
    for rule in rules():
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"]
        if "for" in rule:
            config.parse_duration(rule["for"])


@pytest.mark.parametrize(
    ("topic", "needle"),
    [
        ("secret nearing expiry", "webhook_sidecar_secret_not_after_timestamp_seconds"),
        ("certificate nearing expiry", "webhook_sidecar_tls_cert_not_after_timestamp_seconds"),
        ("rising unauthorized", 'reason="unauthorized"'),
        ("locked out clients", 'reason="locked_out"'),
        ("upstream errors", "upstream_error|upstream_unavailable|upstream_timeout"),
        ("reload failures", 'webhook_sidecar_config_reloads_total{result="error"}'),
        ("route signatures failing", 'webhook_sidecar_route_requests_total{code="401"}'),
    ],
)
def test_rules_cover(topic: str, needle: str) -> None:
    assert any(needle in rule["expr"] for rule in rules()), topic


# ---------------------------------------------------------------- promtool, when installed

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not on PATH (Debian: prometheus)"
)


def series(metric: str, values: str, **labels: str) -> dict[str, str]:
    """One promtool input series of ``job="s", instance="i"`` plus ``labels``."""
    pairs = {"job": "s", "instance": "i", **labels}
    text = ", ".join(f'{k}="{v}"' for k, v in pairs.items())
    return {"series": f"webhook_sidecar_{metric}{{{text}}}", "values": values}


def fires(at: str, alert: str, labels: dict[str, str], **annotations: str) -> dict[str, Any]:
    expected = {"exp_labels": labels, "exp_annotations": annotations}
    return {"eval_time": at, "alertname": alert, "exp_alerts": [expected]}


def silent(at: str, alert: str) -> dict[str, Any]:
    return {"eval_time": at, "alertname": alert, "exp_alerts": []}


INSTANCE = {"job": "s", "instance": "i"}
# promtool's clock starts at 0; series values below are chosen relative to that.
PROMTOOL_TESTS = {
    "evaluation_interval": "1m",
    "tests": [
        {  # "current" expires in 3 days and is still used; "old" expires too but is unused.
            "interval": "1m",
            "input_series": [
                series("secret_not_after_timestamp_seconds", f"{3 * 86400}x90", secret="current"),
                series("secret_not_after_timestamp_seconds", f"{2 * 86400}x90", secret="old"),
                series("auth_success_total", "0+5x90", secret="current"),
                series("auth_success_total", "7x90", secret="old"),
                series("config_reloads_total", "0 0 0 1 1 1", result="error"),
            ],
            "alert_rule_test": [
                fires(
                    "60m",
                    "WebhookSecretExpiringWhileInUse",
                    {"severity": "warning", **INSTANCE, "secret": "current"},
                    summary="Webhook secret current expires in 2d 23h 0m 0s and is still in use",
                    description="Move the callers using secret current on i to the current "
                    "secret (webhook_sidecar_auth_success_total by secret shows who is left).",
                ),
                silent("60m", "WebhookSecretExpiresTodayWhileInUse"),
                silent("60m", "WebhookTLSCertificateExpiringSoon"),  # no TLS: no series
                fires(
                    "5m",
                    "WebhookConfigReloadFailed",
                    {"severity": "warning", **INSTANCE, "result": "error"},
                    summary="A config reload on i was refused; "
                    "the previous config is still running",
                    description='The sidecar log has the problems (message "reload refused, '
                    'keeping the running config").',
                ),
            ],
        },
        {  # An upstream outage: every call fails with upstream_unavailable.
            "interval": "1m",
            "input_series": [
                series("requests_total", "0+60x30", endpoint="agent", code="503"),
                series("rejections_total", "0+60x30", reason="upstream_unavailable"),
                series("rejections_total", "0 0 0 0 3 3 3", reason="locked_out"),
            ],
            "alert_rule_test": [
                fires(
                    "20m",
                    "WebhookUpstreamErrors",
                    {"severity": "critical", "job": "s"},
                    summary="100% of webhook calls fail at the agent runtime",
                    description="See webhook_sidecar_rejections_total by reason: "
                    "upstream_unavailable (runtime down or busy), "
                    "upstream_timeout, upstream_error.",
                ),
                fires(
                    "6m",
                    "WebhookClientsLockedOut",
                    {"severity": "warning", "job": "s"},
                    summary="3 webhook calls refused as locked_out in 10 minutes (brute force?)",
                ),
            ],
        },
        {  # The shared limiter goes down: fail closed on one replica, fail open on another.
            "interval": "1m",
            "input_series": [
                series("rejections_total", "0x5 0+30x10", reason="limiter_unavailable"),
                series("limiter_fail_open_total", "0x5 0+30x10", job="t"),
            ],
            "alert_rule_test": [
                silent("4m", "WebhookRateLimiterUnavailable"),
                fires(
                    "10m",
                    "WebhookRateLimiterUnavailable",
                    {"severity": "critical", "job": "s"},
                    summary="Webhook calls refused: the shared rate limiter is unreachable",
                ),
                fires(
                    "10m",
                    "WebhookRateLimiterFailingOpen",
                    {"severity": "warning", "job": "t"},
                    summary="120 webhook calls passed without rate limits in 10 minutes "
                    "(limiter down, failOpen)",
                ),
            ],
        },
        {  # A GitHub route whose secret was rotated at GitHub only: every delivery is 401.
            "interval": "1m",
            "input_series": [
                series("route_requests_total", "0+10x20 200+0x10", route="gh", code="200"),
                series("route_requests_total", "0x20 0+10x30", route="gh", code="401"),
                series("route_requests_total", "0+10x50", route="stripe", code="200"),
            ],
            "alert_rule_test": [
                silent("15m", "WebhookRouteSignaturesFailing"),
                fires(
                    "45m",
                    "WebhookRouteSignaturesFailing",
                    {"severity": "warning", "job": "s", "route": "gh"},
                    summary="Most deliveries on route gh fail their signature check",
                    description="Compare the route's secrets with the secret set at the sender "
                    "(webhook_sidecar_rejections_total: signature_invalid, or signature_expired "
                    "for clock skew).",
                ),
            ],
        },
        {  # A guessing attack: bad tokens jump from none to 2/s.
            "interval": "1m",
            "input_series": [series("rejections_total", "0x120 0+120x40", reason="unauthorized")],
            "alert_rule_test": [
                silent("100m", "WebhookUnauthorizedRising"),
                fires(
                    "150m",
                    "WebhookUnauthorizedRising",
                    {"severity": "warning", "job": "s"},
                    summary="2/s webhook calls with a bad or missing token, "
                    "over 3x the hour before",
                ),
            ],
        },
    ],
}


@needs_promtool
def test_promtool_accepts_the_rules(tmp_path: Path) -> None:
    assert PROMTOOL is not None
    result = subprocess.run(
        [PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_alerts_fire_on_the_series_they_are_for(tmp_path: Path) -> None:
    assert PROMTOOL is not None
    tests = json.loads(json.dumps(PROMTOOL_TESTS))
    tests["rule_files"] = [str(RULES)]
    (tmp_path / "tests.yml").write_text(yaml.safe_dump(tests))
    result = subprocess.run(
        [PROMTOOL, "test", "rules", "tests.yml"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
