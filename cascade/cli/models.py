"""`cascade models ...`: build the serving artefacts ahead of time (e.g. in an image build step)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from cascade.cli.app import app
from cascade.embedding import ensure_onnx_model, model_identity
from cascade.settings import Settings

models_app = typer.Typer(help="Build and inspect model artefacts.", no_args_is_help=True)
app.add_typer(models_app, name="models")
console = Console()


@models_app.command("export")
def export(
    int8: Annotated[bool, typer.Option("--int8", help="Also build the int8-quantised embedder.")] = False,
) -> None:
    """Export the MiniLM embedder to ONNX under the data directory, if missing (needs the train extra: torch)."""
    settings = Settings()
    for quantized in (False, True) if int8 else (False,):
        path = ensure_onnx_model(settings, quantized)
        console.print(f"{model_identity(quantized)}: {path} ({path.stat().st_size / 1e6:.1f} MB)")
