"""Prometheus metrics of the review app: counters of what it moved, and the stats view's figures.

The figures come from the store at scrape time, so every replica reports the same shared queue;
aggregate them with `max`, not `sum`. Queue depth and age, and the audit precision, are the
series that docs/drift.md defines (`cascade.stream.metrics`), set here from the store.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import REGISTRY as DEFAULT_REGISTRY
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from cascade.drift import AuditPrecision
from cascade.review.store import ReviewStore, Stats
from cascade.stream import metrics as stream_metrics

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


# The series of docs/drift.md (dashboards and alerts) that the review app sets.
DRIFT_SERIES = (
    "cascade_review_pending_items",
    "cascade_review_oldest_pending_seconds",
    "cascade_audit_blocks",
    "cascade_audit_block_precision",
)


class StoreCollector(Collector):
    def __init__(self, stats: Stats) -> None:
        self.stats = stats

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        stats = self.stats
        depth = GaugeMetricFamily("cascade_review_open_tasks", "Open review tasks, by kind.", labels=["kind"])
        for kind in ("review", "appeal", "audit"):
            depth.add_metric([kind], stats.open_tasks.get(kind, 0))
        yield depth
        yield GaugeMetricFamily("cascade_review_claimed_tasks", "Open tasks under a live claim.", value=stats.claimed)
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


def audit_precision(store: ReviewStore, window: int) -> AuditPrecision:
    """Precision of automatic blocks from the latest `window` decided audits (docs/drift.md)."""
    audit = AuditPrecision(size=window)
    audit.extend(store.audit_pairs(window))
    return audit


def exposition(store: ReviewStore, audit_window: int) -> bytes:
    """The /metrics body: this process's counters, the store's figures, and the drift series."""
    stats = store.stats()
    stream_metrics.export_review_queue(stats.queue_depth, stats.oldest_open_age_s or 0.0)
    stream_metrics.export_audit(audit_precision(store, audit_window))
    registry = CollectorRegistry()
    registry.register(StoreCollector(stats))
    drift = DEFAULT_REGISTRY.restricted_registry(
        [f"{name}{suffix}" for name in DRIFT_SERIES for suffix in ("", "_total")]
    )
    return generate_latest(REGISTRY) + generate_latest(registry) + generate_latest(drift)
