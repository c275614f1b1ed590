"""The vector index interface, run against every backend: embedded qdrant-edge, qdrant-client
local mode, and a Qdrant server when CASCADE_TEST_QDRANT_URL names one."""

from __future__ import annotations

import itertools
import json
import os
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from cascade.data import LabelledItem
from cascade.embedding import Embedder
from cascade.exemplars import exemplar_payload
from cascade.settings import PROJECT_ROOT, Settings
from cascade.vectorindex import (
    EdgeIndex,
    HnswTuning,
    QdrantClientIndex,
    StoreInUseError,
    VectorIndex,
    open_vector_index,
)

pytest_plugins = ["model_cache"]  # fixtures: settings, embedder

SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"
SERVER_URL = os.environ.get("CASCADE_TEST_QDRANT_URL")
# Small enough that HNSW (not a full scan) answers the recall test on a few hundred points.
TEST_TUNING = HnswTuning(full_scan_threshold_kb=10, indexing_threshold_kb=10)

OpenIndex = Callable[[], VectorIndex]


# Local mode is a brute-force Python store (slow upserts): it runs the client code path, not the default.
@pytest.fixture(params=["edge", pytest.param("qdrant-local", marks=pytest.mark.slow), "server"])
def open_index(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OpenIndex]:
    """A factory that (re)opens the same store, so tests can close and reopen it."""
    collection = f"test-{uuid.uuid4().hex[:8]}"
    if request.param == "edge":
        yield lambda: EdgeIndex(tmp_path / "edge", TEST_TUNING)
    elif request.param == "qdrant-local":
        # Local mode warns that payload indexes and search params have no effect: known, it is brute force.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            yield lambda: QdrantClientIndex.local(tmp_path / "local", collection)
    else:
        if not SERVER_URL:
            pytest.skip("no Qdrant server here: set CASCADE_TEST_QDRANT_URL=http://host:6333 to run the server backend")
        settings = Settings(data_dir=tmp_path, qdrant_url=SERVER_URL, qdrant_collection=collection)
        yield lambda: open_vector_index(settings)
        from qdrant_client import QdrantClient

        QdrantClient(url=SERVER_URL).delete_collection(collection)


def _rows(n: int) -> list[LabelledItem]:
    """n real labelled rows, spread over the shared files (a third each)."""
    rows: list[LabelledItem] = []
    for path in sorted(SHARED_DATA.glob("*.jsonl")):
        with path.open(encoding="utf-8") as fh:
            for line in itertools.islice(fh, 0, None, 7):
                row = json.loads(line)
                rows.append(LabelledItem(row["id"], row["text"], row["flagged"], row["labels"], row["source"]))
                if len(rows) % (n // 3) == 0:
                    break
    return rows


@pytest.fixture(scope="module")
def real_bank(embedder: Embedder) -> tuple[list[LabelledItem], np.ndarray]:
    rows = _rows(240)
    return rows, embedder.embed([r.text for r in rows])


def _fill(index: VectorIndex, rows: list[LabelledItem], vectors: np.ndarray) -> None:
    payloads = [exemplar_payload(r, "test", np.datetime64("2026-11-27").astype(object)) for r in rows]
    index.upsert([r.id for r in rows], vectors, payloads)


def test_upsert_is_idempotent_by_exemplar_id(open_index: OpenIndex, real_bank) -> None:
    rows, vectors = real_bank
    index = open_index()
    _fill(index, rows[:50], vectors[:50])
    _fill(index, rows[:50], vectors[:50])
    assert index.count() == 50
    assert index.search(vectors[:1], 1)[0][0].payload["text"] == rows[0].text  # read once (a backend may keep it)
    changed = LabelledItem(rows[0].id, "replaced text", 1, {"spam": 1}, "manual")
    _fill(index, [changed], vectors[:1])
    assert index.count() == 50
    (top,) = index.search(vectors[:1], 1)[0]
    assert top.id == rows[0].id and top.payload["text"] == "replaced text" and top.payload["violates"] == ["spam"]
    index.close()


def test_search_ranks_by_cosine_and_carries_payload(open_index: OpenIndex, real_bank) -> None:
    rows, vectors = real_bank
    index = open_index()
    _fill(index, rows, vectors)
    results = index.search(vectors[:5], 5)
    assert len(results) == 5
    for row, vector, found in zip(rows[:5], vectors[:5], results, strict=True):
        assert found[0].id == row.id and found[0].similarity == pytest.approx(1.0, abs=1e-4)
        sims = [n.similarity for n in found]
        assert sims == sorted(sims, reverse=True)
        # The similarity is the cosine of the stored vector.
        expected = {r.id: float(v @ vector) for r, v in zip(rows, vectors, strict=True)}
        assert all(n.similarity == pytest.approx(expected[n.id], abs=1e-4) for n in found)
        assert found[0].payload["text"] == row.text and found[0].payload["labels"] == row.labels
    assert index.search(vectors[:0], 5) == []
    index.close()


def test_filtered_search_count_and_category_counts(open_index: OpenIndex, real_bank) -> None:
    rows, vectors = real_bank
    index = open_index()
    _fill(index, rows, vectors)
    hate = [r for r in rows if r.labels.get("hate") == 1]
    assert hate, "the sample should hold some hate rows"
    for found in index.search(vectors[:10], 5, where={"violates": "hate"}):
        assert found and all(n.payload["labels"]["hate"] == 1 for n in found)
    for found in index.search(vectors[:10], 3, where={"flagged": 1}):
        assert all(n.payload["flagged"] == 1 for n in found)
    assert index.count({"flagged": 1}) == sum(r.flagged for r in rows)
    assert index.count({"source": "sms_spam"}) == sum(r.source == "sms_spam" for r in rows)
    counts = index.category_counts()
    assert counts["hate"].known == sum("hate" in r.labels for r in rows)
    assert counts["hate"].violating == len(hate)
    assert counts["spam"].violating == sum(r.labels.get("spam", 0) for r in rows)
    assert counts["flagged"].known == len(rows)
    index.delete({"source": "sms_spam"})
    assert index.count() == sum(r.source != "sms_spam" for r in rows)
    assert all(n.payload["source"] != "sms_spam" for found in index.search(vectors, 10) for n in found)
    index.close()


def test_reopen_keeps_exemplars(open_index: OpenIndex, real_bank) -> None:
    rows, vectors = real_bank
    index = open_index()
    _fill(index, rows[:100], vectors[:100])
    index.optimize()
    before = [n.id for n in index.search(vectors[:3], 5)[0]]
    index.close()
    reopened = open_index()
    assert reopened.count() == 100
    assert [n.id for n in reopened.search(vectors[:3], 5)[0]] == before
    reopened.close()


def test_recall_at_10_against_exact_search(open_index: OpenIndex, real_bank) -> None:
    rows, vectors = real_bank
    index = open_index()
    _fill(index, rows, vectors)
    index.optimize()
    queries = vectors[::9] + 0.02  # near, not identical, to stored points
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    approx = index.search(queries, 10)
    exact = index.search(queries, 10, exact=True)
    # Exact search agrees with numpy brute force.
    truth = -np.sort(-(queries @ vectors.T), axis=1)[:, :10]
    np.testing.assert_allclose([[n.similarity for n in e] for e in exact], truth, atol=1e-5)
    recall = np.mean([len({n.id for n in a} & {n.id for n in e}) / 10 for a, e in zip(approx, exact, strict=True)])
    assert recall >= 0.95
    index.close()


def test_embedded_store_is_single_process(tmp_path: Path) -> None:
    first = EdgeIndex(tmp_path / "edge")
    with pytest.raises(StoreInUseError, match="another process"):
        EdgeIndex(tmp_path / "edge")
    first.close()
    EdgeIndex(tmp_path / "edge").close()  # free again once closed


def test_edge_hnsw_is_built_by_optimize(tmp_path: Path, real_bank) -> None:
    rows, vectors = real_bank
    index = EdgeIndex(tmp_path / "edge", TEST_TUNING)
    _fill(index, rows, vectors)
    index.optimize()
    assert index._shard.info().indexed_vectors_count == len(rows)
    index.close()


def test_edge_store_made_under_older_tuning_takes_the_current_one(tmp_path: Path, real_bank) -> None:
    rows, vectors = real_bank
    older = EdgeIndex(tmp_path / "edge", HnswTuning(indexing_threshold_kb=None))  # the engine default: 10,000 KB
    _fill(older, rows, vectors)
    older.optimize()
    assert older._shard.info().indexed_vectors_count == 0  # a few hundred points: under the engine's threshold
    older.close()
    reopened = EdgeIndex(tmp_path / "edge", TEST_TUNING)
    reopened.optimize()
    assert reopened._shard.info().indexed_vectors_count == len(rows)
    assert [n.id for n in reopened.search(vectors[:1], 1)[0]] == [rows[0].id]
    reopened.close()


def test_edge_search_walks_int8_vectors_and_returns_float_similarities(tmp_path: Path, real_bank) -> None:
    """The store keeps int8 copies (a search that skips re-scoring sees their rounding), yet every
    similarity the index returns is the float cosine: the candidates are re-scored."""
    import qdrant_edge as qe

    rows, vectors = real_bank
    older = EdgeIndex(tmp_path / "edge", replace(TEST_TUNING, int8=False))  # a store made before int8
    _fill(older, rows, vectors)
    older.optimize()
    older.close()
    index = EdgeIndex(tmp_path / "edge", TEST_TUNING)
    index.optimize()  # what `cascade bank reindex` does: builds the int8 copies of an older store
    queries = vectors[::9] + 0.02
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    unrescored = index._shard.query(
        qe.QueryRequest(
            limit=10,
            query=qe.Query.Nearest(queries[0].tolist()),
            params=qe.SearchParams(hnsw_ef=128, quantization=qe.QuantizationSearchParams(rescore=False)),
        )
    )
    by_id = {r.id: v for r, v in zip(rows, vectors, strict=True)}
    found = index.search(queries, 10)
    for query, neighbours in zip(queries, found, strict=True):
        cosines = [query @ by_id[n.id] for n in neighbours]
        np.testing.assert_allclose([n.similarity for n in neighbours], cosines, atol=1e-5)
    int8_scores = [p.score for p in unrescored]
    float_scores = sorted((queries[0] @ vectors.T).tolist(), reverse=True)[:10]
    assert max(abs(a - b) for a, b in zip(int8_scores, float_scores, strict=True)) > 1e-4
    index.close()
