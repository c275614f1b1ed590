"""Scaling: kNN latency, throughput and memory against exemplar bank size; embedding against batch size.

The bank is built by `cascade.bench.vectorbank` (`build_bank`, `fill`, `measure_queries`, shared
with the study bench/vector_index.py): real MiniLM embeddings of the data's non-test rows, topped up with
synthetic neighbours of them to the asked size; queries are test-split rows, ground truth
is numpy brute force. Each bank size runs in a fresh process, so its RSS is the index's and
nothing else's: `index_rss_mb` is resident memory after building and querying the index
minus before it.
"""

from __future__ import annotations

import multiprocessing
import resource
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from cascade.bench.config import BenchConfig
from cascade.bench.embedders import rate
from cascade.bench.measure import Row, interleave, measured, not_available
from cascade.bench.quality import sample
from cascade.bench.vectorbank import build_bank, fill, measure_queries
from cascade.data import LabelledItem
from cascade.embedding import Embedder, EncoderUnavailable, cached_embeddings
from cascade.settings import Settings
from cascade.vectorindex import EdgeIndex, HnswTuning

K = 10


def rss_mb() -> float:
    """Current resident set size of this process (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def knn_at_size(rows: list[LabelledItem], vectors: np.ndarray, size: int, queries: int, seed: int) -> dict:
    """One bank size, measured in the calling process (run it in a fresh one)."""
    bank_rows, bank_vectors, query_vectors = build_bank(rows, vectors, size)
    query_vectors = query_vectors[np.random.default_rng(seed).permutation(len(query_vectors))[:queries]]
    truth = np.argsort(-(query_vectors @ bank_vectors.T), axis=1)[:, :K]
    ids = np.array([r.id for r in bank_rows])
    workdir = Path(tempfile.mkdtemp(prefix="cascade-bench-knn-"))
    try:
        before = rss_mb()
        tuning = HnswTuning()
        index = EdgeIndex(workdir / "edge", tuning)
        upsert_s = fill(index, bank_rows, bank_vectors)
        started = time.perf_counter()
        index.optimize()
        optimize_s = time.perf_counter() - started
        queried = measure_queries(index, query_vectors, truth, ids)
        after = rss_mb()
        index.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    p50 = queried["query"]["p50_ms"]
    batched = queried["batched64_per_query_ms"]
    return {
        "bank_size": len(bank_rows),
        "real_rows": int(sum("~" not in i for i in ids)),
        "queries": len(query_vectors),
        "hnsw": {"m": tuning.m, "ef_construct": tuning.ef_construct, "search_ef": tuning.search_ef},
        "upsert_s": upsert_s,
        "optimize_s": optimize_s,
        "query_p50_ms": p50,
        "query_p95_ms": queried["query"]["p95_ms"],
        "single_queries_per_s": 1000 / p50 if p50 else None,
        "batched64_queries_per_s": 1000 / batched if batched else None,
        f"recall@{K}": queried[f"recall@{K}"],
        "filtered_flagged_top1_p50_ms": queried["filtered_flagged_top1"]["p50_ms"],
        "index_rss_mb": after - before,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _base(config: BenchConfig, settings: Settings, rows: Sequence[LabelledItem]) -> tuple[list, np.ndarray]:
    chosen = sample(rows, config.scaling_rows, config.seed)
    embedder = Embedder.from_settings(settings)
    path = settings.data_path("train-cache", f"{embedder.identity}.npz")  # shared with `cascade train`
    return chosen, cached_embeddings([r.text for r in chosen], embedder.embed, path)


def measure_knn(
    config: BenchConfig, settings: Settings, rows: Sequence[LabelledItem], log: Callable[[str], None]
) -> dict[str, object]:
    log(f"scaling: embedding up to {config.scaling_rows or len(rows)} real rows for the bank (cached)")
    try:
        base_rows, base_vectors = _base(config, settings, rows)
    except EncoderUnavailable as exc:
        return {"available": False, "reason": str(exc)}
    results: list[Row] = []
    spawn = multiprocessing.get_context("spawn")
    for size in config.bank_sizes:
        log(f"scaling: kNN with a bank of {size:,} exemplars (fresh process)")
        try:
            with spawn.Pool(1) as pool:
                args = (base_rows, base_vectors, size, config.knn_queries, config.seed)
                results.append({"available": True, **pool.apply(knn_at_size, args)})
        except Exception as exc:
            results.append(not_available(f"bank of {size}", f"{type(exc).__name__}: {exc}"))
    return {"available": True, "backend": EdgeIndex.IDENTITY, "k": K, "rows": results}


def measure_batch_sizes(
    config: BenchConfig, settings: Settings, texts: list[str], log: Callable[[str], None]
) -> dict[str, object]:
    log(f"scaling: ONNX embedding at batch sizes {', '.join(map(str, config.batch_sizes))}")
    try:
        embed = Embedder.from_settings(settings).embed
    except EncoderUnavailable as exc:
        return {"available": False, "reason": str(exc)}
    embed(texts[:64])  # warm-up

    def run(batch: int) -> Callable[[], float]:
        # Enough texts for several calls at every size, without a batch-1 run taking minutes.
        chosen = texts[: max(config.single_items, min(len(texts), 8 * batch))]
        return lambda: rate(embed, chosen, batch)

    samples = interleave({str(b): run(b) for b in config.batch_sizes}, config.rounds)
    rows = [measured(f"ONNX embedding, batch {b}", "sentences/s", samples[str(b)], batch=b) for b in config.batch_sizes]
    return {"available": True, "path": "onnx serving (cascade.embedding.Embedder)", "rows": rows}
