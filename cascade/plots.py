"""PNG plots for `cascade evaluate --plots DIR` (matplotlib, headless Agg backend)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

RELIABILITY_BINS = 10


def _pyplot():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")  # no display here or on servers
    import matplotlib.pyplot as plt

    return plt


def _scored(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keep = ~np.isnan(scores)
    return scores[keep], positive[keep]


def pr_curves(stage_scores: Mapping[str, np.ndarray], positive: np.ndarray, path: Path) -> Path | None:
    """Precision–recall of each stage's `flagged` score over the items it scored."""
    from sklearn.metrics import average_precision_score, precision_recall_curve

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 5))
    drawn = 0
    for stage, scores in stage_scores.items():
        s, y = _scored(scores, positive)
        if s.size == 0 or y.all() or not y.any():
            continue
        precision, recall, _ = precision_recall_curve(y, s)
        ax.plot(recall, precision, label=f"{stage} (AP {average_precision_score(y, s):.3f}, n={s.size})")
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.axhline(float(positive.mean()), color="grey", linestyle=":", label="base rate")
    ax.set(
        xlabel="recall", ylabel="precision", title="Precision–recall per stage (flagged)", xlim=(0, 1), ylim=(0, 1.02)
    )
    ax.legend(loc="lower left", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def reliability(stage_scores: Mapping[str, np.ndarray], positive: np.ndarray, path: Path) -> Path | None:
    """Observed violation rate per score bin against the diagonal: are raw scores probabilities?"""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfectly calibrated")
    edges = np.linspace(0, 1, RELIABILITY_BINS + 1)
    drawn = 0
    for stage, scores in stage_scores.items():
        s, y = _scored(scores, positive)
        if s.size == 0:
            continue
        bins = np.clip(np.digitize(s, edges[1:-1]), 0, RELIABILITY_BINS - 1)
        counts = np.bincount(bins, minlength=RELIABILITY_BINS)
        filled = counts > 0
        mean_score = np.bincount(bins, weights=s, minlength=RELIABILITY_BINS)[filled] / counts[filled]
        rate = np.bincount(bins, weights=y.astype(float), minlength=RELIABILITY_BINS)[filled] / counts[filled]
        ax.plot(mean_score, rate, marker="o", label=f"{stage} (n={s.size})")
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set(xlabel="mean raw score in bin", ylabel="observed violation rate", title="Reliability (flagged)")
    ax.set(xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def cost_f1_frontier(
    points: Sequence[Mapping[str, float]], current: Mapping[str, float | None], path: Path
) -> Path | None:
    """Best F1 per LLM budget against modelled cost, with the evaluated threshold set marked."""
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 5))
    cost = [p["cost_relative_to_all_llm"] for p in points]
    ax.plot(cost, [p["f1_review_as_human"] for p in points], marker=".", label="F1, review resolved by a human")
    ax.plot(cost, [p["f1_review_as_allow"] for p in points], marker=".", label="F1, review counted as allow")
    if current.get("cost") is not None and current.get("f1") is not None:
        ax.scatter([current["cost"]], [current["f1"]], color="red", zorder=3, label="evaluated thresholds (human)")
    ax.set(xlabel="modelled cost relative to all-LLM", ylabel="F1 (flagged)", title="Cost–F1 frontier over LLM budgets")
    ax.set(xlim=(0, 1.05), ylim=(0, 1.02))
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def drift_histograms(moved: Sequence[Mapping[str, object]], path: Path) -> Path | None:
    """For each moved stage × category, live score shares per reference decile against the reference's."""
    if not moved:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(len(moved), 1, figsize=(7, 2.6 * len(moved)), squeeze=False)
    for ax, entry in zip(axes[:, 0], moved, strict=True):
        reference = np.asarray(entry["reference_bin_shares"], dtype=float)
        live = np.asarray(entry["bin_shares"], dtype=float)
        x = np.arange(reference.size)
        ax.bar(x - 0.2, reference, width=0.4, label="calibration reference")
        ax.bar(x + 0.2, live, width=0.4, label=f"live (n={entry['scored']})")
        ax.set(
            title=f"{entry['stage']} / {entry['category']}: PSI {float(entry['psi']):.2f}",  # type: ignore[arg-type]
            xlabel="reference score decile",
            ylabel="share of scores",
            xticks=x,
        )
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
