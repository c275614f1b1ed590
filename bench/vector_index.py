"""Vector index benchmark at bank scale on real MiniLM embeddings of the shared data.

Data: every row of the labelled files in `--data` (default ../shared/data) embedded by
`cascade.embedding.Embedder` (cached per embedder identity in `data_dir/train-cache`, shared
with `cascade train`). Queries are test-split rows; the bank is the other rows plus synthetic neighbours of them up to
`--points` (`cascade.bench.vectorbank.build_bank`, shared with `cascade bench`). Ground truth
is numpy brute force over the same matrix.

    .venv/bin/python bench/vector_index.py --points 100000 --backends edge,local

Reports per backend/config: upsert and optimize (HNSW build) time, query p50/p95 at k=10
(single queries, as a lone item would), per-query time inside a 64-query batch, recall@10,
filtered queries (flagged=1 top-1 as the stage runs it, violates=hate top-10), reopen time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np

from cascade.bench.vectorbank import build_bank, fill, measure_queries
from cascade.data import DEFAULT_DATA_DIR, LabelledItem, labelled_files, load_labelled
from cascade.embedding import Embedder, cached_embeddings
from cascade.settings import Settings
from cascade.vectorindex import EdgeIndex, HnswTuning, QdrantClientIndex


def real_vectors(settings: Settings, data_dir: Path) -> tuple[list[LabelledItem], np.ndarray]:
    rows = load_labelled(labelled_files(data_dir))
    embedder = Embedder.from_settings(settings)
    path = settings.data_path("train-cache", f"{embedder.identity}.npz")
    return rows, cached_embeddings([r.text for r in rows], embedder.embed, path)


def run_edge(path: Path, tuning: HnswTuning, rows, vectors, queries, truth, ids, efs: list[int]) -> list[dict]:
    shutil.rmtree(path, ignore_errors=True)
    index = EdgeIndex(path, tuning)
    upsert_s = fill(index, rows, vectors)
    started = time.perf_counter()
    index.optimize()
    optimize_s = time.perf_counter() - started
    index.close()
    started = time.perf_counter()
    index = EdgeIndex(path, tuning)
    index.search(queries[:1], 10)
    reopen_s = time.perf_counter() - started
    out = []
    for ef in efs:
        index.tuning = replace(tuning, search_ef=ef)
        result = {
            "backend": "qdrant-edge",
            "m": tuning.m,
            "ef_construct": tuning.ef_construct,
            "ef": ef,
            "upsert_s": round(upsert_s, 1),
            "optimize_s": round(optimize_s, 1),
            "reopen_s": round(reopen_s, 2),
            **measure_queries(index, queries, truth, ids),
        }
        print(json.dumps(result), flush=True)
        out.append(result)
    index.close()
    return out


def run_local(path: Path, rows, vectors, queries, truth, ids) -> dict:
    shutil.rmtree(path, ignore_errors=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        index = QdrantClientIndex.local(path)
        upsert_s = fill(index, rows, vectors)
        index.close()
        started = time.perf_counter()
        index = QdrantClientIndex.local(path)
        index.search(queries[:1], 10)
        reopen_s = time.perf_counter() - started
        # Brute force in Python: a few queries are enough to see the order of magnitude.
        few = slice(0, 40)
        result = {
            "backend": "qdrant-client local",
            "upsert_s": round(upsert_s, 1),
            "reopen_s": round(reopen_s, 2),
            **measure_queries(index, queries[few], truth[few], ids),
        }
        index.close()
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--backends", default="edge,local")
    parser.add_argument("--configs", default="16:128,32:256", help="m:ef_construct pairs for qdrant-edge")
    parser.add_argument("--efs", default="64,128,256", help="search ef values for qdrant-edge")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA_DIR, help="directory of labelled JSONL files")
    args = parser.parse_args()

    settings = Settings()
    rows, vectors = real_vectors(settings, args.data)
    bank_rows, bank_vectors, queries = build_bank(rows, vectors, args.points)
    queries = queries[np.random.default_rng(1).permutation(len(queries))[: args.queries]]
    truth = np.argsort(-(queries @ bank_vectors.T), axis=1)[:, :10]
    ids = np.array([r.id for r in bank_rows])
    print(f"bank {len(bank_rows)} points ({int(sum('~' not in i for i in ids))} real), {len(queries)} queries")

    results: list[dict] = []
    workdir = Path(tempfile.mkdtemp(prefix="vector-bench-", dir=settings.data_path("bench")))
    try:
        backends = args.backends.split(",")
        if "edge" in backends:
            for config in args.configs.split(","):
                m, ef_construct = (int(x) for x in config.split(":"))
                tuning = HnswTuning(m=m, ef_construct=ef_construct)
                efs = [int(e) for e in args.efs.split(",")]
                results += run_edge(workdir / "edge", tuning, bank_rows, bank_vectors, queries, truth, ids, efs)
        if "local" in backends:
            results.append(run_local(workdir / "local", bank_rows, bank_vectors, queries, truth, ids))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
