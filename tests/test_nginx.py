"""nginx.conf.example, run for real: Debian's nginx terminating TLS in front of the sidecar.

The file is started as shipped, with only the lines in ``substitutions()``
rewritten (paths, ports, certificates, user, worker count). Each of those lines
must occur in the example exactly once, so an edit to one of them fails here
instead of quietly testing something else. Everything the example promises is
checked through the running nginx:

- over HTTPS (certificates from ``gen-cert``'s ``write_demo_pki``), the client
  address the sidecar's allowlist, lockout and audit log see is the real client
  (clients connect from 127.0.0.2, .3, .4, .5; nginx listens on 127.0.0.1 and
  connects to the sidecar from 127.0.0.1, its only trusted proxy), and the
  runtime receives it in ``X-Forwarded-For``;
- a client's own ``X-Forwarded-For`` cannot spoof it; the example overwrites
  the header, and the appending variant is tested too, to prove the comment's
  claims about it (safe for ordinary clients, spoofable from inside
  ``trustedProxies``);
- TLS 1.2 and 1.3 only, AEAD suites only, no session tickets, HSTS, no version
  in ``Server``; plain HTTP on the TLS port is refused;
- what nginx sends upstream (seen by a recording server in the sidecar's
  place): HTTP/1.1 on reused connections, the body buffered with a
  Content-Length, every header the sidecar needs;
- the body cap equals ``maxBodyBytes``; only /hooks/ is proxied; query strings
  (tokens) stay out of the access log;
- the timeouts and sizes agree with the sidecar's defaults and deploy/configmap.yaml.

Needs nginx (Debian: nginx-light, /usr/sbin/nginx). Locally a missing nginx
skips; under CI=true it fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import json5
import pytest
import yarl
from aiohttp import web
from support.common import AGENT, SECRET, Runtime, base_doc, free_port, terminate, write_config

from sidecar import config
from sidecar.certs import write_demo_pki
from sidecar.settings import Limits
from sidecar.spool.store import BUSY_TIMEOUT_MS

pytestmark = pytest.mark.nginx

IN_CI = os.environ.get("CI") == "true"
REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "nginx.conf.example"
CONFIGMAP = REPO / "deploy" / "configmap.yaml"

NGINX = "127.0.0.1"  # nginx listens here and connects to the sidecar from here
ALLOWED = "127.0.0.2"  # in allowIps
ALSO_ALLOWED = "127.0.0.3"  # in allowIps
INSIDER = "127.0.0.4"  # a client inside trustedProxies (a pod, when that is the pod CIDR)
STRANGER = "127.0.0.5"  # in no list

# Variants of the example, each one line changed, to show what a line is for.
APPENDING = {
    "proxy_set_header X-Forwarded-For $remote_addr;":
        "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
}  # fmt: skip
WITH_TICKETS = {"ssl_session_tickets off;": "ssl_session_tickets on;"}


# --------------------------------------------------------------------------
# Running the example
# --------------------------------------------------------------------------


def nginx_binary() -> str:
    found = shutil.which("nginx")
    if found is None and os.access("/usr/sbin/nginx", os.X_OK):
        found = "/usr/sbin/nginx"  # Debian's location, not on a normal user's PATH
    if found is None:
        if IN_CI:
            pytest.fail("nginx is required under CI=true (apt-get install nginx-light)")
        pytest.skip("nginx is not installed (apt-get install nginx-light)")
    return found


def substitutions(folder: Path, port: int, upstream_port: int, certs: Path) -> dict[str, str]:
    """The example's lines this test rewrites (verbatim, each exactly once), and their stand-ins."""
    temp_paths = "".join(
        f"\n    {kind}_temp_path {folder}/{kind}_temp;"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return {
        # A master that is not root cannot switch user (nginx warns and ignores it).
        "user www-data;": "user root;" if os.geteuid() == 0 else "",
        # Light on a shared machine, and upstream connection reuse is observable.
        "worker_processes auto;": "worker_processes 1;",
        "pid /run/nginx.pid;": f"pid {folder}/nginx.pid;",
        "error_log /var/log/nginx/error.log error;": f"error_log {folder}/error.log error;",
        "access_log /var/log/nginx/webhooks.access.log webhooks;":
            f"access_log {folder}/access.log webhooks;",
        # nginx-light creates its compiled-in temp folders (/var/lib/nginx/...)
        # at startup, even unused: keep them inside the test's folder.
        "http {": "http {" + temp_paths,
        "listen 443 ssl;": f"listen {NGINX}:{port} ssl;",
        "listen [::]:443 ssl;": "",  # the test speaks IPv4 loopback only
        "server 127.0.0.1:8080;": f"server 127.0.0.1:{upstream_port};",
        "/etc/nginx/tls/webhooks.example.com/fullchain.pem": str(certs / "server.pem"),
        "/etc/nginx/tls/webhooks.example.com/privkey.pem": str(certs / "server-key.pem"),
    }  # fmt: skip


def render(text: str, replacements: dict[str, str]) -> str:
    for old, new in replacements.items():
        count = text.count(old)
        assert count == 1, f"nginx.conf.example must contain {old!r} exactly once, found {count}"
        text = text.replace(old, new)
    return text


class Nginx:
    """One nginx master in the foreground (``daemon off``), with its logs in ``folder``."""

    def __init__(self, binary: str, folder: Path, conf: str, port: int) -> None:
        self.binary = binary
        self.folder = folder
        self.port = port
        self.conf = folder / "nginx.conf"
        folder.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(conf)
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self, *extra: str) -> list[str]:
        return [self.binary, "-p", f"{self.folder}/", "-c", str(self.conf), *extra]

    def start(self, timeout: float = 10.0) -> Nginx:
        with (self.folder / "stderr.log").open("wb") as err:
            self.proc = subprocess.Popen(
                self.command("-g", "daemon off;"), stdout=subprocess.DEVNULL, stderr=err
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited {self.proc.returncode}: {self.errors()}")
            with contextlib.suppress(OSError), socket.create_connection((NGINX, self.port), 0.5):
                return self
            time.sleep(0.05)
        raise RuntimeError(f"nginx not listening in {timeout}s: {self.errors()}")

    def errors(self) -> str:
        logs = [self.folder / "stderr.log", self.folder / "error.log"]
        return "\n".join(p.read_text(errors="replace") for p in logs if p.exists())

    def access_log(self) -> str:
        path = self.folder / "access.log"
        return path.read_text() if path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc)


@pytest.fixture(scope="module")
def nginx_bin() -> str:
    return nginx_binary()


@pytest.fixture
def certs(short_tmp: Path) -> Path:
    out = short_tmp / "certs"
    write_demo_pki(out, ["localhost", NGINX])
    return out


@pytest.fixture
def start_nginx(nginx_bin: str, short_tmp: Path, certs: Path) -> Iterator[Callable[..., Nginx]]:
    """Start the example in front of ``upstream_port``; every nginx is stopped at the end."""
    started: list[Nginx] = []

    def start(upstream_port: int, variant: dict[str, str] | None = None) -> Nginx:
        folder = short_tmp / f"nginx{len(started)}"
        port = free_port()
        text = render(EXAMPLE.read_text(), substitutions(folder, port, upstream_port, certs))
        proc = Nginx(nginx_bin, folder, render(text, variant or {}), port)
        started.append(proc)
        return proc.start()

    yield start
    for proc in started:
        proc.stop()


# --------------------------------------------------------------------------
# Clients
# --------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: Any
    text: str

    @property
    def json(self) -> Any:
        return json.loads(self.text)


def client_tls(certs: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certs / "ca.pem"))


async def send(
    port: int,
    certs: Path,
    path: str = "/hooks/wake",
    *,
    source: str = ALLOWED,
    method: str = "POST",
    body: bytes | None = None,
    chunked: bool = False,
    token: str | None = SECRET,
    headers: dict[str, str] | None = None,
    scheme: str = "https",
) -> Reply:
    """One request to nginx from the loopback address ``source``."""
    h = {"Content-Type": "application/json"}
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    h.update(headers or {})
    data: Any = json.dumps({"agent": AGENT}).encode() if body is None else body
    if chunked:
        payload = data

        async def chunks() -> AsyncIterator[bytes]:
            for i in range(0, len(payload), 8192):
                yield payload[i : i + 8192]

        data = chunks()
    url = yarl.URL(f"{scheme}://{NGINX}:{port}{path}", encoded=True)
    tls: ssl.SSLContext | bool = client_tls(certs) if scheme == "https" else False
    connector = aiohttp.TCPConnector(local_addr=(source, 0), ssl=tls, force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.request(
            method, url, data=data if method == "POST" else None, headers=h, allow_redirects=False
        ) as resp,
    ):
        return Reply(resp.status, resp.headers, await resp.text())


# --------------------------------------------------------------------------
# The whole path: client -> nginx (TLS) -> sidecar process -> runtime
# --------------------------------------------------------------------------


@dataclass
class Stack:
    nginx: Nginx
    sidecar: Any  # conftest.SidecarProcess
    runtime: Runtime
    certs: Path

    async def post(self, path: str = "/hooks/wake", **kwargs: Any) -> Reply:
        return await send(self.nginx.port, self.certs, path, **kwargs)

    def audit(self) -> list[dict[str, Any]]:
        return [e for e in self.sidecar.json_lines() if "requestId" in e and "outcome" in e]

    async def audit_line(self, reply: Reply, timeout: float = 10.0) -> dict[str, Any]:
        """The sidecar's audit line for ``reply`` (written off its event loop: wait for it)."""
        rid = reply.headers["X-Request-Id"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for entry in self.audit():
                if entry["requestId"] == rid:
                    return entry
            await asyncio.sleep(0.05)
        raise AssertionError(f"no audit line for {rid}: {self.sidecar.output()}")


def sidecar_doc(runtime: Runtime, port: int, admin: int, **overrides: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "listen": f"127.0.0.1:{port}",
        "admin": {"listen": f"127.0.0.1:{admin}"},
        "trustedProxies": [f"{NGINX}/32"],
        "allowIps": [f"{ALLOWED}/32", f"{ALSO_ALLOWED}/32"],
        "authLockout": {"maxFailures": 3, "window": "1m", "duration": "5m"},
        **overrides,
    }
    return base_doc(runtime.path, **settings)


@pytest.fixture
def stack(
    runtime: Runtime,
    short_tmp: Path,
    certs: Path,
    sidecar_process: Any,
    start_nginx: Callable[..., Nginx],
) -> Callable[..., Awaitable[Stack]]:
    async def start(variant: dict[str, str] | None = None, **overrides: Any) -> Stack:
        port, admin = free_port(), free_port()
        path = write_config(short_tmp, sidecar_doc(runtime, port, admin, **overrides))
        proc = await asyncio.to_thread(sidecar_process, path, admin)
        return Stack(start_nginx(port, variant), proc, runtime, certs)

    return start


async def test_the_allowlist_and_the_audit_log_see_the_real_client(
    stack: Callable[..., Awaitable[Stack]],
) -> None:
    s = await stack()
    ok = await s.post(source=ALLOWED)
    assert ok.status == 200, ok.text
    assert (await s.audit_line(ok))["clientIp"] == ALLOWED
    assert [c["forwardedFor"] for c in s.runtime.calls] == [ALLOWED]

    refused = await s.post(source=STRANGER)
    assert (refused.status, refused.json["error"]) == (403, "ip_not_allowed")  # the sidecar's JSON
    entry = await s.audit_line(refused)
    assert (entry["clientIp"], entry["outcome"]) == (STRANGER, "rejected")
    assert len(s.runtime.calls) == 1

    for reply in (ok, refused):  # nginx's own headers on proxied replies, errors included
        assert reply.headers["Strict-Transport-Security"] == "max-age=63072000"
        assert reply.headers["Server"] == "nginx"  # no version, and not the sidecar's


@pytest.mark.parametrize("variant", [None, APPENDING], ids=["as-shipped", "appending"])
async def test_a_client_supplied_x_forwarded_for_cannot_spoof_the_address(
    stack: Callable[..., Awaitable[Stack]], variant: dict[str, str] | None
) -> None:
    s = await stack(variant)
    # An allowed address; one that ends in nginx's own (trusted) address; junk.
    for claim in (ALLOWED, f"{ALLOWED}, {NGINX}", f"{ALLOWED},{ALLOWED}", "garbage", ""):
        reply = await s.post(source=STRANGER, headers={"X-Forwarded-For": claim})
        assert (reply.status, reply.json["error"]) == (403, "ip_not_allowed"), claim
        assert (await s.audit_line(reply))["clientIp"] == STRANGER, claim
    assert s.runtime.calls == []


@pytest.mark.parametrize(
    ("variant", "status", "seen_as"),
    [(None, 403, INSIDER), (APPENDING, 200, ALLOWED)],
    ids=["as-shipped-overwrites", "appending-is-spoofed"],
)
async def test_why_the_example_overwrites_x_forwarded_for(
    stack: Callable[..., Awaitable[Stack]],
    variant: dict[str, str] | None,
    status: int,
    seen_as: str,
) -> None:
    """A client whose own address is inside trustedProxies (any pod, when that is the pod CIDR)."""
    s = await stack(variant, trustedProxies=[f"{NGINX}/32", f"{INSIDER}/32"])
    reply = await s.post(source=INSIDER, headers={"X-Forwarded-For": ALLOWED})
    assert reply.status == status, reply.text
    assert (await s.audit_line(reply))["clientIp"] == seen_as


async def test_a_locked_out_client_does_not_lock_out_another(
    stack: Callable[..., Awaitable[Stack]],
) -> None:
    s = await stack()
    for _ in range(3):  # authLockout.maxFailures
        wrong = await s.post(source=ALSO_ALLOWED, token="x" * 64)
        assert (wrong.status, wrong.json["error"]) == (401, "unauthorized")
    locked = await s.post(source=ALSO_ALLOWED)  # a valid token no longer helps
    assert (locked.status, locked.json["error"]) == (429, "locked_out")
    assert "Retry-After" in locked.headers
    assert (await s.audit_line(locked))["clientIp"] == ALSO_ALLOWED

    other = await s.post(source=ALLOWED)
    assert other.status == 200, other.text
    assert (await s.audit_line(other))["clientIp"] == ALLOWED
    # Not even a spoofed header puts the locked client into the other's bucket.
    spoof = await s.post(source=ALSO_ALLOWED, headers={"X-Forwarded-For": ALLOWED})
    assert spoof.status == 429


async def test_the_body_cap_is_max_body_bytes(stack: Callable[..., Awaitable[Stack]]) -> None:
    s = await stack()
    limit = Limits().max_body_bytes
    small = json.dumps({"agent": AGENT, "message": "hi"}).encode()
    at_cap = small + b" " * (limit - len(small))  # trailing whitespace is valid JSON

    over = await s.post("/hooks/agent", body=at_cap + b" ")
    over_chunked = await s.post("/hooks/agent", body=at_cap + b" ", chunked=True)
    for reply in (over, over_chunked):
        # nginx's own bare 413 (an HTML page), not the sidecar's JSON payload_too_large.
        assert reply.status == 413
        assert reply.headers["Content-Type"].startswith("text/html")
        assert "X-Request-Id" not in reply.headers
    ok = await s.post("/hooks/agent", body=at_cap)
    assert ok.status == 200, ok.text  # nginx's cap is not below the sidecar's
    await s.audit_line(ok)
    assert len(s.audit()) == 1  # the oversized calls never reached the sidecar


async def test_only_hooks_are_proxied(stack: Callable[..., Awaitable[Stack]]) -> None:
    s = await stack()
    for path in ("/", "/metrics", "/healthz", "/readyz", "/hooks/%2e%2e/metrics", "/HOOKS/wake"):
        for method in ("GET", "POST"):
            reply = await s.post(path, method=method)
            assert reply.status == 404, path
            # nginx's 404, not the sidecar's JSON one.
            assert "X-Request-Id" not in reply.headers and "not_found" not in reply.text, path
    # nginx's rule for a proxied location ending in "/": /hooks is redirected there.
    bare = await s.post("/hooks")
    assert (bare.status, yarl.URL(bare.headers["Location"]).path) == (301, "/hooks/")
    inside = await s.post("/hooks/nope")
    assert (inside.status, inside.json["error"]) == (404, "not_found")  # the sidecar's
    await s.audit_line(inside)
    assert len(s.audit()) == 1


async def test_a_token_in_the_query_reaches_the_sidecar_but_not_the_access_log(
    stack: Callable[..., Awaitable[Stack]],
) -> None:
    s = await stack()
    reply = await s.post(f"/hooks/wake?token={SECRET}&x=1")
    # The query was passed on: the sidecar saw it and refused the call.
    assert (reply.status, reply.json["error"]) == (400, "token_in_query")
    rid = reply.headers["X-Request-Id"]
    deadline = time.monotonic() + 10
    while rid not in s.nginx.access_log() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    log = s.nginx.access_log()
    line = next(line for line in log.splitlines() if rid in line)
    assert line.startswith(f"{ALLOWED} ")
    assert '"POST /hooks/wake HTTP/1.1" 400 ' in line
    assert SECRET not in log and "token" not in log and "x=1" not in log


async def test_plain_http_to_the_tls_port_is_refused(
    stack: Callable[..., Awaitable[Stack]],
) -> None:
    s = await stack()
    reply = await s.post(scheme="http")
    assert reply.status == 400 and "plain HTTP request was sent to HTTPS port" in reply.text
    ok = await s.post()
    await s.audit_line(ok)
    assert len(s.audit()) == 1 and len(s.runtime.calls) == 1


# --------------------------------------------------------------------------
# What nginx sends upstream, seen by a recording server in the sidecar's place
# --------------------------------------------------------------------------


@dataclass
class Seen:
    version: tuple[int, int]
    raw_path: str
    headers: list[tuple[str, str]]
    body: bytes
    peer: tuple[str, int]

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


@pytest.fixture
async def recorder(aiohttp_server: Any) -> tuple[int, list[Seen]]:
    seen: list[Seen] = []

    async def record(request: web.Request) -> web.Response:
        peer = request.transport.get_extra_info("peername") if request.transport else ("?", 0)
        seen.append(
            Seen(
                (request.version.major, request.version.minor),
                request.raw_path,
                [(k.decode(), v.decode()) for k, v in request.raw_headers],
                await request.read(),
                (peer[0], peer[1]),
            )
        )
        return web.json_response({"status": "ok"}, headers={"X-Request-Id": "r1"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    server = await aiohttp_server(app, host="127.0.0.1")
    return int(server.port), seen


@pytest.mark.parametrize(
    ("variant", "forwarded"),
    [(None, ALSO_ALLOWED), (APPENDING, f"{ALLOWED}, {ALSO_ALLOWED}")],
    ids=["as-shipped", "appending"],
)
async def test_what_the_sidecar_receives_from_nginx(
    start_nginx: Callable[..., Nginx],
    recorder: tuple[int, list[Seen]],
    certs: Path,
    variant: dict[str, str] | None,
    forwarded: str,
) -> None:
    port, seen = recorder
    nginx = start_nginx(port, variant)
    body = json.dumps({"agent": AGENT, "message": "m" * 20000}).encode()
    sent = {
        "Idempotency-Key": "order-1234",
        "X-Request-Id": "req-1",
        "X-Forwarded-For": ALLOWED,  # the client's claim
    }
    for _ in range(5):
        reply = await send(
            nginx.port,
            certs,
            "/hooks/agent?a=b",
            source=ALSO_ALLOWED,
            body=body,
            chunked=True,
            headers=sent,
        )
        assert reply.status == 200
    assert len(seen) == 5
    first = seen[0]
    assert first.version == (1, 1)
    assert first.raw_path == "/hooks/agent?a=b"  # as the client sent it, query included
    assert first.header("X-Forwarded-For") == [forwarded]
    assert first.header("Authorization") == [f"Bearer {SECRET}"]
    assert first.header("Content-Type") == ["application/json"]
    assert first.header("Idempotency-Key") == ["order-1234"]
    assert first.header("X-Request-Id") == ["req-1"]
    # Buffered: the chunked upload arrives whole, with a Content-Length.
    assert first.body == body
    assert first.header("Content-Length") == [str(len(body))]
    assert first.header("Transfer-Encoding") == []
    # Keep-alive to the sidecar: no "Connection: close", one connection for all.
    assert first.header("Connection") == []
    assert len({s.peer for s in seen}) == 1, [s.peer for s in seen]


# --------------------------------------------------------------------------
# TLS (no sidecar needed: the handshake is nginx's alone)
# --------------------------------------------------------------------------


def handshake(port: int, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    raw = socket.create_connection((NGINX, port), timeout=5)
    try:
        return ctx.wrap_socket(raw, server_hostname=NGINX)
    except BaseException:
        raw.close()
        raise


def legacy_client(
    certs: Path, version: ssl.TLSVersion, ciphers: str | None = None
) -> ssl.SSLContext:
    """A client willing to speak ``version`` only: the refusal must come from nginx."""
    ctx = client_tls(certs)
    ctx.minimum_version = ctx.maximum_version = version
    ctx.set_ciphers(f"{ciphers or 'ALL'}:@SECLEVEL=0")  # the client's own policy allows it
    return ctx


@pytest.fixture
def tls_nginx(start_nginx: Callable[..., Nginx]) -> Nginx:
    return start_nginx(free_port())  # nothing listens upstream: TLS only


def test_tls_1_2_and_1_3_with_aead_suites(tls_nginx: Nginx, certs: Path) -> None:
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        ctx = client_tls(certs)
        ctx.minimum_version = ctx.maximum_version = version
        with handshake(tls_nginx.port, ctx) as tls:
            assert tls.version() == version.name.replace("v1_", "v1.")
            cipher = tls.cipher()
            assert cipher is not None and ("GCM" in cipher[0] or "CHACHA20" in cipher[0])


# Python deprecates asking for these versions, which is what this test does.
@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
@pytest.mark.parametrize(
    "version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1], ids=["1.0", "1.1"]
)
def test_tls_1_0_and_1_1_are_refused(
    tls_nginx: Nginx, certs: Path, version: ssl.TLSVersion
) -> None:
    with pytest.raises(ssl.SSLError, match=r"(?i)protocol.version"):  # nginx's alert
        handshake(tls_nginx.port, legacy_client(certs, version)).close()


@pytest.mark.parametrize("cipher", ["ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES256-SHA384"])
def test_cbc_suites_are_refused_on_tls_1_2(tls_nginx: Nginx, certs: Path, cipher: str) -> None:
    # Control: the same client with a suite of the list gets through.
    allowed = legacy_client(certs, ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-AES128-GCM-SHA256")
    handshake(tls_nginx.port, allowed).close()
    with pytest.raises(ssl.SSLError, match=r"(?i)handshake.failure"):
        handshake(tls_nginx.port, legacy_client(certs, ssl.TLSVersion.TLSv1_2, cipher)).close()


def test_no_session_tickets(start_nginx: Callable[..., Nginx], certs: Path) -> None:
    ctx = client_tls(certs)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2  # TLS 1.3 tickets are the session cache's ids
    shipped, control = start_nginx(free_port()), start_nginx(free_port(), WITH_TICKETS)
    with handshake(control.port, ctx) as tls:
        assert tls.session is not None and tls.session.has_ticket  # the check can see tickets
    with handshake(shipped.port, ctx) as tls:
        assert tls.session is not None and not tls.session.has_ticket


async def test_nginx_own_replies_carry_hsts_and_no_version(tls_nginx: Nginx, certs: Path) -> None:
    reply = await send(tls_nginx.port, certs, "/", method="GET")
    assert reply.status == 404
    assert reply.headers["Strict-Transport-Security"] == "max-age=63072000"
    assert reply.headers["Server"] == "nginx"
    assert not re.search(r"nginx/\d", reply.text)


# --------------------------------------------------------------------------
# The file itself
# --------------------------------------------------------------------------


def test_nginx_t_accepts_the_example_without_warnings(
    nginx_bin: str, short_tmp: Path, certs: Path
) -> None:
    folder = short_tmp / "t"
    text = render(EXAMPLE.read_text(), substitutions(folder, free_port(), free_port(), certs))
    proc = Nginx(nginx_bin, folder, text, 0)
    result = subprocess.run(proc.command("-t"), capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "[warn]" not in result.stderr and "[emerg]" not in result.stderr, result.stderr


def directive(text: str, name: str) -> list[str]:
    """The arguments of every ``name ...;`` in ``text``, comments left out."""
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return [line[len(name) :].strip().rstrip(";") for line in lines if line.startswith(name + " ")]


def size(value: str) -> int:
    units = {"k": 1024, "m": 1024 * 1024}
    return int(value[:-1]) * units[value[-1].lower()] if value[-1].isalpha() else int(value)


def test_sizes_and_timeouts_agree_with_the_sidecar() -> None:
    text = EXAMPLE.read_text()
    upstream_block = re.search(r"upstream webhook_sidecar \{(.*?)\}", text, re.S)
    deployed_text = re.search(r"config\.json5: \|\n(.*)", CONFIGMAP.read_text(), re.S)
    assert upstream_block is not None and deployed_text is not None
    deployed = json5.loads(deployed_text[1])["sidecar"]
    defaults = config.loads(json.dumps(base_doc("/run/x.sock"))).sidecar
    gateway = {"url": "http://127.0.0.1:18789", "protocol": "openclaw"}
    token = {"env": "TEST_WEBHOOK_SECRET"}
    openclaw = base_doc("/x", upstream={**gateway, "token": token})
    longest_upstream_timeout = max(
        config.loads(json.dumps(openclaw)).sidecar.upstream.timeout,
        defaults.upstream.timeout,
        config.parse_duration(deployed["upstream"]["timeout"]),
    )

    [body_cap] = map(size, directive(text, "client_max_body_size"))
    assert body_cap == defaults.limits.max_body_bytes == deployed["limits"]["maxBodyBytes"]
    [in_memory] = map(size, directive(text, "client_body_buffer_size"))
    assert in_memory >= body_cap  # a permitted body never goes to a temp file
    # nginx must wait longer than the sidecar waits for the runtime, or its bare
    # 504 cuts in before the sidecar's JSON upstream_timeout.
    [read_timeout] = map(config.parse_duration, directive(text, "proxy_read_timeout"))
    assert read_timeout > longest_upstream_timeout
    # With a spool (deploy/configmap.yaml has one) the answer comes after the commit,
    # not after the runtime; a commit may wait this long for SQLite's write lock. A
    # 504 from nginx before that is a stored call its sender will send again.
    assert "spool" in deployed
    assert read_timeout > BUSY_TIMEOUT_MS / 1000
    # nginx hands the body over whole, so the sidecar's own body timeout never
    # fires for a client that nginx still waits for.
    [body_timeout] = map(config.parse_duration, directive(text, "client_body_timeout"))
    assert body_timeout <= config.parse_duration(deployed["limits"]["bodyTimeout"])
    # nginx closes an idle upstream connection before the sidecar does (the sidecar's
    # idle timeout is its header timeout: see server.py).
    [idle] = map(config.parse_duration, directive(upstream_block[1], "keepalive_timeout"))
    assert idle < defaults.limits.header_timeout
    assert idle < config.parse_duration(deployed["limits"]["headerTimeout"])
