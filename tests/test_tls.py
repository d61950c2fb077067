"""TLS termination on the real listener (``Server`` in this process, real handshakes):
https with the gen-cert CA, no plain http, minimum version, mTLS, and certificates,
CAs and TLS settings replaced on reload for new connections, without a restart."""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client import generate_latest
from support.clients import (
    ProjectedVolume,
    client_context,
    listening_doc,
    peer_certificate_serial,
    post,
    public_port,
    public_url,
    running_server,
    until,
)
from support.common import Runtime, base_doc, write_config

from sidecar import config
from sidecar.certs import write_demo_pki

PKI = ["ca.pem", "server.pem", "server-key.pem", "client.pem", "client-key.pem"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two unrelated throwaway PKIs, "a" and "b"."""
    out = {}
    for name in ("a", "b"):
        out[name] = tmp_path_factory.mktemp(f"pki-{name}")
        write_demo_pki(out[name], ["localhost", "127.0.0.1"])
    return out


def serial(path: Path) -> int:
    return int(x509.load_pem_x509_certificate(path.read_bytes()).serial_number)


def tls_doc(runtime: Runtime, **tls: Any) -> dict[str, Any]:
    return listening_doc(runtime.path, tls={key: str(value) for key, value in tls.items()})


def url(doc: dict[str, Any], scheme: str = "https") -> str:
    return public_url(doc, scheme)


def server_tls(pki: Path, **extra: Any) -> dict[str, Any]:
    return {"certFile": pki / "server.pem", "keyFile": pki / "server-key.pem", **extra}


async def test_https_with_the_gen_cert_ca_and_no_plain_http(
    runtime: Runtime, short_tmp: Path, pki: dict[str, Path]
) -> None:
    doc = tls_doc(runtime, **server_tls(pki["a"]))
    async with running_server(short_tmp, doc) as (server, _):
        status, _, body = await post(url(doc), ssl_context=client_context(pki["a"] / "ca.pem"))
        assert status == 200, body
        with pytest.raises(aiohttp.ClientError):
            await post(url(doc, "http"))
        with pytest.raises(aiohttp.ClientConnectorCertificateError):  # another CA: not trusted
            await post(url(doc), ssl_context=client_context(pki["b"] / "ca.pem"))
        metrics = generate_latest(server.state.metrics.registry).decode()
    leaf = x509.load_pem_x509_certificate((pki["a"] / "server.pem").read_bytes())
    expires = leaf.not_valid_after_utc.timestamp()
    [line] = [x for x in metrics.splitlines() if x.startswith("webhook_sidecar_tls_cert_not_after")]
    assert float(line.split()[1]) == expires
    assert len(runtime.calls) == 1


async def test_tls_1_2_is_the_default_minimum(
    runtime: Runtime, short_tmp: Path, pki: dict[str, Path]
) -> None:
    doc = tls_doc(runtime, **server_tls(pki["a"]))
    async with running_server(short_tmp, doc) as (server, _):
        ctx = client_context(pki["a"] / "ca.pem", max_version="1.2")
        assert (await post(url(doc), ssl_context=ctx))[0] == 200
        assert server.tls is not None
        assert server.tls.context.minimum_version == ssl.TLSVersion.TLSv1_2


async def test_min_version_1_3_refuses_tls_1_2(
    runtime: Runtime, short_tmp: Path, pki: dict[str, Path]
) -> None:
    doc = tls_doc(runtime, **server_tls(pki["a"], minVersion="1.3"))
    async with running_server(short_tmp, doc):
        with pytest.raises(aiohttp.ClientError):
            await post(url(doc), ssl_context=client_context(pki["a"] / "ca.pem", max_version="1.2"))
        assert (await post(url(doc), ssl_context=client_context(pki["a"] / "ca.pem")))[0] == 200


async def test_mtls_refuses_clients_without_a_certificate_from_the_ca(
    runtime: Runtime,
    short_tmp: Path,
    pki: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # CA "b" in the system trust store must not make its clients acceptable.
    monkeypatch.setenv("SSL_CERT_FILE", str(pki["b"] / "ca.pem"))
    doc = tls_doc(runtime, **server_tls(pki["a"], clientCaFile=pki["a"] / "ca.pem"))
    ca = pki["a"] / "ca.pem"
    async with running_server(short_tmp, doc):
        with pytest.raises(aiohttp.ClientError):
            await post(url(doc), ssl_context=client_context(ca))
        b = pki["b"]
        with pytest.raises(aiohttp.ClientError):
            await post(
                url(doc), ssl_context=client_context(ca, b / "client.pem", b / "client-key.pem")
            )
        a = pki["a"]
        ctx = client_context(ca, a / "client.pem", a / "client-key.pem")
        assert (await post(url(doc), ssl_context=ctx))[0] == 200
    assert len(runtime.calls) == 1


async def test_sslkeylogfile_is_ignored(
    runtime: Runtime, short_tmp: Path, pki: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Session keys are never written out, whatever the environment says."""
    keylog = short_tmp / "keys.log"
    monkeypatch.setenv("SSLKEYLOGFILE", str(keylog))
    doc = tls_doc(runtime, **server_tls(pki["a"]))
    async with running_server(short_tmp, doc):
        monkeypatch.delenv("SSLKEYLOGFILE")  # the test's own client must not write it either
        assert (await post(url(doc), ssl_context=client_context(pki["a"] / "ca.pem")))[0] == 200
    assert not keylog.exists()


def pem_files(pki: Path) -> dict[str, bytes]:
    return {name: (pki / name).read_bytes() for name in PKI}


async def test_certificate_swapped_in_a_kubernetes_volume_is_served_to_new_connections(
    runtime: Runtime, short_tmp: Path, pki: dict[str, Path]
) -> None:
    """cert-manager renews, the kubelet swaps ``..data``: no signal, no restart."""
    volume = ProjectedVolume(short_tmp / "tls", pem_files(pki["a"]))
    doc = tls_doc(runtime, **server_tls(volume.folder))
    old_ca, new_ca = client_context(pki["a"] / "ca.pem"), client_context(pki["b"] / "ca.pem")
    async with running_server(short_tmp, doc) as (server, _):
        assert await peer_certificate_serial(public_port(doc), old_ca) == serial(
            pki["a"] / "server.pem"
        )
        volume.update(pem_files(pki["b"]))

        async def new_cert_served() -> bool:
            try:
                return await peer_certificate_serial(public_port(doc), new_ca) == serial(
                    pki["b"] / "server.pem"
                )
            except ssl.SSLCertVerificationError:
                return False

        await until(new_cert_served)
        assert (await post(url(doc), ssl_context=new_ca))[0] == 200
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await post(url(doc), ssl_context=old_ca)
        leaf = x509.load_pem_x509_certificate((pki["b"] / "server.pem").read_bytes())
        assert server.tls is not None
        assert server.tls.not_after == leaf.not_valid_after_utc.timestamp()
        registry = server.state.metrics.registry
        gauge = registry.get_sample_value("webhook_sidecar_tls_cert_not_after_timestamp_seconds")
        assert gauge == leaf.not_valid_after_utc.timestamp()


async def test_client_ca_replaced_on_reload(
    runtime: Runtime, short_tmp: Path, pki: dict[str, Path]
) -> None:
    """Swapping clientCaFile drops the old CA at once (it is not merely added to)."""
    volume = ProjectedVolume(short_tmp / "tls", pem_files(pki["a"]))
    doc = tls_doc(runtime, **server_tls(volume.folder, clientCaFile=volume.folder / "ca.pem"))
    a, b = pki["a"], pki["b"]
    async with running_server(short_tmp, doc) as (server, _):
        as_a = client_context(a / "ca.pem", a / "client.pem", a / "client-key.pem")
        assert (await post(url(doc), ssl_context=as_a))[0] == 200
        # New CA for clients only; the server keeps certificate "a".
        volume.update({**pem_files(a), "ca.pem": (b / "ca.pem").read_bytes()})
        assert await server.reload()
        with pytest.raises(aiohttp.ClientError):
            await post(url(doc), ssl_context=as_a)
        as_b = client_context(a / "ca.pem", b / "client.pem", b / "client-key.pem")
        assert (await post(url(doc), ssl_context=as_b))[0] == 200


async def test_reload_can_turn_mtls_on_and_raise_the_minimum_version(
    runtime: Runtime, short_tmp: Path, pki: dict[str, Path]
) -> None:
    a = pki["a"]
    doc = tls_doc(runtime, **server_tls(a))
    plain, tls12 = client_context(a / "ca.pem"), client_context(a / "ca.pem", max_version="1.2")
    async with running_server(short_tmp, doc) as (server, _):
        assert (await post(url(doc), ssl_context=plain))[0] == 200
        assert (await post(url(doc), ssl_context=tls12))[0] == 200
        doc["sidecar"]["tls"].update(clientCaFile=str(a / "ca.pem"), minVersion="1.3")
        write_config(short_tmp, doc)
        assert await server.reload()
        with pytest.raises(aiohttp.ClientError):
            await post(url(doc), ssl_context=plain)  # no client certificate
        client = client_context(a / "ca.pem", a / "client.pem", a / "client-key.pem")
        assert (await post(url(doc), ssl_context=client))[0] == 200
        client.maximum_version = ssl.TLSVersion.TLSv1_2
        with pytest.raises(aiohttp.ClientError):
            await post(url(doc), ssl_context=client)


async def test_broken_new_certificate_is_refused_and_the_old_one_served(
    runtime: Runtime, short_tmp: Path, pki: dict[str, Path]
) -> None:
    a, b = pki["a"], pki["b"]
    volume = ProjectedVolume(short_tmp / "tls", pem_files(a))
    doc = tls_doc(runtime, **server_tls(volume.folder))
    async with running_server(short_tmp, doc) as (server, _):
        # A half-finished renewal: the new certificate with the old key.
        volume.update({**pem_files(a), "server.pem": (b / "server.pem").read_bytes()})
        assert not await server.reload()
        ctx = client_context(a / "ca.pem")
        assert await peer_certificate_serial(public_port(doc), ctx) == serial(a / "server.pem")
        assert (await post(url(doc), ssl_context=ctx))[0] == 200
        reloads = server.state.metrics.config_reloads
        assert reloads.labels("error")._value.get() == 1


async def test_reload_cannot_turn_tls_off(
    runtime: Runtime, short_tmp: Path, pki: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    doc = tls_doc(runtime, **server_tls(pki["a"]))
    async with running_server(short_tmp, doc) as (server, _):
        del doc["sidecar"]["tls"]
        write_config(short_tmp, doc)
        assert not await server.reload()
        [refused] = [r for r in caplog.records if r.getMessage().startswith("reload refused")]
        problems = refused.problems  # type: ignore[attr-defined]
        assert problems == ["sidecar.tls: turning TLS on or off needs a restart"]
        assert (await post(url(doc), ssl_context=client_context(pki["a"] / "ca.pem")))[0] == 200


# ---------------------------------------------------------------- config errors


def expired_pair(folder: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "old")])
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(1)
        .not_valid_before(past - dt.timedelta(days=1)).not_valid_after(past)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    (folder / "old.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "old-key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return folder / "old.pem", folder / "old-key.pem"


def encrypted_key(folder: Path, pki: Path) -> Path:
    key = serialization.load_pem_private_key((pki / "server-key.pem").read_bytes(), None)
    path = folder / "encrypted-key.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda f, p: server_tls(p["a"], keyFile=p["b"] / "server-key.pem"),
            "the key does not belong to the certificate",
        ),
        (lambda f, p: server_tls(p["a"], keyFile=encrypted_key(f, p["a"])), "encrypted private"),
        (lambda f, p: server_tls(p["a"], certFile=p["a"] / "server-key.pem"), "not valid PEM"),
        (lambda f, p: server_tls(p["a"], clientCaFile=p["a"] / "server-key.pem"), "clientCaFile"),
        (lambda f, p: dict(zip(["certFile", "keyFile"], expired_pair(f), strict=True)), "expired"),
        (lambda f, p: server_tls(p["a"], certFile=f / "none.pem"), "cannot read file"),
    ],
)
def test_unusable_tls_files_are_config_errors(
    short_tmp: Path, pki: dict[str, Path], make: Any, message: str
) -> None:
    """check-config and start-up catch them, not the first client's handshake."""
    tls = {k: str(v) for k, v in make(short_tmp, pki).items()}
    with pytest.raises(config.ConfigError) as err:
        config.load(write_config(short_tmp, base_doc("/x.sock", tls=tls)))
    [problem] = err.value.problems
    assert problem.startswith("sidecar.tls") and message in problem, problem
    assert "PRIVATE KEY" not in problem


def handshake(port: int, ctx: ssl.SSLContext, session: ssl.SSLSession | None = None) -> Any:
    """A blocking TLS handshake plus one request (in a thread); returns the socket."""
    import socket

    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        conn = ctx.wrap_socket(raw, server_hostname="127.0.0.1", session=session)
    except BaseException:
        raw.close()
        raise
    try:
        # TLS 1.3 reports a refused client certificate only after the handshake.
        conn.sendall(b"POST /nope HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        if not conn.recv(1024).startswith(b"HTTP/1.1 404"):
            raise ssl.SSLError("no reply")
    except BaseException:
        conn.close()
        raise
    return conn


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
async def test_no_session_outlives_a_removed_client_ca(
    runtime: Runtime, short_tmp: Path, pki: dict[str, Path], version: ssl.TLSVersion
) -> None:
    """A resumed session skips the client-certificate check: the sidecar resumes none."""
    volume = ProjectedVolume(short_tmp / "tls", pem_files(pki["a"]))
    doc = tls_doc(runtime, **server_tls(volume.folder, clientCaFile=volume.folder / "ca.pem"))
    a = pki["a"]
    ctx = client_context(a / "ca.pem", a / "client.pem", a / "client-key.pem")
    ctx.maximum_version = version
    async with running_server(short_tmp, doc) as (server, _):
        first = await asyncio.to_thread(handshake, public_port(doc), ctx)
        session = first.session
        first.close()
        again = await asyncio.to_thread(handshake, public_port(doc), ctx, session)
        assert not again.session_reused
        session = again.session
        again.close()
        volume.update({**pem_files(a), "ca.pem": (pki["b"] / "ca.pem").read_bytes()})
        assert await server.reload()
        with pytest.raises((ssl.SSLError, OSError)):
            (await asyncio.to_thread(handshake, public_port(doc), ctx, session)).close()


async def test_without_tls_there_is_no_certificate_gauge(runtime: Runtime, short_tmp: Path) -> None:
    """Absent rather than 0: an "expires within a week" alert must not fire on plain HTTP."""
    doc = tls_doc(runtime)
    del doc["sidecar"]["tls"]
    async with running_server(short_tmp, doc) as (server, _):
        metrics = generate_latest(server.state.metrics.registry).decode()
    assert "tls_cert_not_after" not in metrics
    assert "webhook_sidecar_config_reloads_total" in metrics


def test_run_with_a_key_that_does_not_fit_exits_2(short_tmp: Path, pki: dict[str, Path]) -> None:
    import subprocess
    import sys

    tls = {k: str(v) for k, v in server_tls(pki["a"], keyFile=pki["b"] / "server-key.pem").items()}
    path = write_config(short_tmp, base_doc(short_tmp / "rt.sock", tls=tls))
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "run", "-c", str(path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert "sidecar.tls: cannot use certFile" in result.stderr
    assert "the key does not belong to the certificate" in result.stderr
