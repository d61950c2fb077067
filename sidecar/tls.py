"""TLS termination (``sidecar.tls``), with certificates replaced without a restart.

asyncio gives a listener one ``SSLContext`` for its whole life. :class:`ServingTls`
keeps that context as the front door and moves every new connection onto the
context built from the newest files, from its SNI callback: OpenSSL calls it
for every handshake, with or without a server name, before it picks the
certificate (the mechanism ``SSLContext.sni_callback`` documents for choosing a
certificate). Connections already open keep the one they shook hands with.

OpenSSL copies two settings from the front door when it creates a connection,
before that switch: the minimum version and whether a client certificate is
asked for. :meth:`ServingTls.use` copies both onto the front door as well, so a
reload can raise ``minVersion`` or turn mTLS on or off for new connections.
Sessions are never resumed (see :class:`ServingTls`).
"""

from __future__ import annotations

import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .secrets import SecretSourceError, read_small_file

if TYPE_CHECKING:
    from .settings import Tls

VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
MAX_PEM_BYTES = 1024 * 1024


class TlsError(ValueError):
    """The TLS files cannot be used. The message names the file, never key material."""


@dataclass(frozen=True, slots=True)
class Loaded:
    context: ssl.SSLContext
    not_after: float  # Unix time the server certificate expires


def _no_password() -> bytes:
    # Without a callback OpenSSL would prompt for the passphrase on the terminal,
    # hanging a start or a reload.
    raise TlsError("keyFile: encrypted private keys are not supported")


def _reason(exc: Exception) -> str:
    if isinstance(exc, ssl.SSLError):
        if exc.reason == "KEY_VALUES_MISMATCH":
            return "the key does not belong to the certificate"
        if exc.reason:
            return exc.reason.lower().replace("_", " ")
        return "not valid PEM"
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return str(exc)


def certificate_not_after(path: Path) -> float:
    """When the first (leaf) certificate in a PEM file expires, as Unix time."""
    # Imported here: cryptography's X.509 bindings add ~8 MB of RSS to every process,
    # and only a sidecar that terminates TLS needs them.
    from cryptography import x509

    try:
        data = read_small_file(str(path), MAX_PEM_BYTES)
        return x509.load_pem_x509_certificates(data)[0].not_valid_after_utc.timestamp()
    except SecretSourceError as exc:
        raise TlsError(f"certFile: {exc}") from None
    except ValueError:
        raise TlsError(f"certFile: {path}: not a PEM certificate") from None


def load(tls: Tls, *, now: float | None = None) -> Loaded:
    """A server context from ``tls``'s files. Raises :class:`TlsError`.

    An expired certificate is refused: a reload keeps serving the old one
    rather than one no client accepts.
    """
    # Not ssl.create_default_context(): it starts writing session keys to the file
    # named by SSLKEYLOGFILE whenever that variable is set.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = VERSIONS[tls.min_version]
    try:
        ctx.load_cert_chain(tls.cert_file, tls.key_file, password=_no_password)
    except (ssl.SSLError, OSError) as exc:
        raise TlsError(
            f"cannot use certFile {tls.cert_file} with keyFile {tls.key_file}: {_reason(exc)}"
        ) from None
    if tls.client_ca_file is not None:
        try:
            ctx.load_verify_locations(cafile=tls.client_ca_file)
        except (ssl.SSLError, OSError) as exc:
            raise TlsError(f"clientCaFile: {tls.client_ca_file}: {_reason(exc)}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED  # no certificate, or one it did not sign: refused
    not_after = certificate_not_after(tls.cert_file)
    if not_after <= (time.time() if now is None else now):
        raise TlsError(f"certFile: {tls.cert_file}: the certificate has expired")
    return Loaded(ctx, not_after)


class ServingTls:
    """The listener's context, and the newest one each new connection is moved to."""

    def __init__(self, first: Loaded) -> None:
        self.context = first.context  # give this one to the listener
        self.current = first
        self.context.sni_callback = self._select
        # No session resumption: OpenSSL resumes a session before the switch above and
        # without checking the client certificate again, so a ticket issued before a
        # reload would outlive a client CA that reload removed (tests/test_tls.py).
        # Callers keep connections alive; a full handshake costs well under a millisecond.
        self.context.num_tickets = 0
        self.context.options |= ssl.OP_NO_TICKET

    def _select(self, conn: ssl.SSLObject, server_name: str | None, front: ssl.SSLContext) -> None:
        current = self.current.context
        if current is not front:
            conn.context = current

    @property
    def not_after(self) -> float:
        return self.current.not_after

    def use(self, loaded: Loaded) -> None:
        """Serve ``loaded`` to every connection from now on."""
        front = self.context
        front.minimum_version = loaded.context.minimum_version
        front.verify_mode = loaded.context.verify_mode
        self.current = loaded
