"""The ``webhooks.enabled`` switch: when false, authenticated hooks answer 503."""

from __future__ import annotations

from functools import partial

from ..call import Call, Guard, Reject
from ..settings import Settings

_DISABLED = partial(
    Reject, 503, "webhooks_disabled", "webhooks are disabled in the sidecar's config"
)


def webhooks_enabled(settings: Settings) -> Guard | None:
    """503 ``webhooks_disabled`` for every call; ``None`` (no guard) when hooks are on."""
    if settings.webhooks.enabled:
        return None

    def guard(call: Call) -> None:
        raise _DISABLED()

    return guard
