"""`cascade evaluate`: what a threshold set does to labelled data, as a report with stable keys.

The report (documented in docs/calibration.md) is computed from a `SimulatedRun`, so a
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

from cascade.assembly import adjudicator_stage, relative_costs
from cascade.calibration import (
    MIN_CLASS_EXAMPLES,
    CalibrationError,
    CalibrationMap,
    Family,
    FamilyCounts,
    Targets,
    choose_thresholds,
    level_grid,
)
from cascade.contract import ContentItem, Verdict
from cascade.data import FLAGGED, LabelledItem, Split, split_of
from cascade.hashbank import BANK_FILE, HashBank
from cascade.normalize import normalize, text_key
from cascade.pipeline import CascadeRunner, new_context
from cascade.scoring import UNKNOWN_LABEL, LabelMatrix, ScoreTable
from cascade.simulation import ALLOW, BLOCK, DECISION_NAMES, PIPELINE, REVIEW, SimulatedRun, run_from_verdicts, simulate
from cascade.stages.base import Stage
from cascade.thresholds import ThresholdSet


@dataclass(frozen=True)
class CostModel:
    """Relative cost per item per stage reached, in units of one call of the adjudicator (the LLM).

    Assumed, not measured, and declared by each stage class (`Stage.relative_cost`): an LLM
    moderation call costs around a thousand times a CPU embedding + kNN or ONNX head, and
    the hash lookup is cheaper still. Items that escalate past the last cheap stage count as
    LLM calls even when no LLM stage runs (they would be, in a full deployment). Human
    review is not priced here.
    """

    per_stage: Mapping[str, float]
    adjudicator: str
    unknown_stage: float = 0.01

    @classmethod
    def of_stages(cls) -> CostModel:
        """The model the stage classes declare (`cascade.assembly.relative_costs`)."""
        return cls(relative_costs(), adjudicator_stage())

    def of(self, stage: str) -> float:
        return self.per_stage.get(stage, self.unknown_stage)

    def relative_to_all_llm(self, outcome: SimulatedRun) -> float | None:
        """Cost of this run over the cost of sending every item straight to the LLM."""
        n = len(outcome.decision)
        if n == 0:
            return None
        cheap = sum(
            self.of(name) * float(outcome.reached[:, i].sum())
            for i, name in enumerate(outcome.stage_names)
            if name != self.adjudicator
        )
        llm = self.of(self.adjudicator) * float(outcome.llm_calls.sum())
        return (cheap + llm) / (n * self.of(self.adjudicator))


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


def guarantee_metrics(
    outcome: SimulatedRun, flagged: np.ndarray, confidence: float, rows: np.ndarray | None = None
) -> dict[str, dict[str, object]]:
    """The three calibrated quantities (and the review rate) with exact intervals, over `rows` (default all)."""
    if rows is None:
        return _interval_metrics(outcome.decision, outcome.llm_calls, flagged, confidence)
    return _interval_metrics(outcome.decision[rows], outcome.llm_calls[rows], flagged[rows], confidence)


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
    counts: FamilyCounts, budgets: Sequence[float] = tuple(np.linspace(0, 1, 21)), cost_model: CostModel | None = None
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
    cost_model = cost_model or CostModel.of_stages()
    cheap = sum(cost_model.of(stage) * reached for stage, reached in counts.reached.items())
    call = cost_model.of(cost_model.adjudicator)
    cost = np.repeat(((cheap + counts.llm_calls * call) / (n * call))[:, None], k2, 1)
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


def file_frontier(thresholds: ThresholdSet, table: ScoreTable, labels: LabelMatrix) -> list[dict[str, float]]:
    """The cost–F1 frontier over the default set's calibration family, when the file carries its maps."""
    maps = {
        stage: {category: CalibrationMap.of(doc) for category, doc in cats.items()}
        for stage, cats in thresholds.score_maps.items()
        if stage in table.stage_names
    }
    if not maps:
        return []
    family = Family.build(table.stage_names, maps, level_grid(), level_grid())
    return cost_f1_frontier(family.counts(table, labels.flagged))


def _percentiles(values: np.ndarray) -> dict[str, float | None]:
    if values.size == 0:
        return {"p50": None, "p95": None, "p99": None}
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99)}


def _shares(decision: np.ndarray) -> dict[str, float | None]:
    return {name: _ratio((decision == code).sum(), len(decision)) for code, name in enumerate(DECISION_NAMES)}


def build_report(
    outcome: SimulatedRun,
    labels: LabelMatrix,
    confidence: float = 0.95,
    calibrated_categories: Sequence[str] = (),
    shadow: tuple[str, np.ndarray] | None = None,
    cost_model: CostModel | None = None,
    stage_flagged: Mapping[str, np.ndarray] | None = None,
) -> dict[str, object]:
    """The evaluation report; keys are documented in docs/calibration.md and kept stable.

    `stage_flagged`: each stage's raw `flagged` score per item (NaN where it gave none), for
    the AUPRC of every stage alone beside the cascade's.
    """
    n = len(outcome.decision)
    stage_flagged = stage_flagged or {}
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
        "stage_auprc": {name: auprc(scores, flagged) for name, scores in stage_flagged.items()},
        "cost_relative_to_all_llm": (cost_model or CostModel.of_stages()).relative_to_all_llm(outcome),
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
    report["per_source"] = {
        source: _part(outcome, labels, labels.sources == source, confidence, stage_flagged)
        for source in sorted(set(labels.sources.tolist()))
    }
    report["per_band_set"] = {
        name: _part(outcome, labels, outcome.band_set == name, confidence, stage_flagged)
        for name in sorted(set(outcome.band_set.tolist()))
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


def _part(
    outcome: SimulatedRun,
    labels: LabelMatrix,
    rows: np.ndarray,
    confidence: float,
    stage_flagged: Mapping[str, np.ndarray],
) -> dict[str, object]:
    """The figures of one part of the items (a source, a band set): each part is also judged alone."""
    flagged = labels.flagged[rows] == 1
    return {
        "stage_auprc": {name: auprc(scores[rows], flagged) for name, scores in stage_flagged.items()},
        "n": int(rows.sum()),
        "flagged_rate": _ratio(flagged.sum(), rows.sum()),
        "band_sets": sorted(set(outcome.band_set[rows].tolist())),
        "decisions": _shares(outcome.decision[rows]),
        "auto": decision_metrics(outcome.decision[rows], flagged)["auto"],
        "auprc": auprc(outcome.final_scores[FLAGGED][rows], flagged),
        "intervals": guarantee_metrics(outcome, labels.flagged, confidence, rows),
    }


def leave_one_source_out(
    calibration: tuple[ScoreTable, LabelMatrix],
    test: tuple[ScoreTable, LabelMatrix],
    targets: Targets,
    allowed_categories: Sequence[str] | None = None,
) -> dict[str, dict[str, object]]:
    """Cross-source figures: for each source, bands calibrated on the *other* sources' calibration
    rows (pooled, same targets), measured on this source's test rows, as if it were new traffic.

    A source needs enough violations and non-violations among its test rows to be measured.
    """
    (cal_table, cal_labels), (test_table, test_labels) = calibration, test
    out: dict[str, dict[str, object]] = {}
    for source in sorted(set(test_labels.sources.tolist())):
        rows = np.flatnonzero(test_labels.sources == source)
        others = np.flatnonzero(cal_labels.sources != source)
        flagged = test_labels.flagged[rows] == 1
        if min(int(flagged.sum()), int((~flagged).sum())) < MIN_CLASS_EXAMPLES or others.size == 0:
            continue
        try:
            chosen = choose_thresholds(
                cal_table.take(others), cal_labels.take(others), targets, f"without-{source}", allowed_categories
            )
        except CalibrationError as exc:  # infeasible without this source: say so, it is a finding
            out[source] = {"n": int(rows.size), "calibrated_without_it": None, "reason": str(exc)}
            continue
        with_maps = chosen.thresholds.model_copy(update={"score_maps": chosen.score_maps()})
        outcome = simulate(test_table.take(rows), with_maps)
        labels = test_labels.take(rows)
        out[source] = {
            "n": int(rows.size),
            "calibrated_without_it": int(others.size),
            "decisions": _shares(outcome.decision),
            "auto": decision_metrics(outcome.decision, flagged)["auto"],
            "auprc": auprc(outcome.final_scores[FLAGGED], flagged),
            "intervals": guarantee_metrics(outcome, labels.flagged, targets.confidence),
        }
    return out


def _fmt(value: object, percent: bool = True) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1%}" if percent else f"{value:.3f}"
    return str(value)


def value_with_ci(entry: object) -> str:
    """`{value, ci}` as "95.1% [93.0%, 96.8%]"; "-" without a value."""
    if not isinstance(entry, Mapping) or entry.get("value") is None:
        return "-"
    ci = entry.get("ci")
    return _fmt(entry["value"]) + (f" [{ci[0]:.1%}, {ci[1]:.1%}]" if isinstance(ci, list) else "")


def _label_table(title: str, columns: Sequence[str]) -> Table:
    """A table with a label in its first column (left) and figures in the others (right)."""
    table = Table(title=title)
    for position, column in enumerate(columns):
        table.add_column(column, justify="left" if position == 0 else "right")
    return table


def _parts_table(title: str, what: str, parts: Mapping[str, Mapping[str, object]]) -> Table:
    table = _label_table(
        title,
        (
            what,
            "n",
            "flagged",
            "band sets",
            "allow",
            "block",
            "review",
            "coverage",
            "AUPRC",
            "block precision",
            "allow miss",
        ),
    )
    for name, row in parts.items():
        mix, intervals, auto = row["decisions"], row["intervals"], row["auto"]
        assert isinstance(mix, Mapping) and isinstance(intervals, Mapping) and isinstance(auto, Mapping)
        table.add_row(
            name,
            str(row["n"]),
            _fmt(row["flagged_rate"]),
            ", ".join(row["band_sets"]),  # type: ignore[arg-type]
            *(_fmt(mix[d]) for d in DECISION_NAMES),
            _fmt(auto["coverage"]),
            _fmt(row["auprc"], percent=False),
            value_with_ci(intervals["block_precision"]),
            value_with_ci(intervals["allow_miss"]),
        )
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
    head.add_row("AUPRC (calibrated score)", _fmt(report["auprc"], percent=False))
    stage_auprc = report.get("stage_auprc")
    if isinstance(stage_auprc, Mapping):
        for name, value in stage_auprc.items():
            head.add_row(f"AUPRC of {name} alone (raw)", _fmt(value, percent=False))
    intervals = report["intervals"]
    assert isinstance(intervals, Mapping)
    for name in ("block_precision", "allow_miss"):
        head.add_row(name.replace("_", " "), value_with_ci(intervals[name]))
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
    for key, what, title in (
        (
            "per_source",
            "source",
            "per source (each source's figures; a guarantee holds for the mix it was certified on)",
        ),
        ("per_band_set", "band set", "per band set (the items each set judged)"),
    ):
        parts = report.get(key)
        if isinstance(parts, Mapping) and len(parts) > 1:
            console.print(_parts_table(title, what, parts))
    cross = report.get("leave_one_source_out")
    if isinstance(cross, Mapping) and cross:
        table = _label_table(
            "leave one source out (bands calibrated on the other sources, measured on this source's test rows)",
            ("source", "n", "coverage", "AUPRC", "block precision", "allow miss", "llm rate"),
        )
        for name, row in cross.items():
            if row.get("calibrated_without_it") is None:
                table.add_row(name, str(row["n"]), "infeasible without it", "", "", "", "")
                continue
            intervals = row["intervals"]
            table.add_row(
                name,
                str(row["n"]),
                _fmt(row["auto"]["coverage"]),
                _fmt(row["auprc"], percent=False),
                *(value_with_ci(intervals[k]) for k in ("block_precision", "allow_miss", "llm_rate")),
            )
        console.print(table)
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


async def live_run(
    runner: CascadeRunner, items: Sequence[ContentItem], batch_size: int, categories: Sequence[str]
) -> tuple[SimulatedRun, list[Verdict]]:
    """Run the cascade for real over `items`, in batches; the run in the replay's shape, and its verdicts."""
    verdicts: list[Verdict] = []
    batch_of: list[int] = []
    for number, start in enumerate(range(0, len(items), batch_size)):
        contexts = [new_context(item) for item in items[start : start + batch_size]]
        verdicts.extend(await runner.run(contexts))
        batch_of.extend([number] * len(contexts))
    return run_from_verdicts(verdicts, runner.stage_names, batch_of, categories), verdicts


def stale_stages(thresholds: ThresholdSet, stages: Sequence[Stage]) -> list[str]:
    """Stages whose version differs from the one the thresholds were calibrated on (raw cuts no longer fit)."""
    calibrated = {
        s["name"]: s["version"] for s in thresholds.provenance.get("stages", []) if isinstance(s, dict) and "name" in s
    }
    return [
        f"thresholds {thresholds.version} were calibrated on {s.name} {calibrated[s.name]}, this is {s.version}"
        for s in stages
        if s.name in calibrated and calibrated[s.name] != s.version
    ]


def stage_flagged_from_verdicts(verdicts: Sequence[Verdict], stage_names: Sequence[str]) -> dict[str, np.ndarray]:
    """Each stage's `flagged` score per verdict (NaN where the stage gave none): what a replay reads from its table."""
    out = {name: np.full(len(verdicts), np.nan) for name in stage_names}
    for i, verdict in enumerate(verdicts):
        for entry in verdict.trace:
            if entry.error is None and FLAGGED in entry.scores:
                out[entry.stage][i] = entry.scores[FLAGGED]
    return out
