"""An app's figures through prometheus-client (the `prometheus` extra).

The hot paths keep bumping plain integers (`metrics.py`); this collector turns them into
metric families only when it is scraped. `DreamWebSocketApp.prometheus_collector()` returns one
to register in your own registry, `<mount>/metrics` renders it from a registry of its own.
Importing this module without prometheus-client raises `ImportError`.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from .metrics import PUBLISH_DURATION, FiguresSource, cumulative_buckets, families


class DreamWsCollector(Collector):
    """Reads one app's counters at each scrape; register it with `REGISTRY.register(...)`.

    Its metric names are fixed (`dream_ws_*`): two apps' collectors in one registry collide,
    and the registry says so when the second is registered.
    """

    def __init__(self, figures: FiguresSource) -> None:
        self.figures = figures

    def collect(self) -> Iterator[Metric]:
        figures = self.figures()
        if figures is None:
            return  # its app is gone
        for family in families(figures):
            metric: CounterMetricFamily | GaugeMetricFamily
            if family.kind == "counter":
                metric = CounterMetricFamily(family.name, family.help, labels=family.labels)
            else:
                metric = GaugeMetricFamily(family.name, family.help, labels=family.labels)
            for values, value in family.samples:
                metric.add_metric(values, value)
            yield metric
        name, help_text = PUBLISH_DURATION
        seconds = figures.publishing.seconds
        histogram = HistogramMetricFamily(name, help_text, labels=())
        histogram.add_metric((), cumulative_buckets(seconds), seconds.sum)
        yield histogram

    def describe(self) -> Iterator[Metric]:
        # Names for the registry's duplicate check; reading the counters once is as cheap.
        return self.collect()


def private_registry(collector: DreamWsCollector) -> CollectorRegistry:
    """A registry with only this collector: `<mount>/metrics` shows this app's figures alone,
    not whatever else the process registered in prometheus-client's default registry."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def render(registry: CollectorRegistry) -> str:
    return generate_latest(registry).decode()
