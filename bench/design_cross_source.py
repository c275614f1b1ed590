"""Cross-source AUPRC of the `flagged` head per design (feeds the design choice in docs/classifier.md).

In-domain CV (in the model card) favours the MLP; this checks whether it also transfers to a
source it never saw. Same weights as the default model; plain estimators (AUPRC is rank-based).

    .venv/bin/python bench/design_cross_source.py
"""

from __future__ import annotations

import json
import time
import warnings

from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score
from sklearn.neural_network import MLPClassifier

from cascade.data import Split, labelled_files, load_labelled
from cascade.embedding import Embedder, cached_embeddings
from cascade.settings import Settings
from cascade.train import policy_seed_rows
from cascade.train.fit import SEED, TrainOptions, head_data

DATA = labelled_files()  # ../shared/data: run from the repository root
WEIGHTS = {"davidson2017": 0.25, "toxicchat0124": 2.0, "policy-seed": 1.0}
DESIGNS = {
    "logreg": lambda: LogisticRegression(C=1.0, max_iter=3000),
    "mlp-128": lambda: MLPClassifier((128,), alpha=1e-3, max_iter=40, tol=1e-3, random_state=SEED),
    "mlp-32": lambda: MLPClassifier((32,), alpha=1e-3, max_iter=40, tol=1e-3, random_state=SEED),
}


def main() -> None:
    warnings.simplefilter("ignore", ConvergenceWarning)
    settings = Settings()
    embedder = Embedder.from_settings(settings)
    rows = load_labelled(DATA, Split.TRAIN) + policy_seed_rows(settings.policies_dir)[0]
    X = cached_embeddings(
        [r.text for r in rows], embedder.embed, settings.data_dir / "train-cache" / f"{embedder.identity}.npz"
    )
    (head, *_), _ = head_data(rows, TrainOptions(source_weights=WEIGHTS))
    Xh = X[head.index]
    for name, build in DESIGNS.items():
        result: dict[str, float] = {}
        started = time.perf_counter()
        for source in ("toxicchat0124", "policy-seed", "davidson2017"):
            held = head.sources == source
            model = build().fit(Xh[~held], head.y[~held], sample_weight=head.weight[~held])
            result[source] = round(float(average_precision_score(head.y[held], model.predict_proba(Xh[held])[:, 1])), 4)
        print(
            json.dumps(
                {"design": name, "cross_source_auprc": result, "seconds": round(time.perf_counter() - started, 1)}
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
