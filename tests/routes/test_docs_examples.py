"""Every route example in docs/routes.md loads as written (with its secrets supplied)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import json5
import pytest
from support.common import AGENT, SECRET
from support.senders import BEARER_TOKEN, GH_SECRET, SW_SECRET

from sidecar.config.parser import loads

DOC = Path(__file__).resolve().parents[2] / "docs" / "routes.md"
BLOCKS = re.findall(r"```json5\n(\"[\w-]+\": \{.*?\n\},)\n```", DOC.read_text(), re.S)


def test_the_page_has_the_examples() -> None:
    assert len(BLOCKS) >= 9


@pytest.mark.parametrize("block", BLOCKS, ids=[b.split('"')[1] for b in BLOCKS])
def test_route_example_loads(block: str) -> None:
    name, spec = next(iter(json5.loads("{" + block + "}").items()))
    secret = SW_SECRET if spec["verify"] == "standard-webhooks" else GH_SECRET
    if spec["verify"] == "bearer":
        secret = BEARER_TOKEN
    spec["secrets"] = [{"id": "s1", "value": secret}]
    agents: dict[str, dict[str, Any]] = {AGENT: {}, spec["agent"]: {}}
    doc = {"webhooks": {"secret": SECRET, "agents": agents, "routes": {name: spec}}}
    settings = loads(json5.dumps(doc))
    assert settings.webhooks.routes[f"/hooks/{name}"].agent == spec["agent"]


def test_the_full_example_loads() -> None:
    text = DOC.read_text()
    full = re.search(r"```json5\n(\{\n  webhooks:.*?\n\})\n```", text, re.S)
    assert full is not None
    doc = json5.loads(full.group(1))
    doc["webhooks"]["secret"] = SECRET
    doc["webhooks"]["routes"]["github"]["secrets"] = [{"id": "g", "value": GH_SECRET}]
    routes = loads(json5.dumps(doc)).webhooks.routes
    assert routes["/hooks/github"].dedup == 86400.0
