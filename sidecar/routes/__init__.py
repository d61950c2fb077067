"""Routes: signed senders on ``/hooks/<name>`` (docs/routes.md).

One module per provider profile, each exposing ``PROFILE`` (see :mod:`.base`);
:func:`profile_for` picks the one a route's ``verify`` names.
"""

from __future__ import annotations

from ..settings import Verify
from . import bearer, generic, github, gitlab, linear, sentry, slack, standard_webhooks, stripe
from .base import Profile

PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        github.PROFILE,
        gitlab.PROFILE,
        stripe.PROFILE,
        slack.PROFILE,
        linear.PROFILE,
        sentry.PROFILE,
        standard_webhooks.PROFILE,
        bearer.PROFILE,
    )
}


def profile_for(verify: Verify) -> Profile:
    """The profile a route's ``verify`` names (``hmac``: built from its settings)."""
    if verify.profile == "hmac":
        return generic.profile(verify)
    return PROFILES[verify.profile]
