"""Every target's configuration, in one place.

Edit here to change what is measured:
  SIDECAR_VARIANTS  the sidecar configs (one sidecar process per variant);
                    each variant gets a valid-call and a refusal scenario.
  nginx_conf()      the nginx equivalent of the sidecar's default variant.
The harness (bench/run.py) fills in ports, socket paths and the secret.
"""

from __future__ import annotations

import os
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
    if variant == "sidecar":
        return base
    if variant == "sidecar-workers2":
        # The defaults with two worker processes on the port (SO_REUSEPORT). On the
        # one server core they only compete; run with --server-cpu 0,1 to see them scale.
        base["sidecar"]["workers"] = 2
        return base
    if variant == "sidecar-guards":
        sc = base["sidecar"]
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
        base["sidecar"]["rateLimit"] = {"perIp": dict(GENEROUS), "global": dict(GENEROUS)}
        if variant == "sidecar-limits-redis":
            assert redis_url is not None
            base["sidecar"]["rateLimit"]["backend"] = redis_url
        base["webhooks"]["agents"][AGENT]["rateLimit"] = dict(GENEROUS)
        return base
    raise KeyError(variant)


# Variants that need a redis-server; the harness starts one for them.
NEEDS_REDIS = {"sidecar-limits-redis"}


# name -> description; the order is the order of the scenarios.
SIDECAR_VARIANTS = {
    "sidecar": "defaults (authLockout raised so that the refusal runs cannot trip it)",
    "sidecar-guards": (
        "every guard on: allowIps, perIp/global/agent rate limits, authLockout, maxConcurrent"
    ),
    "sidecar-limits": "perIp/global/agent rate limits only, memory backend",
    "sidecar-limits-redis": (
        "perIp/global/agent rate limits only, Redis backend (redis-server on the server core)"
    ),
    "sidecar-workers2": "defaults with sidecar.workers: 2 (use --server-cpu 0,1 to scale)",
}


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
