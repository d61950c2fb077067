"""``webhook-sidecar unlock -c FILE ADDRESS``: release an address from the auth lockout
through the running sidecar's admin listener (docs/operations.md).

It reads only ``sidecar.admin.listen`` from the config file, so it works where the
secrets the config points at are not readable (another shell, another user), and it
never talks to the public port. A wildcard admin address (``0.0.0.0``, ``::``) is
reached on loopback.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import json5

from .config import parse_listen
from .settings import DEFAULT_ADMIN_LISTEN, Listen

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
TIMEOUT = 10.0  # under workers the supervisor asks each worker, up to 2 s each in parallel


class UnlockError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def admin_listen(path: Path) -> Listen:
    """``sidecar.admin.listen`` from the config file (its default when absent)."""
    try:
        doc = json5.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UnlockError(f"{path}: cannot read config file: {exc.strerror}", EXIT_USAGE) from None
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise UnlockError(
            f"{path}: not a valid config (check-config -c {path} says why)", EXIT_USAGE
        ) from None
    value: Any = doc
    for key in ("sidecar", "admin", "listen"):
        value = value.get(key) if isinstance(value, dict) else None
    if value is None:
        return DEFAULT_ADMIN_LISTEN
    try:
        if not isinstance(value, str):
            raise ValueError("must be a string host:port")
        return parse_listen(value)
    except ValueError as exc:
        raise UnlockError(f"sidecar.admin.listen: {exc}", EXIT_USAGE) from None


def admin_url(listen: Listen) -> str:
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(listen.host, listen.host)
    return f"http://{Listen(host, listen.port)}/admin/unlock"


def unlock(url: str, address: str) -> bool:
    """POST the unlock; True when the address was locked. Raises :class:`UnlockError`."""
    request = urllib.request.Request(  # noqa: S310 - admin_url builds http:// only
        url,
        data=json.dumps({"address": address}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as resp:  # noqa: S310 - see above
            return bool(json.loads(resp.read())["unlocked"])
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("message", exc.reason)
        except ValueError:
            message = exc.reason
        code = EXIT_USAGE if exc.code == 400 else EXIT_FAILURE
        raise UnlockError(f"{url}: {exc.code} {message}", code) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        why = getattr(reason, "strerror", None) or str(reason)
        raise UnlockError(
            f"cannot reach the admin listener at {url}: {why} (is the sidecar running?)",
            EXIT_FAILURE,
        ) from None
    except (ValueError, KeyError):
        raise UnlockError(f"{url}: not a webhook-sidecar admin listener", EXIT_FAILURE) from None


def run(path: Path, address: str) -> int:
    """Find the admin listener in ``path``, ask it to release ``address``, say what happened."""
    try:
        url = admin_url(admin_listen(path))
        was_locked = unlock(url, address)
    except UnlockError as exc:
        print(f"unlock: {exc}", file=sys.stderr)
        return exc.code
    print(f"{address}: " + ("unlocked" if was_locked else "was not locked (nothing to release)"))
    return EXIT_OK
