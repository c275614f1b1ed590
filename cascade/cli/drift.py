"""`cascade drift`: has traffic moved away from what a threshold file was certified on?"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cascade.cli.app import app, fail
from cascade.cli.bank import file_progress, import_progress
from cascade.contract import Verdict
from cascade.drift import PSI_ALERT, PSI_WATCH, DriftError, Reference, moved, rows_to_label, summarise
from cascade.jsonl import read_jsonl
from cascade.settings import Settings
from cascade.stream.client import read_topics
from cascade.stream.topics import Topics
from cascade.thresholds import ThresholdError, ThresholdSet


def _parse_time(value: str | None, option: str) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise fail(f"{option} {value!r} is not an ISO 8601 time; use e.g. 2026-11-30T06:00:00Z") from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _from_files(paths: Sequence[Path], err: Console) -> list[Verdict]:
    verdicts, skipped = [], 0
    with import_progress() as progress:
        for path in paths:
            for _, record in read_jsonl(path, file_progress(progress, path)):
                try:
                    verdicts.append(Verdict.model_validate(record))
                except ValidationError:
                    skipped += 1  # a dead letter, a summary line, a corrupt line: not a verdict
    if skipped:
        err.print(f"[yellow]skipped {skipped} lines that are not verdicts[/]")
    return verdicts


def _from_topics(
    url: str, topics: Topics, since: datetime | None, until: datetime | None, idle_s: float
) -> list[Verdict]:
    """Every verdict on the verdict topics processed in [since, until), read until the topics go quiet."""
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)  # its connection errors: we print one line

    async def read() -> list[Verdict]:
        found: list[Verdict] = []
        quiet_since = time.monotonic()
        async for topic, _, value in read_topics(url, topics.all_verdicts):
            if not topic:
                if time.monotonic() - quiet_since > idle_s:
                    return found
                continue
            quiet_since = time.monotonic()
            verdict = Verdict.model_validate_json(value)
            if (since is None or verdict.processed_at >= since) and (until is None or verdict.processed_at < until):
                found.append(verdict)
        return found

    return asyncio.run(read())


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _status(psi: float | None) -> str:
    if psi is None:
        return "no scores"
    return "[red]moved[/]" if psi >= PSI_ALERT else "[yellow]moving[/]" if psi >= PSI_WATCH else "stable"


def _render(summary: dict[str, Any], min_items: int, console: Console) -> None:
    table = Table(title=f"score drift: {summary['items']} verdicts vs {summary['reference_items']} calibration items")
    for column in ("stage", "category", "scored", "PSI", "KS", "median (ref)", "p95 (ref)", "status"):
        table.add_column(column, justify="left" if column in ("stage", "category", "status") else "right")
    for stage in summary["stages"]:
        for c in stage["categories"]:
            q, r = c["quantiles"], c["reference_quantiles"]
            few = c["scored"] < min_items
            table.add_row(
                escape(stage["stage"]),
                escape(c["category"]),
                str(c["scored"]),
                "-" if c["psi"] is None else f"{c['psi']:.3f}",
                "-" if c["ks"] is None else f"{c['ks']:.3f}",
                f"{q['p50']:.3f} ({r['p50']:.3f})" if c["scored"] else "-",
                f"{q['p95']:.3f} ({r['p95']:.3f})" if c["scored"] else "-",
                f"too few (< {min_items})" if few and c["scored"] else _status(c["psi"]),
            )
    console.print(table)
    mix = Table(title="decisions and flow: live (calibration reference)")
    mix.add_column("figure")
    mix.add_column("live", justify="right")
    mix.add_column("reference", justify="right")
    for name in summary["reference_decisions"]:
        mix.add_row(
            f"decision {name}", _percent(summary["decisions"][name]), _percent(summary["reference_decisions"][name])
        )
    for name, share in summary["reference_decided_by"].items():
        mix.add_row(f"decided by {escape(name)}", _percent(summary["decided_by"].get(name, 0.0)), _percent(share))
    for stage in summary["stages"]:
        mix.add_row(f"reach {escape(stage['stage'])}", _percent(stage["reached"]), _percent(stage["reference_reached"]))
    mix.add_row("LLM rate", _percent(summary["llm_rate"]), _percent(summary["reference_llm_rate"]))
    mix.add_row("review rate", _percent(summary["review_rate"]), _percent(summary["reference_review_rate"]))
    console.print(mix)


def _advice(summary: dict[str, Any], worst: list[dict[str, Any]], targets: dict[str, Any]) -> list[str]:
    lines = []
    if worst:
        named = ", ".join(f"{m['stage']}/{m['category']} (PSI {m['psi']:.2f})" for m in worst)
        lines.append(f"MOVED: {named}. The bands were certified on a different mix: their guarantees do not hold here.")
        rows = rows_to_label(targets, summary["decisions"].get("block", 0.0))
        how_many = f"about {rows:,} rows" if rows else "a fresh sample"
        lines.append(
            f"Recalibrate: label {how_many} drawn at random from current traffic (only the calibration split, "
            "20 % of rows, certifies), run `cascade calibrate` on them together with the old data, and roll the "
            "new file out as --shadow-thresholds first."
        )
    else:
        lines.append(f"No stage or category moved (every PSI < {PSI_ALERT}).")
    max_llm = targets.get("max_llm_rate")
    if max_llm is not None and summary["llm_rate"] > max_llm:
        lines.append(
            f"The LLM rate {summary['llm_rate']:.1%} exceeds the certified budget {max_llm:.1%}: LLM cost and "
            "latency are above plan."
        )
    return lines


@app.command()
def drift(
    verdicts: Annotated[
        list[Path] | None, typer.Argument(help="Verdict logs (JSONL, one Verdict per line), e.g. from cascade tail.")
    ] = None,
    thresholds: Annotated[
        Path | None, typer.Option(help="Threshold file with a reference (default: configured).")
    ] = None,
    broker: Annotated[
        str | None, typer.Option(help="Read the verdict topics of this Kafka cluster instead of files.")
    ] = None,
    since: Annotated[str | None, typer.Option(help="With --broker: verdicts processed at or after (ISO 8601).")] = None,
    until: Annotated[str | None, typer.Option(help="With --broker: verdicts processed before (ISO 8601).")] = None,
    idle: Annotated[float, typer.Option(min=0.1, help="With --broker: stop after this many quiet seconds.")] = 3.0,
    min_items: Annotated[int, typer.Option(min=1, help="Scores a stage × category needs to be judged.")] = 200,
    json_report: Annotated[Path | None, typer.Option("--json", help="Write the report here as JSON.")] = None,
    plots: Annotated[Path | None, typer.Option(help="Directory for a PNG of the moved score distributions.")] = None,
) -> None:
    """Compare live verdicts with a threshold file's calibration reference: what moved, by how much, what to do."""
    settings = Settings()
    err = Console(stderr=True)
    if bool(verdicts) == bool(broker):
        raise fail("give verdict log files or --broker URL (with --since/--until), not both and not neither")
    if (since or until) and not broker:
        raise fail("--since/--until select verdicts on the topics: use them with --broker")
    start, end = _parse_time(since, "--since"), _parse_time(until, "--until")
    try:
        threshold_set = ThresholdSet.load(thresholds or settings.thresholds)
        reference = Reference.from_thresholds(threshold_set)
    except (ThresholdError, DriftError) as exc:
        raise fail(str(exc)) from exc
    if reference is None:
        raise fail(
            f"thresholds {threshold_set.version} carry no drift reference (calibrated before references existed); "
            "re-run `cascade calibrate` to write one"
        )
    if verdicts:
        for path in verdicts:
            if not path.is_file():
                raise fail(f"verdict log not found: {path}")
        found = _from_files(verdicts, err)
    else:
        try:
            found = _from_topics(broker, Topics(settings.topic_prefix), start, end, idle)  # type: ignore[arg-type]
        except (OSError, RuntimeError) as exc:
            raise fail(f"cannot read the verdict topics from {broker}: {exc}; check --broker") from exc
    if not found:
        raise fail("no verdicts to compare (empty logs, or nothing in the time range)")
    other = {v.thresholds_version for v in found} - {threshold_set.version}
    if other:
        err.print(
            f"[yellow]warning:[/] verdicts made under thresholds {', '.join(sorted(map(escape, other)))}, "
            f"compared with the reference of {escape(threshold_set.version)}"
        )
    summary = summarise(reference, ((v.trace, v.decision, v.decided_by) for v in found))
    worst = moved(summary, min_items)
    targets = threshold_set.provenance.get("targets", {})
    advice = _advice(summary, worst, targets)
    console = Console()
    _render(summary, min_items, console)
    for line in advice:
        console.print(escape(line))
    report = {
        **summary,
        "thresholds_version": threshold_set.version,
        "moved": worst,
        "advice": advice,
        "rows_to_label": rows_to_label(targets, summary["decisions"].get("block", 0.0)) if worst else None,
    }
    if plots is not None:
        from cascade.plots import drift_histograms

        plots.mkdir(parents=True, exist_ok=True)
        written = drift_histograms(worst, plots / "drift.png")
        report["plots"] = [str(written)] if written else []
        err.print(f"plots: {written or 'none (nothing moved)'}")
    if json_report is not None:
        json_report.parent.mkdir(parents=True, exist_ok=True)
        json_report.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
