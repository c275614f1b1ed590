"""Fitting the frozen design's heads: one calibrated scikit-learn estimator per category on embeddings.

Labels are partial: a row trains a head only if it carries that head's label. Each head is a
`DESIGNS` estimator inside `CalibratedClassifierCV` (sigmoid calibration on held-out folds),
with per-source weights (see `cascade.train`); out-of-fold and leave-one-source-out figures
come from the same fitting code.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import ClassifierMixin
from sklearn.calibration import CalibratedClassifierCV
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score
from sklearn.model_selection import StratifiedKFold
from sklearn.neural_network import MLPClassifier

from cascade.data import LabelledItem, Split, categories_of

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
