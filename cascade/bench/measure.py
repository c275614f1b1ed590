"""Rows of the benchmark report, and interleaved timing.

A row is a plain dict so it goes to JSON as is: either a measurement (`available: true`,
`median`, `best`, `samples`, `unit`) or `available: false` with the reason. A ratio names
the two rows it divides, so a reader (and the tests) can recompute it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from cascade.contract import Verdict

Row = dict[str, Any]


def measured(label: str, unit: str, samples: Sequence[float], **extra: Any) -> Row:
    values = [float(v) for v in samples]
    return {
        "label": label,
        "available": True,
        "unit": unit,
        "median": statistics.median(values),
        "best": max(values),
        "samples": values,
        **extra,
    }


def not_available(label: str, reason: str) -> Row:
    return {"label": label, "available": False, "reason": reason}


def ratio(label: str, rows: Mapping[str, Row], numerator: str, denominator: str, paired: bool = True) -> Row:
    """median(numerator) / median(denominator), both measured in this run.

    With `paired`, also the median over rounds of the per-round ratio: rows interleaved in the
    same rounds saw the same load in each, so this is the steadier figure when load drifts.
    """
    missing = [k for k in (numerator, denominator) if not rows.get(k, {}).get("available")]
    if missing:
        return not_available(label, f"needs {' and '.join(missing)}, not measured")
    top, bottom = rows[numerator], rows[denominator]
    out = {
        "label": label,
        "available": True,
        "value": top["median"] / bottom["median"],
        "numerator": numerator,
        "denominator": denominator,
    }
    if paired:  # zip keeps the interleaved rounds: extra rounds taken later (A B A) are appended
        pairs = zip(top["samples"], bottom["samples"], strict=False)
        out["paired_median"] = statistics.median([a / b for a, b in pairs])
    return out


def items_per_s(count: int, work: Callable[[], object]) -> float:
    started = time.perf_counter()
    work()
    return count / (time.perf_counter() - started)


def interleave(runs: Mapping[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Each run once per round, order reversed every other round (ABBA), so drifting load hits all alike."""
    samples: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for index in range(rounds):
        for name in names if index % 2 == 0 else reversed(names):
            samples[name].append(runs[name]())
    return samples


def cascade_breakdown(verdicts: Sequence[Verdict], stage_names: Sequence[str]) -> dict[str, object]:
    """Where one run's time went (stage ms per item: batch wall time summed once per batch) and who decided."""
    n = len(verdicts)
    batch_ms: dict[tuple[str, str], float] = {}
    for verdict in verdicts:
        for entry in verdict.trace:
            # Items of one stage batch share its wall time; (stage, latency) identifies the batch.
            batch_ms[(entry.stage, repr(entry.latency_ms))] = entry.latency_ms
    per_item = {name: sum(ms for (s, _), ms in batch_ms.items() if s == name) / n for name in stage_names}
    decided = {name: sum(v.decided_by == name for v in verdicts) / n for name in [*stage_names, "pipeline"]}
    errors = sum(any(entry.error for entry in v.trace) for v in verdicts)
    return {"stage_ms_per_item": per_item, "decided_by": decided, "items_with_stage_error": errors}
