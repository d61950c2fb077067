"""Secret sources and windows: files (one trailing newline dropped, never a FIFO, a device or a
huge file), env variables as raw bytes, inline values; windows half-open; nothing printable
ever shows a value."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest
from support.common import SECRET, base_doc, write_config

from sidecar import config
from sidecar.secrets import MAX_SECRET_FILE_BYTES, Secret, SecretSource, SecretSourceError


@pytest.mark.parametrize(
    ("content", "value"),
    [
        (b"s3cret", b"s3cret"),
        (b"s3cret\n", b"s3cret"),
        (b"s3cret\r\n", b"s3cret"),
        (b"s3cret\n\n", b"s3cret\n"),  # one newline, not all trailing whitespace
        (b"s3cret ", b"s3cret "),
        (b"\xffbytes\x00", b"\xffbytes\x00"),  # bytes, not text
    ],
)
def test_file_contents(tmp_path: Path, content: bytes, value: bytes) -> None:
    path = tmp_path / "secret"
    path.write_bytes(content)
    assert SecretSource("file", str(path)).read() == value


def test_env_value_is_the_raw_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WS_TEST_SECRET", "caf\udce9")  # a Latin-1 byte in a UTF-8 locale
    assert SecretSource("env", "WS_TEST_SECRET").read() == b"caf\xe9"


def test_missing_env_variable_names_it() -> None:
    with pytest.raises(SecretSourceError, match="environment variable WS_NOT_SET is not set"):
        SecretSource("env", "WS_NOT_SET").read()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: None, "No such file or directory"),
        (lambda p: p.mkdir(), "not a regular file"),
        (lambda p: os.mkfifo(p), "not a regular file"),  # would block a reload forever
        (lambda p: p.write_bytes(b"x" * (MAX_SECRET_FILE_BYTES + 1)), "larger than 65536 bytes"),
    ],
)
def test_unusable_files_are_refused(tmp_path: Path, make: Any, message: str) -> None:
    path = tmp_path / "secret"
    make(path)
    done = threading.Event()
    error: list[BaseException] = []

    def read() -> None:
        try:
            SecretSource("file", str(path)).read()
        except SecretSourceError as exc:
            error.append(exc)
        finally:
            done.set()

    threading.Thread(target=read, daemon=True).start()
    assert done.wait(5), "reading blocked"
    assert message in str(error[0]) and str(path) in str(error[0])


def test_device_files_are_refused() -> None:
    with pytest.raises(SecretSourceError, match="not a regular file"):
        SecretSource("file", "/dev/zero").read()


def test_windows_are_half_open() -> None:
    s = Secret("x", b"v", SecretSource("value", ""), not_before=100.0, not_after=200.0)
    assert [s.valid_at(t) for t in (99.999, 100.0, 199.999, 200.0)] == [False, True, True, False]
    forever = Secret("y", b"v", SecretSource("value", ""))
    assert forever.valid_at(0) and forever.valid_at(1e12)


def test_no_printable_form_shows_the_value() -> None:
    s = Secret("rot-1", SECRET.encode(), SecretSource("file", "/etc/webhook/current"))
    for text in (repr(s), str(s), f"{s}", repr([s]), repr({"s": s})):
        assert SECRET not in text
    assert repr(s) == "Secret(id='rot-1', source='file /etc/webhook/current', value=***)"


def test_secrets_compare_by_identity_not_value() -> None:
    a = Secret("a", b"same", SecretSource("value", ""))
    b = Secret("a", b"same", SecretSource("value", ""))
    assert a != b and a == a  # value comparisons belong to hmac.compare_digest


def test_config_errors_name_the_source_not_the_value(short_tmp: Path) -> None:
    doc = base_doc("/x.sock")
    doc["webhooks"]["secret"] = {"file": "missing-secret"}
    with pytest.raises(config.ConfigError) as err:
        config.load(write_config(short_tmp, doc))
    [problem] = err.value.problems
    assert problem.startswith("webhooks.secret.file: cannot read ")
    assert problem.endswith("missing-secret: No such file or directory")


def test_file_paths_are_relative_to_the_config(short_tmp: Path) -> None:
    (short_tmp / "current").write_text(SECRET + "\n")
    doc = base_doc("/x.sock")
    doc["webhooks"]["secrets"] = [{"id": "current", "file": "current"}]
    del doc["webhooks"]["secret"]
    settings = config.load(write_config(short_tmp, doc))
    [secret] = settings.webhooks.secrets
    assert secret.value == SECRET.encode() and secret.source.where == str(short_tmp / "current")
    assert short_tmp / "current" in settings.watched_files


def test_upstream_token_with_a_line_break_is_a_config_error(short_tmp: Path) -> None:
    (short_tmp / "token").write_bytes(b"abc\r\nX-Injected: 1\n")
    doc = base_doc("/x.sock")
    doc["sidecar"]["upstream"]["token"] = {"file": "token"}
    with pytest.raises(config.ConfigError) as err:
        config.load(write_config(short_tmp, doc))
    assert err.value.problems == ["sidecar.upstream.token: must not contain control characters"]
