"""Routes vs the seed's bearer call, side by side in one run (docs/routes.md).

Starts the fast runtime (bench/runtime.py) on a Unix socket and one sidecar with a
GitHub route, every guard on (allowIps, per-IP and global rate limits, lockout,
maxConcurrent, `when`, message and sessionKey templates), pinned to one core; wrk
runs on another. In alternation, for ``--rounds`` rounds of ``--duration`` s each:

- ``route``: a signed GitHub push delivery of ~60 KiB to ``/hooks/github``;
- ``bearer``: a ``/hooks/agent`` call with a Bearer token and a body of the same size.

It reports requests/s of each (median of the rounds), the ratio route/bearer (target
>= 0.9), and the cost of the signature check alone on a 64 KiB body (timeit of the
GitHub profile's ``verify``, next to a bare ``hmac.digest`` of the same bytes).

    python bench/routes_bench.py [--rounds 3] [--duration 5] [--server-cpu 0] [--client-cpu 1]
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
import urllib.request
from pathlib import Path

from multidict import CIMultiDict

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

from sidecar.routes import github  # noqa: E402
from sidecar.routes.base import Key  # noqa: E402
from sidecar.secrets import Secret, SecretSource  # noqa: E402

SECRET = "8f3a1c2e9b7d4f6a0c5e8b1d3f7a9c2e4b6d8f0a1c3e5b7d9f2a4c6e8b0d1f3a"
ROUTE_SECRET = "3c9e1a7f5b2d8e4a6c0f9b1d7e3a5c8f2b4d6e8a0c1e3f5a7b9d2c4e6f8a0b1d"
SIZE = 60_000  # under the default maxBodyBytes (65536)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def github_body(size: int) -> bytes:
    """A push delivery in GitHub's format: a repository object with its ~90 fields, the
    20 commits GitHub puts in a push payload at most, their messages long enough for the
    body to be about ``size`` bytes."""
    api = "https://api.github.com/repos/acme/api"
    repository: dict[str, object] = {"id": 186853002, "name": "api", "full_name": "acme/api"}
    for name in ("archive", "assignees", "blobs", "branches", "collaborators", "comments",
                 "commits", "compare", "contents", "contributors", "deployments", "downloads",
                 "events", "forks", "git_commits", "git_refs", "git_tags", "hooks", "issue_events",
                 "issues", "keys", "labels", "languages", "merges", "milestones", "notifications",
                 "pulls", "releases", "stargazers", "statuses", "subscribers", "subscription",
                 "tags", "teams", "trees"):  # fmt: skip
        repository[f"{name}_url"] = f"{api}/{name}{{/sha}}"
    for flag in ("private", "fork", "has_issues", "has_projects", "has_wiki", "has_pages",
                 "archived", "disabled", "is_template", "allow_forking"):  # fmt: skip
        repository[flag] = False
    for count in ("size", "stargazers_count", "watchers_count", "forks_count",
                  "open_issues_count", "forks", "open_issues", "watchers"):  # fmt: skip
        repository[count] = 42
    repository["owner"] = {"name": "acme", "login": "acme", "id": 1, "type": "Organization",
                           "html_url": "https://github.com/acme", "site_admin": False}  # fmt: skip
    repository["topics"] = ["api", "python", "webhooks"]
    repository["default_branch"] = "main"

    def commit(i: int, message: str) -> dict[str, object]:
        return {
            "id": f"{i:040x}", "tree_id": f"{i + 7:040x}", "distinct": True,
            "message": message, "timestamp": "2026-11-02T10:15:00Z",
            "url": f"https://github.com/acme/api/commit/{i:040x}",
            "author": {"name": "Mona Lisa Octocat", "email": "octocat@github.com",
                       "username": "octocat"},
            "committer": {"name": "GitHub", "email": "noreply@github.com", "username": "web-flow"},
            "added": [], "removed": [], "modified": ["deploy/run.sh", "README.md"],
        }  # fmt: skip

    push: dict[str, object] = {
        "ref": "refs/heads/main", "before": "0" * 40, "after": "1" * 40,
        "repository": repository, "pusher": {"name": "octocat", "email": "octocat@github.com"},
        "sender": {"login": "octocat", "id": 1, "type": "User", "site_admin": False},
        "created": False, "deleted": False, "forced": False, "base_ref": None,
        "compare": "https://github.com/acme/api/compare/000000000000...111111111111",
    }  # fmt: skip
    base = len(json.dumps({**push, "commits": [commit(i, "") for i in range(20)],
                           "head_commit": commit(19, "")}, separators=(",", ":")))  # fmt: skip
    words = "Make the deploy step idempotent so a retried job does not double-apply. "
    text = (words * (1 + (size - base) // 21 // len(words)))[: max(0, (size - base) // 21)]
    push["commits"] = [commit(i, text) for i in range(20)]
    push["head_commit"] = commit(19, text)
    return json.dumps(push, separators=(",", ":")).encode()


def bearer_body(size: int) -> bytes:
    body = {"agent": "my-agent", "message": ""}
    body["message"] = "x" * (size - len(json.dumps(body, separators=(",", ":"))))
    return json.dumps(body, separators=(",", ":")).encode()


def config(tmp: Path, sock: Path, listen: int, admin: int) -> Path:
    doc = {
        "webhooks": {
            "secret": SECRET,
            "agents": {
                "my-agent": {
                    "sessionKey": "s",
                    "maxConcurrent": 1000,
                    "sessionKeyPrefixes": ["gh-"],
                }
            },
            "routes": {
                "github": {
                    "verify": "github",
                    "secrets": [{"id": "gh", "value": ROUTE_SECRET}],
                    "agent": "my-agent",
                    "when": "headers['x-github-event'] == 'push' and "
                    "body.repository.full_name == 'acme/api'",
                    "message": "GitHub {{ headers['x-github-event'] }} on "
                    "{{ body.repository.full_name }}: {{ body.head_commit.message }}",
                    "sessionKey": "gh-{{ body.repository.name }}",
                    "dedup": "0s",
                }
            },
        },
        "sidecar": {
            "listen": f"127.0.0.1:{listen}",
            "admin": {"listen": f"127.0.0.1:{admin}"},
            "upstream": {"socket": str(sock)},
            "allowIps": ["127.0.0.1/32"],
            "rateLimit": {
                "perIp": {"requests": 10_000_000, "per": "1s"},
                "global": {"requests": 10_000_000, "per": "1s"},
            },
            "limits": {"maxMessageChars": 65536},
            "log": {"level": "error"},
        },
    }
    path = tmp / "config.json"
    path.write_text(json.dumps(doc))
    return path


def wait_ready(admin: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError("the sidecar did not become ready")


def wrk(args: argparse.Namespace, url: str, body_file: Path, headers: list[str]) -> dict:
    lua = str(BENCH / "wrk" / "route.lua")
    argv = ["taskset", "-c", args.client_cpu, "wrk", "-t1", "-c32", f"-d{args.duration}s",
            "-s", lua, url, "--", str(body_file), "200", *headers]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, timeout=args.duration + 30).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("BENCH_RESULT "))
    result = json.loads(line.removeprefix("BENCH_RESULT "))
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    return result


def verify_cost(size: int = 65536) -> tuple[float, float]:
    """Microseconds per GitHub signature check of ``size`` bytes, and per bare HMAC."""
    body = os.urandom(size)
    key = Key(Secret("gh", ROUTE_SECRET.encode(), SecretSource("value", "")), ROUTE_SECRET.encode())
    sig = "sha256=" + hmac.new(key.key, body, hashlib.sha256).hexdigest()
    headers = CIMultiDict({"X-Hub-Signature-256": sig, "X-GitHub-Delivery": "d-1"})
    now = time.time()
    assert github.verify(body, headers, (key,), now, 300.0).secret is not None
    n = 2000
    check = min(
        timeit.repeat(lambda: github.verify(body, headers, (key,), now, 300.0), number=n, repeat=5)
    )
    bare = min(timeit.repeat(lambda: hmac.digest(key.key, body, "sha256"), number=n, repeat=5))
    return check / n * 1e6, bare / n * 1e6


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=int, default=5)
    p.add_argument("--server-cpu", default="0")
    p.add_argument("--client-cpu", default="1")
    args = p.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is not installed", file=sys.stderr)
        return 1
    check_us, bare_us = verify_cost()
    print(f"signature check, 64 KiB body: {check_us:.1f} us (bare HMAC-SHA256: {bare_us:.1f} us)")
    tmp = Path(tempfile.mkdtemp(prefix="routes-bench-", dir="/tmp"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        sock, listen, admin = tmp / "rt.sock", free_port(), free_port()
        pin = ["taskset", "-c", args.server_cpu]
        runtime = [*pin, sys.executable, str(BENCH / "runtime.py"), "--socket", str(sock)]
        procs.append(subprocess.Popen(runtime, stderr=subprocess.DEVNULL))
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        cfg = config(tmp, sock, listen, admin)
        sidecar = [*pin, sys.executable, "-m", "sidecar", "run", "-c", str(cfg)]
        procs.append(subprocess.Popen(sidecar, env=env, stderr=subprocess.DEVNULL))
        wait_ready(admin)
        gh = github_body(SIZE)
        gh_file, bearer_file = tmp / "github.json", tmp / "agent.json"
        gh_file.write_bytes(gh)
        bearer_file.write_bytes(bearer_body(len(gh)))
        signature = "sha256=" + hmac.new(ROUTE_SECRET.encode(), gh, hashlib.sha256).hexdigest()
        scenarios = {
            "route": (f"http://127.0.0.1:{listen}/hooks/github", gh_file,
                      ["X-GitHub-Event:push", "X-GitHub-Delivery:72d3162e",
                       f"X-Hub-Signature-256:{signature}"]),
            "bearer": (f"http://127.0.0.1:{listen}/hooks/agent", bearer_file,
                       [f"Authorization:Bearer {SECRET}"]),
        }  # fmt: skip
        rps: dict[str, list[float]] = {name: [] for name in scenarios}
        for r in range(args.rounds):
            order = list(scenarios) if r % 2 == 0 else list(reversed(scenarios))
            for name in order:
                result = wrk(args, *scenarios[name])
                if result["unexpected"]:
                    print(f"{name}: unexpected statuses {result['statuses']}", file=sys.stderr)
                    return 1
                rps[name].append(result["rps"])
        route, bearer = (statistics.median(rps[n]) for n in ("route", "bearer"))
        print(f"body {len(gh)} bytes; {args.rounds} rounds of {args.duration}s, "
              f"server cpu {args.server_cpu}, wrk cpu {args.client_cpu}")  # fmt: skip
        print(f"route  (signed GitHub push, every guard): {route:8.0f} req/s  {rps['route']}")
        print(f"bearer (/hooks/agent, same size):         {bearer:8.0f} req/s  {rps['bearer']}")
        print(f"ratio route/bearer: {route / bearer:.2f}x (target >= 0.9x)")
        return 0
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
