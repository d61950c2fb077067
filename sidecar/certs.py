"""``webhook-sidecar gen-cert``: a throwaway CA, a server and a client certificate (PEM).

For trials of TLS and mTLS only. The CA's key is never written, so nothing
else can ever be signed by it. Keys are written with mode 0600. Each file is
written to a temporary name and renamed into place, so a sidecar watching the
files never loads half a certificate, and a key never exists with a wider mode.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import re
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = dt.timedelta(days=90)
# What write_demo_pki writes, in this order.
PKI_FILES = ("ca.pem", "server.pem", "server-key.pem", "client.pem", "client-key.pem")
# RFC 1123 host names (A-labels for IDNs), with an optional wildcard first label.
_DNS_NAME = re.compile(
    r"(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not _DNS_NAME.fullmatch(host):
                raise ValueError(
                    f"--host {host!r}: not an IP address or DNS name "
                    "(letters, digits, '-', '.', an optional leading '*.'; IDNs as xn--)"
                ) from None
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _key_usage(ca: bool) -> x509.KeyUsage:
    """A CA signs certificates and CRLs only; a leaf signs handshakes only (ECDSA)."""
    return x509.KeyUsage(
        digital_signature=not ca, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
        encipher_only=False, decipher_only=False,
    )  # fmt: skip


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    hosts: list[str] | None = None,
    usage: x509.ObjectIdentifier | None = None,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer.subject if issuer is not None else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    builder = builder.add_extension(_key_usage(ca), critical=True)
    if hosts:
        builder = builder.add_extension(_san(hosts), critical=False)
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to a fresh temporary file with ``mode`` (0600 from creation, then
    widened if asked), then rename it over ``path``: never a partial file, never a
    symlink followed, never a key readable by others for a moment."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write_demo_pki(out: Path, hosts: list[str]) -> list[Path]:
    """Write ca.pem, server.pem, server-key.pem, client.pem, client-key.pem into ``out``.

    The server certificate covers ``hosts`` (DNS names and IP addresses; the first
    is also its common name). Raises ValueError for a host that is neither.
    """
    if not hosts:
        raise ValueError("--host: at least one name or address is needed")
    _san(hosts)  # refuse bad names before anything is written
    out.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _issue("webhook-sidecar throwaway CA", ca_key, None, ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    common_name = hosts[0] if len(hosts[0]) <= 64 else "webhook-sidecar server"  # X.520 limit
    server = _issue(
        common_name, server_key, ca, ca_key, hosts=hosts, usage=ExtendedKeyUsageOID.SERVER_AUTH
    )
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _issue(  # with a SAN too: RFC 5280 verifiers (cryptography's) require one
        "webhook-sidecar client",
        client_key,
        ca,
        ca_key,
        hosts=["webhook-sidecar-client"],
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
    )
    pem = serialization.Encoding.PEM
    files = [
        (out / "ca.pem", ca.public_bytes(pem), 0o644),
        (out / "server.pem", server.public_bytes(pem), 0o644),
        (out / "server-key.pem", _key_pem(server_key), 0o600),
        (out / "client.pem", client.public_bytes(pem), 0o644),
        (out / "client-key.pem", _key_pem(client_key), 0o600),
    ]
    for path, data, mode in files:
        _write(path, data, mode)
    return [path for path, _, _ in files]
