"""``webhook-sidecar``: commands -> settings -> run (docs/cli.md).

Exit codes: 0 success (also after a SIGTERM drain); 2 bad config, missing or
unreadable config file, bad arguments, or ``check-config --strict`` with
warnings; 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

from . import __version__, config
from .secrets import generate_secret

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2
CONFIG_ENV = "WEBHOOK_SIDECAR_CONFIG"


def version() -> str:
    """The installed distribution's version; the package's own when run from a checkout."""
    try:
        return metadata.version("webhook-sidecar")
    except metadata.PackageNotFoundError:
        return __version__


def _config_path(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Path:
    value = args.config or os.environ.get(CONFIG_ENV)
    if not value:
        parser.error(f"the config file is required: -c FILE or env {CONFIG_ENV}")
    return Path(value)


def cmd_run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .process.main import run

    return run(_config_path(args, parser))


def cmd_worker(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .process.workers import run_worker

    return run_worker(Path(args.config), args.index, args.port, args.admin_socket, args.supervisor)


def cmd_check_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    path = _config_path(args, parser)
    try:
        settings = config.load(path)
    except config.ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {problem}")
        return EXIT_CONFIG
    warnings = config.security_warnings(settings)
    for warning in warnings:
        print(f"warning: {warning}")
    if warnings and args.strict:
        return EXIT_CONFIG
    print(f"{path}: valid" + (f", {len(warnings)} warning(s)" if warnings else ""))
    return EXIT_OK


def cmd_gen_secret(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    print(generate_secret())
    return EXIT_OK


def cmd_gen_cert(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .certs import PKI_FILES, write_demo_pki

    out = Path(args.out).absolute()
    taken = [out / name for name in PKI_FILES if os.path.lexists(out / name)]
    if taken and not args.force:
        names = ", ".join(str(p) for p in taken)
        print(f"gen-cert: refusing to overwrite {names}; pass --force to replace them",
              file=sys.stderr)  # fmt: skip
        return EXIT_CONFIG
    try:
        written = write_demo_pki(out, args.host or ["localhost", "127.0.0.1"])
    except OSError as exc:
        print(f"gen-cert: cannot write to {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILURE
    except ValueError as exc:  # a --host that is neither a DNS name nor an address
        print(f"gen-cert: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    for path in written:
        print(path)
    print()
    print(tls_block(out))
    return EXIT_OK


def tls_block(out: Path) -> str:
    """The ``sidecar.tls`` block (JSON5) that serves what gen-cert wrote into ``out``."""

    def path(name: str) -> str:
        return json.dumps(str(out / name))

    return "\n".join([
        "// Paste into the config's `sidecar` block (docs/configuration.md):",
        "tls: {",
        f"  certFile: {path('server.pem')},",
        f"  keyFile: {path('server-key.pem')},",
        "  // mTLS: callers must present a certificate signed by this CA (client.pem and",
        "  // client-key.pem are one). Remove this line for TLS without client certificates.",
        f"  clientCaFile: {path('ca.pem')},",
        "},",
    ])  # fmt: skip


def cmd_unlock(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .unlock import run

    return run(_config_path(args, parser), args.address)


def cmd_dev_runtime(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .devruntime import run

    return run(args.socket)


def cmd_demo(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .demo import run

    return run(args.port)


def cmd_spool(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .spool.cli import run

    return run(args, _config_path(args, parser))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="webhook-sidecar",
        description="Security sidecar in front of AI agent runtimes: authenticates, "
        "filters and rate-limits webhook calls, then forwards them to the runtime.",
    )
    parser.add_argument("--version", action="version", version=f"webhook-sidecar {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str, func: object) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        return p

    p = add("run", "serve the hooks", cmd_run)
    p.add_argument("-c", "--config", help=f"config file (JSON5); default: env {CONFIG_ENV}")
    p = add("check-config", "validate a config and print security warnings", cmd_check_config)
    p.add_argument("-c", "--config", help=f"config file (JSON5); default: env {CONFIG_ENV}")
    p.add_argument("--strict", action="store_true", help="fail (exit 2) on warnings too")
    add("gen-secret", "print a fresh random secret (64 hex characters)", cmd_gen_secret)
    p = add("gen-cert", "write a throwaway CA, server and client certificates", cmd_gen_cert)
    p.add_argument("--out", required=True, help="folder to write the PEM files to")
    p.add_argument("--host", action="append", help="name or address the server certificate covers")
    p.add_argument("--force", action="store_true", help="replace files that already exist")
    p = add("unlock", "release an address from the auth lockout (via the admin listener)",
            cmd_unlock)  # fmt: skip
    p.add_argument("-c", "--config", help=f"config file (JSON5); default: env {CONFIG_ENV}")
    p.add_argument("address", help="the locked address, as the lockout's log line names it")
    p = add("demo", "run the reference runtime and the sidecar with a fresh secret", cmd_demo)
    p.add_argument("--port", type=int, default=8080, help="public port (default 8080)")
    p = add("dev-runtime", "run the reference runtime alone on a Unix socket", cmd_dev_runtime)
    p.add_argument("--socket", required=True, help="Unix socket path to listen on")
    from .spool.cli import register

    register(sub, f"config file (JSON5); default: env {CONFIG_ENV}")
    sub.choices["spool"].set_defaults(func=cmd_spool)
    # Internal, not listed: one worker process of `run` with sidecar.workers > 1.
    p = sub.add_parser("_worker")
    p.set_defaults(func=cmd_worker)
    p.add_argument("-c", "--config", required=True)
    for option in ("--index", "--port", "--supervisor"):
        p.add_argument(option, type=int, required=True)
    p.add_argument("--admin-socket", required=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args, parser))
    except KeyboardInterrupt:
        return EXIT_OK
