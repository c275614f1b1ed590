"""`cascade moderate`: the cascade over a JSONL file or stdin, one shot."""

from __future__ import annotations

import asyncio
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import IO, Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from cascade.assembly import STAGE_ORDER, build_runner, freeze_loaded_heap
from cascade.cli.app import app, fail
from cascade.contract import DeadLetter, Verdict
from cascade.intake import parse_record
from cascade.jsonl import raw_records
from cascade.pipeline import CascadeRunner, judge_batches, new_context
from cascade.repeats import is_repeat
from cascade.settings import Settings
from cascade.stages.base import ItemContext
from cascade.thresholds import ThresholdError


class ModerationSummary:
    """Counts for the operator: decisions, deciding stages, dead letters, stage problems."""

    def __init__(self, title: str = "cascade moderate") -> None:
        self.title = title
        self.decisions: Counter[str] = Counter()
        self.decided_by: Counter[str] = Counter()
        self.dead_letters: Counter[str] = Counter()
        self.stage_errors: Counter[tuple[str, str]] = Counter()
        self.repeats = 0
        self.started = time.perf_counter()

    def add_verdict(self, verdict: Verdict) -> None:
        self.decisions[verdict.decision.value] += 1
        self.decided_by[verdict.decided_by] += 1
        self.repeats += is_repeat(verdict)
        for entry in verdict.trace:
            if entry.error:
                self.stage_errors[(entry.stage, entry.error)] += 1

    def add_dead_letter(self, letter: DeadLetter) -> None:
        self.dead_letters[letter.error_code.value] += 1

    @property
    def items(self) -> int:
        return sum(self.decisions.values()) + sum(self.dead_letters.values())

    def render(self, console: Console, stage_names: list[str]) -> None:
        elapsed = time.perf_counter() - self.started
        verdicts = sum(self.decisions.values())
        table = Table(title=f"{self.title}: {self.items} records in {elapsed:.1f} s", show_lines=False)
        table.add_column("what")
        table.add_column("value")
        table.add_column("count", justify="right")
        table.add_column("share", justify="right")

        def share(n: int, of: int) -> str:
            return f"{n / of:.1%}" if of else "-"

        for decision in ("allow", "block", "review"):
            table.add_row(
                "decision", decision, str(self.decisions[decision]), share(self.decisions[decision], verdicts)
            )
        for stage in [*stage_names, "pipeline"]:
            if self.decided_by[stage]:
                n = self.decided_by[stage]
                label = stage if stage != "pipeline" else "nobody (review)"
                table.add_row("decided by", label, str(n), share(n, verdicts))
        # Every item is looked up before the first stage, so this share is the cache's hit rate.
        table.add_row("repeat cache", "re-issued (hit rate)", str(self.repeats), share(self.repeats, verdicts))
        for code, n in sorted(self.dead_letters.items()):
            table.add_row("dead letter", code, str(n), share(n, self.items))
        console.print(table)
        for (stage, error), n in self.stage_errors.most_common():
            console.print(f"[yellow]{stage}[/]: {n} item(s) escalated because: {error}")


def _read_records(stream: IO[bytes], name: str) -> Iterator[tuple[bytes, str]]:
    for lineno, record in raw_records(stream):
        yield record, f"{name}:{lineno}"


def _batches(records: Iterator[tuple[bytes, str]], size: int) -> Iterator[list[tuple[bytes, str]]]:
    batch: list[tuple[bytes, str]] = []
    for record in records:
        batch.append(record)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


async def moderate_stream(
    runner: CascadeRunner,
    records: Iterator[tuple[bytes, str]],
    settings: Settings,
    verdict_out: IO[str],
    dead_letter_out: IO[str],
    summary: ModerationSummary,
    batch_size: int = 64,
    on_progress: Callable[[int], None] | None = None,
) -> None:
    """Every record → one verdict line or one dead-letter line; verdicts in input order."""

    def contexts() -> Iterator[list[ItemContext]]:
        for batch in _batches(records, batch_size):
            parsed_batch: list[ItemContext] = []
            for raw, source in batch:
                parsed = parse_record(raw, settings, source)
                if isinstance(parsed, DeadLetter):
                    dead_letter_out.write(parsed.model_dump_json() + "\n")
                    summary.add_dead_letter(parsed)
                else:
                    parsed_batch.append(new_context(parsed, source))
            if on_progress is not None:
                on_progress(sum(len(raw) + 1 for raw, _ in batch))
            if parsed_batch:
                yield parsed_batch

    in_flight = settings.batches_in_flight(runner.stage_names)
    async for verdicts in judge_batches(runner, contexts(), in_flight):
        for verdict in verdicts:
            verdict_out.write(verdict.model_dump_json() + "\n")
            summary.add_verdict(verdict)


@app.command()
def moderate(
    input: Annotated[str, typer.Argument(help="JSONL of ContentItem records, or - for stdin.")],
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Verdict JSONL (default: stdout).")] = None,
    dead_letter: Annotated[
        Path | None,
        typer.Option("--dead-letter", help="Dead-letter JSONL (default: OUTPUT.deadletter.jsonl, or stderr)."),
    ] = None,
    thresholds: Annotated[Path | None, typer.Option(help="Threshold set (default: the packaged default set).")] = None,
    shadow_thresholds: Annotated[
        Path | None, typer.Option(help="A second threshold set, recorded in each verdict, never acted on.")
    ] = None,
    stages: Annotated[str, typer.Option(help="Comma-separated stages to run, in cascade order.")] = ",".join(
        STAGE_ORDER
    ),
    batch_size: Annotated[int, typer.Option(min=1, max=4096)] = 64,
) -> None:
    """Moderate JSONL: one verdict per valid record, one dead letter per bad one, a summary on stderr."""
    settings = Settings()
    stage_names = [s.strip() for s in stages.split(",") if s.strip()]
    if input != "-" and not Path(input).is_file():
        raise fail(f"input file not found: {input}")
    if dead_letter is None and output is not None:
        dead_letter = output.with_name(output.name + ".deadletter.jsonl")
    for path, option in ((output, "-o/--output"), (dead_letter, "--dead-letter")):
        if path is not None and not path.parent.is_dir():
            raise fail(f"{option}: directory {path.parent} does not exist; create it or choose another path")
    try:
        runner = build_runner(settings, thresholds, shadow_thresholds, stage_names)
    except (ThresholdError, ValueError, FileNotFoundError) as exc:
        raise fail(str(exc)) from exc
    freeze_loaded_heap()

    err = Console(stderr=True)
    summary = ModerationSummary()
    with ExitStack() as stack:
        verdict_out = stack.enter_context(output.open("w", encoding="utf-8")) if output else sys.stdout
        dl_out = stack.enter_context(dead_letter.open("w", encoding="utf-8")) if dead_letter else sys.stderr
        if input == "-":
            stream, total = sys.stdin.buffer, None
        else:
            stream, total = stack.enter_context(Path(input).open("rb")), Path(input).stat().st_size
        progress = (
            Progress(
                TextColumn("moderating"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                console=err,
                transient=True,
            )
            if total
            else nullcontext()
        )
        with progress:
            task = progress.add_task("bytes", total=total) if total else None
            advance = (lambda n: progress.advance(task, n)) if task is not None else None
            asyncio.run(
                _run_and_close(
                    runner, _read_records(stream, input), settings, verdict_out, dl_out, summary, batch_size, advance
                )
            )
    summary.render(err, runner.stage_names)


async def _run_and_close(runner: CascadeRunner, *args: object) -> None:
    try:
        await moderate_stream(runner, *args)  # type: ignore[arg-type]
    finally:
        await runner.aclose()
