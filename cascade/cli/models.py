"""`cascade models ...`: build the serving artefacts ahead of time (e.g. in an image build step)."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from cascade.cli.app import app, fail
from cascade.embedding import ensure_onnx_model, model_identity, tuned_card
from cascade.settings import Settings

models_app = typer.Typer(help="Build and inspect model artefacts.", no_args_is_help=True)
app.add_typer(models_app, name="models")
console = Console()


@models_app.command("export")
def export(
    int8: Annotated[
        bool, typer.Option("--int8", help="Frozen design: also build the int8-quantised embedder.")
    ] = False,
    from_run: Annotated[
        Path | None,
        typer.Option(help="Tuned design: rebuild the model's encoder graphs from this fit work directory."),
    ] = None,
) -> None:
    """Export the frozen MiniLM embedder to ONNX under the data directory, if missing; or, for the tuned model,
    rebuild its graphs (e.g. the fp32 one, not kept in git) from the fit run (needs the train extra: torch)."""
    settings = Settings()
    card = tuned_card(settings.model_dir)
    if card is None:
        for quantized in (False, True) if int8 else (False,):
            path = ensure_onnx_model(settings, quantized)
            console.print(f"{model_identity(quantized)}: {path} ({path.stat().st_size / 1e6:.1f} MB)")
        return
    encoder = card["encoder"]
    if from_run is None:
        for precision, name in encoder["files"].items():
            present = (settings.model_dir / name).is_file()
            console.print(f"{settings.model_dir / name} ({precision}): {'shipped' if present else 'missing'}")
        if not all((settings.model_dir / name).is_file() for name in encoder["files"].values()):
            console.print("rebuild a missing graph with --from-run DIR (the fit's work directory, with checkpoint.pt)")
        return
    if not (from_run / "checkpoint.pt").is_file():
        raise fail(f"--from-run {from_run}: no checkpoint.pt there (the work directory of `cascade train`)")
    from cascade.embedding import source_model_dir
    from cascade.tuning.export import export as export_graphs
    from cascade.tuning.export import load_checkpoint

    model, _ = load_checkpoint(from_run, source_model_dir())
    with tempfile.TemporaryDirectory() as scratch:
        export_graphs(model, source_model_dir(), Path(scratch), int(encoder["max_tokens"]), ["ok", "word " * 300])
        for precision, name in encoder["files"].items():
            built = Path(scratch) / name
            digest = hashlib.sha256(built.read_bytes()).hexdigest()
            if digest != encoder["sha256"][precision]:
                raise fail(f"{from_run} rebuilds {name} as sha256 {digest[:12]}, not the card's: a different run")
            shutil.move(built, settings.model_dir / name)
            console.print(f"{settings.model_dir / name} ({precision}, sha256 {digest[:12]})")
