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
    CalibratedBySurface,
    CalibrationError,
    InfeasibleTargets,
    Targets,
    choose_thresholds,
    choose_thresholds_by_surface,
    hand_set_bands,
    with_hand_set_bands,
    with_provenance,
    with_surfaces,
)
from cascade.cli.app import app, fail
from cascade.data import (
    FLAGGED,
    DataError,
    LabelledItem,
    Split,
    SplitChoice,
    file_digest,
    in_split,
    load_labelled,
    split_of,
)
from cascade.drift import Reference
from cascade.evaluation import (
    build_report,
    file_frontier,
    guarantee_metrics,
    leakage_warnings,
    live_run,
    render_report,
    stage_flagged_from_verdicts,
    stale_stages,
    value_with_ci,
)
from cascade.evaluation import leave_one_source_out as cross_source
from cascade.llm.answers import LLMRun, sample_rows
from cascade.llm.shadow import shadow_agreement
from cascade.pipeline import CascadeRunner
from cascade.plots import cost_f1_frontier as plot_frontier
from cascade.plots import pr_curves, reliability
from cascade.policy import load_policy
from cascade.scoring import LabelMatrix, ScoreTable, admit, cache_key, cached_scores
from cascade.settings import Settings
from cascade.simulation import (
    DECISION_CODES,
    simulate,
    simulate_shadow,
)
from cascade.stages.base import Stage
from cascade.thresholds import ThresholdError, ThresholdSet

T = TypeVar("T")


class CalibrateBy(StrEnum):
    POOL = "pool"
    SURFACE = "surface"


class SurfaceFallback(StrEnum):
    DEFAULT = "default"
    ESCALATE = "escalate"


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
    by: Annotated[
        CalibrateBy,
        typer.Option(
            "--by",
            help="pool: one band set for all items; surface: also one per surface with enough rows "
            "(Bonferroni over the band sets), the rest fall back to the pooled default.",
        ),
    ] = CalibrateBy.POOL,
    fallback: Annotated[
        SurfaceFallback,
        typer.Option(
            help="With --by surface, what judges a labelled surface that cannot be certified: the pooled default "
            "band set, or no bands at all (escalate: only definitive matches decide, the rest goes to the LLM "
            "or review).",
        ),
    ] = SurfaceFallback.DEFAULT,
    hand_set_band: Annotated[
        list[str] | None,
        typer.Option(
            help="STAGE.CATEGORY=ALLOW_BELOW:BLOCK_AT (either may be empty = null), repeatable: a band for a stage "
            "that calibration could not score (e.g. llm.flagged=0.5:0.5 with no LLM reachable); recorded as hand-set.",
        ),
    ] = None,
    version: Annotated[str | None, typer.Option(help="thresholds_version (default: calibrated-<timestamp>).")] = None,
    stages: StagesOption = ",".join(STAGE_ORDER),
    batch_size: BatchOption = 64,
    refresh_scores: RefreshOption = False,
    llm_sample: Annotated[
        int | None, typer.Option(min=1, help="With a configured llm stage: at most N rows per split (docs/llm.md).")
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", help="Make the LLM calls without asking first.")] = False,
) -> None:
    """Choose every stage's bands so the targets hold with the given confidence; write them with provenance.

    Fits on the calibration split, reports on the test split (both by id). Exit code 2 and
    no file when the targets cannot be met. With a configured LLM endpoint, the llm stage runs
    too: its expected calls and cost are shown first, and its answers are kept for reruns.
    """
    from datetime import UTC, datetime

    settings = Settings()
    err = Console(stderr=True)
    targets = Targets(target_block_precision, max_allow_miss, max_llm_rate, confidence)
    if fallback is not SurfaceFallback.DEFAULT and by is not CalibrateBy.SURFACE:
        raise fail(f"--fallback {fallback.value} applies to surfaces: add --by surface, or drop --fallback")
    rows, digests = _load_rows(data)
    built = _stages(settings, stages)
    llm_run = LLMRun.attach(built, settings.data_dir)
    if llm_run is not None:
        rows = _confirm_llm_spend(llm_run, rows, settings, llm_sample, yes, err)
    policy = load_policy(settings.policies_dir)
    try:
        hand_set = hand_set_bands(hand_set_band or [], STAGE_ORDER, policy.names)
    except CalibrationError as exc:
        raise fail(f"--hand-set-band {exc}") from None
    version = version or f"calibrated-{datetime.now(UTC):%Y%m%dT%H%M%SZ}"

    async def work() -> tuple[tuple[ScoreTable, LabelMatrix, int], tuple[ScoreTable, LabelMatrix, int]]:
        cal = await _score(
            built,
            in_split(rows, Split.CALIBRATION),
            settings,
            digests,
            "calibration",
            refresh_scores,
            batch_size,
            err,
        )
        test = await _score(
            built, in_split(rows, Split.TEST), settings, digests, "test", refresh_scores, batch_size, err
        )
        return cal, test

    (cal_table, cal_labels, cal_skipped), (test_table, test_labels, test_skipped) = _with_stages(built, work)
    by_surface: CalibratedBySurface | None = None
    try:
        if by is CalibrateBy.SURFACE:
            by_surface = choose_thresholds_by_surface(
                cal_table,
                cal_labels,
                targets,
                version,
                sorted(policy.names),
                per_source=per_source,
                escalate_fallbacks=fallback is SurfaceFallback.ESCALATE,
            )
            chosen, decision_set = by_surface.default, by_surface.decision_set(version)
        else:
            chosen = choose_thresholds(
                cal_table, cal_labels, targets, version, sorted(policy.names), per_source=per_source
            )
            decision_set = chosen.thresholds
    except InfeasibleTargets as exc:
        raise fail(f"{exc} No file written.", code=2) from exc
    except CalibrationError as exc:
        raise fail(str(exc), code=2) from exc
    outcome = simulate(test_table, decision_set, surfaces=test_labels.surfaces)
    achieved = guarantee_metrics(outcome, test_labels.flagged, confidence)
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
    if by_surface is not None:
        achieved_by_set = {
            name: guarantee_metrics(outcome, test_labels.flagged, confidence, outcome.band_set == name)
            for name in decision_set.band_sets()
        }
        thresholds = with_surfaces(thresholds, by_surface, achieved_by_set)
    thresholds = with_hand_set_bands(thresholds, hand_set)
    # What live traffic is compared with (cascade.drift; docs/drift.md).
    thresholds.provenance["reference"] = Reference.of(cal_table, thresholds).to_doc()
    if llm_run is not None:
        thresholds.provenance["llm"] = llm_run.provenance({"calibration": cal_table, "test": test_table}, llm_sample)
    output.parent.mkdir(parents=True, exist_ok=True)
    thresholds.dump(output)
    _render_calibration(thresholds, achieved, chosen.accepted, chosen.candidates, Console())
    if by_surface is not None:
        _render_surfaces(thresholds, by_surface, Console())
    err.print(f"wrote {output} (thresholds_version {thresholds.version})")


def _confirm_llm_spend(
    run: LLMRun, rows: list[LabelledItem], settings: Settings, per_split: int | None, yes: bool, err: Console
) -> list[LabelledItem]:
    """The rows the LLM will see (sampled), after the operator agreed to the calls they cost."""
    sampled = sample_rows(rows, per_split) if per_split is not None else rows
    scored = [r for r in sampled if split_of(r.id) in (Split.CALIBRATION, Split.TEST)]
    plan = run.plan(admit(scored, settings)[1])
    err.print(plan.describe(run.stage.primary.endpoint.model), soft_wrap=True)
    if plan.calls and not yes:
        try:
            agreed = typer.confirm("make these llm calls?", default=False, err=True)
        except typer.Abort:
            raise fail("no answer to the cost question: pass --yes to make the llm calls from a script") from None
        if not agreed:
            raise fail("not confirmed: no llm call made (omit the llm stage with --stages, or cap --llm-sample)")
    return sampled


def _render_surfaces(thresholds: ThresholdSet, by_surface: CalibratedBySurface, console: Console) -> None:
    """Which band set each surface got, and its test-split figures."""
    table = Table(
        title=f"band sets by surface ({by_surface.band_sets_tested} tested, each at "
        f"{by_surface.band_set_confidence:.2%} confidence so all hold at once); on the test split"
    )
    for column in ("surface", "calibration rows", "band set", "block precision", "allow miss", "llm rate"):
        table.add_column(column, justify="left" if column in ("surface", "band set") else "right")
    tested = thresholds.provenance["by_surface"]
    for surface in sorted(by_surface.rows):
        own = thresholds.surfaces.get(surface)
        figures = own.provenance["achieved"]["test"] if own is not None else {}
        kind = "default (fallback)"
        if own is not None:
            kind = "own (certified)" if surface in by_surface.surfaces else "no bands (escalates)"
        table.add_row(
            surface,
            str(by_surface.rows[surface]),
            kind,
            *(value_with_ci(figures.get(key)) for key in ("block_precision", "allow_miss", "llm_rate")),
        )
    figures = tested["default_test"]
    table.add_row(
        "(items judged by the default)",
        "",
        "default",
        *(value_with_ci(figures.get(key)) for key in ("block_precision", "allow_miss", "llm_rate")),
    )
    console.print(table)
    console.print(
        "Targets are certified per band set, on its own surface's traffic; the table above the bands is the "
        "whole mix, where surfaces without a certified set may miss them (an escalating surface's LLM rate)."
    )
    for surface, reason in sorted(by_surface.fallbacks.items()):
        instead = "gets no bands (escalates)" if by_surface.escalate_fallbacks else "falls back to the default band set"
        console.print(f"surface {surface} {instead}: {reason}", markup=False)


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


def _render_shadow_model(agreement: dict[str, object], console: Console) -> None:
    table = Table(title=f"shadow model {agreement['shadow']}: agreement with the primary LLM (flagged at 0.5)")
    for column in ("shadowed", "agree", "disagree", "error", "primary only flagged", "shadow only flagged", "rate"):
        table.add_column(column, justify="right")
    rate = agreement["agreement_rate"]
    table.add_row(
        *(str(agreement[k]) for k in ("shadowed", "agree", "disagree", "error")),
        str(agreement["primary_only_flagged"]),
        str(agreement["shadow_only_flagged"]),
        "-" if rate is None else f"{rate:.1%}",
    )
    console.print(table)


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
    leave_one_source_out: Annotated[
        bool,
        typer.Option(
            help="Also, per source: bands calibrated (with the file's targets) on the other sources' calibration "
            "rows, measured on this source's test rows."
        ),
    ] = False,
    stages: StagesOption = ",".join(STAGE_ORDER),
    batch_size: BatchOption = 64,
    refresh_scores: RefreshOption = False,
) -> None:
    """Measure a threshold set on labelled data: decision mix, stage flow, quality, cost, latency, plots."""
    settings = Settings()
    err = Console(stderr=True)
    rows, digests = _load_rows(data)
    all_rows = rows
    if split is not SplitChoice.ALL:
        rows = in_split(rows, Split(split.value))
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
    try:
        cross_targets = Targets.of_thresholds(primary) if leave_one_source_out else None
    except CalibrationError as exc:
        raise fail(f"{exc}; --leave-one-source-out needs a file written by `cascade calibrate`") from None
    built = _stages(settings, stages)
    stale = stale_stages(primary, built)
    for message in stale:
        err.print(f"[yellow]warning:[/] {message}; re-run `cascade calibrate`")
    labels_categories = LabelMatrix.of(rows).categories
    if live:
        kept, items, skipped = admit(rows, settings)
        runner = CascadeRunner(built, primary, policy.version, shadow)
        outcome, verdicts = _with_stages(built, lambda: live_run(runner, items, batch_size, labels_categories))
        labels = LabelMatrix.of(kept)
        stage_flagged = stage_flagged_from_verdicts(verdicts, runner.stage_names)
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
        outcome = simulate(table, primary, labels_categories, labels.surfaces)
        stage_flagged = {s.name: s.column(FLAGGED) for s in table.stages}
        shadow_decision = simulate_shadow(table, outcome, shadow, labels.surfaces) if shadow else None
        frontier = file_frontier(primary, table, labels)

    calibrated = {
        c
        for band_set in primary.band_sets().values()
        for by_stage in (band_set.stages, band_set.score_maps)
        for cats in by_stage.values()
        for c in cats
    }
    report = build_report(
        outcome,
        labels,
        confidence,
        sorted(calibrated),
        (shadow.version, shadow_decision) if shadow is not None and shadow_decision is not None else None,
        stage_flagged=stage_flagged,
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
    if live:  # the shadow model's answers live in the verdicts' traces, not in the replayed score tables
        report["llm_shadow_model"] = shadow_agreement(verdicts)
    if cross_targets is not None:

        async def both_splits() -> tuple[tuple[ScoreTable, LabelMatrix, int], tuple[ScoreTable, LabelMatrix, int]]:
            scored = [
                await _score(
                    built, in_split(all_rows, part), settings, digests, part.value, refresh_scores, batch_size, err
                )
                for part in (Split.CALIBRATION, Split.TEST)
            ]
            return scored[0], scored[1]

        (cal_table, cal_labels, _), (test_table, test_labels, _) = _with_stages(built, both_splits)
        report["leave_one_source_out"] = cross_source(
            (cal_table, cal_labels), (test_table, test_labels), cross_targets, sorted(policy.names)
        )
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
    if report.get("llm_shadow_model"):
        _render_shadow_model(report["llm_shadow_model"], Console())  # type: ignore[arg-type]
    if plots is not None:
        err.print(f"plots: {', '.join(report['plots']) or 'none (no scores to plot)'}")  # type: ignore[arg-type]
