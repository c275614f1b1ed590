"""`cascade evaluate`: what a threshold set does to labelled data, as a report with stable keys.

The report (documented in docs/calibration.md) is computed from a `CascadeOutcome`, so a
replay over cached scores and a live run give the same figures for the same decisions.
Every share is a fraction of all evaluated items unless its name says otherwise; a metric
with an empty denominator is null.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from cascade.calibration import FamilyCounts
from cascade.data import FLAGGED, LabelledItem, Split, split_of
from cascade.hashbank import BANK_FILE, HashBank
from cascade.normalize import normalize, text_key
from cascade.scoring import UNKNOWN_LABEL, LabelMatrix
from cascade.simulation import ALLOW, BLOCK, DECISION_NAMES, LLM_STAGE, PIPELINE, REVIEW, CascadeOutcome


@dataclass(frozen=True)
class CostModel:
    """Relative cost per item per stage reached, in units of one LLM call.

    Assumed, not measured: an LLM moderation call costs around a thousand times a CPU
    embedding + kNN or ONNX head, and the hash lookup is cheaper still. Items that escalate
    past the last cheap stage count as LLM calls even when no LLM stage runs (they would
    be, in a full deployment). Human review is not priced here.
    """

    per_stage: Mapping[str, float]
    unknown_stage: float = 0.01

    def of(self, stage: str) -> float:
        return self.per_stage.get(stage, self.unknown_stage)

    def relative_to_all_llm(self, outcome: CascadeOutcome) -> float | None:
        """Cost of this run over the cost of sending every item straight to the LLM."""
        n = len(outcome.decision)
        if n == 0:
            return None
        cheap = sum(
            self.of(name) * float(outcome.reached[:, i].sum())
            for i, name in enumerate(outcome.stage_names)
            if name != LLM_STAGE
        )
        llm = self.of(LLM_STAGE) * float(outcome.llm_calls.sum())
        return (cheap + llm) / (n * self.of(LLM_STAGE))


COST_MODEL = CostModel({"hash": 0.0001, "retrieval": 0.001, "classifier": 0.001, LLM_STAGE: 1.0})


def clopper_pearson(successes: int, trials: int, confidence: float) -> tuple[float, float] | None:
    """Exact two-sided binomial interval (Clopper & Pearson 1934); None without trials."""
    from scipy.stats import beta  # the [train] extra: evaluation is an operator tool, not serving

    if trials <= 0:
        return None
    tail = (1 - confidence) / 2
    low = 0.0 if successes == 0 else float(beta.ppf(tail, successes, trials - successes + 1))
    high = 1.0 if successes == trials else float(beta.ppf(1 - tail, successes + 1, trials - successes))
    return low, high


def _ratio(num: float, den: float) -> float | None:
    return float(num) / float(den) if den else None


def prf(predicted: np.ndarray, actual: np.ndarray) -> dict[str, float | None]:
    """Precision, recall, F1 of boolean predictions against boolean truth."""
    tp = float((predicted & actual).sum())
    precision, recall = _ratio(tp, predicted.sum()), _ratio(tp, actual.sum())
    f1 = None
    if precision is not None and recall is not None:
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def decision_metrics(decision: np.ndarray, positive: np.ndarray) -> dict[str, dict[str, float | None]]:
    """`auto`, `review_as_human` and `review_as_allow` for one binary target (block = predicted positive)."""
    auto = decision != REVIEW
    blocked = decision == BLOCK
    human_resolved = np.where(decision == REVIEW, positive, blocked)  # a reviewer gets it right
    return {
        "auto": {"coverage": _ratio(auto.sum(), len(decision)), **prf(blocked[auto], positive[auto])},
        "review_as_human": prf(human_resolved, positive),
        "review_as_allow": prf(blocked, positive),
    }


def auprc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Average precision of a score over the items that have one; None without both classes."""
    from sklearn.metrics import average_precision_score

    scored = ~np.isnan(scores)
    labels = positive[scored]
    if labels.all() or not labels.any():
        return None
    return float(average_precision_score(labels, scores[scored]))


def guarantee_metrics(outcome: CascadeOutcome, flagged: np.ndarray, confidence: float) -> dict[str, dict[str, object]]:
    """The three calibrated quantities (and the review rate) with exact intervals."""
    return _interval_metrics(outcome.decision, outcome.llm_calls, flagged, confidence)


def _interval_metrics(
    decision: np.ndarray, llm_calls: np.ndarray, flagged: np.ndarray, confidence: float
) -> dict[str, dict[str, object]]:
    blocked, allowed, positive = decision == BLOCK, decision == ALLOW, flagged == 1
    counts = {
        "block_precision": (int((blocked & positive).sum()), int(blocked.sum())),
        "allow_miss": (int((allowed & positive).sum()), int(positive.sum())),
        "llm_rate": (int(llm_calls.sum()), len(flagged)),
        "review_rate": (int((decision == REVIEW).sum()), len(flagged)),
    }
    out: dict[str, dict[str, object]] = {}
    for name, (k, n) in counts.items():
        interval = clopper_pearson(k, n, confidence)
        out[name] = {"value": _ratio(k, n), "ci": list(interval) if interval else None, "k": k, "n": n}
    return out


def cost_f1_frontier(
    counts: FamilyCounts, budgets: Sequence[float] = tuple(np.linspace(0, 1, 21)), cost_model: CostModel = COST_MODEL
) -> list[dict[str, float]]:
    """For each LLM budget, the candidate (from the calibration family) with the best F1 within it.

    F1 counts review as resolved by a human (`review_as_human`); the same candidate's F1
    with review counted as allow is given alongside. Empirical on the evaluated items: a
    what-if curve, not a guarantee.
    """
    n, positives, k2 = counts.n, counts.positives, counts.blocks.shape[1]
    if n == 0 or positives == 0:
        return []
    true_blocks = counts.blocks - counts.false_blocks
    f1_allow = 2 * true_blocks / (counts.blocks + positives)
    f1_human = 2 * (true_blocks + counts.reviewed_positives) / (counts.blocks + counts.reviewed_positives + positives)
    cheap = sum(cost_model.of(stage) * reached for stage, reached in counts.reached.items())
    cost = np.repeat(
        ((cheap + counts.llm_calls * cost_model.of(LLM_STAGE)) / (n * cost_model.of(LLM_STAGE)))[:, None], k2, 1
    )
    llm_rate = np.repeat((counts.llm_calls / n)[:, None], k2, 1)
    points = []
    for budget in budgets:
        within = llm_rate <= budget + 1e-12
        if not within.any():
            continue
        best = np.unravel_index(np.argmax(np.where(within, f1_human, -1.0)), within.shape)
        points.append(
            {
                "llm_budget": float(budget),
                "llm_rate": float(llm_rate[best]),
                "cost_relative_to_all_llm": float(cost[best]),
                "f1_review_as_human": float(f1_human[best]),
                "f1_review_as_allow": float(f1_allow[best]),
            }
        )
    return points


def _percentiles(values: np.ndarray) -> dict[str, float | None]:
    if values.size == 0:
        return {"p50": None, "p95": None, "p99": None}
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99)}


def _shares(decision: np.ndarray) -> dict[str, float | None]:
    return {name: _ratio((decision == code).sum(), len(decision)) for code, name in enumerate(DECISION_NAMES)}


def build_report(
    outcome: CascadeOutcome,
    labels: LabelMatrix,
    confidence: float = 0.95,
    calibrated_categories: Sequence[str] = (),
    shadow: tuple[str, np.ndarray] | None = None,
    cost_model: CostModel = COST_MODEL,
) -> dict[str, object]:
    """The evaluation report; keys are documented in docs/calibration.md and kept stable."""
    n = len(outcome.decision)
    flagged = labels.flagged == 1
    stages = {}
    for i, name in enumerate(outcome.stage_names):
        stages[name] = {
            "reached": _ratio(outcome.reached[:, i].sum(), n),
            "decided": _ratio((outcome.decided_by == i).sum(), n),
            "escalated": _ratio(outcome.escalated_past(i).sum(), n),
            "errors": _ratio(outcome.errored[:, i].sum(), n),
        }
    report: dict[str, object] = {
        "n": n,
        "thresholds_version": outcome.thresholds_version,
        "decisions": _shares(outcome.decision),
        "decided_by": {
            name: _ratio((outcome.decided_by == i).sum(), n)
            for i, name in [*enumerate(outcome.stage_names), (PIPELINE, "pipeline")]
        },
        "stages": stages,
        "llm_rate": _ratio(outcome.llm_calls.sum(), n),
        **decision_metrics(outcome.decision, flagged),
        "auprc": auprc(outcome.final_scores[FLAGGED], flagged),
        "cost_relative_to_all_llm": cost_model.relative_to_all_llm(outcome),
        "latency_ms": {name: _percentiles(values) for name, values in outcome.latency_ms.items()},
        "confidence": confidence,
        "intervals": guarantee_metrics(outcome, labels.flagged, confidence),
        "per_category": {},
    }
    per_category: dict[str, object] = {}
    for category in labels.categories:
        if category == FLAGGED:
            continue
        column = labels.column(category)
        known = column != UNKNOWN_LABEL
        positive = column[known] == 1
        decision = outcome.decision[known]
        own_score = outcome.final_scores.get(category)
        has_own_score = own_score is not None and not np.isnan(own_score[known]).all()
        score = own_score if has_own_score else outcome.final_scores[FLAGGED]
        per_category[category] = {
            "n": int(known.sum()),
            "positives": int(positive.sum()),
            "calibrated": category in calibrated_categories,
            "decisions_of_positives": _shares(decision[positive]),
            **decision_metrics(decision, positive),
            "auprc": auprc(score[known], positive),
            "auprc_score": category if has_own_score else FLAGGED,
        }
    report["per_category"] = per_category
    llm_calls = outcome.llm_calls
    report["per_source"] = {
        source: {
            "n": int(rows.sum()),
            "flagged_rate": _ratio(flagged[rows].sum(), rows.sum()),
            "decisions": _shares(outcome.decision[rows]),
            "auto": decision_metrics(outcome.decision[rows], flagged[rows])["auto"],
            "intervals": _interval_metrics(outcome.decision[rows], llm_calls[rows], labels.flagged[rows], confidence),
        }
        for source in sorted(set(labels.sources.tolist()))
        for rows in [labels.sources == source]
    }
    if shadow is not None:
        version, shadow_decision = shadow
        report["shadow"] = {
            "thresholds_version": version,
            "agreement": _ratio((shadow_decision == outcome.decision).sum(), n),
            "decisions": _shares(shadow_decision),
            "confusion": {
                primary: {
                    other: _ratio(((outcome.decision == p) & (shadow_decision == s)).sum(), n)
                    for s, other in enumerate(DECISION_NAMES)
                }
                for p, primary in enumerate(DECISION_NAMES)
            },
            **{f"shadow_{k}": v for k, v in decision_metrics(shadow_decision, flagged).items()},
        }
    return report


def _fmt(value: object, percent: bool = True) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1%}" if percent else f"{value:.3f}"
    return str(value)


def _with_ci(entry: Mapping[str, object]) -> str:
    ci = entry["ci"]
    return _fmt(entry["value"]) + (f" [{ci[0]:.1%}, {ci[1]:.1%}]" if isinstance(ci, list) else "")


def _label_table(title: str, columns: Sequence[str]) -> Table:
    """A table with a label in its first column (left) and figures in the others (right)."""
    table = Table(title=title)
    for position, column in enumerate(columns):
        table.add_column(column, justify="left" if position == 0 else "right")
    return table


def render_report(report: Mapping[str, object], console: Console) -> None:
    """The report as rich tables for the operator."""
    head = Table(title=f"cascade evaluate: {report['n']} items, thresholds {report['thresholds_version']}")
    head.add_column("metric")
    head.add_column("value", justify="right")
    decisions = report["decisions"]
    assert isinstance(decisions, Mapping)
    for name in DECISION_NAMES:
        head.add_row(f"decision {name}", _fmt(decisions[name]))
    head.add_row("LLM call rate", _fmt(report["llm_rate"]))
    head.add_row("cost vs all-LLM", _fmt(report["cost_relative_to_all_llm"]))
    head.add_row("AUPRC (final score)", _fmt(report["auprc"], percent=False))
    intervals = report["intervals"]
    assert isinstance(intervals, Mapping)
    for name in ("block_precision", "allow_miss"):
        head.add_row(name.replace("_", " "), _with_ci(intervals[name]))
    console.print(head)

    quality = _label_table("flagged: precision / recall / F1", ("view", "coverage", "precision", "recall", "f1"))
    for view in ("auto", "review_as_human", "review_as_allow"):
        metrics = report[view]
        assert isinstance(metrics, Mapping)
        quality.add_row(
            view,
            _fmt(metrics.get("coverage")),
            _fmt(metrics["precision"]),
            _fmt(metrics["recall"]),
            _fmt(metrics["f1"]),
        )
    console.print(quality)

    stages = _label_table(
        "stages (share of all items)",
        ("stage", "reached", "decided", "escalated", "errors", "p50 ms", "p95 ms", "p99 ms"),
    )
    stage_rows, latency = report["stages"], report["latency_ms"]
    assert isinstance(stage_rows, Mapping) and isinstance(latency, Mapping)
    for name, row in stage_rows.items():
        lat = latency.get(name, {})
        stages.add_row(
            name,
            _fmt(row["reached"]),
            _fmt(row["decided"]),
            _fmt(row["escalated"]),
            _fmt(row["errors"]),
            *(_fmt(lat.get(p), percent=False) for p in ("p50", "p95", "p99")),
        )
    console.print(stages)

    per_category = report["per_category"]
    assert isinstance(per_category, Mapping)
    if per_category:
        cats = _label_table(
            "per category (labelled rows only)",
            ("category", "n", "pos", "calibrated", "blocked", "allowed", "review", "auto P", "auto R"),
        )
        for name, row in per_category.items():
            mix, auto = row["decisions_of_positives"], row["auto"]
            cats.add_row(
                name,
                str(row["n"]),
                str(row["positives"]),
                "yes" if row["calibrated"] else "no",
                _fmt(mix["block"]),
                _fmt(mix["allow"]),
                _fmt(mix["review"]),
                _fmt(auto["precision"]),
                _fmt(auto["recall"]),
            )
        console.print(cats)
    per_source = report.get("per_source")
    if isinstance(per_source, Mapping) and len(per_source) > 1:
        sources = _label_table(
            "per source (guarantees hold for the pooled mix, not for each source)",
            ("source", "n", "flagged", "allow", "block", "review", "block precision", "allow miss"),
        )
        for name, row in per_source.items():
            mix, intervals = row["decisions"], row["intervals"]
            sources.add_row(
                name,
                str(row["n"]),
                _fmt(row["flagged_rate"]),
                *(_fmt(mix[d]) for d in DECISION_NAMES),
                _with_ci(intervals["block_precision"]),
                _with_ci(intervals["allow_miss"]),
            )
        console.print(sources)
    shadow = report.get("shadow")
    if isinstance(shadow, Mapping):
        console.print(
            f"shadow thresholds {shadow['thresholds_version']}: agreement {_fmt(shadow['agreement'])} "
            f"(shadow decisions: {', '.join(f'{k} {_fmt(v)}' for k, v in shadow['decisions'].items())})"
        )


def leakage_warnings(rows: Sequence[LabelledItem], data_dir: Path) -> list[str]:
    """Why figures on `rows` would flatter the cascade: rows from the train split (what models and banks
    were built from), and rows whose text is in the hash bank (decided by an exact match, not measured)."""
    if not rows:
        return []
    warnings = []
    in_train = sum(1 for row in rows if split_of(row.id) is Split.TRAIN)
    if in_train:
        warnings.append(
            f"{in_train} of {len(rows)} rows ({in_train / len(rows):.0%}) are in the train split, which the models"
            " and banks were built from; use --split test"
        )
    if (data_dir / BANK_FILE).is_file():
        bank = HashBank.open(data_dir)
        try:
            banked = sum(1 for row in rows if bank.exact(text_key(normalize(row.text))))
        finally:
            bank.close()
        if banked:
            warnings.append(
                f"{banked} of {len(rows)} rows ({banked / len(rows):.0%}) are in the hash bank: their verdicts are"
                " exact matches, not measurements; use --split test or rows that were never banked"
            )
    return warnings
