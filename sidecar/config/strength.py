"""Is a secret guessable? The checks beyond ``minSecretLength`` (docs/configuration.md).

A long secret is not a strong one: ``Password1Password1Password1Password1`` passes
any length check and falls to the first guesses of a password cracker. Three
shapes are refused, for webhook and route secrets alike:

1. one block repeated (``abcabcabc…``, ``Password1Password1…``, a partial last block
   included);
2. fewer than 8 distinct characters (``aaaa…``, ``01010101…``);
3. a dictionary word followed by digits (``password2024…``, ``Welcome123…``), with a
   small built-in list of the words such secrets are made of.

Random secrets pass: ``gen-secret``'s 64 hex characters and a provider's 32-hex
signing secret have 16 possible characters, are never periodic in practice, and
contain no letters-then-digits word shape (tests/config/test_strength.py checks
this over many generated secrets). The reason never contains the secret.
"""

from __future__ import annotations

import re

MIN_DISTINCT = 8
# Periodicity is decided on the first bytes only: a real secret is far shorter, and
# the check must stay cheap on a 64 KiB secret file.
_PERIOD_WINDOW = 4096
_WORD_THEN_DIGITS = re.compile(rb"([a-z]+)[0-9]*[^a-z0-9]*")

# The stems of the most common passwords and of the words people build secrets from
# (lower case; a digit suffix and trailing punctuation are stripped before the lookup).
WORDS = frozenset(
    b"""
    password passw0rd passwd pass secret secrets token webhook webhooks hook hooks
    admin administrator root user login letmein welcome qwerty qwertyuiop asdf asdfgh
    asdfghjkl zxcvbnm iloveyou monkey dragon master shadow sunshine princess football
    baseball soccer hockey batman superman trustno1 freedom whatever abc abcdef abcdefg
    abcdefgh changeme default test testing demo example sample private public access
    security secure openclaw sidecar agent api apikey key service server system
    computer internet hello hunter ninja michael jennifer jordan charlie thomas summer
    winter spring autumn flower starwars pokemon mustang cheese cookie chocolate
    killer hottie lovely love family friend money banana orange apple google github
    gitlab slack discord stripe linear company office company production staging
    development prod dev local localhost
    """.split()
)


def weak_secret_reason(value: bytes | str) -> str | None:
    """Why ``value`` is guessable, or ``None`` when none of the three shapes applies.

    Checked in order: a repeated block, too few distinct characters, a dictionary
    word followed by digits. The length check (``minSecretLength``) is the caller's."""
    raw = value.encode() if isinstance(value, str) else value
    if _is_periodic(raw[:_PERIOD_WINDOW]):
        return "it is one block repeated"
    if len(set(raw)) < MIN_DISTINCT:
        return f"it has fewer than {MIN_DISTINCT} distinct characters"
    match = _WORD_THEN_DIGITS.fullmatch(raw.lower())
    if match is not None and match.group(1) in WORDS:
        return "it is a dictionary word followed by digits"
    return None


def _is_periodic(raw: bytes) -> bool:
    """Whether ``raw`` is a block of at most half its length repeated (the last copy
    may be cut short): it then equals itself shifted by the block's length."""
    n = len(raw)
    return any(raw[p:] == raw[: n - p] for p in range(1, n // 2 + 1))
