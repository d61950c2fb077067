"""Every target's configuration, in one place.

Edit here to change what is measured:
  SIDECAR_VARIANTS  the sidecar variants (one sidecar process each): their
                    scenarios, what each must answer and is compared with;
  sidecar_config()  their configs;
  soak_config()     the soak's sidecar (bench/soak.py), every guard on;
  nginx_conf()      the nginx equivalent of the sidecar's default variant.
The harness (bench/harness.py) fills in ports, socket paths and the secret.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

AGENT = "my-agent"
BODY = '{"agent":"my-agent","message":"hello"}'
# Refusal runs send the same call with another word of the same length: the
# runtime counts the bodies carrying it, so a refused call that reached it is
# caught exactly, even if it lands after its run (a proxy still busy).
REFUSED_MARK = "xyzzy"
BODY_REFUSED = BODY.replace("hello", REFUSED_MARK)
PATH = "/hooks/agent"

# Generous limits: the guards are on the path, but must not refuse anything
# during a run (a run at ~10k req/s for 10 s is ~100k requests from one IP).
GENEROUS = {"requests": 10_000_000, "per": "1s", "burst": 10_000_000}


@dataclass(frozen=True)
class Expect:
    """What every response of a scenario must be: a status, and for a refusal the
    JSON body's ``error`` code (the preflight checks it; wrk checks the status)."""

    status: int
    code: str | None = None


OK = Expect(200)
UNAUTHORIZED_401 = Expect(401, "unauthorized")


@dataclass(frozen=True)
class Load:
    """One throughput scenario of a sidecar variant: ``<variant><suffix>``.

    ``token`` is "good" or "bad" (the harness has both). A refusal (``expect``
    not 200) sends BODY_REFUSED, so a refused call that reached the runtime is
    counted there. ``vs`` lists the ratios it enters: (denominator scenario,
    goal or None)."""

    suffix: str
    token: str
    expect: Expect
    vs: tuple[tuple[str, float | None], ...] = ()


@dataclass(frozen=True)
class Variant:
    """A sidecar config to measure, one sidecar process.

    ``prepare_bad_calls``: bad-token calls sent once from 127.0.0.1 right after
    it starts, before the preflight and the warm-up (to trip its lockout)."""

    description: str
    loads: tuple[Load, ...]
    latency: bool = True  # a fixed-rate scenario lat-<variant>, valid calls
    needs_redis: bool = False
    prepare_bad_calls: int = 0


# The goals of issue 8: valid calls >= 0.75x nginx, refusals >= 0.9x a bare aiohttp 401.
VS_NGINX = ("nginx", 0.75)
VS_FLOOR = ("floor401-refuse", 0.9)


def _standard(description: str, *, vs_default: bool = True, needs_redis: bool = False) -> Variant:
    """A valid-call scenario and a bad-token one."""
    valid_vs: tuple[tuple[str, float | None], ...] = (VS_NGINX,)
    valid_vs += (("sidecar", None),) if vs_default else (("direct", None),)
    return Variant(
        description,
        (Load("", "good", OK, valid_vs), Load("-refuse", "bad", UNAUTHORIZED_401, (VS_FLOOR,))),
        needs_redis=needs_redis,
    )


# Tripped once before any measurement; only a lock's end (LOCKED_DURATION) can
# un-trip it: a success does not reset it, and the scenario sends valid tokens,
# so nothing during the run counts as a failure either.
LOCKED_MAX_FAILURES = 3
LOCKED_DURATION = "24h"  # longer than any benchmark


def _refusal(description: str, expect: Expect, *, prepare_bad_calls: int = 0) -> Variant:
    """One scenario only, every call refused before bearer auth. It sends the
    right token: the refusal must not depend on the token (docs/http-api.md)."""
    load = Load("", "good", expect, (VS_FLOOR,))
    return Variant(description, (load,), latency=False, prepare_bad_calls=prepare_bad_calls)


# name -> Variant; the order is the order of the scenarios.
SIDECAR_VARIANTS = {
    "sidecar": _standard(
        "defaults (authLockout raised so that the refusal runs cannot trip it)", vs_default=False
    ),
    "sidecar-guards": _standard(
        "every guard on: allowIps, perIp/global/agent rate limits, authLockout, maxConcurrent"
    ),
    "sidecar-limits": _standard("perIp/global/agent rate limits only, memory backend"),
    "sidecar-limits-redis": _standard(
        "perIp/global/agent rate limits only, Redis backend (redis-server on the server core)",
        needs_redis=True,
    ),
    "sidecar-workers2": _standard(
        "defaults with sidecar.workers: 2 (use --server-cpu 0,1 to scale)"
    ),
    "sidecar-deny": _refusal(
        "allowIps excludes 127.0.0.1, which is a trusted proxy (so its connections pass "
        "the accept-time check): every call 403 ip_not_allowed",
        Expect(403, "ip_not_allowed"),
    ),
    "sidecar-locked": _refusal(
        f"lockout tripped for 127.0.0.1 before the runs (maxFailures {LOCKED_MAX_FAILURES}, "
        f"duration {LOCKED_DURATION}): every call 429 locked_out, valid token included",
        Expect(429, "locked_out"),
        prepare_bad_calls=LOCKED_MAX_FAILURES,
    ),
}

# Variants that need a redis-server; the harness starts one for them.
NEEDS_REDIS = {name for name, v in SIDECAR_VARIANTS.items() if v.needs_redis}


def sidecar_config(
    *,
    secret: str,
    listen: str,
    admin_listen: str,
    upstream_socket: str,
    variant: str,
    redis_url: str | None = None,
) -> dict[str, Any]:
    """The JSON5 config (as a dict, written as JSON) for one sidecar variant."""
    base: dict[str, Any] = {
        "webhooks": {
            "enabled": True,
            "secret": secret,
            "agents": {AGENT: {"sessionKey": "webhook-session"}},
        },
        "sidecar": {
            "listen": listen,
            "admin": {"listen": admin_listen},
            "upstream": {"socket": upstream_socket},
            # The sidecar locks an address out after a few bad tokens by
            # default (and then refuses valid tokens too, for minutes). The
            # refusal scenario sends ~10^5 bad tokens from 127.0.0.1, so the
            # lockout is kept on the path (it counts every failure) but is
            # made unable to trip: at most 10^6 failures (the config's cap)
            # within a 10 s window, i.e. 100k refusals/s.
            "authLockout": {"maxFailures": 1_000_000, "window": "10s", "duration": "1s"},
        },
    }
    sc = base["sidecar"]
    if variant == "sidecar":
        return base
    if variant == "sidecar-workers2":
        # The defaults with two worker processes on the port (SO_REUSEPORT). On the
        # one server core they only compete; run with --server-cpu 0,1 to see them scale.
        sc["workers"] = 2
        return base
    if variant == "sidecar-guards":
        sc["allowIps"] = ["127.0.0.0/8"]
        sc["rateLimit"] = {"perIp": dict(GENEROUS), "global": dict(GENEROUS)}
        sc["limits"] = {"maxBodyBytes": 65536, "maxMessageChars": 32768}
        base["webhooks"]["agents"][AGENT].update(
            {"rateLimit": dict(GENEROUS), "maxConcurrent": 1024}
        )
        return base
    if variant in ("sidecar-limits", "sidecar-limits-redis"):
        # The limiter alone (per-IP, global and agent buckets), in memory or in
        # Redis: compared with "sidecar" (limits off) it is the limiter's cost.
        sc["rateLimit"] = {"perIp": dict(GENEROUS), "global": dict(GENEROUS)}
        if variant == "sidecar-limits-redis":
            assert redis_url is not None
            sc["rateLimit"]["backend"] = redis_url
        base["webhooks"]["agents"][AGENT]["rateLimit"] = dict(GENEROUS)
        return base
    if variant == "sidecar-deny":
        # Any address but loopback: the allowlist guard refuses every call. The peer is
        # a trusted proxy, or the connection would be closed at accept without a reply
        # (docs/connections.md); with no X-Forwarded-For the client is the peer itself.
        sc["allowIps"] = ["10.0.0.0/8", "::1/128"]
        sc["trustedProxies"] = ["127.0.0.1/32"]
        return base
    if variant == "sidecar-locked":
        sc["authLockout"] = {
            "maxFailures": LOCKED_MAX_FAILURES,
            "window": "1h",
            "duration": LOCKED_DURATION,
        }
        return base
    raise KeyError(variant)


UNAUTHORIZED = (
    '{"status":"error","error":"unauthorized","message":"missing or invalid bearer token"}'
)


def nginx_conf(
    *, tmp: str, port: int, upstream_socket: str, secret: str, cpu: int, run_as_root: bool
) -> str:
    """nginx with the sidecar's default checks, as an operator would write them.

    Notes on equivalence:
    - nginx runs `if`/`return` (rewrite phase) before limit_req (preaccess)
      and allow/deny (access), so a bad token is refused before the IP check
      and the limiter: its refusal path is the cheapest nginx can do. Valid
      calls go through all of them.
    - keepalive_requests is raised on both sides: nginx's default (1000)
      would make it reconnect every 1000 calls, which aiohttp does not do.
    """
    mask = "1" + "0" * cpu  # worker_cpu_affinity bitmask, rightmost is CPU 0
    user = "user root root;" if run_as_root else ""
    return f"""
# generated by bench/run.py
{user}
worker_processes 1;
worker_cpu_affinity {mask};
daemon off;
master_process on;
pid {tmp}/nginx.pid;
lock_file {tmp}/nginx.lock;
error_log {tmp}/nginx-error.log warn;
worker_rlimit_nofile 8192;

events {{
    worker_connections 4096;
}}

http {{
    access_log off;
    client_body_temp_path {tmp}/ngx-body;
    proxy_temp_path {tmp}/ngx-proxy;
    fastcgi_temp_path {tmp}/ngx-fastcgi;
    uwsgi_temp_path {tmp}/ngx-uwsgi;
    scgi_temp_path {tmp}/ngx-scgi;
    server_tokens off;
    keepalive_requests 100000000;
    keepalive_timeout 75s;

    map_hash_bucket_size 128;  # "Bearer <64 hex>" is longer than the default bucket
    map $http_authorization $bench_auth_ok {{
        default 0;
        "Bearer {secret}" 1;
    }}

    limit_req_zone $binary_remote_addr zone=bench_perip:1m rate=10000000r/s;

    upstream runtime {{
        server unix:{upstream_socket};
        keepalive 32;
        keepalive_requests 100000000;
    }}

    server {{
        listen 127.0.0.1:{port} backlog=1024;
        client_max_body_size 64k;
        default_type application/json;

        location ~ ^/hooks/(agent|wake)$ {{
            allow 127.0.0.1;
            deny all;
            if ($bench_auth_ok = 0) {{
                add_header WWW-Authenticate 'Bearer realm="webhooks"' always;
                return 401 '{UNAUTHORIZED}';
            }}
            limit_req zone=bench_perip burst=10000000 nodelay;
            limit_except POST {{ deny all; }}

            proxy_pass http://runtime;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "";
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_set_header X-Request-Id $request_id;
        }}

        location / {{
            return 404 '{{"status":"error","error":"not_found"}}';
        }}
    }}
}}
"""


def is_root() -> bool:
    return os.geteuid() == 0


# --------------------------------------------------------------------------
# The soak (bench/soak.py, bench/wrk/soak.lua): every guard on, with limits that
# some senders trip, so that the lockout and limiter tables fill up to their caps.

THROTTLED_AGENT = "throttled-agent"  # its own tight rate limit: most of its calls are 429
# allowIps leaves out 224.0.0.0/3: an eighth of the random IPv4 senders get 403.
SOAK_ALLOW_IPS = ["0.0.0.0/1", "128.0.0.0/2", "192.0.0.0/3", "::/0"]
SOAK_DENIED_V4 = "224.0.0.0/3"


def soak_config(
    *, secret: str, listen: str, admin_listen: str, upstream_socket: str
) -> dict[str, Any]:
    """The soak's sidecar: every guard on, behind a trusted proxy (127.0.0.1, wrk)
    whose X-Forwarded-For names a different client on nearly every call."""
    return {
        "webhooks": {
            "enabled": True,
            "secret": secret,
            "agents": {
                AGENT: {
                    "sessionKey": "webhook-session",
                    "rateLimit": dict(GENEROUS),
                    "maxConcurrent": 1024,
                },
                THROTTLED_AGENT: {
                    "sessionKey": "throttled-session",
                    "rateLimit": {"requests": 20, "per": "1s", "burst": 20},
                    "maxConcurrent": 4,
                },
            },
        },
        "sidecar": {
            "listen": listen,
            "admin": {"listen": admin_listen},
            "upstream": {"socket": upstream_socket},
            "allowIps": SOAK_ALLOW_IPS,
            "trustedProxies": ["127.0.0.1/32"],
            "rateLimit": {
                # A bucket a single call leaves behind lives 60 s (one call a
                # minute refills it): at a few thousand new addresses a second
                # the limiter's 100k-entry cap binds. The few hot senders that
                # call many times get 429 after their burst of 10.
                "perIp": {"requests": 60, "per": "1h", "burst": 10},
                "global": dict(GENEROUS),
            },
            # The default policy (10 failures in 1 min) with locks of 2 min
            # instead of 5, so the lock table reaches its steady size by
            # minute 3 and the soak's second half shows growth, not filling.
            "authLockout": {"maxFailures": 10, "window": "1m", "duration": "2m"},
            "limits": {"maxBodyBytes": 65536, "maxMessageChars": 32768},
        },
    }
