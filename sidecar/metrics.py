"""Every metric of SPEC §6, in one place, on an injected registry.

Label values come only from bounded sets: endpoints, status codes the sidecar
itself answers, the SPEC §3 error codes, configured secret ids. Counters for
the known label values are created up front so dashboards show zeros, not gaps.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .config import Settings

ENDPOINTS = ("wake", "agent", "other")
ERROR_CODES = (
    "ip_not_allowed", "locked_out", "not_found", "method_not_allowed", "token_in_query",
    "unauthorized", "rate_limited", "limiter_unavailable", "webhooks_disabled",
    "payload_too_large", "request_timeout", "unsupported_media_type", "invalid_json",
    "invalid_request", "agent_not_found", "agent_not_permitted", "session_key_not_allowed",
    "upstream_error", "upstream_unavailable", "upstream_timeout", "internal_error",
)  # fmt: skip
# Buckets around what a webhook costs: sub-millisecond refusals to multi-second agent admits.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20)


class Metrics:
    """The sidecar's metrics. One instance per process (or per test, with its own registry)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        p = "webhook_sidecar_"
        self.requests = Counter(
            p + "requests_total", "Requests on the public listener.", ["endpoint", "code"], registry=r
        )
        self.request_duration = Histogram(
            p + "request_duration_seconds", "Time from request to response.", ["endpoint"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.upstream_duration = Histogram(
            p + "upstream_duration_seconds", "Time the runtime took to answer.", ["endpoint"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.rejections = Counter(
            p + "rejections_total", "Requests refused, by SPEC error code.", ["reason"], registry=r
        )
        self.auth_success = Counter(
            p + "auth_success_total", "Successful authentications, by secret id.", ["secret"],
            registry=r,
        )
        self.secret_not_after = Gauge(
            p + "secret_not_after_timestamp_seconds", "When each secret with notAfter expires.",
            ["secret"], registry=r,
        )
        self.tls_cert_not_after = Gauge(
            p + "tls_cert_not_after_timestamp_seconds", "When the serving certificate expires.",
            registry=r,
        )
        self.config_reloads = Counter(
            p + "config_reloads_total", "Config reloads, by result.", ["result"], registry=r
        )
        self.in_flight = Gauge(
            p + "in_flight_requests", "Requests being handled on the public listener.", registry=r
        )
        self.limiter_fail_open = Counter(
            p + "limiter_fail_open_total",
            "Requests let through unchecked because the shared rate-limit backend was "
            "unreachable (rateLimit.failOpen: true).",
            registry=r,
        )
        for endpoint in ENDPOINTS:
            self.request_duration.labels(endpoint)
            self.upstream_duration.labels(endpoint)
        for code in ERROR_CODES:
            self.rejections.labels(code)
        for result in ("success", "error"):
            self.config_reloads.labels(result)
        # Resolved children, so the hot path does a dict lookup, not a labels() call.
        self._requests: dict[tuple[str, int], Counter] = {}
        self._durations = {e: self.request_duration.labels(e) for e in ENDPOINTS}
        self._upstream = {e: self.upstream_duration.labels(e) for e in ENDPOINTS}
        self._rejections = {c: self.rejections.labels(c) for c in ERROR_CODES}
        self._auth: dict[str, Counter] = {}

    def configure(self, settings: Settings) -> None:
        """Follow a (re)loaded config: secret ids and their expiry gauges."""
        ids = {s.id for s in settings.webhooks.secrets}
        self._auth = {i: self.auth_success.labels(i) for i in sorted(ids)}
        self.secret_not_after.clear()
        for secret in settings.webhooks.secrets:
            if secret.not_after is not None:
                self.secret_not_after.labels(secret.id).set(secret.not_after)

    def observe(self, endpoint: str, status: int, code: str | None, seconds: float) -> None:
        key = (endpoint, status)
        child = self._requests.get(key)
        if child is None:
            child = self._requests[key] = self.requests.labels(endpoint, str(status))
        child.inc()
        self._durations[endpoint].observe(seconds)
        if code is not None:
            self._rejections[code].inc()

    def observe_upstream(self, endpoint: str, seconds: float) -> None:
        self._upstream[endpoint].observe(seconds)

    def authenticated(self, secret_id: str) -> None:
        child = self._auth.get(secret_id)
        if child is not None:
            child.inc()
