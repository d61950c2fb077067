"""Secret sources (inline value, file, environment), validity windows, masked repr.

A secret's bytes live only in :class:`Secret.value`; everything that can be
printed (repr, str, error messages) shows the id and the source, never the value.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


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
        if self.kind == "value":
            assert inline is not None
            return inline.encode()
        if self.kind == "env":
            value = os.environ.get(self.where)
            if value is None:
                raise SecretSourceError(f"environment variable {self.where} is not set")
            return value.encode()
        try:
            data = Path(self.where).read_bytes()
        except OSError as exc:
            raise SecretSourceError(f"cannot read {self.where}: {exc.strerror}") from None
        if data.endswith(b"\r\n"):
            return data[:-2]
        if data.endswith(b"\n"):
            return data[:-1]
        return data


@dataclass(frozen=True, slots=True)
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
