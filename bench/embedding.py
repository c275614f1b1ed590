"""Embedding throughput and int8 quality, measured in one run on this machine.

Throughput: sentence-transformers (torch, batched like the serving path:
`cascade.bench.embedders`) vs the ONNX serving path (`cascade.embedding`, fp32 and int8), at
batch 1 and batch 64, on real texts of the shared data, in interleaved
rounds so that load from other work hits every path alike. Reports the best and the median
round in sentences/s, and ratios to torch.

Quality (`--quality`): int8 vs fp32 — cosine between their vectors, and AUPRC of a logistic
regression per target (flagged and each annotated category) trained on the train split's
embeddings and evaluated on the test split's (`cascade.data.split_of`). Embeddings are cached
per model identity in `data_dir/train-cache` (shared with `cascade train`).

    .venv/bin/python bench/embedding.py --rounds 5
    .venv/bin/python bench/embedding.py --rounds 0 --quality --quality-rows 12000
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np

from cascade.bench.embedders import Embed, rate, torch_embedder
from cascade.data import DEFAULT_DATA_DIR, Split, categories_of, labelled_files, load_labelled, split_of
from cascade.embedding import Embedder, cached_embeddings
from cascade.settings import Settings


def sample_texts(data_dir: Path, n: int, seed: int = 3) -> list[str]:
    rows = load_labelled(labelled_files(data_dir))
    picked = np.random.default_rng(seed).choice(len(rows), n, replace=False)
    return [rows[i].text for i in picked]


def throughput(paths: dict[str, Embed], rounds: int, texts: list[str]) -> dict[str, dict[str, float]]:
    singles = texts[:128]
    for embed in paths.values():  # warm-up: first calls allocate
        embed(texts[:64])
        embed(texts[:1])
    samples: dict[tuple[str, int], list[float]] = {}
    for _ in range(rounds):
        for name, embed in paths.items():
            samples.setdefault((name, 64), []).append(rate(embed, texts, 64))
            samples.setdefault((name, 1), []).append(rate(embed, singles, 1))
    out: dict[str, dict[str, float]] = {}
    for (name, batch), values in samples.items():
        base = samples[("torch", batch)]
        out[f"{name} batch {batch}"] = {
            "best_sent_per_s": round(max(values), 1),
            "median_sent_per_s": round(statistics.median(values), 1),
            "median_ms_per_call": round(1000 * batch / statistics.median(values), 2),
            "ratio_to_torch_median": round(statistics.median(values) / statistics.median(base), 2),
        }
    return out


def auprc(y: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import average_precision_score

    return float(average_precision_score(y, score))


def quality(settings: Settings, data_dir: Path, max_rows: int) -> dict[str, object]:
    from sklearn.linear_model import LogisticRegression

    rows = load_labelled(labelled_files(data_dir))
    if max_rows < len(rows):  # a fixed random subset: int8 vectors of every row cost minutes
        keep = np.sort(np.random.default_rng(11).choice(len(rows), max_rows, replace=False))
        rows = [rows[i] for i in keep]
    texts = [r.text for r in rows]
    vectors = {}
    for quantized in (False, True):
        embedder = Embedder.from_settings(settings.model_copy(update={"embedding_int8": quantized}))
        path = settings.data_path("train-cache", f"{embedder.identity}.npz")
        vectors["int8" if quantized else "fp32"] = cached_embeddings(texts, embedder.embed, path)
    cosine = (vectors["fp32"] * vectors["int8"]).sum(axis=1)
    split = np.array([split_of(r.id) for r in rows])
    train, test = split == Split.TRAIN, split == Split.TEST
    report: dict[str, object] = {
        "cosine_int8_vs_fp32": {
            "min": round(float(cosine.min()), 4),
            "p01": round(float(np.percentile(cosine, 1)), 4),
            "mean": round(float(cosine.mean()), 4),
        }
    }
    for target in categories_of(rows):
        labels = np.array([-1 if r.label(target) is None else r.label(target) for r in rows])
        known = labels >= 0
        result = {}
        for name, x in vectors.items():
            model = LogisticRegression(max_iter=2000, C=1.0).fit(x[train & known], labels[train & known])
            result[name] = round(auprc(labels[test & known], model.predict_proba(x[test & known])[:, 1]), 4)
        result["delta_points"] = round(100 * (result["int8"] - result["fp32"]), 2)
        result["test_rows"] = int((test & known).sum())
        report[f"auprc {target}"] = result
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--texts", type=int, default=640)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quality", action="store_true", help="also measure int8 vs fp32 quality")
    parser.add_argument("--quality-rows", type=int, default=12_000, help="random subset of the shared rows")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA_DIR, help="directory of labelled JSONL files")
    args = parser.parse_args()

    settings = Settings(embedding_threads=args.threads)
    results: dict[str, object] = {}
    if args.rounds:
        paths = {
            "torch": torch_embedder(args.threads),
            "onnx fp32": Embedder.from_settings(settings).embed,
            "onnx int8": Embedder.from_settings(settings.model_copy(update={"embedding_int8": True})).embed,
        }
        results["throughput"] = throughput(paths, args.rounds, sample_texts(args.data, args.texts))
    if args.quality:
        results["quality"] = quality(settings, args.data, args.quality_rows)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
