"""Weak secrets are config errors beyond minSecretLength (docs/configuration.md)."""

from __future__ import annotations

import secrets
import string
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.common import SEED_EXAMPLE

from sidecar.config import ConfigError, loads
from sidecar.config.strength import weak_secret_reason
from sidecar.secrets import generate_secret

REPEATED = "it is one block repeated"
FEW = "it has fewer than 8 distinct characters"
WORD = "it is a dictionary word followed by digits"


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("Password1Password1Password1Password1", REPEATED),
        ("Password1Password1Password1Password1Pass", REPEATED),  # the last block cut short
        ("0123456789abcdef" * 4, REPEATED),
        ("x" * 40, REPEATED),
        ("aabbaabbccaabbaabbccaabbaabbccddaabbaabbcc", FEW),
        ("password20242024202420242024202420", WORD),
        ("Welcome123456789012345678901234567!", WORD),
        ("LetMeIn98765432109876543210987654321", WORD),
    ],
)
def test_weak_shapes_are_named(value: str, reason: str) -> None:
    assert weak_secret_reason(value) == reason
    assert weak_secret_reason(value.encode()) == reason


@pytest.mark.parametrize(
    "value",
    [
        "your-secret-token",  # the seed's demo secret: weak by length only
        "2bbcf5ffb0bc899ded8a851eab985d26",  # a provider's 32-hex signing secret
        "whsec_MfKQ9r2A8n4Ux7Bz0Lq3Vt6Yc1Wp5Ed",  # a provider's base64-ish secret
    ],
)
def test_real_looking_secrets_pass(value: str) -> None:
    assert weak_secret_reason(value) is None


@settings(max_examples=2000, deadline=None)
@given(st.randoms(use_true_random=True))
def test_gen_secret_and_provider_hex_always_pass(rnd: Any) -> None:
    # gen-secret's shape (64 hex) and a provider's (32 hex), uniformly random as they
    # are in life (hypothesis's own draws favour degenerate values like all zeros).
    for n in (32, 64):
        value = "".join(rnd.choice("0123456789abcdef") for _ in range(n))
        assert weak_secret_reason(value) is None, value


def test_gen_secret_output_passes() -> None:
    for _ in range(2000):
        assert weak_secret_reason(generate_secret()) is None
        assert weak_secret_reason(secrets.token_hex(16)) is None


@given(
    st.text(string.ascii_letters + string.digits, min_size=1, max_size=12),
    st.integers(min_value=2, max_value=10),
)
def test_any_repeated_block_is_refused(block: str, times: int) -> None:
    assert weak_secret_reason(block * times) == REPEATED


def _doc(secret: str, min_len: int = 32) -> str:
    quoted = repr(secret).replace("'", '"')
    webhooks = f"webhooks: {{secret: {quoted}, agents: {{a: {{}}}}}}"
    return f"{{{webhooks}, sidecar: {{minSecretLength: {min_len}}}}}"


def test_a_weak_webhook_secret_is_a_config_error_that_hides_it() -> None:
    weak = "Password1Password1Password1Password1"
    with pytest.raises(ConfigError) as caught:
        loads(_doc(weak))
    message = str(caught.value)
    assert f"webhooks.secret: secret 'default' is weak: {REPEATED}" in message
    assert weak not in message and "Password1" not in message


def test_a_weak_secret_in_a_list_names_its_entry() -> None:
    ok, weak = generate_secret(), "welcome" + "1234567890" * 3
    text = f'{{webhooks: {{secrets: [{{id: "ok", value: "{ok}"}}, {{id: "w", value: "{weak}"}}], agents: {{a: {{}}}}}}}}'  # noqa: E501
    with pytest.raises(ConfigError, match=r"webhooks.secrets\[1\]: secret 'w' is weak: it is a"):
        loads(text)


def test_the_seeds_demo_secret_loads_with_min_length_8() -> None:
    text = SEED_EXAMPLE % "your-secret-token"
    with pytest.raises(ConfigError, match="shorter than minSecretLength"):
        loads(text)
    settings = loads(_doc("your-secret-token", 8))
    assert settings.webhooks.secrets[0].value == b"your-secret-token"
