"""`cascade train --design tuned`: fit, export, measure, and write the model directory with its card.

Everything lands in `out`: `encoder.int8.onnx`, `encoder.fp32.onnx`, `tokenizer.json`,
`card.json`, `card.md`. The fit run (checkpoint, history) stays in a work directory, so a
finished fit can be exported and measured again (`from_run`) without training twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from cascade.data import FLAGGED, LabelledItem, Split, file_digest, load_labelled
from cascade.embedding import CARD_FILE, source_model_dir
from cascade.tuning.evaluate import (
    auprc_by_source,
    leave_one_source_out,
    model_scores,
    near_copy_threshold,
    sentences_per_second,
    serving_embedder,
)
from cascade.tuning.export import export, load_checkpoint
from cascade.tuning.fit import HISTORY, FitOptions, fit, label_matrix, per_source_sample

Log = Callable[[str], None]
INT8_MIN_SPEEDUP = 1.6
INT8_MAX_AUPRC_LOSS = 0.01
TRUNCATION_TOLERANCE = 0.005
SEED_OFFSET = 7  # a sample seed of its own: the evaluation samples differ from the fit's


@dataclass(frozen=True)
class TunedOptions:
    name: str = "default"
    fit: FitOptions = field(default_factory=FitOptions)
    truncations: tuple[int, ...] = (64, 128, 256)
    loso_cap: int = 600
    test_cap: int = 1500
    """Test rows per source measured (a fixed sample; every row of the smaller sources)."""
    speed_texts: int = 256
    compare_model: Path | None = None
    """A frozen model directory measured on the same rows, for the card's design comparison."""


def _parity_texts(rows: Sequence[LabelledItem], per_source: int) -> list[str]:
    """Texts of every length, padding included: the shortest, the longest and some between, per source."""
    texts: list[str] = []
    for source in sorted({r.source for r in rows}):
        mine = sorted((r.text for r in rows if r.source == source), key=len)
        picks = np.linspace(0, len(mine) - 1, num=min(per_source, len(mine))).astype(int)
        texts += [mine[i] for i in picks]
    return [*texts, "ok", "🙂🙂🙂 !!!", "word " * 400]


def trained_heads_auprc(
    rows: Sequence[LabelledItem], heads: Sequence[str], scores: np.ndarray, flagged_ignored: Sequence[str]
) -> dict[str, float]:
    """Per source, the mean AUPRC of the heads trained on it (its labelled heads; `flagged` unless masked).

    The yardstick of the choices below: a masked `flagged` on a source is not something the
    model was asked to learn, and its categories' heads are what serve that source.
    """
    result: dict[str, float] = {}
    for source, per_head in auprc_by_source(rows, heads, scores).items():
        values = [
            v["auprc"]
            for head, v in per_head.items()
            if v["auprc"] is not None and not (head == FLAGGED and source in flagged_ignored)
        ]
        if values:
            result[source] = round(float(np.mean(values)), 4)
    return result


def _choose_truncation(figures: dict[int, dict[str, Any]]) -> tuple[int, str]:
    """The shortest limit within the tolerance of the best limit on every source (AUPRC of its trained heads).

    Per source, not macro: long chat prompts lose what a longer limit keeps, while tweets and
    SMS never reach it, so an average over sources would hide the cost on the one that pays it.
    """
    sources = sorted(next(iter(figures.values()))["auprc"])
    best = {s: max(f["auprc"][s] for f in figures.values()) for s in sources}
    chosen = min(t for t, f in figures.items() if all(f["auprc"][s] >= best[s] - TRUNCATION_TOLERANCE for s in sources))
    return chosen, (
        f"the shortest limit within {TRUNCATION_TOLERANCE} AUPRC (the heads trained on each source) of the best "
        "limit on every source of the calibration sample: "
        + "; ".join(
            f"{t}: " + ", ".join(f"{s} {f['auprc'][s]:.4f}" for s in sources) for t, f in sorted(figures.items())
        )
    )


def build(
    paths: Sequence[Path],
    seed_rows: Sequence[LabelledItem],
    out: Path,
    work_dir: Path,
    options: TunedOptions,
    cache_dir: Path,
    log: Log,
    from_run: bool = False,
) -> dict[str, Any]:
    """Train (unless `from_run`: reuse the fit in `work_dir`), export to `out`, measure, write the card."""
    base = source_model_dir()
    if from_run:
        history = json.loads((work_dir / HISTORY).read_text(encoding="utf-8"))
    else:
        history = fit(paths, seed_rows, base, work_dir, options.fit, log)
    model, checkpoint = load_checkpoint(work_dir, base)
    heads: list[str] = list(checkpoint["heads"])
    max_tokens = int(checkpoint["options"]["max_tokens"])
    test = per_source_sample(load_labelled(paths, Split.TEST), options.test_cap, SEED_OFFSET)
    log("exporting fp32 and int8 graphs, checking parity against torch")
    encoder = export(model, base, out, max_tokens, _parity_texts(test, 8))
    version = encoder["sha256"]["int8"][:12]
    card: dict[str, Any] = {"name": options.name, "version": version, "design": "tuned", "heads": heads}
    # A first card, so the serving path can load the graphs for the measurements below.
    (out / CARD_FILE).write_text(json.dumps({**card, "encoder": encoder}) + "\n", encoding="utf-8")

    calibration = per_source_sample(load_labelled(paths, Split.CALIBRATION), options.fit.calibration_cap, SEED_OFFSET)
    long_texts = sorted((r.text for r in calibration), key=len)[-options.speed_texts // 4 :]
    truncation: dict[int, dict[str, Any]] = {}
    for limit in options.truncations:
        log(f"truncation {limit}: scoring the calibration sample")
        got_heads, scores, _ = model_scores(out, [r.text for r in calibration], True, cache_dir, limit)
        speed = sentences_per_second({"int8": serving_embedder(out, True, limit)}, long_texts, [16], rounds=2)
        truncation[limit] = {
            "auprc": trained_heads_auprc(calibration, got_heads, scores, options.fit.flagged_ignored),
            "sentences_per_second": speed["int8"]["batch_16"],
        }
    encoder["max_tokens"], truncation_rationale = _choose_truncation(truncation)
    calibration_auprc = {"int8": truncation[encoder["max_tokens"]]["auprc"]}
    got_heads, scores, _ = model_scores(out, [r.text for r in calibration], False, cache_dir, encoder["max_tokens"])
    calibration_auprc["fp32"] = trained_heads_auprc(calibration, got_heads, scores, options.fit.flagged_ignored)
    (out / CARD_FILE).write_text(json.dumps({**card, "encoder": encoder}) + "\n", encoding="utf-8")

    test_texts = [r.text for r in test]
    figures: dict[str, Any] = {}
    embeddings: dict[str, np.ndarray] = {}
    for precision, int8 in (("int8", True), ("fp32", False)):
        log(f"scoring the test split ({len(test)} rows), {precision}")
        got_heads, scores, embeddings[precision] = model_scores(out, test_texts, int8, cache_dir)
        figures[precision] = auprc_by_source(test, got_heads, scores)
    frozen_note = None
    loso_train = per_source_sample(load_labelled(paths, Split.TRAIN), options.loso_cap, SEED_OFFSET)
    loso_texts = [r.text for r in loso_train]
    log(f"leave-one-source-out: embedding {len(loso_train)} train rows")
    _, _, tuned_train = model_scores(out, loso_texts, True, cache_dir)
    _, _, calibration_vectors = model_scores(out, [r.text for r in calibration], True, cache_dir)
    encoder["near_copy_similarity"], near_copy = near_copy_threshold(
        tuned_train, loso_texts, calibration_vectors, [r.text for r in calibration]
    )
    (out / CARD_FILE).write_text(json.dumps({**card, "encoder": encoder}) + "\n", encoding="utf-8")
    loso = {"tuned int8": leave_one_source_out(loso_train, tuned_train, test, embeddings["int8"])}
    if options.compare_model is not None:
        log(f"scoring the test split with the frozen model {options.compare_model}")
        frozen_card = json.loads((options.compare_model / CARD_FILE).read_text(encoding="utf-8"))
        got_heads, scores, frozen_test = model_scores(options.compare_model, test_texts, False, cache_dir)
        figures["frozen"] = auprc_by_source(test, got_heads, scores)
        _, _, frozen_train = model_scores(options.compare_model, loso_texts, False, cache_dir)
        loso["frozen"] = leave_one_source_out(loso_train, frozen_train, test, frozen_test)
        frozen_note = (
            f"`{frozen_card['name']}` version {frozen_card['version']}, design `{frozen_card['design']}` on "
            f"`{frozen_card['input']['embedder']}` (fp32), the model shipped before this one"
        )

    log("speed: int8 against fp32")
    speed_sample = per_source_sample(test, options.speed_texts // 3, SEED_OFFSET)
    speed = sentences_per_second(
        {"int8": serving_embedder(out, True), "fp32": serving_embedder(out, False)},
        [r.text for r in speed_sample],
        [1, 64],
    )
    default_precision, precision_rationale = _choose_precision(calibration_auprc, speed)
    train_rows = load_labelled(paths, Split.TRAIN) + list(seed_rows)
    y, mask = label_matrix(train_rows, heads)
    card.update(
        {
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "task": "multi-label moderation scores and retrieval embeddings from one encoder pass",
            "encoder": encoder,
            "default_precision": default_precision,
            "precision_rationale": precision_rationale,
            "machine": f"{len(os.sched_getaffinity(0))} CPU cores ({platform.machine()}), shared with other work",
            "fit": history,
            "label_counts": {h: [int(mask[:, j].sum()), int(y[mask[:, j] > 0, j].sum())] for j, h in enumerate(heads)},
            "data": [*(file_digest(p) for p in paths), _seed_digest(seed_rows)],
            "evaluation": {
                "test": figures,
                "frozen_model": frozen_note,
                "leave_one_source_out": loso,
                "loso_cap": options.loso_cap,
                "truncation": truncation,
                "truncation_rationale": truncation_rationale,
                "calibration_auprc": calibration_auprc,
                "near_copy": near_copy,
                "speed": speed,
            },
            "options": {**asdict(options), "compare_model": str(options.compare_model or "")},
        }
    )
    return card


def _choose_precision(
    calibration_auprc: dict[str, dict[str, float]], speed: dict[str, dict[str, float]]
) -> tuple[str, str]:
    """int8 if it is at least 1.6x faster than fp32 (batch 64) and loses at most a point of AUPRC on any
    source (the heads trained on it, on the calibration sample: the test split only reports)."""
    speedup = speed["int8"]["batch_64"] / speed["fp32"]["batch_64"]
    losses = {s: round(calibration_auprc["fp32"][s] - v, 4) for s, v in calibration_auprc["int8"].items()}
    if not losses:
        return "fp32", "no calibration rows with both classes to compare int8 with: fp32 kept"
    worst = max(losses.values())
    ok = speedup >= INT8_MIN_SPEEDUP and worst <= INT8_MAX_AUPRC_LOSS
    return ("int8" if ok else "fp32"), (
        f"int8 is {speedup:.2f}x fp32 at batch 64 and loses at most {worst:+.4f} AUPRC on a source of the "
        f"calibration sample (the heads trained on it; bar: >= {INT8_MIN_SPEEDUP}x, <= {INT8_MAX_AUPRC_LOSS}): "
        + ", ".join(f"{s} {v:+.4f}" for s, v in sorted(losses.items()))
    )


def _seed_digest(seed_rows: Sequence[LabelledItem]) -> dict[str, Any]:
    digest = hashlib.sha256("\n".join(r.text for r in seed_rows).encode("utf-8")).hexdigest()
    return {"path": "cascade/policies/seeds", "sha256": digest, "rows": len(seed_rows)}
