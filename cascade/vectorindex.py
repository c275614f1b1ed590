"""The exemplar vector index: one small interface, a Qdrant server backend and an embedded one.

- `QdrantClientIndex` talks to a Qdrant server through `qdrant-client` (production, set
  `CASCADE_QDRANT_URL` and optionally `CASCADE_QDRANT_API_KEY`). The same class also drives
  `qdrant-client`'s local mode (`QdrantClient(path=...)`), which is how the test suite runs
  its code path without a server, and how the benchmark compares it.
- `EdgeIndex` is the embedded default: `qdrant-edge` (Qdrant's own engine in-process, HNSW,
  persistent shard under `Settings().data_dir / "exemplars"`). Chosen by measurement over
  `qdrant-client` local mode, which is brute force (figures in docs/retrieval.md).

Both stores are single-process: an embedded shard (like a local-mode store) holds a lock
on its directory, so only one process may open it at a time. In the streaming deployment
only the retrieval worker opens the bank; CLI imports run while it is stopped, or against
a Qdrant server, which any number of workers share.

Points are keyed by a UUID derived from the exemplar id, so upserts are idempotent by
exemplar id. Payload (see `cascade.exemplars.exemplar_payload`): `exemplar_id`, `text`,
`flagged`, `labels` (known categories only), `label_keys` (the known categories),
`violates` (the categories labelled 1), `source`, `added_at`, `added_by`, `encoder` (the
identity of the encoder that embedded it). Payload indexes exist on the fields filters and
facets use.
"""

from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cascade.embedding import DIMENSIONS
from cascade.settings import Settings

# Exact-match filters: field -> value (a list field matches when any element equals the value).
Where = Mapping[str, str | int | bool]

_ID_NAMESPACE = uuid.UUID("6f1c2a8e-5d1b-4c57-9a43-2f7e0c9b1d64")
KEYWORD_FIELDS = ("exemplar_id", "source", "label_keys", "violates", "added_by", "encoder")
INTEGER_FIELDS = ("flagged",)
_FACET_LIMIT = 1000  # more categories than any policy will name


def point_id(exemplar_id: str) -> str:
    return str(uuid.uuid5(_ID_NAMESPACE, exemplar_id))


@dataclass(frozen=True)
class HnswTuning:
    """HNSW parameters; defaults chosen by bench/vector_index.py on real MiniLM embeddings."""

    m: int = 16
    ef_construct: int = 128
    search_ef: int = 128
    # Qdrant sizes these in KB of vectors (1000 KB ≈ 650 MiniLM vectors): a segment smaller than
    # `indexing_threshold_kb` gets no HNSW graph, a search filtered below `full_scan_threshold_kb`
    # candidates scans them exactly. The engine's default indexing threshold (10,000 KB) left a
    # bank's later imports (~5,000 exemplars) unindexed, scanned exactly by every query: half the
    # kNN time (docs/bench.md).
    full_scan_threshold_kb: int = 1000
    indexing_threshold_kb: int | None = 1000
    # The vectors are also kept as int8: the graph walk compares those, and the best
    # `oversampling` x k candidates are re-scored on the float vectors, so the similarities
    # returned are exact. Half the kNN CPU at the float graph's recall@10 (0.997, docs/bench.md).
    int8: bool = True
    oversampling: float = 3.0


# The int8 copies' clipping range: the central 99 % of vector components (outliers clip, the rest keep precision).
INT8_QUANTILE = 0.99


class StoreInUseError(RuntimeError):
    """The embedded store is locked by another process."""


@dataclass(frozen=True)
class Neighbour:
    id: str
    similarity: float
    payload: dict[str, Any]


@dataclass(frozen=True)
class CategoryCount:
    known: int  # exemplars labelled for the category (0 or 1)
    violating: int  # of those, labelled 1


class VectorIndex(ABC):
    """Exemplar vectors with payload; cosine similarity on unit vectors."""

    identity: str  # backend and collection, for stage versions and logs

    @abstractmethod
    def upsert(self, ids: Sequence[str], vectors: np.ndarray, payloads: Sequence[dict[str, Any]]) -> None:
        """Insert or replace exemplars by id."""

    @abstractmethod
    def search(
        self, vectors: np.ndarray, k: int, where: Where | None = None, exact: bool = False
    ) -> list[list[Neighbour]]:
        """Top-k neighbours per query vector, best first. `exact` bypasses the ANN index."""

    @abstractmethod
    def delete(self, where: Where) -> None:
        """Remove every exemplar matching `where`."""

    @abstractmethod
    def count(self, where: Where | None = None) -> int: ...

    @abstractmethod
    def _facet(self, field: str) -> dict[str, int]: ...

    @abstractmethod
    def scroll(self, limit: int, offset: Any = None) -> tuple[list[Neighbour], Any]:
        """A page of exemplars (similarity 0) in id order and the offset of the next page (None at the end)."""

    def encoders(self) -> dict[str, int]:
        """Exemplars per encoder identity that embedded them (exemplars without one are not counted)."""
        return self._facet("encoder")

    def category_counts(self) -> dict[str, CategoryCount]:
        """Per category (plus `flagged`): exemplars labelled for it and those labelled violating."""
        known = self._facet("label_keys")
        violating = self._facet("violates")
        counts = {c: CategoryCount(known=n, violating=violating.get(c, 0)) for c, n in sorted(known.items())}
        counts["flagged"] = CategoryCount(known=self.count(), violating=self.count({"flagged": 1}))
        return counts

    def optimize(self) -> None:  # noqa: B027 - only embedded engines build their index on demand
        """Build or refresh the ANN index after a bulk load."""

    @abstractmethod
    def close(self) -> None: ...


class EdgeIndex(VectorIndex):
    """Embedded Qdrant engine (`qdrant-edge`), persistent in one directory, one process at a time.

    Payloads are kept in memory once read (up to `PAYLOAD_CACHE` of them): reading them from the
    shard cost as much as the search itself, and the same exemplars answer many queries. The store
    is single-process, so this object sees every write, and each write drops what it changes.
    """

    IDENTITY = "qdrant-edge:exemplars"
    PAYLOAD_CACHE = 50_000  # tens of MB at most

    def __init__(self, path: Path, tuning: HnswTuning | None = None) -> None:
        import qdrant_edge as qe

        self._qe = qe
        self.tuning = tuning or HnswTuning()
        self.path = Path(path)
        self.identity = self.IDENTITY
        self._payloads: dict[uuid.UUID, dict[str, Any]] = {}
        self._writes = 0  # a read that overlaps a write must not cache what it read
        hnsw = qe.HnswIndexConfig(
            m=self.tuning.m,
            ef_construct=self.tuning.ef_construct,
            full_scan_threshold=self.tuning.full_scan_threshold_kb,
        )
        int8 = qe.ScalarQuantizationConfig(type=qe.ScalarType.Int8, quantile=INT8_QUANTILE, always_ram=True)
        config = qe.EdgeConfig(
            vectors=qe.EdgeVectorParams(size=DIMENSIONS, distance=qe.Distance.Cosine),
            hnsw_config=hnsw,
            quantization_config=int8 if self.tuning.int8 else None,
            payload_memory=qe.Memory.Cached,
            optimizers=qe.EdgeOptimizersConfig(indexing_threshold=self.tuning.indexing_threshold_kb),
        )
        if (self.path / "edge_config.json").exists():
            try:
                # With the config: a store made under older tuning takes this one (the next optimize applies it).
                self._shard = qe.EdgeShard.load(str(self.path), config)
            except Exception as exc:
                if "WouldBlock" in str(exc):
                    raise StoreInUseError(
                        f"the exemplar store {self.path} is open in another process; the embedded store is "
                        "single-process: stop the retrieval worker, or share a Qdrant server (CASCADE_QDRANT_URL)"
                    ) from exc
                raise
        else:
            self._shard = qe.EdgeShard.create(str(self.path), config)
            for name in KEYWORD_FIELDS:
                self._shard.update(qe.UpdateOperation.create_field_index(name, qe.PayloadSchemaType.Keyword))
            for name in INTEGER_FIELDS:
                self._shard.update(qe.UpdateOperation.create_field_index(name, qe.PayloadSchemaType.Integer))

    def _filter(self, where: Where | None) -> Any:
        if not where:
            return None
        qe = self._qe
        return qe.Filter(must=[qe.FieldCondition(key=k, match=qe.MatchValue(v)) for k, v in where.items()])

    def upsert(self, ids: Sequence[str], vectors: np.ndarray, payloads: Sequence[dict[str, Any]]) -> None:
        qe = self._qe
        points = [
            qe.Point(point_id(i), v.tolist(), {**p, "exemplar_id": i})
            for i, v, p in zip(ids, np.asarray(vectors, dtype=np.float32), payloads, strict=True)
        ]
        if points:
            self._writes += 1
            for i in ids:
                self._payloads.pop(uuid.UUID(point_id(i)), None)
            self._shard.update(qe.UpdateOperation.upsert_points(points))

    def search(
        self, vectors: np.ndarray, k: int, where: Where | None = None, exact: bool = False
    ) -> list[list[Neighbour]]:
        qe = self._qe
        quantization = _quantization_params(qe, self.tuning, exact)
        params = qe.SearchParams(hnsw_ef=max(self.tuning.search_ef, k), exact=exact, quantization=quantization)
        condition = self._filter(where)
        requests = [
            qe.QueryRequest(
                limit=k, query=qe.Query.Nearest(v.tolist()), filter=condition, with_payload=False, params=params
            )
            for v in np.asarray(vectors, dtype=np.float32)
        ]
        if not requests:
            return []
        answers = self._shard.query_batch(qe.QueryBatchRequest(requests))
        # Keyed by the engine's own id objects (UUIDs): each `.id` read builds one, so read it once.
        hits = [[(p.id, p.score) for p in points] for points in answers]
        payloads = self._payloads_of({i for found in hits for i, _ in found})
        return [[_neighbour(score, payloads[i]) for i, score in found] for found in hits]

    def _payloads_of(self, ids: set[uuid.UUID]) -> dict[uuid.UUID, dict[str, Any]]:
        found: dict[uuid.UUID, dict[str, Any]] = {}
        missing = []
        for i in ids:
            payload = self._payloads.get(i)
            if payload is None:
                missing.append(i)
            else:
                found[i] = payload
        if missing:
            writes = self._writes
            read = {r.id: r.payload or {} for r in self._shard.retrieve(missing, True, False)}
            if writes == self._writes:
                if len(self._payloads) + len(read) > self.PAYLOAD_CACHE:
                    self._payloads.clear()  # a bank larger than the cache: start over, not track recency
                self._payloads.update(read)
            found.update(read)
        return found

    def delete(self, where: Where) -> None:
        self._writes += 1
        self._payloads.clear()
        self._shard.update(self._qe.UpdateOperation.delete_points_by_filter(self._filter(where)))

    def count(self, where: Where | None = None) -> int:
        return self._shard.count(self._qe.CountRequest(exact=True, filter=self._filter(where)))

    def _facet(self, field: str) -> dict[str, int]:
        # Idempotent: a store created before the field was indexed gets its index now.
        self._shard.update(self._qe.UpdateOperation.create_field_index(field, self._qe.PayloadSchemaType.Keyword))
        response = self._shard.facet(self._qe.FacetRequest(key=field, limit=_FACET_LIMIT, exact=True))
        return {str(hit.value): hit.count for hit in response.hits}

    def scroll(self, limit: int, offset: Any = None) -> tuple[list[Neighbour], Any]:
        points, following = self._shard.scroll(self._qe.ScrollRequest(limit=limit, offset=offset, with_payload=True))
        return [_neighbour(0.0, p.payload) for p in points], following

    def optimize(self) -> None:
        self._shard.optimize()

    def close(self) -> None:
        self._shard.close()


class QdrantClientIndex(VectorIndex):
    """A collection reached through `qdrant-client`: a server (production) or its local mode."""

    def __init__(self, client: Any, collection: str, identity: str, tuning: HnswTuning | None = None) -> None:
        from qdrant_client import models

        self._models = models
        self._client = client
        self.collection = collection
        self.identity = identity
        self.tuning = tuning or HnswTuning()
        if not client.collection_exists(collection):
            client.create_collection(
                collection,
                vectors_config=models.VectorParams(size=DIMENSIONS, distance=models.Distance.COSINE),
                hnsw_config=models.HnswConfigDiff(
                    m=self.tuning.m,
                    ef_construct=self.tuning.ef_construct,
                    full_scan_threshold=self.tuning.full_scan_threshold_kb,
                ),
                optimizers_config=models.OptimizersConfigDiff(indexing_threshold=self.tuning.indexing_threshold_kb),
                quantization_config=models.ScalarQuantization(
                    scalar=models.ScalarQuantizationConfig(
                        type=models.ScalarType.INT8, quantile=INT8_QUANTILE, always_ram=True
                    )
                )
                if self.tuning.int8
                else None,
            )
            for name in KEYWORD_FIELDS:
                client.create_payload_index(collection, name, models.PayloadSchemaType.KEYWORD)
            for name in INTEGER_FIELDS:
                client.create_payload_index(collection, name, models.PayloadSchemaType.INTEGER)

    @classmethod
    def server(cls, settings: Settings) -> QdrantClientIndex:
        from qdrant_client import QdrantClient

        key = settings.qdrant_api_key.get_secret_value() if settings.qdrant_api_key else None
        client = QdrantClient(url=settings.qdrant_url, api_key=key, timeout=settings.qdrant_timeout_s)
        return cls(client, settings.qdrant_collection, f"qdrant:{settings.qdrant_collection}")

    @classmethod
    def local(cls, path: Path, collection: str = "exemplars") -> QdrantClientIndex:
        from qdrant_client import QdrantClient

        return cls(QdrantClient(path=str(path)), collection, f"qdrant-local:{collection}")

    def _filter(self, where: Where | None) -> Any:
        if not where:
            return None
        m = self._models
        return m.Filter(must=[m.FieldCondition(key=k, match=m.MatchValue(value=v)) for k, v in where.items()])

    def upsert(self, ids: Sequence[str], vectors: np.ndarray, payloads: Sequence[dict[str, Any]]) -> None:
        m = self._models
        points = [
            m.PointStruct(id=point_id(i), vector=v.tolist(), payload={**p, "exemplar_id": i})
            for i, v, p in zip(ids, np.asarray(vectors, dtype=np.float32), payloads, strict=True)
        ]
        if points:
            self._client.upsert(self.collection, points=points, wait=True)

    def search(
        self, vectors: np.ndarray, k: int, where: Where | None = None, exact: bool = False
    ) -> list[list[Neighbour]]:
        m = self._models
        quantization = _quantization_params(m, self.tuning, exact)
        params = m.SearchParams(hnsw_ef=max(self.tuning.search_ef, k), exact=exact, quantization=quantization)
        condition = self._filter(where)
        requests = [
            m.QueryRequest(query=v.tolist(), limit=k, filter=condition, with_payload=True, params=params)
            for v in np.asarray(vectors, dtype=np.float32)
        ]
        if not requests:
            return []
        answers = self._client.query_batch_points(self.collection, requests)
        return [[_neighbour(p.score, p.payload) for p in answer.points] for answer in answers]

    def delete(self, where: Where) -> None:
        self._client.delete(self.collection, points_selector=self._models.FilterSelector(filter=self._filter(where)))

    def count(self, where: Where | None = None) -> int:
        return self._client.count(self.collection, count_filter=self._filter(where), exact=True).count

    def _facet(self, field: str) -> dict[str, int]:
        # Idempotent: a collection created before the field was indexed gets its index now.
        self._client.create_payload_index(self.collection, field, self._models.PayloadSchemaType.KEYWORD)
        response = self._client.facet(self.collection, field, limit=_FACET_LIMIT, exact=True)
        return {str(hit.value): hit.count for hit in response.hits}

    def scroll(self, limit: int, offset: Any = None) -> tuple[list[Neighbour], Any]:
        points, following = self._client.scroll(self.collection, limit=limit, offset=offset, with_payload=True)
        return [_neighbour(0.0, p.payload) for p in points], following

    def close(self) -> None:
        self._client.close()


def _quantization_params(models: Any, tuning: HnswTuning, exact: bool) -> Any:
    """Search on the int8 vectors, re-scoring the best candidates on the float ones; an exact search
    (or an index tuned without int8, whose store may still hold int8 vectors) reads the floats only."""
    if exact or not tuning.int8:
        return models.QuantizationSearchParams(ignore=True)
    return models.QuantizationSearchParams(rescore=True, oversampling=tuning.oversampling)


def _neighbour(score: float, payload: dict[str, Any] | None) -> Neighbour:
    payload = payload or {}
    # A cosine of float32 unit vectors can land a rounding error outside [-1, 1] (a text against itself).
    similarity = min(1.0, max(-1.0, float(score)))
    return Neighbour(id=str(payload.get("exemplar_id", "")), similarity=similarity, payload=payload)


def index_identity(settings: Settings) -> str:
    """The identity `open_vector_index` will have, without opening it."""
    return f"qdrant:{settings.qdrant_collection}" if settings.qdrant_url else EdgeIndex.IDENTITY


def open_vector_index(settings: Settings) -> VectorIndex:
    """The Qdrant server when `qdrant_url` is set, else the embedded shard under `data_dir`."""
    if settings.qdrant_url:
        return QdrantClientIndex.server(settings)
    return EdgeIndex(settings.data_path("exemplars"))
