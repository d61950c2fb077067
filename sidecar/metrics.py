"""Every metric of docs/metrics.md, in one place, on an injected registry.

Label values come only from bounded sets: endpoints, status codes the sidecar
itself answers, the docs/http-api.md error codes, configured secret ids. Nothing a
client sends (address, path, token, an upstream's status) can become a label:
a status outside :data:`STATUSES` is counted as ``code="other"``. Counters for
the known label values are created up front so dashboards show zeros, not gaps.

The five families every request updates are small custom collectors over plain
numbers: prometheus_client's Counter and Histogram take a lock per update, which
made our three updates per request cost 2.6 µs; these cost 0.7 µs. They are
updated and collected on the event loop thread only, so they need no lock.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from itertools import accumulate

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.utils import floatToGoString

from .settings import Settings

# ``*_created`` samples would double the output; the text format Prometheus scrapes
# reads them as unrelated gauges. (A process-wide switch of prometheus_client.)
disable_created_metrics()  # type: ignore[no-untyped-call]

PREFIX = "webhook_sidecar_"
ENDPOINTS = ("wake", "agent", "route", "other")
ERROR_CODES = (
    "ip_not_allowed", "locked_out", "not_found", "method_not_allowed", "token_in_query",
    "unauthorized", "rate_limited", "limiter_unavailable", "webhooks_disabled",
    "payload_too_large", "request_timeout", "unsupported_media_type", "invalid_json",
    "invalid_request", "agent_not_found", "agent_not_permitted", "session_key_not_allowed",
    "upstream_error", "upstream_unavailable", "upstream_timeout", "internal_error",
    "signature_invalid", "signature_expired", "template_error",
    "duplicate_in_flight", "dedup_unavailable",
    "spool_full", "spool_unavailable",
)  # fmt: skip
# Every status the public API answers with (docs/http-api.md). Upstream statuses are mapped
# to 502/503/504 by the forwarder, so none of them can reach this label directly.
STATUSES = (200, 400, 401, 403, 404, 405, 408, 409, 413, 415, 422, 429, 500, 502, 503, 504)
OTHER_STATUS = "other"
RELOAD_RESULTS = ("success", "error")
SPOOL_STATES = ("pending", "dead")
SPOOL_RESULTS = ("delivered", "retried", "dead")
# A group commit is one fsync: sub-millisecond on NVMe, tens of ms on network disks.
COMMIT_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
# Buckets around what a webhook costs: sub-millisecond refusals to multi-second agent admits.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5,
                   10, 20)  # fmt: skip


class Counts:
    """A counter family over plain numbers, keyed by its label values."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labels: tuple[str, ...],
        keys: Iterable[tuple[str, ...]],
        registry: CollectorRegistry,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labels = labels
        self.values: dict[tuple[str, ...], float] = dict.fromkeys(keys, 0.0)
        registry.register(self)

    def describe(self) -> list[Metric]:
        return [CounterMetricFamily(self.name, self.documentation, labels=self.labels)]

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labels)
        for key, value in self.values.items():
            family.add_metric(key, value)
        yield family


class Buckets:
    """One histogram child: per-bucket counts (not yet cumulative) and the sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # le is inclusive
        self.sum += value


class Histograms:
    """A histogram family with one label over fixed label values."""

    def __init__(
        self,
        name: str,
        documentation: str,
        label: str,
        keys: Iterable[str],
        registry: CollectorRegistry,
        bounds: tuple[float, ...] = LATENCY_BUCKETS,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.label = label
        self.les = [floatToGoString(b) for b in bounds] + ["+Inf"]  # type: ignore[no-untyped-call]
        self.children = {key: Buckets(bounds) for key in keys}
        registry.register(self)

    def describe(self) -> list[Metric]:
        return [HistogramMetricFamily(self.name, self.documentation, labels=[self.label])]

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=[self.label])
        for key, child in self.children.items():
            buckets = list(zip(self.les, map(float, accumulate(child.counts)), strict=True))
            family.add_metric([key], buckets, child.sum)
        yield family


class OptionalGauge:
    """A gauge without labels that is exported only once it has a value.

    The TLS certificate's expiry exists only when TLS is on; a default 0 would read
    as "expired in 1970" and fire every expiry alert on a plain-HTTP sidecar.
    """

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry) -> None:
        self.name = name
        self.documentation = documentation
        self.value: float | None = None
        registry.register(self)

    def set(self, value: float) -> None:
        self.value = float(value)

    def clear(self) -> None:
        self.value = None

    def describe(self) -> list[Metric]:
        return [GaugeMetricFamily(self.name, self.documentation)]

    def collect(self) -> Iterator[Metric]:
        if self.value is not None:
            yield GaugeMetricFamily(self.name, self.documentation, value=self.value)


class Metrics:
    """The sidecar's metrics. One instance per process (or per test, with its own registry).

    ``process=True`` adds prometheus_client's process and platform collectors
    (memory, CPU, open files) for the real process; tests leave them off.
    """

    def __init__(self, registry: CollectorRegistry | None = None, *, process: bool = False) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        p = PREFIX
        if process:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            # No GCCollector: it hooks a Python callback into every garbage collection.
        self.requests = Counts(
            p + "requests_total", "Requests on the public listener, by endpoint and HTTP status.",
            ("endpoint", "code"), [(e, str(s)) for e in ENDPOINTS for s in STATUSES], r,
        )  # fmt: skip
        self.request_duration = Histograms(
            p + "request_duration_seconds", "Time from request to response.", "endpoint",
            ENDPOINTS, r,
        )  # fmt: skip
        self.upstream_duration = Histograms(
            p + "upstream_duration_seconds", "Time the runtime took to answer.", "endpoint",
            ENDPOINTS, r,
        )  # fmt: skip
        self.rejections = Counts(
            p + "rejections_total", "Requests refused, by error code.", ("reason",),
            [(c,) for c in ERROR_CODES], r,
        )  # fmt: skip
        self.auth_success = Counts(
            p + "auth_success_total", "Successful authentications, by secret id.", ("secret",),
            (), r,
        )  # fmt: skip
        self.secret_not_after = Gauge(
            p + "secret_not_after_timestamp_seconds", "When each secret with notAfter expires.",
            ["secret"], registry=r,
        )  # fmt: skip
        self.tls_cert_not_after = OptionalGauge(
            p + "tls_cert_not_after_timestamp_seconds", "When the serving certificate expires.", r
        )
        self.config_reloads = Counter(
            p + "config_reloads_total", "Config reloads, by result.", ["result"], registry=r
        )
        for result in RELOAD_RESULTS:
            self.config_reloads.labels(result)
        self.in_flight = Gauge(
            p + "in_flight_requests", "Requests being handled on the public listener.", registry=r
        )
        self.unlocks = Counter(
            p + "unlocks_total",
            "Addresses released from the auth lockout by an operator (POST /admin/unlock).",
            registry=r,
        )
        # Not in docs/metrics.md: how many calls went through unchecked while the shared
        # limiter was down (rateLimit.failOpen: true).
        self.limiter_fail_open = Counter(
            p + "limiter_fail_open_total",
            "Requests let through unchecked because the shared rate-limit backend was "
            "unreachable (rateLimit.failOpen: true).",
            registry=r,
        )
        # Routes (docs/routes.md): label values are configured route names.
        self.route_requests = Counts(
            p + "route_requests_total", "Requests on each route, by HTTP status.",
            ("route", "code"), (), r,
        )  # fmt: skip
        self.route_ignored = Counts(
            p + "route_ignored_total", "Route deliveries answered without forwarding because "
            "the route's `when` was false.", ("route",), (), r,
        )  # fmt: skip
        # By route name; the seed endpoints count as "wake"/"agent", never a route's name.
        self.duplicates = Counts(
            p + "duplicates_total", "Deliveries answered as duplicates (docs/dedup.md).",
            ("route",), [("wake",), ("agent",)], r,
        )  # fmt: skip
        # The hot path reads these directly: one dict lookup per update.
        self._requests = self.requests.values
        self._status = {s: str(s) for s in STATUSES}
        self._durations = self.request_duration.children
        self._upstream = self.upstream_duration.children
        self._rejections = self.rejections.values
        self._auth = self.auth_success.values
        self._spool: SpoolMetrics | None = None

    def spool(self) -> SpoolMetrics:
        """The spool's metrics, registered on first use (only with ``sidecar.spool``)."""
        if self._spool is None:
            self._spool = SpoolMetrics(self.registry)
        return self._spool

    def count_in_flight(self, source: Callable[[], int]) -> None:
        """Read ``in_flight_requests`` from ``source`` at scrape time (the handlers in
        flight, which the drain tracks anyway) instead of two gauge updates per request."""
        self.in_flight.set_function(lambda: float(source()))

    def configure(self, settings: Settings) -> None:
        """Follow a (re)loaded config: secret ids and their expiry gauges.

        A secret removed from the config disappears from ``secret_not_after`` (an
        alert must not fire for a secret nobody uses any more); its
        ``auth_success`` counter stays, as counters must not go backwards.
        """
        routes = settings.webhooks.routes.values()
        for route in routes:
            self.route_ignored.values.setdefault((route.name,), 0.0)
            for status in STATUSES:
                self.route_requests.values.setdefault((route.name, str(status)), 0.0)
        secrets = [*settings.webhooks.secrets, *(s for r in routes for s in r.secrets)]
        for secret in secrets:
            self._auth.setdefault((secret.id,), 0.0)
        self.secret_not_after.clear()
        for secret in secrets:
            if secret.not_after is not None:
                self.secret_not_after.labels(secret.id).set(secret.not_after)
        if settings.sidecar.tls is None:
            self.tls_cert_not_after.clear()

    def observe(self, endpoint: str, status: int, code: str | None, seconds: float) -> None:
        """One finished request on the public listener."""
        # A status outside docs/http-api.md must never become a label value of its own.
        key = (endpoint, self._status.get(status, OTHER_STATUS))
        self._requests[key] = self._requests.get(key, 0.0) + 1
        self._durations[endpoint].observe(seconds)
        if code is not None:
            # A code missing from ERROR_CODES (a test checks) still counts.
            self._rejections[(code,)] = self._rejections.get((code,), 0.0) + 1

    def rejected(self, code: str) -> None:
        """A refusal outside a request, e.g. a connection over maxConnectionsPerIp."""
        self._rejections[(code,)] = self._rejections.get((code,), 0.0) + 1

    def observe_route(self, route: str, status: int, ignored: bool) -> None:
        """One finished request on a route (besides :meth:`observe`)."""
        key = (route, self._status.get(status, OTHER_STATUS))
        values = self.route_requests.values
        values[key] = values.get(key, 0.0) + 1
        if ignored:
            self.route_ignored.values[(route,)] = self.route_ignored.values.get((route,), 0.0) + 1

    def duplicate(self, route: str) -> None:
        """A delivery answered as a duplicate (done, or in flight) on ``route``."""
        values = self.duplicates.values
        key = (route,)
        values[key] = values.get(key, 0.0) + 1

    def observe_upstream(self, endpoint: str, seconds: float) -> None:
        self._upstream[endpoint].observe(seconds)

    def authenticated(self, secret_id: str) -> None:
        # Also for a secret a reload removed while the call was in flight.
        key = (secret_id,)
        self._auth[key] = self._auth.get(key, 0.0) + 1


class SpoolMetrics:
    """The spool's metrics (docs/spool.md), registered only when ``sidecar.spool`` is set.
    Updated on the event loop thread (commit times are handed over from the writer)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        p = PREFIX
        self.events = Gauge(
            p + "spool_events", "Events in the spool, by state.", ["state"], registry=registry
        )
        self.oldest = OptionalGauge(
            p + "spool_oldest_pending_age_seconds",
            "Age of the oldest pending event in the spool.",
            registry,
        )
        self.deliveries = Counts(
            p + "spool_deliveries_total", "Delivery attempts from the spool, by result.",
            ("result",), [(r,) for r in SPOOL_RESULTS], registry,
        )  # fmt: skip
        # Once per commit, not per request: prometheus_client's own (locked) histogram.
        self.commits = Histogram(
            p + "spool_commit_duration_seconds",
            "Time of one group commit (transaction and fsync) of the spool.",
            buckets=COMMIT_BUCKETS, registry=registry,
        )  # fmt: skip
        for state in SPOOL_STATES:
            self.events.labels(state)

    def observe_commit(self, seconds: float) -> None:
        self.commits.observe(seconds)

    def delivery(self, result: str) -> None:
        key = (result,)
        self.deliveries.values[key] = self.deliveries.values.get(key, 0.0) + 1

    def gauges(self, pending: int, dead: int, oldest_age: float | None) -> None:
        self.events.labels("pending").set(pending)
        self.events.labels("dead").set(dead)
        if oldest_age is None:
            self.oldest.set(0.0)
        else:
            self.oldest.set(oldest_age)
