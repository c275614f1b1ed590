"""Retrieval stage: nearest labelled exemplars vote on each category.

For an item with embedding q, the index returns the top-k exemplars by cosine similarity
s_j = q·e_j (k = `retrieval_k`). Neighbours below `retrieval_min_similarity` carry no
evidence and are dropped; each remaining neighbour j votes with weight w_j = s_j.

Per category c (and `flagged`), over the kept neighbours whose labels include c (a category
unknown for a neighbour is not counted):

    vote_c = Σ_j w_j · y_jc / (Σ_j w_j + α)      (y_jc ∈ {0, 1}, α = `retrieval_prior_weight`)

α is a pseudo-neighbour voting 0: it keeps thin evidence from scoring high (one kept neighbour
at similarity 0.35 that violates c gives 0.35 / 0.85 = 0.41, not 1.0), while ten close
violating neighbours still score ~0.95. No counted neighbour → no score for c, so c stays
unresolved and the item escalates.

Near copies: the most similar known-violating exemplar (flagged = 1), m = its similarity
(`max_bad_similarity` in the details). It is the first flagged exemplar among the top-k when
there is one (the top-k are the k most similar of all exemplars, so no flagged one lies
between); only items without one take a second, filtered query. When m ≥ the near-copy
similarity (`retrieval_near_copy`, else the encoder's own: `cascade.embedding.near_copy_similarity`),
the item is treated as a copy of that violation:

    score_c = max(vote_c, m)   for `flagged` and every category that exemplar violates

so a near-copy blocks whenever the block band is at or below m. Otherwise score_c = vote_c.

The kept and near-copy neighbours (id, text, flagged, labels, similarity; one per distinct
normalised text) go to `ctx.evidence["neighbours"]` as few-shot examples for the LLM stage, for the
items the stage's bands leave unsettled only (`StageResult.evidence`; on the bench's test texts two in
three are decided here).

Failure handling: if the index cannot be opened or queried, every item of the batch gets an
`error` (it escalates), one warning is logged per outage, and the index is retried after
`retry_after_s` (5 s); the first successful batch logs the recovery. An empty bank, or one
that holds vectors of another encoder than the one this process embeds with (the bank
records it per exemplar), makes the stage unavailable (items escalate, with the fix in the
trace: add exemplars, or `cascade bank reindex`) until it is fixed; it is rechecked every 30 s.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from cascade.data import FLAGGED
from cascade.embedding import FROZEN_NEAR_COPY, encoder_identity, near_copy_similarity
from cascade.exemplars import bank_problem
from cascade.normalize import normalize, text_key
from cascade.settings import Settings
from cascade.stages.base import NEIGHBOURS_KEY, ItemContext, Stage, StageResult
from cascade.vectorindex import Neighbour, VectorIndex, index_identity, open_vector_index

if TYPE_CHECKING:
    from cascade.embedding import Embedder
    from cascade.stages.base import Resources

log = logging.getLogger(__name__)

_SCORING_VERSION = "2"
_RETRY_AFTER_S = 5.0
_BANK_RECHECK_S = 30.0
_EVIDENCE_KEYS = 50_000  # exemplar texts whose evidence key is kept (a few MB)


def vote(neighbours: Sequence[Neighbour], min_similarity: float, prior_weight: float) -> dict[str, float]:
    """Similarity-weighted label vote per category over neighbours at or above `min_similarity`."""
    weights: dict[str, float] = {}
    positives: dict[str, float] = {}
    for n in neighbours:
        if n.similarity < min_similarity or n.similarity <= 0:
            continue
        labels = {**n.payload.get("labels", {}), FLAGGED: n.payload.get("flagged", 0)}
        for category, label in labels.items():
            weights[category] = weights.get(category, 0.0) + n.similarity
            positives[category] = positives.get(category, 0.0) + n.similarity * int(label)
    return {c: positives[c] / (w + prior_weight) for c, w in weights.items()}


def score_item(
    neighbours: Sequence[Neighbour],
    nearest_bad: Neighbour | None,
    min_similarity: float,
    near_copy: float,
    prior_weight: float,
) -> StageResult:
    scores = vote(neighbours, min_similarity, prior_weight)
    max_bad = nearest_bad.similarity if nearest_bad is not None else 0.0
    note = None
    if nearest_bad is not None and max_bad >= near_copy:
        for category in (FLAGGED, *nearest_bad.payload.get("violates", [])):
            scores[category] = max(scores.get(category, 0.0), max_bad)
        note = f"near-copy (similarity {max_bad:.3f}) of known violation {nearest_bad.id}"
    kept = sum(n.similarity >= min_similarity for n in neighbours)
    details: dict[str, Any] = {"max_bad_similarity": round(max_bad, 4), "neighbours_counted": kept}
    if nearest_bad is not None:
        details["nearest_bad_id"] = nearest_bad.id
    return StageResult(scores=scores, note=note, details=details)


@functools.lru_cache(maxsize=_EVIDENCE_KEYS)
def _evidence_key(text: str) -> str:
    # Exemplar texts recur across items (the same neighbours answer many queries): normalise each once.
    return text_key(normalize(text))


def evidence_neighbours(neighbours: Sequence[Neighbour], nearest_bad: Neighbour | None) -> list[dict[str, Any]]:
    """Neighbours for the LLM's few-shot, best first, one per distinct normalised text."""
    seen: set[str] = set()
    out = []
    candidates = [*neighbours, *([nearest_bad] if nearest_bad is not None else [])]
    for n in sorted(candidates, key=lambda n: -n.similarity):
        text = str(n.payload.get("text", ""))
        key = _evidence_key(text)
        if key in seen:
            continue
        seen.add(key)
        out.append(
            {
                "id": n.id,
                "text": text,
                "flagged": int(n.payload.get("flagged", 0)),
                "labels": dict(n.payload.get("labels", {})),
                "similarity": round(n.similarity, 4),
            }
        )
    return out


def _neighbours_evidence(
    neighbours: Sequence[Neighbour], nearest_bad: Neighbour | None, min_similarity: float
) -> dict[str, Any]:
    kept = [n for n in neighbours if n.similarity >= min_similarity]
    return {NEIGHBOURS_KEY: evidence_neighbours(kept, nearest_bad)}


class RetrievalStage(Stage):
    name = "retrieval"
    relative_cost = 0.001  # a CPU embedding and a kNN query, ~a thousandth of an LLM call

    def __init__(
        self,
        get_embedder: Callable[[], Embedder],
        model_name: str,
        open_index: Callable[[], VectorIndex],
        index_name: str,
        k: int = 10,
        min_similarity: float = 0.3,
        near_copy: float = FROZEN_NEAR_COPY,
        prior_weight: float = 0.5,
        retry_after_s: float = _RETRY_AFTER_S,
    ) -> None:
        # Both are opened on first use: every stream worker builds every stage but runs only its own,
        # and only the retrieval worker may hold the (single-process) embedded store.
        self._get_embedder = get_embedder
        self._open_index = open_index
        self._index: VectorIndex | None = None
        self.k = k
        self.min_similarity = min_similarity
        self.near_copy = near_copy
        self.prior_weight = prior_weight
        self.retry_after_s = retry_after_s
        self.version = f"{_SCORING_VERSION}+{model_name}+{index_name}+k{k}+copy{near_copy:g}"
        self._outage_since: float | None = None
        self._retry_at = 0.0
        self._bank_checked_at: float | None = None
        self._bank_problem: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings, resources: Resources) -> RetrievalStage:
        return cls(
            get_embedder=lambda: resources.embedder,
            model_name=encoder_identity(settings),
            open_index=lambda: open_vector_index(settings),
            index_name=index_identity(settings),
            k=settings.retrieval_k,
            min_similarity=settings.retrieval_min_similarity,
            near_copy=near_copy_similarity(settings),
            prior_weight=settings.retrieval_prior_weight,
        )

    @property
    def unavailable_reason(self) -> str | None:
        now = time.monotonic()
        stale = self._bank_problem is not None and now - (self._bank_checked_at or 0.0) >= _BANK_RECHECK_S
        if self._bank_checked_at is None or stale:
            try:
                problem = bank_problem(self._index_or_open(), self._get_embedder().identity)
            except Exception:  # an outage is reported per batch by `score`
                return None
            if problem is not None and problem != self._bank_problem:
                log.warning("retrieval: %s", problem)
            self._bank_problem, self._bank_checked_at = problem, now
        return self._bank_problem

    def _index_or_open(self) -> VectorIndex:
        if self._index is None:
            if time.monotonic() < self._retry_at:
                raise ConnectionError("vector index unavailable; retrying shortly")
            try:
                self._index = self._open_index()
            except Exception:
                self._retry_at = time.monotonic() + self.retry_after_s
                raise
        return self._index

    async def score(self, batch: Sequence[ItemContext]) -> list[StageResult]:
        await asyncio.to_thread(self._get_embedder().embed_contexts, batch)
        try:
            results = await asyncio.to_thread(self._search, batch)
        except Exception as exc:  # an outage must escalate items, never crash the worker
            self._record_outage(exc)
            return [StageResult(error=f"vector index unavailable: {type(exc).__name__}: {exc}") for _ in batch]
        if self._outage_since is not None:
            log.warning("retrieval: vector index back after %.1f s", time.monotonic() - self._outage_since)
            self._outage_since = None
        return results

    def _search(self, batch: Sequence[ItemContext]) -> list[StageResult]:
        queries = np.vstack([ctx.embedding for ctx in batch])
        index = self._index_or_open()
        neighbours = index.search(queries, self.k)
        nearest_bad = [next((n for n in found if n.payload.get(FLAGGED) == 1), None) for found in neighbours]
        unknown = [row for row, bad in enumerate(nearest_bad) if bad is None]
        if unknown:
            for row, bad in zip(unknown, index.search(queries[unknown], 1, where={FLAGGED: 1}), strict=True):
                nearest_bad[row] = bad[0] if bad else None
        results = []
        for found, worst in zip(neighbours, nearest_bad, strict=True):
            result = score_item(found, worst, self.min_similarity, self.near_copy, self.prior_weight)
            # Few-shot examples for the LLM and the review page: only an item that escalates uses them.
            result.evidence = functools.partial(_neighbours_evidence, found, worst, self.min_similarity)
            results.append(result)
        return results

    def _record_outage(self, exc: Exception) -> None:
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            log.warning(
                "retrieval: vector index unavailable (%s: %s); items escalate until it is back", type(exc).__name__, exc
            )
        # Drop the handle: the next attempt (after the retry delay) reopens a fresh connection.
        if self._index is not None:
            try:
                self._index.close()
            except Exception:
                log.debug("closing a failed vector index handle", exc_info=True)
            self._index = None
            self._retry_at = time.monotonic() + self.retry_after_s

    async def aclose(self) -> None:
        if self._index is not None:
            self._index.close()
            self._index = None
