"""Read Prometheus text the way Prometheus does: with prometheus_client's own parser."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class Scrape:
    """One scrape: families by name and every sample by (name, labels)."""

    def __init__(self, text: str) -> None:
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples: Samples = {}
        for family in self.families.values():
            for s in family.samples:
                self.samples[(s.name, frozenset(s.labels.items()))] = s.value

    @classmethod
    def of(cls, registry: CollectorRegistry) -> Scrape:
        return cls(generate_latest(registry).decode())

    def value(self, name: str, **labels: str) -> float:
        """The sample's value; KeyError when the series does not exist."""
        return self.samples[(name, frozenset(labels.items()))]

    def get(self, name: str, default: Any = None, **labels: str) -> Any:
        return self.samples.get((name, frozenset(labels.items())), default)

    def series(self, name: str) -> dict[frozenset[tuple[str, str]], float]:
        """Every series of one sample name, by its labels."""
        return {labels: v for (n, labels), v in self.samples.items() if n == name}

    def label_values(self, name: str, label: str) -> set[str]:
        return {dict(labels)[label] for labels in self.series(name)}
