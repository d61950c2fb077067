"""Value converters shared by the config readers (:mod:`.parser`, :mod:`.routes`): each
returns the value or raises ``ValueError`` with the message a key path is put before."""

from __future__ import annotations

from collections.abc import Callable


def choice(*choices: str) -> Callable[[object], str]:
    """One of ``choices``, exactly as written."""

    def convert(value: object) -> str:
        if value not in choices:
            raise ValueError("must be one of " + ", ".join(repr(c) for c in choices))
        return str(value)

    return convert
