"""Prometheus metrics of a stage worker (served on `/metrics` by `cascade.stream.health`).

Rates are left to PromQL, e.g. the share of items that reach the LLM:
`sum(rate(cascade_stage_items_total{stage="llm"}[5m])) / sum(rate(cascade_stage_items_total{stage="hash"}[5m]))`.
The drift figures (`cascade_drift_*`, `cascade_reference_*`, `cascade_audit_*`) are described in
docs/drift.md; k8s/base/monitoring/ holds the dashboard and the alerts built on these names.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterator, Sequence

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from cascade.contract import DeadLetter, Verdict
from cascade.drift import AuditPrecision, DriftMonitor, Reference, SurfaceLimit
from cascade.llm.resilience import BreakerState, CircuitBreaker, RollingBudget
from cascade.repeats import RepeatCache, is_repeat
from cascade.settings import Settings
from cascade.stages.base import ItemContext, Stage
from cascade.thresholds import ThresholdSet

VERDICTS = Counter(
    "cascade_verdicts_total",
    "Verdicts the broker acknowledged, by decision and the stage that settled the item.",
    ["decision", "decided_by"],
)
STAGE_ITEMS = Counter(
    "cascade_stage_items_total",
    "Items a stage handled, by what it did (allow, block, escalate, review).",
    ["stage", "result"],
)
STAGE_ERRORS = Counter("cascade_stage_errors_total", "Items a stage could not judge (they escalated).", ["stage"])
STAGE_COST = Counter("cascade_stage_cost_usd_total", "Spend reported by a stage (the LLM's API cost).", ["stage"])
STAGE_SECONDS = Histogram(
    "cascade_stage_batch_seconds",
    "Wall time of one stage over one batch.",
    ["stage"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
BATCH_SIZE = Histogram(
    "cascade_stage_batch_size",
    "Items per batch a stage agent took.",
    ["stage"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
DEAD_LETTERS = Counter("cascade_dead_letters_total", "Dead letters the broker acknowledged.", ["stage", "error_code"])
REFUSED_OUTPUTS = Counter(
    "cascade_refused_outputs_total",
    "Outputs the broker refused for good (size, topic, authorization), dead-lettered instead.",
    ["stage", "error_code"],
)
IN_FLIGHT = Gauge("cascade_stage_batches_in_flight", "Batches being processed or delivered.", ["stage"])
DELIVERY_RETRIES = Counter(
    "cascade_delivery_retries_total", "Failed attempts to produce a batch's output (retried).", ["stage"]
)
QUARANTINES = Counter(
    "cascade_bank_quarantines_total",
    "Bank entries a stage's flood guard quarantined (reported in the trace as newly_quarantined).",
    ["stage"],
)
FALLBACKS = Counter(
    "cascade_stage_item_fallbacks_total", "Batches the cascade raised on, retried item by item.", ["stage"]
)


REPEAT_VERDICTS = Counter(
    "cascade_repeat_verdicts_total",
    "Verdicts re-issued from the repeat cache (cascade.repeats), by decision and the stage that first decided.",
    ["decision", "decided_by"],
)

SURFACE_VERDICTS = Counter(
    "cascade_surface_verdicts_total",
    "Verdicts of items that carry a surface, by surface, decision and deciding stage.",
    ["surface", "decision", "decided_by"],
)

# Drift against the threshold file's calibration-time reference (cascade.drift): DriftCollector below.
REFERENCE_STAGE_SHARE = Gauge(
    "cascade_reference_stage_share",
    "Calibration reference: share of the items reaching a stage by what it did.",
    ["stage", "result"],
)
REFERENCE_DECIDED_SHARE = Gauge(
    "cascade_reference_decided_share", "Calibration reference: share of all items decided by a stage.", ["stage"]
)
REFERENCE_DECISION_SHARE = Gauge(
    "cascade_reference_decision_share", "Calibration reference: share of all items per decision.", ["decision"]
)
REFERENCE_RATE = Gauge("cascade_reference_rate", "Calibration reference: LLM rate and review rate.", ["rate"])

# Precision of automatic blocks from audited items (cascade.drift.AuditPrecision).
AUDIT_SENT = Counter("cascade_audit_sent_total", "Automatic verdicts also sent to review as audits.", ["decision"])
AUDIT_PRECISION = Gauge(
    "cascade_audit_block_precision",
    "Precision of automatic blocks among audited items reviewers decided: estimate and interval bounds.",
    ["bound"],
)
AUDIT_BLOCKS = Gauge("cascade_audit_blocks", "Audited automatic blocks with a reviewer's decision, in the window.")
AUDIT_TARGET = Gauge(
    "cascade_audit_block_precision_target", "The block precision the threshold file certified (its target)."
)

# Set by the review app (docs/drift.md): the oldest item waiting for a reviewer.
REVIEW_OLDEST = Gauge(
    "cascade_review_oldest_pending_seconds", "Age of the oldest item in the review queue (review and audit items)."
)
REVIEW_PENDING = Gauge("cascade_review_pending_items", "Items waiting in the review queue.")

log = logging.getLogger(__name__)
_drift: DriftMonitor | None = None
_surfaces = SurfaceLimit(Settings.model_fields["drift_max_surfaces"].default)  # start_drift sets the configured one


class GuardCollector(Collector):
    """The LLM guards' state, read at scrape time from the stages that have them (cascade.llm.resilience)."""

    def __init__(self, stages: Sequence[Stage]) -> None:
        self.stages = list(stages)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        breaker = GaugeMetricFamily(
            "cascade_llm_breaker_open",
            "1 while a stage's circuit breaker is open (or half-open), else 0.",
            labels=["stage"],
        )
        budget = GaugeMetricFamily(
            "cascade_llm_budget_used_ratio",
            "Share of a stage's rolling budget used, per cap (items, usd); 1 = exhausted, calls are refused.",
            labels=["stage", "cap"],
        )
        for stage in self.stages:
            guard = getattr(stage, "breaker", None)
            if isinstance(guard, CircuitBreaker):
                breaker.add_metric([stage.name], float(guard.state is not BreakerState.CLOSED))
            cap = getattr(stage, "budget", None)
            if isinstance(cap, RollingBudget):
                if cap.max_items:
                    budget.add_metric([stage.name, "items"], cap.calls / cap.max_items)
                if cap.max_usd:
                    budget.add_metric([stage.name, "usd"], cap.spent_usd / cap.max_usd)
        yield breaker
        yield budget


class RepeatCollector(Collector):
    """The repeat cache's counters and hit ratio, read at scrape time (cascade.repeats)."""

    def __init__(self, cache: RepeatCache) -> None:
        self.cache = cache

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        stats = self.cache.stats
        lookups = CounterMetricFamily(
            "cascade_repeat_cache_lookups",
            "Items looked up in the repeat cache before the first stage, by result (hit, stale, miss).",
            labels=["result"],
        )
        lookups.add_metric(["hit"], stats.hits)
        lookups.add_metric(["stale"], stats.stale)
        lookups.add_metric(["miss"], stats.lookups - stats.hits - stats.stale)
        yield lookups
        yield CounterMetricFamily(
            "cascade_repeat_cache_invalidations",
            "Whole-cache drops because the policy, thresholds or banks changed.",
            value=stats.invalidations,
        )
        yield CounterMetricFamily(
            "cascade_repeat_cache_evictions",
            "Entries dropped to keep the cache within its size.",
            value=stats.evictions,
        )
        yield GaugeMetricFamily(
            "cascade_repeat_cache_entries", "Verdicts held in the repeat cache.", value=len(self.cache)
        )
        ratio = GaugeMetricFamily(
            "cascade_repeat_cache_hit_ratio",
            "Share of lookups answered from the repeat cache since the worker started (windowed: rate of the lookups).",
        )
        if stats.hit_ratio is not None:
            ratio.add_metric([], stats.hit_ratio)
        yield ratio


class DriftCollector(Collector):
    """The drift windows (`start_drift`), summarised at scrape time: per batch it took ~3 % of a worker's
    event loop, for figures read once per scrape. /metrics is served on the event loop, so a scrape never
    runs while a batch is being counted."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        psi = GaugeMetricFamily(
            "cascade_drift_psi",
            "Population-stability index of a stage's scores over the sliding window vs the calibration reference.",
            labels=["stage", "category", "surface"],
        )
        size = GaugeMetricFamily(
            "cascade_drift_window_items", "Items in a stage's sliding drift window.", labels=["stage", "surface"]
        )
        shares = GaugeMetricFamily(
            "cascade_drift_stage_share",
            "Over the sliding window, share of the items reaching a stage by what it did (allow, block, escalate,"
            " review).",
            labels=["stage", "surface", "result"],
        )
        monitor = _drift
        for (stage, surface), window in monitor.windows.items() if monitor is not None else ():
            size.add_metric([stage, surface], len(window))
            for result, share in window.result_shares().items():
                shares.add_metric([stage, surface, result], share)
            for category, value in window.psi(monitor.min_items).items():
                psi.add_metric([stage, category, surface], value)
        yield psi
        yield size
        yield shares


REGISTRY.register(DriftCollector())


def watch_repeats(cache: RepeatCache) -> RepeatCollector:
    """Export this process's repeat cache on /metrics."""
    collector = RepeatCollector(cache)
    REGISTRY.register(collector)
    return collector


def watch_guards(stages: Sequence[Stage]) -> GuardCollector:
    """Export the breaker and budget of `stages` (those this process built) on /metrics."""
    collector = GuardCollector(stages)
    REGISTRY.register(collector)
    return collector


def start_drift(thresholds: ThresholdSet, window: int, min_items: int, max_surfaces: int) -> DriftMonitor | None:
    """Watch this process's stages against `thresholds`' reference; None when the file has none."""
    global _drift, _surfaces
    reference = Reference.from_thresholds(thresholds)
    _surfaces = SurfaceLimit(max_surfaces)
    if reference is None:
        log.warning(
            "thresholds %s carry no drift reference: no drift figures (re-run cascade calibrate)", thresholds.version
        )
    _drift = None if reference is None else DriftMonitor(reference, window, min_items, _surfaces)
    target = thresholds.provenance.get("targets", {}).get("block_precision")
    if target is not None:
        AUDIT_TARGET.set(float(target))
    if reference is not None:
        for stage, ref in reference.stages.items():
            for result, share in ref.results.items():
                REFERENCE_STAGE_SHARE.labels(stage, result).set(share)
        for stage, share in reference.decided_by.items():
            REFERENCE_DECIDED_SHARE.labels(stage).set(share)
        for decision, share in reference.decisions.items():
            REFERENCE_DECISION_SHARE.labels(decision).set(share)
        REFERENCE_RATE.labels("llm").set(reference.llm_rate)
        REFERENCE_RATE.labels("review").set(reference.review_rate)
    return _drift


def record_batch(
    stage: str, inputs: Sequence[ItemContext], outputs: Sequence[Verdict | ItemContext], seconds: float
) -> None:
    """Count what one stage did with one batch, from the trace entry it just appended to each item.

    `inputs` are the batch's items in the order of `outputs` (verdicts do not carry the item).
    """
    STAGE_SECONDS.labels(stage).observe(seconds)
    BATCH_SIZE.labels(stage).observe(len(outputs))
    cost = 0.0
    errors = quarantined = 0
    results: collections.Counter[str] = collections.Counter()
    repeats: collections.Counter[tuple[str, str]] = collections.Counter()
    for context, out in zip(inputs, outputs, strict=True):
        surface = context.item.surface
        if isinstance(out, Verdict) and is_repeat(out):
            # Re-issued, not judged: this stage did no work on it, and its trace is another run's.
            repeats[(out.decision.value, out.decided_by)] += 1
            continue
        entry = out.trace[-1]
        results[entry.result.value] += 1
        errors += entry.error is not None
        quarantined += len(entry.details.get("newly_quarantined") or ())
        cost += entry.cost_usd
        if _drift is not None:
            _drift.observe(stage, surface, entry)
    # Counted per batch, not per item: a labelled counter update costs microseconds, per item it added up.
    for result, n in results.items():
        STAGE_ITEMS.labels(stage, result).inc(n)
    for (decision, decided_by), n in repeats.items():
        REPEAT_VERDICTS.labels(decision, decided_by).inc(n)
    if errors:
        STAGE_ERRORS.labels(stage).inc(errors)
    if quarantined:
        QUARANTINES.labels(stage).inc(quarantined)
    if cost:
        STAGE_COST.labels(stage).inc(cost)


def export_review_queue(pending: int, oldest_age_s: float) -> None:
    """The review queue's depth and the age of its oldest item (the review app calls it; docs/drift.md)."""
    REVIEW_PENDING.set(pending)
    REVIEW_OLDEST.set(oldest_age_s)


def export_audit(audit: AuditPrecision) -> None:
    """Publish the audit-precision estimate (call after feeding it reviewers' decisions; docs/drift.md)."""
    AUDIT_BLOCKS.set(audit.audited_blocks)
    estimate, interval = audit.estimate, audit.interval
    if estimate is not None and interval is not None:
        AUDIT_PRECISION.labels("estimate").set(estimate)
        AUDIT_PRECISION.labels("low").set(interval[0])
        AUDIT_PRECISION.labels("high").set(interval[1])


def record_delivered(stage: str, outcome: Verdict | DeadLetter | None) -> None:
    """Count an output once the broker has acknowledged it (escalations, None, are counted by the next stage)."""
    if isinstance(outcome, Verdict):
        VERDICTS.labels(outcome.decision.value, outcome.decided_by).inc()
        admitted = _surfaces.admit(outcome.item.surface if outcome.item else None)
        if admitted is not None:
            SURFACE_VERDICTS.labels(admitted, outcome.decision.value, outcome.decided_by).inc()
    elif isinstance(outcome, DeadLetter):
        DEAD_LETTERS.labels(stage, outcome.error_code.value).inc()
