"""`cascade schemas`: the JSON Schemas of the contract, generated from the pydantic models."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cascade.cli.app import app, fail
from cascade.contract import json_schemas
from cascade.settings import PROJECT_ROOT


@app.command()
def schemas(
    out_dir: Annotated[Path, typer.Option("--dir", help="Where the schema files live.")] = PROJECT_ROOT / "schemas",
    check: Annotated[bool, typer.Option("--check", help="Fail if the files are not current; write nothing.")] = False,
) -> None:
    """Write (or check) schemas/*.schema.json from the contract models."""
    stale = [name for name, text in json_schemas().items() if _read(out_dir / name) != text]
    if check:
        if stale:
            raise fail(f"out of date: {', '.join(stale)}; run `cascade schemas`")
        typer.echo("schemas are current")
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in json_schemas().items():
        (out_dir / name).write_text(text, encoding="utf-8")
    typer.echo(f"wrote {len(json_schemas())} schema files to {out_dir} ({len(stale)} changed)")


def _read(path: Path) -> str | None:
    return path.read_text(encoding="utf-8") if path.exists() else None
