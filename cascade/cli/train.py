"""`cascade train`: fit the classifier stage's model on labelled JSONL and write it with its card.

`--design mlp|logreg` (the default model's design) fits heads on the frozen MiniLM embedding
(`cascade.train`); `--design tuned` fine-tunes the encoder with its heads (`cascade.tuning`).
"""

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
    from cascade.train.fit import TrainOptions
    from cascade.tuning.build import TunedOptions


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


def _tuned_command_line(data: list[Path], out: Path, options: TunedOptions, with_seeds: bool) -> str:
    fit = options.fit
    words = ["cascade", "train", *map(str, data), "--out", str(out), "--name", options.name, "--design", "tuned"]
    words += ["--epochs", str(fit.epochs), "--max-tokens", str(fit.max_tokens), "--batch-size", str(fit.batch_size)]
    words += ["--learning-rate", f"{fit.encoder_lr:g}", "--seed", str(fit.seed)]
    for source, cap in sorted(fit.source_caps.items()):
        words += ["--source-cap", f"{source}={cap}"]
    for source in fit.flagged_ignored:
        words += ["--ignore-flagged-of", source]
    words += ["--max-minutes", f"{fit.max_minutes:g}"] if fit.max_minutes else []
    words += ["--compare-model", str(options.compare_model)] if options.compare_model else []
    words += ["--policy-seeds" if with_seeds else "--no-policy-seeds"]
    return shlex.join(words)


def _parse_caps(pairs: list[str]) -> dict[str, int]:
    caps: dict[str, int] = {}
    for pair in pairs:
        source, sep, value = pair.partition("=")
        if not sep or not source or not value.isdigit() or int(value) < 2:
            raise fail(f"--source-cap wants SOURCE=ROWS (an integer >= 2), got {pair!r}")
        caps[source] = int(value)
    return caps


def _train_tuned(
    data: list[Path],
    out: Path,
    options: TunedOptions,
    policy_seeds: bool,
    work_dir: Path | None,
    from_run: Path | None,
    explicit_caps: dict[str, int],
) -> None:
    """Train (or take `from_run`), export, measure; the default caps may name sources the data lacks."""
    from cascade.data import load_labelled
    from cascade.train import policy_seed_rows
    from cascade.tuning.build import build
    from cascade.tuning.card import write_card
    from cascade.tuning.export import ExportError

    settings = Settings()
    sources = {r.source for r in load_labelled(data)}
    unknown = (set(explicit_caps) | set(options.fit.flagged_ignored)) - sources
    if unknown:
        raise fail(f"--source-cap / --ignore-flagged-of name sources not in the data: {sorted(unknown)}")
    if options.compare_model is not None and not (options.compare_model / "card.json").is_file():
        raise fail(
            f"--compare-model {options.compare_model}: no card.json there (a model directory of `cascade train`)"
        )
    if from_run is not None and not (from_run / "checkpoint.pt").is_file():
        raise fail(
            f"--from-run {from_run}: no checkpoint.pt there (a work directory of `cascade train --design tuned`)"
        )
    seeds = policy_seed_rows(settings.policies_dir)[0] if policy_seeds else []
    console = Console(stderr=True)
    run_dir = from_run or work_dir or settings.data_path("tuning") / options.name
    try:
        card = build(
            data,
            seeds,
            out,
            run_dir,
            options,
            settings.data_path("eval-cache"),
            lambda message: console.print(message, markup=False, highlight=False),
            from_run=from_run is not None,
        )
    except ExportError as exc:
        raise fail(str(exc)) from exc
    card["command"] = _tuned_command_line(data, out, options, policy_seeds)
    write_card(card, out)
    console.print(f"wrote {out}: {', '.join(card['encoder']['files'].values())}, tokenizer.json, card.json, card.md")
    for source, heads in card["evaluation"]["test"][card["default_precision"]].items():
        flagged = heads.get("flagged", {}).get("auprc")
        console.print(f"  test split, {source}: flagged AUPRC {flagged}")


@app.command()
def train(
    data: Annotated[list[Path], typer.Argument(exists=True, dir_okay=False, help="Labelled JSONL files.")],
    out: Annotated[Path, typer.Option("--out", help="Model directory to write (model.onnx, card.json, card.md).")],
    name: Annotated[str | None, typer.Option(help="Model name in the card and traces (default: OUT's name).")] = None,
    design: Annotated[
        str, typer.Option(help="tuned (fine-tune the encoder with its heads), or mlp / logreg heads on the frozen one.")
    ] = "mlp",
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
    epochs: Annotated[int, typer.Option(min=1, help="tuned: most epochs (early stopping may end sooner).")] = 3,
    max_tokens: Annotated[int, typer.Option(min=8, max=512, help="tuned: truncation while training.")] = 256,
    batch_size: Annotated[int, typer.Option(min=1, help="tuned: rows per optimisation step.")] = 16,
    learning_rate: Annotated[float, typer.Option(min=1e-7, help="tuned: peak learning rate of the encoder.")] = 5e-5,
    source_cap: Annotated[
        list[str] | None,
        typer.Option(
            help="tuned: SOURCE=ROWS drawn per epoch, half flagged (repeatable; default Davidson 400, SMS 300)."
        ),
    ] = None,
    max_minutes: Annotated[float, typer.Option(min=0, help="tuned: wall-clock budget for the fit (0: none).")] = 0.0,
    threads: Annotated[
        int, typer.Option(min=0, help="tuned: torch threads (0: one per core; 1 leaves a core to other work).")
    ] = 1,
    ignore_flagged_of: Annotated[
        list[str] | None,
        typer.Option(help="tuned: SOURCE whose `flagged` label is masked; its categories still train (repeatable)."),
    ] = None,
    compare_model: Annotated[
        Path | None, typer.Option(help="tuned: a frozen model directory measured on the same rows for the card.")
    ] = None,
    work_dir: Annotated[
        Path | None, typer.Option(help="tuned: where the fit keeps its checkpoint (default: DATA_DIR/tuning/NAME).")
    ] = None,
    from_run: Annotated[
        Path | None, typer.Option(help="tuned: export and measure the fit already in this work directory.")
    ] = None,
) -> None:
    """Train the classifier on DATA and write it to OUT with its model card."""
    from cascade.embedding import Embedder, frozen_spec
    from cascade.train import train as run_training
    from cascade.train import write_model
    from cascade.train.fit import DESIGNS, TrainError, TrainOptions

    weights = _parse_weights(source_weight or [])
    if design == "tuned":
        from cascade.tuning.build import TunedOptions
        from cascade.tuning.fit import FitOptions

        caps = _parse_caps(source_cap or [])
        fit_options = FitOptions(
            epochs=epochs,
            max_tokens=max_tokens,
            batch_size=batch_size,
            encoder_lr=learning_rate,
            seed=seed,
            max_minutes=max_minutes,
            threads=threads,
            flagged_ignored=tuple(ignore_flagged_of or ()),
            **({"source_caps": caps} if caps else {}),
        )
        if weights:
            raise fail("--source-weight is for the frozen designs (mlp, logreg); the tuned design uses --source-cap")
        tuned = TunedOptions(name=name or out.resolve().name, fit=fit_options, compare_model=compare_model)
        _train_tuned(data, out, tuned, policy_seeds, work_dir, from_run, caps)
        return

    compared = tuple(d for d in compare.split(",") if d.strip())
    unknown = {design, *compared} - set(DESIGNS)
    if unknown:
        raise fail(f"unknown design(s) {sorted(unknown)}; known: tuned, {', '.join(DESIGNS)}")
    options = TrainOptions(
        design=design,
        c=c,
        source_weights=weights,
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
    embedder = Embedder.from_settings(settings, frozen_spec(settings))  # heads on the frozen MiniLM
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
