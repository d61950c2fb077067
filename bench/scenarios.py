"""What is measured: the scenarios (a load on a target, what it must answer and
which ratios it enters), the order they run in, --only/--skip, and one
measured Run. The sidecar variants and their loads are declared in
bench/configs.py (SIDECAR_VARIANTS); the other targets' scenarios are the
lists in all_scenarios() here, their ratios BASE_RATIOS.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import configs

SIDECAR_TARGETS = tuple(configs.SIDECAR_VARIANTS)


@dataclass
class Scenario:
    name: str
    target: str
    kind: str  # "wrk" | "rate"
    good_token: bool
    expect: configs.Expect = configs.OK
    # The ratios it enters as the numerator: (denominator scenario, goal or None).
    vs: tuple[tuple[str, float | None], ...] = ()

    @property
    def forwards(self) -> bool:
        """Its calls must reach the runtime (and carry BODY); the others must not
        (and carry BODY_REFUSED, which the runtime counts)."""
        return self.expect.status == 200


# Ratios between targets that are not sidecar variants (those are in configs.py).
# floor401-refuse/nginx is the ceiling of any aiohttp server on this core: a bare
# handler answering 401 to a request it does not read, against nginx's whole valid
# call (proxying to the runtime included). Below 0.75, no aiohttp-based proxy can
# reach issue 8's sidecar/nginx goal, whatever its guards cost.
BASE_RATIOS = (
    ("nginx", "direct", None),
    ("nginx-refuse", "floor401-refuse", None),
    ("floor401-refuse", "nginx", None),
)


def all_scenarios() -> tuple[list[Scenario], list[Scenario]]:
    unauthorized = configs.UNAUTHORIZED_401
    thr = [
        Scenario("direct", "direct", "wrk", True),
        Scenario("floor401-refuse", "floor401", "wrk", False, unauthorized),
        Scenario("nginx", "nginx", "wrk", True),
        Scenario("nginx-refuse", "nginx", "wrk", False, unauthorized),
    ]
    lat = [Scenario("lat-direct", "direct", "rate", True)]
    for name, v in configs.SIDECAR_VARIANTS.items():
        for ld in v.loads:
            good = ld.token == "good"
            thr.append(Scenario(name + ld.suffix, name, "wrk", good, ld.expect, ld.vs))
    # nginx's latency right after the default sidecar's, as before.
    lat_names = [n for n, v in configs.SIDECAR_VARIANTS.items() if v.latency]
    lat += [Scenario(f"lat-{n}", n, "rate", True) for n in lat_names[:1]]
    lat.append(Scenario("lat-nginx", "nginx", "rate", True))
    lat += [Scenario(f"lat-{n}", n, "rate", True) for n in lat_names[1:]]
    return thr, lat


def select(scns: list[Scenario], only: list[str] | None, skip: list[str]) -> list[Scenario]:
    out = []
    for s in scns:
        keys = {s.name, s.target, "latency" if s.kind == "rate" else "throughput"}
        if only and not keys & set(only):
            continue
        if keys & set(skip):
            continue
        out.append(s)
    return out


@dataclass
class Run:
    scenario: str
    round: int
    data: dict[str, Any] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)  # wrong answers: the figures are suspect
    noise: list[str] = field(default_factory=list)  # measured under interference
