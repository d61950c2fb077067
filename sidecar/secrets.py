"""Secret sources (inline value, file, environment), validity windows, masked repr.

A secret's bytes live only in :class:`Secret.value`; everything that can be
printed (repr, str, error messages) shows the id and the source, never the value.
"""

from __future__ import annotations

import hmac
import os
import secrets
import stat
from dataclasses import dataclass, field

# Far above any real secret or token; a path pointing at /dev/zero or a log file
# must fail the load, not fill memory.
MAX_SECRET_FILE_BYTES = 64 * 1024


def generate_secret() -> str:
    """32 random bytes as 64 hex characters, like ``openssl rand -hex 32``."""
    return secrets.token_hex(32)


class SecretSourceError(ValueError):
    """A secret could not be read. The message never contains secret material."""


@dataclass(frozen=True, slots=True)
class SecretSource:
    """Where a secret comes from: exactly one of an inline value, a file or an env variable."""

    kind: str  # "value", "file" or "env"
    where: str  # the file path or the variable name; "" for inline values

    def describe(self) -> str:
        return "inline value" if self.kind == "value" else f"{self.kind} {self.where}"

    def read(self, inline: str | None = None) -> bytes:
        """Return the secret's bytes. A file's single trailing newline is dropped."""
        try:
            return self._read(inline)
        except UnicodeEncodeError:  # a lone surrogate ("\ud800") has no bytes
            what = {"value": "value", "env": "variable name", "file": "file name"}[self.kind]
            raise SecretSourceError(f"the {what} is not valid Unicode") from None

    def _read(self, inline: str | None) -> bytes:
        if self.kind == "value":
            assert inline is not None
            return inline.encode()
        if self.kind == "env":
            value = os.environb.get(os.fsencode(self.where))  # the bytes, whatever the locale
            if value is None:
                raise SecretSourceError(f"environment variable {self.where} is not set")
            return value
        data = read_small_file(self.where)
        if data.endswith(b"\r\n"):
            return data[:-2]
        if data.endswith(b"\n"):
            return data[:-1]
        return data


def read_small_file(path: str, limit: int = MAX_SECRET_FILE_BYTES) -> bytes:
    """A regular file's bytes, at most ``limit``. Opened non-blocking, so a FIFO at
    the path is refused instead of hanging a reload until someone writes to it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise SecretSourceError(f"cannot read {path}: not a regular file")
            data = b""
            while len(data) <= limit and (chunk := os.read(fd, limit + 1 - len(data))):
                data += chunk
        finally:
            os.close(fd)
    except OSError as exc:
        raise SecretSourceError(f"cannot read {path}: {exc.strerror}") from None
    except SecretSourceError:
        raise
    except ValueError:  # a NUL in the path: no file can have that name
        raise SecretSourceError(f"cannot read {path}: not a valid file name") from None
    if len(data) > limit:
        raise SecretSourceError(f"cannot read {path}: larger than {limit} bytes")
    return data


# eq=False: no value-based ``==`` that could end up comparing secrets in variable
# time; config compares values with hmac.compare_digest where it must.
@dataclass(frozen=True, slots=True, eq=False)
class Secret:
    """One bearer secret with its id, validity window and optional agent scope."""

    id: str
    value: bytes = field(repr=False)
    source: SecretSource
    not_before: float | None = None  # Unix time; None: valid since forever
    not_after: float | None = None  # Unix time; None: valid forever
    agents: frozenset[str] | None = None  # None: every agent

    def valid_at(self, now: float) -> bool:
        if self.not_before is not None and now < self.not_before:
            return False
        return self.not_after is None or now < self.not_after

    def permits(self, agent: str) -> bool:
        return self.agents is None or agent in self.agents

    def __repr__(self) -> str:
        return f"Secret(id={self.id!r}, source={self.source.describe()!r}, value=***)"

    __str__ = __repr__


def equals_any(value: bytes, candidates: tuple[Secret, ...]) -> bool:
    """Whether ``value`` is one of ``candidates``, compared in constant time with each of
    them (no early exit): for input that must never be echoed into a log or refused
    with a hint, e.g. a query parameter or an ``X-Request-Id`` carrying a token."""
    found = False
    for secret in candidates:
        found |= hmac.compare_digest(value, secret.value)
    return found
