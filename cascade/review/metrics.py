"""Prometheus metrics of the review app: counters of what it moved, and the stats view's figures.

The figures come from the store at scrape time (a custom collector), so every replica reports
the same shared queue; aggregate them with `max`, not `sum`.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from cascade.review.store import ReviewStore

REGISTRY = CollectorRegistry()
CONSUMED = Counter(
    "cascade_review_consumed_total", "Records the review app stored, by topic.", ["topic"], registry=REGISTRY
)
DEAD_LETTERS = Counter(
    "cascade_review_dead_letters_total",
    "Records the review app dead-lettered (e.g. appeals of unknown items).",
    registry=REGISTRY,
)
PUBLISHED = Counter(
    "cascade_review_published_total",
    "Decisions published to the topics, by decision.",
    ["decision"],
    registry=REGISTRY,
)


class StoreCollector(Collector):
    def __init__(self, store: ReviewStore) -> None:
        self.store = store

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        stats = self.store.stats()
        depth = GaugeMetricFamily("cascade_review_queue_depth", "Open review tasks, by kind.", labels=["kind"])
        for kind in ("review", "appeal"):
            depth.add_metric([kind], stats.open_tasks.get(kind, 0))
        yield depth
        yield GaugeMetricFamily("cascade_review_claimed_tasks", "Open tasks under a live claim.", value=stats.claimed)
        yield GaugeMetricFamily(
            "cascade_review_oldest_task_age_seconds",
            "Age of the oldest open task (0 when none).",
            value=stats.oldest_open_age_s or 0.0,
        )
        decisions = CounterMetricFamily(
            "cascade_review_decisions",
            "Decisions in the store, by reviewer and decision.",
            labels=["reviewer", "decision"],
        )
        for reviewer, counts in sorted(stats.decisions_by_reviewer.items()):
            for decision, count in sorted(counts.items()):
                decisions.add_metric([reviewer, decision], count)
        yield decisions
        yield CounterMetricFamily("cascade_review_appeals_decided", "Appeals decided.", value=stats.appeals_decided)
        yield CounterMetricFamily("cascade_review_appeals_overturned", "Appeals overturned.", value=stats.overturned)
        if stats.overturn_rate is not None:
            yield GaugeMetricFamily(
                "cascade_review_overturn_ratio", "Overturned appeals / decided appeals.", value=stats.overturn_rate
            )
        yield GaugeMetricFamily(
            "cascade_review_unpublished_decisions", "Decisions not yet on the topics.", value=stats.unpublished
        )
        agreement = GaugeMetricFamily(
            "cascade_review_stage_agreement_ratio",
            "Share of decided items where the stage's lean matched the reviewer.",
            labels=["stage"],
        )
        precision = GaugeMetricFamily(
            "cascade_review_stage_precision",
            "Of items a stage scored >= 0.5, the share reviewers blocked.",
            labels=["stage"],
        )
        for stage in stats.stages:
            if stage.agreement is not None:
                agreement.add_metric([stage.stage], stage.agreement)
            if stage.precision is not None:
                precision.add_metric([stage.stage], stage.precision)
        yield agreement
        yield precision


def exposition(store: ReviewStore) -> bytes:
    """The /metrics body: this process's counters and the store's figures."""
    registry = CollectorRegistry()
    registry.register(StoreCollector(store))
    return generate_latest(REGISTRY) + generate_latest(registry)
