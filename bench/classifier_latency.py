"""Serving cost of the classifier stage: the ONNX heads vs the embedding they run on, same run.

    .venv/bin/python bench/classifier_latency.py [MODEL_DIR]

Prints median ms per batch for batch sizes 1 and 64 (shared-data texts): embedding alone,
the classifier graph alone on ready vectors, and the ratio. Interleaved rounds, so load from
other work hits both alike.
"""

from __future__ import annotations

import itertools
import json
import statistics
import sys
import time
from pathlib import Path

from cascade.data import DEFAULT_DATA_DIR, read_labelled
from cascade.embedding import Embedder
from cascade.settings import Settings
from cascade.stages.classifier import ClassifierModel

DATA = DEFAULT_DATA_DIR / "toxicchat_train.jsonl"  # run from the repository root


def main() -> None:
    settings = Settings()
    model = ClassifierModel(Path(sys.argv[1]) if len(sys.argv) > 1 else settings.model_dir)
    embedder = Embedder.from_settings(settings)
    texts = [row.text for row in itertools.islice(read_labelled(DATA), 256)]
    result = {}
    for batch in (1, 64):
        sample = texts[:batch]
        vectors = embedder.embed(sample)
        embed_ms, heads_ms = [], []
        for _ in range(7 if batch == 64 else 50):
            started = time.perf_counter()
            embedder.embed(sample)
            embed_ms.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            model.predict(vectors)
            heads_ms.append((time.perf_counter() - started) * 1000)
        embed, heads = statistics.median(embed_ms), statistics.median(heads_ms)
        result[f"batch_{batch}"] = {
            "embedding_ms": round(embed, 3),
            "classifier_ms": round(heads, 4),
            "classifier_share_of_stage": round(heads / (embed + heads), 5),
        }
    print(json.dumps({"model": f"{model.name}@{model.version}", **result}, indent=2))


if __name__ == "__main__":
    main()
