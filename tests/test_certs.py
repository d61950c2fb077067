"""``webhook-sidecar gen-cert``: the five PEM files, key modes, a chain that verifies for the
names asked for (as a server) and for the client pair (as a client), no CA key anywhere."""

from __future__ import annotations

import ipaddress
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from support.common import SECRET

from sidecar.config import load as load_config

FILES = ["ca.pem", "server.pem", "server-key.pem", "client.pem", "client-key.pem"]


def gen_cert(out: Path, *hosts: str, force: bool = False) -> subprocess.CompletedProcess[str]:
    args = [sys.executable, "-m", "sidecar", "gen-cert", "--out", str(out)]
    args += ["--force"] if force else []
    for host in hosts:
        args += ["--host", host]
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pki") / "certs"  # a folder gen-cert has to create
    result = gen_cert(out, "webhooks.example.com", "localhost", "127.0.0.1", "::1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[:5] == [str(out / f) for f in FILES]
    return out


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_writes_exactly_the_five_files_with_key_modes_0600(pki: Path) -> None:
    assert sorted(p.name for p in pki.iterdir()) == sorted(FILES)  # no CA key, no leftovers
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in pki.iterdir()}
    assert modes == {
        "ca.pem": 0o644, "server.pem": 0o644, "client.pem": 0o644,
        "server-key.pem": 0o600, "client-key.pem": 0o600,
    }  # fmt: skip


def test_keys_match_their_certificates(pki: Path) -> None:
    for name in ("server", "client"):
        key = load_pem_private_key((pki / f"{name}-key.pem").read_bytes(), None)
        assert key.public_key() == load(pki / f"{name}.pem").public_key()


@pytest.mark.parametrize(
    "name",
    [
        x509.DNSName("webhooks.example.com"),
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ],
)
def test_server_chain_verifies_for_each_host(
    pki: Path, name: x509.DNSName | x509.IPAddress
) -> None:
    verifier = PolicyBuilder().store(Store([load(pki / "ca.pem")])).build_server_verifier(name)
    chain = verifier.verify(load(pki / "server.pem"), [])
    assert chain[-1] == load(pki / "ca.pem")


def test_server_certificate_is_not_valid_for_other_names(pki: Path) -> None:
    store = Store([load(pki / "ca.pem")])
    verifier = PolicyBuilder().store(store).build_server_verifier(x509.DNSName("evil.example"))
    with pytest.raises(VerificationError):
        verifier.verify(load(pki / "server.pem"), [])


def test_client_pair_verifies_as_a_client_and_not_as_a_server(pki: Path) -> None:
    store = Store([load(pki / "ca.pem")])
    client = load(pki / "client.pem")
    PolicyBuilder().store(store).build_client_verifier().verify(client, [])
    eku = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    server_eku = load(pki / "server.pem").extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert list(server_eku.value) == [ExtendedKeyUsageOID.SERVER_AUTH]


def test_ca_may_sign_leaves_only(pki: Path) -> None:
    basic = load(pki / "ca.pem").extensions.get_extension_for_class(x509.BasicConstraints).value
    assert basic.ca and basic.path_length == 0
    leaf = load(pki / "server.pem").extensions.get_extension_for_class(x509.BasicConstraints)
    assert not leaf.value.ca


def test_default_hosts_are_localhost_and_127_0_0_1(tmp_path: Path) -> None:
    assert gen_cert(tmp_path).returncode == 0
    san = load(tmp_path / "server.pem").extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert san.value.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.value.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]


def test_rewriting_replaces_files_and_narrows_a_wider_key_mode(tmp_path: Path) -> None:
    (tmp_path / "server-key.pem").write_text("old")
    (tmp_path / "server-key.pem").chmod(0o644)
    assert gen_cert(tmp_path, force=True).returncode == 0
    key = tmp_path / "server-key.pem"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


def test_a_symlink_in_the_way_is_replaced_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("keep me")
    out = tmp_path / "out"
    out.mkdir()
    (out / "server-key.pem").symlink_to(target)
    assert gen_cert(out, force=True).returncode == 0
    assert target.read_text() == "keep me"
    assert not (out / "server-key.pem").is_symlink()


@pytest.mark.parametrize("host", ["bad_name", "-x.example", "a..b", "café.example", ""])
def test_bad_host_is_exit_2_and_writes_nothing(tmp_path: Path, host: str) -> None:
    result = gen_cert(tmp_path / "out", host)
    assert result.returncode == 2
    assert "--host" in result.stderr
    assert not (tmp_path / "out").exists()


def test_unwritable_folder_is_exit_1(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    result = gen_cert(tmp_path / "file" / "sub")
    assert result.returncode == 1 and "cannot write" in result.stderr


def test_existing_files_are_kept_without_force_exit_2_naming_them(tmp_path: Path) -> None:
    (tmp_path / "server-key.pem").write_text("precious")
    (tmp_path / "ca.pem").symlink_to(tmp_path / "dangling")  # a dangling link is in the way too
    result = gen_cert(tmp_path)
    assert result.returncode == 2
    assert str(tmp_path / "server-key.pem") in result.stderr
    assert str(tmp_path / "ca.pem") in result.stderr and "--force" in result.stderr
    assert str(tmp_path / "server.pem") not in result.stderr  # only what is in the way
    assert (tmp_path / "server-key.pem").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca.pem", "server-key.pem"]
    assert result.stdout == ""


def test_printed_tls_block_serves_what_was_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The block, pasted into ``sidecar`` as printed, is a config check-config accepts,
    with absolute paths to the new files (run from another folder than the config's)."""
    out = tmp_path / "pki"
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "gen-cert", "--out", "pki"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    block = result.stdout.split("\n\n", 1)[1]
    elsewhere = tmp_path / "etc"
    elsewhere.mkdir()
    config = elsewhere / "config.json5"
    config.write_text(
        "{webhooks: {secret: {env: 'S'}, agents: {a: {}}},\n"
        f"sidecar: {{listen: '127.0.0.1:0', upstream: {{socket: '/run/x.sock'}},\n{block}\n}}}}"
    )
    check = subprocess.run(
        [sys.executable, "-m", "sidecar", "check-config", "-c", str(config)],
        capture_output=True, text=True, timeout=60, env={**os.environ, "S": SECRET},
    )  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    monkeypatch.setenv("S", SECRET)
    settings = load_config(config)
    assert settings.sidecar.tls is not None
    assert settings.sidecar.tls.cert_file == out / "server.pem"
    assert settings.sidecar.tls.client_ca_file == out / "ca.pem"
