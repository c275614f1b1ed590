"""`cascade sample`: ContentItem JSONL drawn from labelled data, for demos and benchmarks."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Annotated

import typer

from cascade.cli.app import app, fail
from cascade.data import DataError, Split, load_labelled


@app.command()
def sample(
    data: Annotated[list[Path], typer.Argument(help="Labelled JSONL files (shared/data format).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write ContentItem JSONL.")],
    split: Annotated[Split | None, typer.Option(help="Only rows of this deterministic split.")] = Split.TEST,
    n: Annotated[int, typer.Option("-n", min=1, help="How many items (fewer if the data has fewer).")] = 1000,
    seed: Annotated[int, typer.Option(help="Shuffle seed; the same seed gives the same sample.")] = 7,
) -> None:
    """Draw a deterministic random sample of items (id, text and surface: labels stay out)."""
    missing = [str(p) for p in data if not p.is_file()]
    if missing:
        raise fail(f"data file(s) not found: {', '.join(missing)}")
    try:
        rows = load_labelled(data, split)
    except DataError as exc:
        raise fail(str(exc)) from exc
    random.Random(seed).shuffle(rows)
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w", encoding="utf-8") as fh:
        for row in rows[:n]:
            fh.write(json.dumps(row.item_record(), ensure_ascii=False) + "\n")
    typer.echo(f"wrote {min(n, len(rows))} items to {output}")
