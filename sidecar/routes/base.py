"""What every provider profile shares (docs/routes.md, "Profiles").

A profile module exposes ``PROFILE``: how to verify a delivery (``verify(raw_body,
headers, keys, now, tolerance) -> Verdict``), which headers carry its signature or
token (never shown to templates), and where its delivery id lives. ``verify`` works on
the raw request bytes, before anything parses them, and compares in constant time
against *every* key of the route: which secret came close is not a timing signal.

Refusals are ``signature_invalid`` (missing, malformed or wrong) and
``signature_expired`` (a timestamp outside ``tolerance``, either way). Their messages
name the header at fault and never quote what was sent or what was expected.
"""

from __future__ import annotations

import binascii
import hmac
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from multidict import MultiMapping

from ..secrets import Secret

log = logging.getLogger("sidecar.routes")

Headers = MultiMapping[str]
# Far above any real signature header (Stripe with a few v1 entries is ~300 bytes):
# an oversized value is refused before any of it is decoded.
MAX_HEADER_CHARS = 4096
MAX_ID_CHARS = 256  # a delivery id, as the Idempotency-Key rule of docs/http-api.md
_HEX = {32: re.compile(r"[0-9a-fA-F]{64}"), 20: re.compile(r"[0-9a-fA-F]{40}")}
_DIGITS = re.compile(r"[0-9]{1,12}")


class Refused(Exception):
    """A delivery the route refuses: ``code`` is signature_invalid or signature_expired."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code)
        self.code = code
        self.message = message


def invalid(message: str) -> Refused:
    return Refused("signature_invalid", message)


def expired(what: str) -> Refused:
    return Refused("signature_expired", f"{what} is outside the allowed time window")


@dataclass(frozen=True, slots=True)
class Key:
    """One route secret and the key bytes it signs with (Standard Webhooks: decoded)."""

    secret: Secret
    key: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class Verdict:
    """What ``verify`` found: the matched secret, the delivery id and event when the
    headers carry them, or the refusal ``(code, message)``."""

    secret: Secret | None
    delivery_id: str | None = None
    event: str | None = None
    refusal: tuple[str, str] | None = None


Verifier = Callable[[bytes, Headers, Sequence[Key], float, float], Verdict]
BodyCheck = Callable[[dict[str, Any], float, float], None]


@dataclass(frozen=True, slots=True)
class Profile:
    """A sender: its verifier and what the route pipeline needs to know about it."""

    name: str
    verify: Verifier
    hidden: frozenset[str]  # lower-cased header names templates never see
    body_delivery: str | None = None  # a top-level body field holding the delivery id
    check_body: BodyCheck | None = None  # a signed check on the parsed body (raises Refused)
    form: bool = False  # accepts application/x-www-form-urlencoded bodies too
    timestamped: bool = False


def refusals(verify: Callable[[bytes, Headers, Sequence[Key], float, float], Verdict]) -> Verifier:
    """Turn the :class:`Refused` a verifier raises into the refusal of its verdict."""

    def wrapped(
        body: bytes, headers: Headers, keys: Sequence[Key], now: float, tolerance: float
    ) -> Verdict:
        try:
            return verify(body, headers, keys, now, tolerance)
        except Refused as exc:
            return Verdict(None, refusal=(exc.code, exc.message))

    wrapped.__doc__ = verify.__doc__
    return wrapped


# --------------------------------------------------------------------------- headers


def one_header(headers: Headers, name: str) -> str:
    """The single value of ``name``: present once, printable ASCII, not oversized."""
    values = headers.getall(name, ())
    if not values:
        raise invalid(f"header {name!r} is missing")
    if len(values) != 1:
        raise invalid(f"header {name!r} must appear exactly once")
    value = values[0]
    if len(value) > MAX_HEADER_CHARS:
        raise invalid(f"header {name!r} is too long")
    if not value.isascii() or not value.isprintable():
        raise invalid(f"header {name!r} must be printable ASCII")
    return value


def delivery_header(headers: Headers, name: str) -> str | None:
    """A delivery id from a header, or None when absent or unusable as an id (more than
    one, too long, not printable ASCII): then the delivery is simply not deduplicated."""
    values = headers.getall(name, ())
    if len(values) != 1:
        return None
    value = values[0]
    if 0 < len(value) <= MAX_ID_CHARS and value.isascii() and value.isprintable():
        return value
    return None


def timestamp(value: str, name: str) -> int:
    """Unix seconds from a header value; anything but digits is signature_invalid."""
    if not _DIGITS.fullmatch(value):
        raise invalid(f"header {name!r} must be a Unix time in seconds")
    return int(value)


def check_time(sent: float, now: float, tolerance: float, what: str) -> None:
    if abs(now - sent) > tolerance:
        raise expired(what)


def hex_signature(value: str, name: str, size: int = 32) -> bytes:
    """A hex digest of ``size`` bytes (either case); anything else is malformed."""
    if not _HEX[size].fullmatch(value):
        raise invalid(f"header {name!r} must hold a {size * 2}-digit hex signature")
    return bytes.fromhex(value)


def base64_signature(value: str, name: str, size: int = 32) -> bytes:
    try:
        raw = binascii.a2b_base64(value, strict_mode=True)
    except binascii.Error:
        raise invalid(f"header {name!r} must hold a base64 signature") from None
    if len(raw) != size:
        raise invalid(f"header {name!r} must hold a base64 signature of {size} bytes")
    return raw


# --------------------------------------------------------------------------- matching


def hmac_match(
    keys: Sequence[Key],
    body: bytes,
    candidates: Sequence[bytes],
    header: str,
    now: float,
    prefix: bytes = b"",
    digest: str = "sha256",
) -> Secret:
    """The secret whose HMAC of ``prefix + body`` equals one of ``candidates``.

    Every key is tried and every candidate compared (``hmac.compare_digest``, no early
    exit). The body is hashed in place: ``hmac.digest`` reads it, and a prefix goes in
    through ``update`` first, so it is never copied."""
    matched: Secret | None = None
    for key in keys:
        if prefix:
            mac = hmac.new(key.key, prefix, digest)
            mac.update(body)
            computed = mac.digest()
        else:
            computed = hmac.digest(key.key, body, digest)
        for candidate in candidates:
            if hmac.compare_digest(computed, candidate):
                matched = key.secret
    return _valid(matched, header, now)


def token_match(keys: Sequence[Key], token: bytes, header: str, now: float) -> Secret:
    """The secret equal to ``token`` (GitLab, Bearer), compared with every key."""
    matched: Secret | None = None
    for key in keys:
        if hmac.compare_digest(token, key.key):
            matched = key.secret
    return _valid(matched, header, now)


def _valid(matched: Secret | None, header: str, now: float) -> Secret:
    if matched is None:
        raise invalid(f"header {header!r} does not match any secret of this route")
    if not matched.valid_at(now):
        log.warning(
            "signature matched route secret %r outside its validity window",
            matched.id,
            extra={"secretId": matched.id},
        )
        raise invalid(f"header {header!r} does not match any secret of this route")
    return matched
