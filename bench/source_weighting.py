"""Cross-source validation of the `flagged` head's source weighting (feeds docs/classifier.md).

Ranking quality only (AUPRC / ROC AUC do not depend on calibration), so a plain logistic
regression with the head's base weights stands in for the calibrated head. Views per
configuration, all on the TRAIN split of the shared data:
- in-domain: 5-fold out-of-fold AUPRC on each source's rows, every source in training;
- cross-source: train on the other two sources, AUPRC on the held-out one;
- policy seeds: the hand-written violating/benign examples of every policy category
  (cascade/policies/seeds), never trained on here: the closest stand-in this repository has
  for held-out benchmarks with categories the data lacks (violence, self-harm, sexual...).
With `--seeds`, the seeds join training as one more source (`cascade train --policy-seeds`)
and are scored leave-one-category-out instead: each seed category is scored by a model that
saw the data and the seeds of every *other* category, i.e. does teaching some policy
categories by example help with a category that has no example at all?
Needs the embedding cache that `cascade train` fills (run it once first).

    .venv/bin/python bench/source_weighting.py [LABEL-FILTER ...] > .cascade/bench/source_weighting.jsonl
"""

from __future__ import annotations

import json
import sys

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.model_selection import StratifiedKFold

from cascade.data import Split, labelled_files, load_labelled
from cascade.embedding import Embedder, cached_embeddings
from cascade.exemplars import load_seed_sets
from cascade.settings import Settings
from cascade.train.fit import TrainOptions, head_data

DATA = labelled_files()  # ../shared/data: run from the repository root
SOURCES = ("davidson2017", "sms_spam_collection", "toxicchat0124")


def _fit(X: np.ndarray, y: np.ndarray, w: np.ndarray, c: float) -> LogisticRegression:
    return LogisticRegression(C=c, max_iter=3000).fit(X, y, sample_weight=w)


def class_balanced(weight: np.ndarray, sources: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Within each source, positives and negatives get half of the source's weight each."""
    out = weight.copy()
    for source in set(sources.tolist()):
        rows = sources == source
        for label in (0, 1):
            cell = rows & (y == label)
            if cell.any():
                out[cell] = weight[rows].sum() / (2 * cell.sum())
    return out


def evaluate(
    rows: list, X: np.ndarray, seeds_X: np.ndarray, seeds_y: np.ndarray, options: TrainOptions, balance: bool
) -> dict:
    (head, *_), _ = head_data(rows, options)
    Xh, y, src = X[head.index], head.y, head.sources
    w = class_balanced(head.weight, src, y) if balance else head.weight
    oof = np.zeros(len(y))
    for tr, te in StratifiedKFold(5, shuffle=True, random_state=options.seed).split(Xh, y):
        oof[te] = _fit(Xh[tr], y[tr], w[tr], options.c).predict_proba(Xh[te])[:, 1]
    result: dict = {"in_domain": {}, "cross_source": {}, "cross_source_roc": {}}
    for s in SOURCES:
        held = src == s
        result["in_domain"][s] = round(float(average_precision_score(y[held], oof[held])), 4)
        p = _fit(Xh[~held], y[~held], w[~held], options.c).predict_proba(Xh[held])[:, 1]
        result["cross_source"][s] = round(float(average_precision_score(y[held], p)), 4)
        result["cross_source_roc"][s] = round(float(roc_auc_score(y[held], p)), 4)
    p = _fit(Xh, y, w, options.c).predict_proba(seeds_X)[:, 1]
    result["policy_seeds"] = {
        "auprc": round(float(average_precision_score(seeds_y, p)), 4),
        "roc_auc": round(float(roc_auc_score(seeds_y, p)), 4),
    }
    return result


def evaluate_with_seeds(rows: list, seeds: list, X: np.ndarray, seeds_X: np.ndarray, options: TrainOptions) -> dict:
    everything = rows + seeds
    X_all = np.vstack([X, seeds_X])
    (head, *_), _ = head_data(everything, options)
    assert len(head.y) == len(everything)
    y, w = head.y, head.weight
    is_seed = np.arange(len(everything)) >= len(rows)
    category = np.array([r.id.split(":")[1] if s else "" for r, s in zip(everything, is_seed, strict=True)])
    held_out_scores = np.zeros(int(is_seed.sum()))
    for c in sorted(set(category[is_seed].tolist())):
        # Leave out the category's own seeds and any seed labelled with it (e.g. hateful threats are also violence).
        left_out = is_seed & ((category == c) | np.array([c in r.labels for r in everything]))
        model = _fit(X_all[~left_out], y[~left_out], w[~left_out], options.c)
        target = category[is_seed] == c
        held_out_scores[target] = model.predict_proba(X_all[is_seed][target])[:, 1]
    oof = np.zeros(len(y))
    for tr, te in StratifiedKFold(5, shuffle=True, random_state=options.seed).split(X_all, y):
        oof[te] = _fit(X_all[tr], y[tr], w[tr], options.c).predict_proba(X_all[te])[:, 1]
    toxicchat = head.sources == "toxicchat0124"
    return {
        "in_domain": {"toxicchat0124": round(float(average_precision_score(y[toxicchat], oof[toxicchat])), 4)},
        "policy_seeds_leave_category_out": {
            "auprc": round(float(average_precision_score(y[is_seed], held_out_scores)), 4),
            "roc_auc": round(float(roc_auc_score(y[is_seed], held_out_scores)), 4),
        },
    }


def main() -> None:
    settings = Settings()
    embedder = Embedder.from_settings(settings)
    cache = settings.data_dir / "train-cache" / f"{embedder.identity}.npz"
    rows = load_labelled(DATA, Split.TRAIN)
    X = cached_embeddings([r.text for r in rows], embedder.embed, cache)
    seeds = [row for seed_set in load_seed_sets(settings.policies_dir) for row in seed_set.rows()]
    seeds_X = cached_embeddings([r.text for r in seeds], embedder.embed, cache)
    seeds_y = np.array([r.flagged for r in seeds])
    counts = {s: sum(r.source == s for r in rows) for s in SOURCES}
    natural = {s: counts[s] / (sum(counts.values()) / len(SOURCES)) for s in SOURCES}
    configs: list[tuple[str, TrainOptions, bool]] = [
        ("natural (unweighted)", TrainOptions(source_weights=natural), False),
        ("equal sources", TrainOptions(), False),
        ("equal sources + class balance", TrainOptions(), True),
    ]
    for davidson in (0.1, 0.25, 0.5):
        for toxicchat in (1.0, 2.0):
            for balance in (False, True):
                weights = {"davidson2017": davidson, "toxicchat0124": toxicchat}
                label = f"davidson {davidson} toxicchat {toxicchat}{' + class balance' if balance else ''}"
                configs.append((label, TrainOptions(source_weights=weights), balance))
    for c in (0.25, 4.0):
        configs.append((f"equal sources + class balance, C={c}", TrainOptions(c=c), True))
    if "--seeds" in sys.argv:
        seeded = [("natural (unweighted)", natural), ("equal sources", {})]
        seeded += [("davidson 0.25 toxicchat 2.0", {"davidson2017": 0.25, "toxicchat0124": 2.0})]
        seeded += [("davidson 0.5 toxicchat 2.0", {"davidson2017": 0.5, "toxicchat0124": 2.0})]
        only = [a for a in sys.argv[1:] if a != "--seeds"]
        for label, weights in seeded:
            for seed_weight in (0.25, 0.5, 1.0):
                name = f"{label} + seeds {seed_weight}"
                if only and not any(o in name for o in only):
                    continue
                options = TrainOptions(source_weights={**weights, "policy-seed": seed_weight})
                result = evaluate_with_seeds(rows, seeds, X, seeds_X, options)
                selection = np.mean(
                    [result["in_domain"]["toxicchat0124"], result["policy_seeds_leave_category_out"]["auprc"]]
                )
                print(json.dumps({"config": name, **result, "selection": round(float(selection), 4)}), flush=True)
        return
    only = sys.argv[1:]
    for label, options, balance in configs:
        if only and not any(o in label for o in only):
            continue
        result = evaluate(rows, X, seeds_X, seeds_y, options, balance)
        toxicchat = [result["in_domain"]["toxicchat0124"], result["cross_source"]["toxicchat0124"]]
        summary = {
            "toxicchat_mean": round(float(np.mean(toxicchat)), 4),
            "selection": round(float(np.mean([*toxicchat, result["policy_seeds"]["auprc"]])), 4),
        }
        print(json.dumps({"config": label, **result, **summary}), flush=True)


if __name__ == "__main__":
    main()
