"""`cascade bench`: throughput, quality and cost, and scaling, measured side by side in one run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from cascade.cli.app import app, fail
from cascade.data import DEFAULT_DATA_DIR, labelled_files
from cascade.settings import Settings


@app.command()
def bench(
    files: Annotated[
        list[Path] | None, typer.Argument(help="Labelled JSONL files (also accepted after --data).")
    ] = None,
    data: Annotated[
        list[Path] | None, typer.Option("--data", help=f"Labelled JSONL files (default: {DEFAULT_DATA_DIR}/*.jsonl).")
    ] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Small samples and fewer rounds: under a minute.")] = False,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write the result here (default: DATA_DIR/bench/latest.json).")
    ] = None,
    plots: Annotated[Path | None, typer.Option("--plots", help="Write PNG plots into this directory.")] = None,
    thresholds: Annotated[
        Path | None, typer.Option(help="Threshold set of the cascade (default: the configured one).")
    ] = None,
    sections: Annotated[str, typer.Option(help="Comma-separated: throughput, quality, scaling.")] = (
        "throughput,quality,scaling"
    ),
    rounds: Annotated[int | None, typer.Option(min=1, help="Interleaved rounds per throughput row.")] = None,
    items: Annotated[
        int | None, typer.Option(min=8, help="Test-split texts every throughput row runs on (default 512).")
    ] = None,
    torch: Annotated[bool, typer.Option(help="Compare sentence-transformers (torch) embeddings.")] = True,
    stream: Annotated[bool, typer.Option(help="Measure end to end through the embedded broker.")] = True,
    scale_out: Annotated[
        bool, typer.Option(help="Through the broker: two single-thread workers in one group against one.")
    ] = True,
    refresh_scores: Annotated[
        bool, typer.Option(help="Re-score the quality items even when cached scores match (e.g. after a bank change).")
    ] = False,
) -> None:
    """Measure the cascade: every ratio in the output comes from this one run (docs/bench.md)."""
    from cascade.bench import run_bench
    from cascade.bench.config import SECTIONS, BenchConfig
    from cascade.bench.report import render, write_json, write_plots

    paths = [*(data or []), *(files or [])] or labelled_files()
    if not paths:
        raise fail(f"no data: pass labelled JSONL files (none found in {DEFAULT_DATA_DIR})")
    for path in paths:
        if not path.is_file():
            raise fail(f"data file not found: {path}")
    chosen = tuple(s.strip() for s in sections.split(",") if s.strip())
    unknown = set(chosen) - set(SECTIONS)
    if unknown or not chosen:
        raise fail(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    overrides: dict[str, object] = {
        "sections": chosen,
        "thresholds": thresholds,
        "torch": torch,
        "stream": stream,
        "scale_out": scale_out,
        "refresh_scores": refresh_scores,
    }
    if rounds is not None:
        overrides["rounds"] = rounds
    if items is not None:
        overrides["throughput_items"] = items
    config = BenchConfig.preset(tuple(paths), quick, **overrides)
    settings = Settings()
    err = Console(stderr=True)
    result, curves = run_bench(config, settings, lambda message: err.print(f"[dim]{message}[/]"))
    render(result, Console())
    out = json_out or settings.data_path("bench", "latest.json")
    write_json(result, out)
    err.print(f"wrote {out}")
    if plots is not None:
        for path in write_plots(result, curves, plots):
            err.print(f"wrote {path}")
