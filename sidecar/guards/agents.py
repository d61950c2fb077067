"""Agent lookup, secret scope and session-key policy — only after authentication.

404 ``agent_not_found`` is answered only to authenticated callers, so the agent
list is not an oracle. A secret scoped with ``agents`` may trigger only those
(403 ``agent_not_permitted``). A requested ``sessionKey`` is used only when the
agent allows request keys and, if ``sessionKeyPrefixes`` is set, it starts with
one of them; otherwise 403 ``session_key_not_allowed`` — never a silent
fallback to the default session.
"""

from __future__ import annotations

from ..call import Call, Guard, Reject
from ..settings import Agent, Settings


def agent_lookup(settings: Settings) -> Guard:
    """Sets ``call.agent``; 404 for unknown agents, 403 outside the secret's scope."""
    agents = settings.webhooks.agents

    def guard(call: Call) -> None:
        name = call.body["agent"]
        agent = agents.get(name)
        if agent is None:
            raise Reject(404, "agent_not_found", f"no agent named {name!r} is configured")
        secret = call.secret
        if secret is not None and not secret.permits(name):
            raise Reject(
                403,
                "agent_not_permitted",
                f"the token used may not trigger agent {name!r}",
            )
        call.agent = agent

    return guard


def session_key_policy(settings: Settings) -> Guard:
    """Sets ``call.session``: the requested key if the agent's policy allows it."""

    def guard(call: Call) -> None:
        agent = call.agent
        assert agent is not None
        requested = call.body.get("sessionKey")
        if requested is None:
            call.session = agent.session_key
            return
        call.session = requested_session(agent, requested)

    return guard


def requested_session(agent: Agent, requested: str) -> str:
    """``requested`` if the agent's policy allows it, else 403 ``session_key_not_allowed``
    (also for a route's rendered sessionKey, docs/routes.md)."""
    if not agent.allow_request_session_key:
        raise Reject(
            403,
            "session_key_not_allowed",
            f"agent {agent.name!r} does not accept a sessionKey from the request",
        )
    prefixes = agent.session_key_prefixes
    if prefixes and not requested.startswith(prefixes):
        raise Reject(
            403,
            "session_key_not_allowed",
            f"agent {agent.name!r} accepts only session keys starting with "
            + ", ".join(repr(p) for p in prefixes),
        )
    return requested
