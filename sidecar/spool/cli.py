"""``webhook-sidecar spool stats|list|show|replay|drop -c FILE`` (docs/spool.md).

Usable while the server runs: WAL mode lets these read beside it, and ``replay`` /
``drop`` are ordinary short transactions that wait their turn. Only ``show`` prints
message text; ``drop`` writes an audit line (JSON) on stderr.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sqlite3
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from .. import config
from . import queries
from .store import SpoolError, connect, counts, file_bytes, oldest_pending

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2
T = TypeVar("T")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], config_help: str) -> None:
    """Add ``spool`` and its commands to the top-level parser's subcommands."""
    spool = sub.add_parser(
        "spool", help="inspect and repair the spool", description="inspect and repair the spool"
    )
    commands = spool.add_subparsers(dest="spool_command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        p = commands.add_parser(name, help=help_text, description=help_text)
        p.add_argument("-c", "--config", help=config_help)
        return p

    p = add("stats", "pending and dead events, oldest pending age, size on disk")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p = add("list", "events, oldest first, without their message text")
    p.add_argument("--dead", action="store_true", help="the dead letters instead of pending")
    p.add_argument("--limit", type=int, default=100, help="at most N events (default 100)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p = add("show", "one event in full, message text included")
    p.add_argument("id", help="the event's id (eventId)")
    p = add("replay", "dead letters back to pending, attempts reset")
    p.add_argument("ids", nargs="*", metavar="ID")
    p.add_argument("--all-dead", action="store_true", help="every dead letter")
    p = add("drop", "delete events for good (audit-logged)")
    p.add_argument("ids", nargs="+", metavar="ID")


def run(args: argparse.Namespace, config_path: Path) -> int:
    try:
        settings = config.load(config_path)
    except config.ConfigError as exc:
        for problem in exc.problems:
            print(f"config error: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    spool = settings.sidecar.spool
    if spool is None:
        print(f"{config_path}: sidecar.spool is not configured", file=sys.stderr)
        return EXIT_CONFIG
    command = args.spool_command
    if command == "replay" and bool(args.ids) == bool(args.all_dead):
        print("spool replay: give event ids or --all-dead (not both)", file=sys.stderr)
        return EXIT_CONFIG
    try:
        conn = connect(spool.path, readonly=command in ("stats", "list", "show"))
    except SpoolError as exc:
        print(f"spool error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        return _COMMANDS[command](args, conn, spool.path)
    except sqlite3.Error as exc:
        print(f"spool error: {spool.path}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        conn.close()


def _stats(args: argparse.Namespace, conn: sqlite3.Connection, path: Path) -> int:
    pending, dead = counts(conn)
    oldest = oldest_pending(conn)
    age = None if oldest is None else round(max(0.0, time.time() - oldest), 3)
    stats = {"pending": pending, "dead": dead, "oldestPendingAgeSeconds": age}
    stats["bytes"] = file_bytes(path)
    if args.json:
        print(json.dumps(stats))
    else:
        print(f"pending: {pending}")
        print(f"dead: {dead}")
        print(f"oldest pending: {'-' if age is None else f'{age:.1f}s ago'}")
        print(f"on disk: {stats['bytes']} bytes ({path})")
    return EXIT_OK


def _list(args: argparse.Namespace, conn: sqlite3.Connection, path: Path) -> int:
    events = queries.listing(conn, args.dead, max(0, args.limit))
    if args.json:
        for event in events:
            print(json.dumps(event))
        return EXIT_OK
    header = ("ID", "STATE", "ENDPOINT", "AGENT", "SESSION", "ATTEMPTS", "AGE", "LAST ERROR")
    rows: list[tuple[str, ...]] = [header]
    for e in events:
        error = "-" if e["lastError"] is None else f"{e['lastStatus'] or ''} {e['lastError']}"
        where = f"route:{e['route']}" if e["endpoint"] == "route" else e["endpoint"]
        cells = (e["id"], e["state"], where, e["agent"], e["sessionKey"], e["attempts"])
        rows.append((*map(str, cells), f"{e['ageSeconds']:.0f}s", error.strip()))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    for row in rows:  # aligned columns; the last one (the error) as long as it is
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)), row[-1])
    return EXIT_OK


def _show(args: argparse.Namespace, conn: sqlite3.Connection, path: Path) -> int:
    event = queries.one(conn, args.id)
    if event is None:
        print(f"spool show: no event {args.id!r} in {path}", file=sys.stderr)
        return EXIT_FAILURE
    print(json.dumps(event, indent=2, ensure_ascii=False))
    return EXIT_OK


def _write(conn: sqlite3.Connection, op: Callable[[sqlite3.Connection], T]) -> T:
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = op(conn)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return result


def _replay(args: argparse.Namespace, conn: sqlite3.Connection, path: Path) -> int:
    ids = None if args.all_dead else list(args.ids)
    changed = _write(conn, queries.replay(ids))
    print(f"replayed {changed} event(s)")
    if ids is not None and changed < len(ids):
        print("some ids are not dead letters in this spool", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def _drop(args: argparse.Namespace, conn: sqlite3.Connection, path: Path) -> int:
    dropped = _write(conn, queries.drop(list(args.ids)))
    audit = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "level": "warning",
        "message": "spool events dropped",
        "action": "spool_drop",
        "spool": str(path),
        "ids": dropped,
        "user": _user(),
        "pid": os.getpid(),
    }
    print(json.dumps(audit), file=sys.stderr)
    print(f"dropped {len(dropped)} event(s)")
    missing = [i for i in args.ids if i not in dropped]
    if missing:
        print(f"not in the spool: {' '.join(missing)}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


_COMMANDS: dict[str, Callable[[argparse.Namespace, sqlite3.Connection, Path], int]] = {
    "stats": _stats,
    "list": _list,
    "show": _show,
    "replay": _replay,
    "drop": _drop,
}
