"""How well the retrieval vote separates violations, on the shared data's calibration split.

Bank: the train split (as `cascade bank import --kind exemplars` would load it). Items: the
calibration split. Neighbours come from exact numpy search over the real embeddings (cached
in `data_dir/train-cache`), then go through the stage's own `score_item`, so the figures are
the stage's scores without any ANN error. Reports per target: AUPRC, coverage (share of items
that got a score at all) for a few `retrieval_min_similarity` values, and how many items the
near-copy rule lifts.

    .venv/bin/python bench/retrieval_scores.py
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime

import numpy as np
from sklearn.metrics import average_precision_score

from cascade.data import Split, categories_of, labelled_files, load_labelled, split_of
from cascade.embedding import Embedder, cached_embeddings
from cascade.exemplars import exemplar_payload
from cascade.settings import Settings
from cascade.stages.retrieval import score_item
from cascade.vectorindex import Neighbour


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--min-similarity", default="0.3,0.5")
    parser.add_argument("--near-copy", type=float, default=0.95)
    parser.add_argument("--prior-weight", default="0.0,0.5", help="retrieval_prior_weight values")
    args = parser.parse_args()

    settings = Settings()
    rows = load_labelled(labelled_files())  # ../shared/data: run from the repository root
    embedder = Embedder.from_settings(settings)
    vectors = cached_embeddings(
        [r.text for r in rows], embedder.embed, settings.data_path("train-cache", f"{embedder.identity}.npz")
    )
    split = np.array([split_of(r.id) for r in rows])
    bank_idx = np.flatnonzero(split == Split.TRAIN)
    item_idx = np.flatnonzero(split == Split.CALIBRATION)
    now = datetime.now(UTC)
    payloads = [exemplar_payload(rows[i], "bench", now) for i in bank_idx]
    bank = vectors[bank_idx]
    flagged_bank = np.flatnonzero([p["flagged"] == 1 for p in payloads])

    neighbours, nearest_bad = [], []
    for start in range(0, len(item_idx), 1024):
        sims = vectors[item_idx[start : start + 1024]] @ bank.T
        top = np.argsort(-sims, axis=1)[:, : args.k]
        bad = flagged_bank[np.argmax(sims[:, flagged_bank], axis=1)]
        for row_sims, row_top, b in zip(sims, top, bad, strict=True):
            neighbours.append([Neighbour(rows[bank_idx[j]].id, float(row_sims[j]), payloads[j]) for j in row_top])
            nearest_bad.append(Neighbour(rows[bank_idx[b]].id, float(row_sims[b]), payloads[b]))

    targets = categories_of(rows)
    report: dict[str, object] = {"bank": len(bank_idx), "items": len(item_idx), "k": args.k}
    grid = [(float(f), float(p)) for f in args.min_similarity.split(",") for p in args.prior_weight.split(",")]
    for floor, prior in grid:
        results = [score_item(n, b, floor, args.near_copy, prior) for n, b in zip(neighbours, nearest_bad, strict=True)]
        per_target = {}
        for target in targets:
            truth = np.array([rows[i].label(target) for i in item_idx], dtype=object)
            known = np.array([t is not None for t in truth])
            scored = np.array([target in r.scores for r in results])
            use = known & scored
            y = truth[use].astype(int)
            s = np.array([r.scores[target] for r, u in zip(results, use, strict=True) if u])
            per_target[target] = {
                "coverage": round(float(use.sum() / max(known.sum(), 1)), 3),
                "auprc_on_covered": round(float(average_precision_score(y, s)), 4) if y.any() else None,
                "positives": int(y.sum()),
            }
        lifted = sum(r.note is not None for r in results)
        report[f"min_similarity={floor} prior_weight={prior}"] = {"near_copies": lifted, **per_target}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
