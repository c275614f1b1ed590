"""Prometheus metrics of a stage worker (served on `/metrics` by `cascade.stream.health`).

Rates are left to PromQL, e.g. the share of items that reach the LLM:
`sum(rate(cascade_stage_items_total{stage="llm"}[5m])) / sum(rate(cascade_stage_items_total{stage="hash"}[5m]))`.
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import Counter, Gauge, Histogram

from cascade.contract import DeadLetter, Verdict
from cascade.stages.base import ItemContext

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


def record_batch(stage: str, outputs: Sequence[Verdict | ItemContext], seconds: float) -> None:
    """Count what one stage did with one batch, from the trace entry it just appended to each item."""
    STAGE_SECONDS.labels(stage).observe(seconds)
    BATCH_SIZE.labels(stage).observe(len(outputs))
    cost = 0.0
    for out in outputs:
        entry = out.trace[-1]
        STAGE_ITEMS.labels(stage, entry.result.value).inc()
        if entry.error is not None:
            STAGE_ERRORS.labels(stage).inc()
        if entry.details.get("newly_quarantined"):
            QUARANTINES.labels(stage).inc(len(entry.details["newly_quarantined"]))
        cost += entry.cost_usd
    if cost:
        STAGE_COST.labels(stage).inc(cost)


def record_delivered(stage: str, outcome: Verdict | DeadLetter | None) -> None:
    """Count an output once the broker has acknowledged it (escalations, None, are counted by the next stage)."""
    if isinstance(outcome, Verdict):
        VERDICTS.labels(outcome.decision.value, outcome.decided_by).inc()
    elif isinstance(outcome, DeadLetter):
        DEAD_LETTERS.labels(stage, outcome.error_code.value).inc()
