"""Figures for the model card, from the serving path itself (onnxruntime, no torch).

- per source and head, AUPRC on the test split, for any model directory (tuned or frozen)
  at either precision, so designs are compared on the same rows by the same code;
- leave-one-source-out: logistic-regression heads on an encoder's embeddings, trained on the
  other sources' train rows and scored on the held-out source's test rows;
- the truncation length: `flagged` AUPRC per source at several token limits;
- encoder speed: sentences/s at batch 1 and batch 64, fp32 against int8, interleaved.

Scores of a model directory are cached by (encoder identity, max tokens, texts digest) under
`cache_dir`, so the card's comparisons cost one pass per model.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from cascade.data import LabelledItem
from cascade.embedding import Embedder, encoder_spec, tuned_card
from cascade.evaluation import auprc
from cascade.settings import Settings


def serving_embedder(
    model_dir: Path, int8: bool, max_tokens: int | None = None, settings: Settings | None = None
) -> Embedder:
    """The embedder `cascade moderate` would build for `model_dir` (tuned or frozen)."""
    update = {"model_dir": model_dir, "embedding_int8": int8, "embedding_cache_size": 0}
    chosen = (settings or Settings()).model_copy(update=update)
    spec = encoder_spec(chosen)
    return Embedder.from_settings(chosen, replace(spec, max_tokens=max_tokens) if max_tokens else spec)


def model_scores(
    model_dir: Path, texts: Sequence[str], int8: bool, cache_dir: Path, max_tokens: int | None = None
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Head names, head scores (n, heads) and embeddings (n, d) of `texts` as served from `model_dir`."""
    from cascade.stages.classifier import ClassifierModel

    embedder = serving_embedder(model_dir, int8, max_tokens)
    digest = hashlib.sha256("\n".join(texts).encode("utf-8", "surrogatepass")).hexdigest()[:16]
    path = cache_dir / f"{embedder.identity}-t{embedder.max_tokens}-{digest}.npz"
    if path.exists():
        with np.load(path) as cached:
            return cached["heads"].tolist(), cached["scores"], cached["embeddings"]
    embeddings, scores = embedder.encode(texts)
    if scores is None:  # frozen: the heads are a separate graph on the embedding
        model = ClassifierModel(model_dir)
        heads, scores = model.heads, model.predict(embeddings)
    else:
        heads = list(embedder.heads)
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.savez(path, heads=np.array(heads), scores=scores, embeddings=embeddings)
    return heads, scores, embeddings


def auprc_by_source(rows: Sequence[LabelledItem], heads: Sequence[str], scores: np.ndarray) -> dict[str, Any]:
    """{source: {head: {rows, positives, auprc}}} over the rows that carry each head's label."""
    result: dict[str, Any] = {}
    for source in sorted({r.source for r in rows}):
        per_head = {}
        for j, head in enumerate(heads):
            picked = [i for i, r in enumerate(rows) if r.source == source and r.label(head) is not None]
            if not picked:
                continue
            y = np.array([rows[i].label(head) for i in picked], dtype=bool)
            value = auprc(scores[picked, j].astype(np.float64), y)
            per_head[head] = {
                "rows": len(picked),
                "positives": int(y.sum()),
                "auprc": None if value is None else round(value, 4),
            }
        result[source] = per_head
    return result


def leave_one_source_out(
    train: Sequence[LabelledItem], X_train: np.ndarray, test: Sequence[LabelledItem], X_test: np.ndarray
) -> dict[str, Any]:
    """`flagged` AUPRC on each source's test rows of a head trained on the other sources' train rows."""
    from sklearn.linear_model import LogisticRegression

    y_train = np.array([r.flagged for r in train])
    train_sources = np.array([r.source for r in train])
    result: dict[str, Any] = {}
    for source in sorted({r.source for r in test}):
        others = train_sources != source
        model = LogisticRegression(C=1.0, max_iter=3000, class_weight="balanced").fit(X_train[others], y_train[others])
        picked = [i for i, r in enumerate(test) if r.source == source]
        y = np.array([test[i].flagged for i in picked], dtype=bool)
        value = auprc(model.predict_proba(X_test[picked])[:, 1], y)
        result[source] = {
            "trained_on": sorted(set(train_sources[others].tolist())),
            "rows": len(picked),
            "auprc": None if value is None else round(value, 4),
        }
    return result


NEAR_COPY_CANDIDATES = (0.95, 0.97, 0.98, 0.99, 0.995)
NEAR_DUPLICATE_JACCARD = 0.6  # word-set overlap of two texts that are edits of one another
NEAR_COPY_PURITY = 0.95


def _word_jaccard(a: str, b: str) -> float:
    words_a, words_b = (set(re.findall(r"\w+", t.lower())) for t in (a, b))
    return len(words_a & words_b) / max(1, len(words_a | words_b))


def near_copy_threshold(
    bank: np.ndarray, bank_texts: Sequence[str], queries: np.ndarray, texts: Sequence[str]
) -> tuple[float, dict[str, Any]]:
    """The lowest candidate similarity at which a query's nearest bank text is an edit of it
    (word Jaccard >= 0.6) for at least 95 % of the queries that reach it.

    The retrieval stage calls such a neighbour a near-copy; the threshold is a property of the
    encoder's geometry (`cascade.embedding.near_copy_similarity`).
    """
    similarity = queries @ bank.T
    nearest = similarity.argmax(axis=1)
    top = similarity[np.arange(len(texts)), nearest]
    overlap = np.array([_word_jaccard(t, bank_texts[j]) for t, j in zip(texts, nearest, strict=True)])
    figures: dict[str, Any] = {}
    for level in NEAR_COPY_CANDIDATES:
        reached = top >= level
        figures[f"{level:g}"] = {
            "share_of_queries": round(float(reached.mean()), 4),
            "near_duplicates": round(float((overlap[reached] >= NEAR_DUPLICATE_JACCARD).mean()), 4)
            if reached.any()
            else None,
        }
    chosen = next(
        (
            level
            for level in NEAR_COPY_CANDIDATES
            if (figures[f"{level:g}"]["near_duplicates"] or 1.0) >= NEAR_COPY_PURITY
        ),
        NEAR_COPY_CANDIDATES[-1],
    )
    return chosen, {"queries": len(texts), "bank": len(bank_texts), "by_level": figures}


def sentences_per_second(
    embedders: Mapping[str, Embedder], texts: Sequence[str], batches: Sequence[int], rounds: int = 3
) -> dict[str, dict[str, float]]:
    """Best-of-`rounds` sentences/s per embedder and batch size, interleaved so load hits all alike."""
    best: dict[str, dict[str, float]] = {name: {} for name in embedders}
    for _ in range(rounds):
        for batch in batches:
            for name, embedder in embedders.items():
                started = time.perf_counter()
                for start in range(0, len(texts), batch):
                    embedder.encode(texts[start : start + batch])
                rate = len(texts) / (time.perf_counter() - started)
                best[name][f"batch_{batch}"] = round(max(best[name].get(f"batch_{batch}", 0.0), rate), 1)
    return best


def is_tuned(model_dir: Path) -> bool:
    return tuned_card(model_dir) is not None
