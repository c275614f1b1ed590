"""A bank at scale from real embeddings, and kNN timing and recall against numpy brute force.

Used by `cascade bench`'s scaling section and by the one-off study bench/vector_index.py.
The bank is the non-test rows plus synthetic neighbours of them: each copy is
normalise(v_i + a·v_j) for a random other row j and a ~ U(0.2, 0.5), points between real
embeddings, with the source row's payload (no new text has to be embedded).
"""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import UTC, datetime

import numpy as np

from cascade.data import LabelledItem, Split, split_of
from cascade.exemplars import exemplar_payload
from cascade.vectorindex import VectorIndex


def build_bank(
    rows: list[LabelledItem], vectors: np.ndarray, points: int, seed: int = 7
) -> tuple[list[LabelledItem], np.ndarray, np.ndarray]:
    """(bank rows, bank vectors, query vectors): real non-test rows plus synthetic neighbours."""
    is_test = np.array([split_of(r.id) is Split.TEST for r in rows])
    base_rows = [r for r, t in zip(rows, is_test, strict=True) if not t]
    base = vectors[~is_test]
    rng = np.random.default_rng(seed)
    extra = max(0, points - len(base))
    src = rng.integers(0, len(base), extra)
    partner = rng.integers(0, len(base), extra)
    mixed = base[src] + rng.uniform(0.2, 0.5, (extra, 1)).astype(np.float32) * base[partner]
    mixed /= np.linalg.norm(mixed, axis=1, keepdims=True)
    bank_vectors = np.vstack([base, mixed])[:points].astype(np.float32)
    bank_rows = base_rows + [replace(base_rows[i], id=f"{base_rows[i].id}~{n}") for n, i in enumerate(src)]
    return bank_rows[:points], bank_vectors, vectors[is_test]


def fill(index: VectorIndex, rows: list[LabelledItem], vectors: np.ndarray, batch: int = 2000) -> float:
    """Upsert every row; seconds taken."""
    now = datetime.now(UTC)
    started = time.perf_counter()
    for i in range(0, len(rows), batch):
        part = rows[i : i + batch]
        index.upsert([r.id for r in part], vectors[i : i + batch], [exemplar_payload(r, "bench", now) for r in part])
    return time.perf_counter() - started


def percentiles(samples: list[float]) -> dict[str, float]:
    arr = np.array(samples) * 1000
    return {"p50_ms": round(float(np.percentile(arr, 50)), 3), "p95_ms": round(float(np.percentile(arr, 95)), 3)}


def measure_queries(index: VectorIndex, queries: np.ndarray, truth: np.ndarray, ids: np.ndarray) -> dict:
    """Single-query latency and recall@10 against `truth`, batched and filtered query latency."""
    single, hits = [], []
    for q, t in zip(queries, truth, strict=True):
        started = time.perf_counter()
        (found,) = index.search(q[None, :], 10)
        single.append(time.perf_counter() - started)
        hits.append(len({n.id for n in found} & set(ids[t].tolist())) / 10)
    batch = queries[:64]
    started = time.perf_counter()
    index.search(batch, 10)
    per_query_batched = (time.perf_counter() - started) / len(batch)
    flagged, hate = [], []
    for q in queries[:200]:
        started = time.perf_counter()
        index.search(q[None, :], 1, where={"flagged": 1})
        flagged.append(time.perf_counter() - started)
        started = time.perf_counter()
        index.search(q[None, :], 10, where={"violates": "hate"})
        hate.append(time.perf_counter() - started)
    return {
        "query": percentiles(single),
        "recall@10": round(float(np.mean(hits)), 4),
        "batched64_per_query_ms": round(per_query_batched * 1000, 3),
        "filtered_flagged_top1": percentiles(flagged),
        "filtered_hate_top10": percentiles(hate),
    }
