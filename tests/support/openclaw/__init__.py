"""Install, configure, start and stop a REAL OpenClaw gateway for tests.

This is a helper package, not a test module. The sidecar's integration tests
(``protocol: "openclaw"``, tests/upstream/test_openclaw_integration.py) and
tests/support/test_openclaw_gateway.py use it; docs/openclaw.md records what
the real gateway does. By job:

- install.py: npm install of Node and openclaw into the cache folder (lock,
  markers, the download announcement, the skip/fail policy);
- model_stub.py: the fake OpenAI-compatible model the gateway talks to;
- gateway.py: the Gateway process (config, start, stop, token rotation) and
  what it records (HookRun, SessionRow).

Typical use, one gateway per test module::

    from support import openclaw

    @pytest.fixture(scope="module")
    def gateway():
        with openclaw.gateway_for_tests() as gw:   # skip/fail policy built in
            yield gw

    async def test_x(gateway):
        async with aiohttp.ClientSession() as s:
            r = await s.post(gateway.url + "/hooks/agent",
                             headers=gateway.auth_headers(), json={...})
        run = gateway.wait_for_hook_run(run_id)          # from the gateway's log
        assert run.logical_session_key == "hook:x"
        req = gateway.model.wait_for("the message text")  # what the model was sent

Only the standard library is used here (plus pytest, imported lazily), so the
helper works from sync fixtures of any scope and from any event loop.
"""

from support.openclaw.gateway import (
    MARKER_ENV,
    Gateway,
    GatewayStartError,
    HookRun,
    SessionRow,
    gateway_for_tests,
    marked_pids,
)
from support.openclaw.install import (
    CACHE_ENV,
    NODE_VERSION,
    OPENCLAW_VERSION,
    SKIP_ENV,
    GatewayInstall,
    GatewayInstallError,
    GatewayUnavailable,
    announce,
    default_cache_dir,
    ensure_installed,
    require_install,
)
from support.openclaw.model_stub import ModelRequest, ModelStub

__all__ = [
    "CACHE_ENV",
    "MARKER_ENV",
    "NODE_VERSION",
    "OPENCLAW_VERSION",
    "SKIP_ENV",
    "Gateway",
    "GatewayInstall",
    "GatewayInstallError",
    "GatewayStartError",
    "GatewayUnavailable",
    "HookRun",
    "ModelRequest",
    "ModelStub",
    "SessionRow",
    "announce",
    "default_cache_dir",
    "ensure_installed",
    "gateway_for_tests",
    "marked_pids",
    "require_install",
]
