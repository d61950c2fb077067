"""GitLab deliveries: the ``X-Gitlab-Token`` compared with every route secret; the delivery
id from ``Idempotency-Key``, else ``X-Gitlab-Event-UUID``."""

from __future__ import annotations

from typing import Any

from support.common import Runtime
from support.senders import GITLAB_PUSH, GITLAB_TOKEN, deliver, encode, route, route_doc

PATH = "/hooks/gitlab"
BODY = encode(GITLAB_PUSH)
UUID = "dd7e1a9f-0a2b-4c3d-8e4f-5a6b7c8d9e0f"


def gitlab_headers(token: str = GITLAB_TOKEN, **more: str) -> dict[str, str]:
    return {
        "X-Gitlab-Event": "Push Hook",
        "X-Gitlab-Event-UUID": UUID,
        "X-Gitlab-Token": token,
        **more,
    }


async def gitlab_sidecar(make_sidecar: Any, runtime: Runtime) -> Any:
    spec = route(
        "gitlab",
        GITLAB_TOKEN,
        when="headers['x-gitlab-event'] == 'Push Hook'",
        message="{{ body.user_username }} pushed to {{ body.project.path_with_namespace }}"
        " ({{ headers['x-gitlab-token'] }})",
    )
    return await make_sidecar(route_doc(runtime.path, {"gitlab": spec}))


async def test_the_token_opens_the_route(make_sidecar: Any, runtime: Runtime) -> None:
    sc = await gitlab_sidecar(make_sidecar, runtime)
    status, _, reply = await deliver(sc, PATH, BODY, gitlab_headers())
    assert status == 200, reply
    [call] = runtime.calls
    # the token header is never shown to templates
    assert call["message"] == "jsmith pushed to acme/api ()"
    assert call["idempotencyKey"] == f"gitlab:{UUID}"


async def test_idempotency_key_is_preferred(make_sidecar: Any, runtime: Runtime) -> None:
    sc = await gitlab_sidecar(make_sidecar, runtime)
    status, _, _ = await deliver(sc, PATH, BODY, gitlab_headers(**{"Idempotency-Key": "k-1"}))
    assert status == 200 and runtime.calls[0]["idempotencyKey"] == "gitlab:k-1"


async def test_wrong_missing_or_doubled_tokens(make_sidecar: Any, runtime: Runtime) -> None:
    sc = await gitlab_sidecar(make_sidecar, runtime)
    cases: list[dict[str, str] | list[tuple[str, str]]] = [
        gitlab_headers(token=GITLAB_TOKEN[:-1]),
        gitlab_headers(token=GITLAB_TOKEN + "x"),
        {k: v for k, v in gitlab_headers().items() if k != "X-Gitlab-Token"},
        [*gitlab_headers().items(), ("X-Gitlab-Token", GITLAB_TOKEN)],
    ]
    for headers in cases:
        status, _, reply = await deliver(sc, PATH, BODY, headers)
        assert (status, reply["error"]) == (401, "signature_invalid")
        assert "X-Gitlab-Token" in reply["message"] and GITLAB_TOKEN not in reply["message"]
    assert runtime.calls == []
