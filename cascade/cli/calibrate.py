"""`cascade calibrate` and `cascade evaluate`: choose bands with guarantees, and measure any band set."""

from __future__ import annotations

import asyncio
import json
import shlex
import sys
from collections.abc import Awaitable, Callable, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Annotated, TypeVar

import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from cascade.assembly import STAGE_ORDER, build_stages
from cascade.calibration import (
    CalibrationError,
    CalibrationMap,
    Family,
    InfeasibleTargets,
    Targets,
    choose_thresholds,
    level_grid,
    with_provenance,
)
from cascade.cli.app import app, fail
from cascade.contract import ContentItem, Verdict
from cascade.data import FLAGGED, DataError, LabelledItem, Split, file_digest, load_labelled, split_of
from cascade.drift import Reference
from cascade.evaluation import build_report, cost_f1_frontier, guarantee_metrics, leakage_warnings, render_report
from cascade.pipeline import CascadeRunner, new_context
from cascade.plots import cost_f1_frontier as plot_frontier
from cascade.plots import pr_curves, reliability
from cascade.policy import load_policy
from cascade.scoring import LabelMatrix, ScoreTable, admit, cache_key, cached_scores
from cascade.settings import Settings
from cascade.simulation import (
    DECISION_CODES,
    CascadeOutcome,
    outcomes_from_verdicts,
    simulate,
    simulate_shadow,
)
from cascade.stages.base import Stage
from cascade.thresholds import ThresholdError, ThresholdSet

T = TypeVar("T")


class SplitChoice(StrEnum):
    ALL = "all"
    TRAIN = "train"
    CALIBRATION = "calibration"
    TEST = "test"


StagesOption = Annotated[str, typer.Option(help="Comma-separated stages to run, in cascade order.")]
BatchOption = Annotated[int, typer.Option(min=1, max=4096, help="Items per stage call.")]
RefreshOption = Annotated[bool, typer.Option(help="Re-score even when cached scores match.")]


def _load_rows(paths: Sequence[Path]) -> tuple[list[LabelledItem], list[dict[str, object]]]:
    for path in paths:
        if not path.is_file():
            raise fail(f"data file not found: {path}")
    try:
        return load_labelled(paths), [file_digest(p) for p in paths]
    except DataError as exc:
        raise fail(str(exc)) from exc


def _stages(settings: Settings, stages: str) -> list[Stage]:
    names = [s.strip() for s in stages.split(",") if s.strip()]
    try:
        built = build_stages(settings, names)
    except (ValueError, RuntimeError, OSError) as exc:  # a stage that cannot be built is an operator error
        raise fail(str(exc)) from exc
    if not built:
        raise fail(f"no stage could be built from {names}")
    return built


def _with_stages(stages: Sequence[Stage], work: Callable[[], Awaitable[T]]) -> T:
    async def run() -> T:
        try:
            return await work()
        finally:
            for stage in stages:
                await stage.aclose()

    return asyncio.run(run())


async def _score(
    stages: Sequence[Stage],
    rows: Sequence[LabelledItem],
    settings: Settings,
    digests: Sequence[dict[str, object]],
    split: str,
    refresh: bool,
    batch_size: int,
    err: Console,
) -> tuple[ScoreTable, LabelMatrix, int]:
    """Scores (cached when possible) and labels for the rows that pass intake, and how many did not."""
    kept, items, skipped = admit(rows, settings)
    key = cache_key(digests, split, stages)
    with Progress(
        TextColumn(f"scoring {split}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    ) as progress:
        task = progress.add_task("items", total=len(items))
        table, cached = await cached_scores(
            stages, items, settings, key, refresh, batch_size, lambda n: progress.advance(task, n)
        )
    err.print(f"{split}: {len(items)} items {'from the score cache' if cached else 'scored'} ({key})")
    return table, LabelMatrix.of(kept), skipped


def _split_rows(rows: Sequence[LabelledItem], split: Split) -> list[LabelledItem]:
    return [row for row in rows if split_of(row.id) is split]


@app.command()
def calibrate(
    data: Annotated[list[Path], typer.Argument(help="Labelled JSONL files (shared/data/README.md format).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Threshold file to write.")],
    target_block_precision: Annotated[float, typer.Option(min=0, max=1, help="P: auto-block precision >= P.")],
    max_allow_miss: Annotated[float, typer.Option(min=0, max=1, help="M: share of violations auto-allowed <= M.")],
    max_llm_rate: Annotated[float, typer.Option(min=0, max=1, help="E: share of items sent to the LLM <= E.")],
    confidence: Annotated[float, typer.Option(min=0.5, max=0.999, help="1 - δ for the guarantee.")] = 0.95,
    per_source: Annotated[
        bool, typer.Option(help="Also certify block precision and allow-miss for each source, not only the mix.")
    ] = False,
    version: Annotated[str | None, typer.Option(help="thresholds_version (default: calibrated-<timestamp>).")] = None,
    stages: StagesOption = ",".join(STAGE_ORDER),
    batch_size: BatchOption = 64,
    refresh_scores: RefreshOption = False,
) -> None:
    """Choose every stage's bands so the targets hold with the given confidence; write them with provenance.

    Fits on the calibration split, reports on the test split (both by id). Exit code 2 and
    no file when the targets cannot be met.
    """
    from datetime import UTC, datetime

    settings = Settings()
    err = Console(stderr=True)
    targets = Targets(target_block_precision, max_allow_miss, max_llm_rate, confidence)
    rows, digests = _load_rows(data)
    built = _stages(settings, stages)
    policy = load_policy(settings.policies_dir)
    version = version or f"calibrated-{datetime.now(UTC):%Y%m%dT%H%M%SZ}"

    async def work() -> tuple[tuple[ScoreTable, LabelMatrix, int], tuple[ScoreTable, LabelMatrix, int]]:
        cal = await _score(
            built,
            _split_rows(rows, Split.CALIBRATION),
            settings,
            digests,
            "calibration",
            refresh_scores,
            batch_size,
            err,
        )
        test = await _score(
            built, _split_rows(rows, Split.TEST), settings, digests, "test", refresh_scores, batch_size, err
        )
        return cal, test

    (cal_table, cal_labels, cal_skipped), (test_table, test_labels, test_skipped) = _with_stages(built, work)
    try:
        chosen = choose_thresholds(cal_table, cal_labels, targets, version, sorted(policy.names), per_source=per_source)
    except InfeasibleTargets as exc:
        raise fail(f"{exc} No file written.", code=2) from exc
    except CalibrationError as exc:
        raise fail(str(exc), code=2) from exc
    achieved = guarantee_metrics(simulate(test_table, chosen.thresholds), test_labels.flagged, confidence)
    command = shlex.join(["cascade", "calibrate", *sys.argv[2:]]) if sys.argv[1:2] == ["calibrate"] else ""
    thresholds = with_provenance(
        chosen,
        cal_table.stages,
        targets,
        digests,
        {"calibration": len(cal_table), "test": len(test_table), "rejected_at_intake": cal_skipped + test_skipped},
        achieved,
        command,
    )
    # What live traffic is compared with (cascade.drift; docs/drift.md).
    thresholds.provenance["reference"] = Reference.of(cal_table, thresholds).to_doc()
    output.parent.mkdir(parents=True, exist_ok=True)
    thresholds.dump(output)
    _render_calibration(thresholds, achieved, chosen.accepted, chosen.candidates, Console())
    err.print(f"wrote {output} (thresholds_version {thresholds.version})")


def _render_calibration(
    thresholds: ThresholdSet, achieved: dict[str, dict[str, object]], accepted: int, candidates: int, console: Console
) -> None:
    targets = thresholds.provenance["targets"]
    table = Table(
        title=f"{thresholds.version}: {accepted} of {candidates} candidates certified; chosen, on the test split"
    )
    for column in ("quantity", "target", "test value", f"{targets['confidence']:.0%} CI", "k / n"):
        table.add_column(column, justify="left" if column == "quantity" else "right")
    target_text = {
        "block_precision": f">= {targets['block_precision']:.1%}",
        "allow_miss": f"<= {targets['max_allow_miss']:.1%}",
        "llm_rate": f"<= {targets['max_llm_rate']:.1%}",
        "review_rate": "-",
    }
    for name, entry in achieved.items():
        value, ci = entry["value"], entry["ci"]
        table.add_row(
            name.replace("_", " "),
            target_text[name],
            "-" if value is None else f"{value:.1%}",
            "-" if not ci else f"[{ci[0]:.1%}, {ci[1]:.1%}]",
            f"{entry['k']} / {entry['n']}",
        )
    console.print(table)
    bands = Table(title="bands (raw score cut-points)")
    for column in ("stage", "category", "allow_below", "block_at"):
        bands.add_column(column)
    for stage, by_category in thresholds.stages.items():
        if not by_category:
            bands.add_row(stage, "-", "no bands (decides by matches only)", "")
        for category, band in by_category.items():
            bands.add_row(stage, category, str(band.allow_below), str(band.block_at))
    console.print(bands)


def _live_outcome(
    runner: CascadeRunner, items: Sequence[ContentItem], batch_size: int, categories: Sequence[str]
) -> Callable[[], Awaitable[tuple[CascadeOutcome, list[Verdict]]]]:
    async def work() -> tuple[CascadeOutcome, list[Verdict]]:
        verdicts: list[Verdict] = []
        batch_of: list[int] = []
        for number, start in enumerate(range(0, len(items), batch_size)):
            contexts = [new_context(item) for item in items[start : start + batch_size]]
            verdicts.extend(await runner.run(contexts))
            batch_of.extend([number] * len(contexts))
        return outcomes_from_verdicts(verdicts, runner.stage_names, batch_of, categories), verdicts

    return work


def _stale_stages(thresholds: ThresholdSet, stages: Sequence[Stage]) -> list[str]:
    """Stages whose version differs from the one the thresholds were calibrated on (raw cuts no longer fit)."""
    calibrated = {
        s["name"]: s["version"] for s in thresholds.provenance.get("stages", []) if isinstance(s, dict) and "name" in s
    }
    return [
        f"thresholds {thresholds.version} were calibrated on {s.name} {calibrated[s.name]}, this is {s.version}"
        for s in stages
        if s.name in calibrated and calibrated[s.name] != s.version
    ]


def _stage_flagged_from_verdicts(verdicts: Sequence[Verdict], stage_names: Sequence[str]) -> dict[str, np.ndarray]:
    out = {name: np.full(len(verdicts), np.nan) for name in stage_names}
    for i, verdict in enumerate(verdicts):
        for entry in verdict.trace:
            if entry.error is None and FLAGGED in entry.scores:
                out[entry.stage][i] = entry.scores[FLAGGED]
    return out


def _frontier(thresholds: ThresholdSet, table: ScoreTable, labels: LabelMatrix) -> list[dict[str, float]]:
    """The cost–F1 frontier over the calibration family, when the threshold file carries its maps."""
    docs = thresholds.provenance.get("calibration_maps")
    if not isinstance(docs, dict):
        return []
    maps = {
        stage: {category: CalibrationMap.from_doc(doc) for category, doc in cats.items()}
        for stage, cats in docs.items()
        if stage in table.stage_names
    }
    if not maps:
        return []
    family = Family.build(table.stage_names, maps, level_grid(), level_grid())
    return cost_f1_frontier(family.counts(table, labels.flagged))


@app.command()
def evaluate(
    data: Annotated[list[Path], typer.Argument(help="Labelled JSONL files (shared/data/README.md format).")],
    thresholds: Annotated[Path | None, typer.Option(help="Threshold set (default: the configured one).")] = None,
    shadow_thresholds: Annotated[Path | None, typer.Option(help="A second set; report agreement with it.")] = None,
    json_report: Annotated[Path | None, typer.Option("--json", help="Write the report here as JSON.")] = None,
    plots: Annotated[Path | None, typer.Option(help="Directory for PNG plots.")] = None,
    split: Annotated[
        SplitChoice, typer.Option(help="Rows to evaluate; use test for the data the thresholds were calibrated on.")
    ] = SplitChoice.ALL,
    live: Annotated[
        bool, typer.Option(help="Run the cascade for real instead of replaying cached stage scores.")
    ] = False,
    confidence: Annotated[float, typer.Option(min=0.5, max=0.999, help="Level of the reported intervals.")] = 0.95,
    stages: StagesOption = ",".join(STAGE_ORDER),
    batch_size: BatchOption = 64,
    refresh_scores: RefreshOption = False,
) -> None:
    """Measure a threshold set on labelled data: decision mix, stage flow, quality, cost, latency, plots."""
    settings = Settings()
    err = Console(stderr=True)
    rows, digests = _load_rows(data)
    if split is not SplitChoice.ALL:
        rows = _split_rows(rows, Split(split.value))
    if not rows:
        raise fail(f"no rows in {', '.join(map(str, data))} for split {split.value}")
    policy = load_policy(settings.policies_dir)
    try:
        primary = ThresholdSet.load(thresholds or settings.thresholds)
        primary.check_names(STAGE_ORDER, policy.names)
        shadow = ThresholdSet.load(shadow_thresholds) if shadow_thresholds else None
        if shadow is not None:
            shadow.check_names(STAGE_ORDER, policy.names)
    except ThresholdError as exc:
        raise fail(str(exc)) from exc
    calibrated_on = {d.get("sha256") for d in primary.provenance.get("data", []) if isinstance(d, dict)}
    if split in (SplitChoice.ALL, SplitChoice.CALIBRATION) and calibrated_on & {d["sha256"] for d in digests}:
        err.print(
            f"[yellow]warning:[/] thresholds {primary.version} were calibrated on this data; "
            "use --split test for figures that were not tuned on"
        )
    for message in leakage_warnings(rows, settings.data_dir):
        err.print(f"[yellow]warning:[/] {message}")
    built = _stages(settings, stages)
    stale = _stale_stages(primary, built)
    for message in stale:
        err.print(f"[yellow]warning:[/] {message}; re-run `cascade calibrate`")
    labels_categories = LabelMatrix.of(rows).categories
    if live:
        kept, items, skipped = admit(rows, settings)
        runner = CascadeRunner(built, primary, policy.version, shadow)
        outcome, verdicts = _with_stages(built, _live_outcome(runner, items, batch_size, labels_categories))
        labels = LabelMatrix.of(kept)
        stage_flagged = _stage_flagged_from_verdicts(verdicts, runner.stage_names)
        shadow_decision = (
            np.array([DECISION_CODES[v.shadow.decision] for v in verdicts if v.shadow], dtype=np.int8)
            if shadow
            else None
        )
        frontier: list[dict[str, float]] = []
    else:
        table, labels, skipped = _with_stages(
            built, lambda: _score(built, rows, settings, digests, split.value, refresh_scores, batch_size, err)
        )
        outcome = simulate(table, primary, labels_categories)
        stage_flagged = {s.name: s.column(FLAGGED) for s in table.stages}
        shadow_decision = simulate_shadow(table, outcome, shadow) if shadow else None
        frontier = _frontier(primary, table, labels)

    calibrated = {c for bands in primary.stages.values() for c in bands}
    maps = primary.provenance.get("calibration_maps")
    if isinstance(maps, dict):
        calibrated |= {c for cats in maps.values() for c in cats}
    report = build_report(
        outcome,
        labels,
        confidence,
        sorted(calibrated),
        (shadow.version, shadow_decision) if shadow is not None and shadow_decision is not None else None,
    )
    report = {
        **report,
        "mode": "live" if live else "replay",
        "split": split.value,
        "data": digests,
        "rejected_at_intake": skipped,
        "stale_stages": stale,
        "frontier": frontier,
    }
    if plots is not None:
        plots.mkdir(parents=True, exist_ok=True)
        positive = labels.flagged == 1
        human = report["review_as_human"]
        written = [
            pr_curves(stage_flagged, positive, plots / "pr_curves.png"),
            reliability(stage_flagged, positive, plots / "reliability.png"),
            plot_frontier(
                frontier,
                {"cost": report["cost_relative_to_all_llm"], "f1": human["f1"]},  # type: ignore[index]
                plots / "cost_f1_frontier.png",
            ),
        ]
        report["plots"] = [str(p) for p in written if p is not None]
    if json_report is not None:
        json_report.parent.mkdir(parents=True, exist_ok=True)
        json_report.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    render_report(report, Console())
    if plots is not None:
        err.print(f"plots: {', '.join(report['plots']) or 'none (no scores to plot)'}")  # type: ignore[arg-type]
