"""Standard Webhooks (and Svix, which sends the same under ``svix-`` names).

``webhook-signature: v1,<base64> [v1,<base64> ...]`` is HMAC-SHA256 over
``<webhook-id>.<webhook-timestamp>.<body>`` with the secret's decoded key: a secret
is ``whsec_<base64>``, and the key is the base64-decoded bytes (decoded once, when
the config loads: :func:`key_of`). Any listed ``v1`` may match; other schemes
(``v1a`` asymmetric signatures) are ignored. The delivery id is ``webhook-id``.
"""

from __future__ import annotations

import binascii
from collections.abc import Sequence

from .base import (
    Headers,
    Key,
    Profile,
    Verdict,
    base64_signature,
    check_time,
    hmac_match,
    invalid,
    one_header,
    refusals,
    timestamp,
)

PREFIX = "whsec_"
_NAMES = {
    "webhook": ("webhook-id", "webhook-timestamp", "webhook-signature"),
    "svix": ("svix-id", "svix-timestamp", "svix-signature"),
}


def key_of(secret: bytes) -> bytes:
    """The HMAC key of a ``whsec_<base64>`` secret (the prefix is optional); raises
    ValueError when it is not valid base64."""
    text = secret[len(PREFIX) :] if secret.startswith(PREFIX.encode()) else secret
    text += b"=" * (-len(text) % 4)  # senders also show it unpadded
    try:
        key = binascii.a2b_base64(text, strict_mode=True)
    except binascii.Error:
        raise ValueError("must be whsec_ followed by base64 (as the sender shows it)") from None
    if len(key) < 16:
        raise ValueError("the decoded key is shorter than 16 bytes")
    return key


@refusals
def verify(
    body: bytes, headers: Headers, keys: Sequence[Key], now: float, tolerance: float
) -> Verdict:
    """Reads the ``webhook-`` headers (else the ``svix-`` ones), checks every ``v1``
    signature, then the timestamp."""
    family = "svix" if "webhook-id" not in headers and "svix-id" in headers else "webhook"
    id_name, ts_name, sig_name = _NAMES[family]
    msg_id = one_header(headers, id_name)
    if "." in msg_id or len(msg_id) > 256:
        raise invalid(f"header {id_name!r} is not a usable message id")
    sent = one_header(headers, ts_name)
    when = timestamp(sent, ts_name)
    signatures: list[bytes] = []
    for item in one_header(headers, sig_name).split(" "):
        if not item:
            continue
        version, sep, text = item.partition(",")
        if not sep:
            raise invalid(f"header {sig_name!r} must list version,signature pairs")
        if version == "v1":
            signatures.append(base64_signature(text, sig_name))
    if not signatures:
        raise invalid(f"header {sig_name!r} has no 'v1' signature")
    prefix = f"{msg_id}.{sent}.".encode()
    secret = hmac_match(keys, body, signatures, sig_name, now, prefix=prefix)
    check_time(when, now, tolerance, f"header {ts_name!r}")
    return Verdict(secret, msg_id)


PROFILE = Profile(
    "standard-webhooks",
    verify,
    frozenset({"webhook-signature", "svix-signature"}),
    timestamped=True,
)
