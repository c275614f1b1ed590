"""`cascade train`: fit the classifier stage's model on labelled JSONL and write it with its card."""

from __future__ import annotations

import shlex
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cascade.cli.app import app, fail
from cascade.data import DataError, Split
from cascade.settings import Settings

if TYPE_CHECKING:
    from cascade.train import TrainOptions


def _parse_weights(pairs: list[str]) -> dict[str, float]:
    weights: dict[str, float] = {}
    for pair in pairs:
        source, sep, value = pair.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = -1.0
        if not sep or not source or weight < 0:
            raise fail(f"--source-weight wants SOURCE=NON_NEGATIVE_NUMBER, got {pair!r}")
        weights[source] = weight
    return weights


def _command_line(data: list[Path], out: Path, options: TrainOptions, all_splits: bool) -> str:
    """The full command that reproduces this model, every option spelled out."""
    words = ["cascade", "train", *map(str, data), "--out", str(out), "--name", options.name]
    words += ["--design", options.design, "--compare", ",".join(options.compare)]
    for source, weight in sorted(options.source_weights.items()):
        words += ["--source-weight", f"{source}={weight:g}"]
    words += ["--c", f"{options.c:g}", "--folds", str(options.folds), "--seed", str(options.seed)]
    words += ["--all-splits"] if all_splits else []
    words += ["--cross-source" if options.cross_source else "--no-cross-source"]
    words += ["--policy-seeds" if options.policy_seeds else "--no-policy-seeds"]
    words += ["--min-positives", str(options.min_positives)]
    return shlex.join(words)


@app.command()
def train(
    data: Annotated[list[Path], typer.Argument(exists=True, dir_okay=False, help="Labelled JSONL files.")],
    out: Annotated[Path, typer.Option("--out", help="Model directory to write (model.onnx, card.json, card.md).")],
    name: Annotated[str | None, typer.Option(help="Model name in the card and traces (default: OUT's name).")] = None,
    design: Annotated[str, typer.Option(help="Estimator per head: mlp or logreg.")] = "mlp",
    compare: Annotated[
        str, typer.Option(help="Comma-separated designs to cross-validate beside DESIGN for the card ('' for none).")
    ] = "logreg",
    source_weight: Annotated[
        list[str] | None,
        typer.Option("--source-weight", help="SOURCE=W: multiply that source's share of the weight (repeatable)."),
    ] = None,
    c: Annotated[float, typer.Option("--c", min=1e-6, help="Inverse regularisation strength (logreg).")] = 1.0,
    folds: Annotated[int, typer.Option(min=2, max=20, help="Folds for calibration and for cross-validation.")] = 5,
    seed: Annotated[int, typer.Option(help="Seed for folds and estimators.")] = 20261127,
    all_splits: Annotated[
        bool, typer.Option(help="Train on every row, not only the train split (then nothing is held out).")
    ] = False,
    cross_source: Annotated[bool, typer.Option(help="Report train-on-others / test-on-one per source.")] = True,
    policy_seeds: Annotated[
        bool, typer.Option(help="Add the policy seed exemplars (cascade/policies/seeds) as one more source.")
    ] = False,
    min_positives: Annotated[
        int, typer.Option(min=2, help="Rows of each class a category needs to get a head (else it is skipped).")
    ] = 30,
) -> None:
    """Train the classifier on DATA and write it to OUT with its model card."""
    from cascade.embedding import Embedder
    from cascade.train import DESIGNS, TrainError, TrainOptions, write_model
    from cascade.train import train as run_training

    compared = tuple(d for d in compare.split(",") if d.strip())
    unknown = {design, *compared} - set(DESIGNS)
    if unknown:
        raise fail(f"unknown design(s) {sorted(unknown)}; known: {', '.join(DESIGNS)}")
    options = TrainOptions(
        design=design,
        c=c,
        source_weights=_parse_weights(source_weight or []),
        folds=folds,
        seed=seed,
        split=None if all_splits else Split.TRAIN,
        compare=compared,
        cross_source=cross_source,
        name=name or out.resolve().name,
        min_positives=min_positives,
    )
    settings = Settings()
    if policy_seeds:
        options = replace(options, policy_seeds=settings.policies_dir)
    console = Console(stderr=True)
    embedder = Embedder.from_settings(settings)
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as bar:
        tasks: dict[str, int] = {}

        def progress(task: str, done: int, total: int) -> None:
            key = "embed" if task == "embed" else "train"
            if key not in tasks:
                tasks[key] = bar.add_task("embedding rows" if key == "embed" else task, total=total)
            bar.update(tasks[key], completed=done, total=total, description=None if key == "embed" else task)

        try:
            trained = run_training(
                data, embedder.embed, embedder.identity, settings.data_dir / "train-cache", options, progress
            )
        except (TrainError, DataError) as exc:
            raise fail(str(exc)) from exc
    trained.card["command"] = _command_line(data, out, options, all_splits)
    write_model(trained, out)
    card = trained.card
    console.print(f"wrote {out}/model.onnx ({trained.onnx_model.ByteSize()} bytes), card.json, card.md")
    for head, metrics in card["cross_validation"].items():
        console.print(
            f"  {head:<10} CV AUPRC {metrics['auprc']:.3f}  F1@0.5 {metrics['f1_at_0.5']:.3f}  ECE {metrics['ece']:.3f}"
        )
