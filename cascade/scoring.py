"""Per-stage score matrices over labelled rows, collected once and cached.

Calibration, evaluation and benchmarks all need the same thing: what every configured
stage says about every item. `collect_scores` runs each stage over *every* item (not only
the ones a threshold set would escalate), through `CascadeRunner.run_stage` so errors and
unavailable stages degrade exactly as in production. Band choice and evaluation are then
offline simulations over these matrices (`cascade.simulation`).

The cache lives under `Settings().data_dir / "scores"`, keyed by the data files' sha256,
the split, and every stage's name, version and availability; a stage whose behaviour
changes must bump its version (or pass `refresh=True`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cascade.contract import ContentItem, DeadLetter, StageAction
from cascade.data import FLAGGED, LabelledItem, categories_of
from cascade.intake import parse_record
from cascade.pipeline import CascadeRunner, new_context
from cascade.settings import Settings
from cascade.stages.base import Stage
from cascade.thresholds import ThresholdSet

# Bump when the cache layout changes, so old files are not misread.
CACHE_FORMAT = "scores-v1"

NO_MATCH, MATCH_ALLOW, MATCH_BLOCK = 0, 1, 2

UNKNOWN_LABEL = -1


@dataclass
class StageScores:
    """One stage over n items: its per-category scores and how it judged each item."""

    name: str
    version: str
    categories: list[str]
    scores: np.ndarray  # (n, C) float64; NaN where the stage gave no score
    match: np.ndarray  # (n,) int8: NO_MATCH / MATCH_ALLOW / MATCH_BLOCK (a definitive match decides)
    error: np.ndarray  # (n,) bool: the stage could not judge the item (it escalates)
    latency_ms: np.ndarray  # (n,) batch wall time / batch size: the item's share of the stage's time
    cost_usd: np.ndarray  # (n,) what the stage reported spending on the item

    def column(self, category: str) -> np.ndarray:
        """Scores for one category; all NaN if the stage never scores it."""
        if category in self.categories:
            return self.scores[:, self.categories.index(category)]
        return np.full(len(self.match), np.nan)

    def take(self, index: np.ndarray) -> StageScores:
        return StageScores(
            self.name,
            self.version,
            list(self.categories),
            self.scores[index],
            self.match[index],
            self.error[index],
            self.latency_ms[index],
            self.cost_usd[index],
        )


@dataclass
class ScoreTable:
    """Every stage's view of the same n items, in cascade order."""

    ids: np.ndarray  # (n,) str
    stages: list[StageScores]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def stage_names(self) -> list[str]:
        return [s.name for s in self.stages]

    def take(self, index: np.ndarray) -> ScoreTable:
        return ScoreTable(self.ids[index], [s.take(index) for s in self.stages])

    def save(self, path: Path) -> None:
        arrays: dict[str, np.ndarray] = {"ids": self.ids.astype(str)}
        meta = []
        for i, s in enumerate(self.stages):
            meta.append({"name": s.name, "version": s.version, "categories": s.categories})
            arrays |= {
                f"{i}.scores": s.scores,
                f"{i}.match": s.match,
                f"{i}.error": s.error,
                f"{i}.latency_ms": s.latency_ms,
                f"{i}.cost_usd": s.cost_usd,
            }
        arrays["meta"] = np.array(json.dumps({"format": CACHE_FORMAT, "stages": meta}))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez_compressed(tmp, **arrays)
        tmp.replace(path)  # atomic: a crashed run never leaves a half-written cache

    @classmethod
    def load(cls, path: Path) -> ScoreTable:
        with np.load(path, allow_pickle=False) as npz:
            meta = json.loads(str(npz["meta"]))
            if meta.get("format") != CACHE_FORMAT:
                raise ValueError(f"{path}: cache format {meta.get('format')!r}, expected {CACHE_FORMAT!r}")
            stages = [
                StageScores(
                    m["name"],
                    m["version"],
                    list(m["categories"]),
                    npz[f"{i}.scores"],
                    npz[f"{i}.match"],
                    npz[f"{i}.error"],
                    npz[f"{i}.latency_ms"],
                    npz[f"{i}.cost_usd"],
                )
                for i, m in enumerate(meta["stages"])
            ]
            return cls(npz["ids"], stages)


@dataclass(frozen=True)
class LabelMatrix:
    """0/1 labels per category, UNKNOWN_LABEL where the source did not annotate. `flagged` first."""

    categories: list[str]
    values: np.ndarray  # (n, C) int8
    sources: np.ndarray  # (n,) str: the row's `source`
    surfaces: np.ndarray | None = None  # (n,) object: the row's surface (None: none); all None if not given

    def __post_init__(self) -> None:
        if self.surfaces is None:
            object.__setattr__(self, "surfaces", np.full(len(self.values), None, dtype=object))

    @classmethod
    def of(cls, rows: Sequence[LabelledItem]) -> LabelMatrix:
        categories = categories_of(rows)
        values = np.full((len(rows), len(categories)), UNKNOWN_LABEL, dtype=np.int8)
        for i, row in enumerate(rows):
            values[i, 0] = row.flagged
            for j, category in enumerate(categories[1:], 1):
                label = row.labels.get(category)
                if label is not None:
                    values[i, j] = label
        return cls(
            categories,
            values,
            np.array([row.source for row in rows], dtype=str),
            np.array([row.surface for row in rows], dtype=object),
        )

    @property
    def flagged(self) -> np.ndarray:
        return self.values[:, 0]

    def column(self, category: str) -> np.ndarray:
        if category == FLAGGED:
            return self.flagged
        if category in self.categories:
            return self.values[:, self.categories.index(category)]
        return np.full(len(self.values), UNKNOWN_LABEL, dtype=np.int8)

    def take(self, index: np.ndarray) -> LabelMatrix:
        return LabelMatrix(self.categories, self.values[index], self.sources[index], self.surfaces[index])


def admit(rows: Sequence[LabelledItem], settings: Settings) -> tuple[list[LabelledItem], list[ContentItem], int]:
    """The rows that pass intake as `ContentItem`s (same rules as production); the count rejected."""
    kept_rows: list[LabelledItem] = []
    items: list[ContentItem] = []
    for row in rows:
        parsed = parse_record(json.dumps(row.item_record(), ensure_ascii=False), settings)
        if isinstance(parsed, DeadLetter):
            continue
        kept_rows.append(row)
        items.append(parsed)
    return kept_rows, items, len(rows) - len(kept_rows)


async def collect_scores(
    stages: Sequence[Stage],
    items: Sequence[ContentItem],
    batch_size: int = 64,
    on_batch: Callable[[int], None] | None = None,
) -> ScoreTable:
    """Run every stage over every item, in cascade order, and gather the traces into matrices.

    A threshold set without bands lets nothing be decided by scores, and every stage is
    called on the whole batch regardless of earlier matches, so each item's trace holds
    every stage's entry. Stages still share work through the item context (embeddings,
    evidence) as they do live.
    """
    runner = CascadeRunner(stages, ThresholdSet(version="score-collection"), policy_version="score-collection")
    traces = []
    for start in range(0, len(items), batch_size):
        contexts = [new_context(item) for item in items[start : start + batch_size]]
        for index in range(len(stages)):
            await runner.run_stage(index, contexts)
        traces.extend((ctx.trace, len(contexts)) for ctx in contexts)
        if on_batch is not None:
            on_batch(len(contexts))
    n = len(items)
    collected: list[StageScores] = []
    for index, stage in enumerate(stages):
        entries = [(trace[index], size) for trace, size in traces]
        categories = sorted({c for entry, _ in entries for c in entry.scores}, key=lambda c: (c != FLAGGED, c))
        scores = np.full((n, len(categories)), np.nan)
        match = np.zeros(n, dtype=np.int8)
        for i, (entry, _) in enumerate(entries):
            for j, category in enumerate(categories):
                if category in entry.scores:
                    scores[i, j] = entry.scores[category]
            if entry.matched:
                match[i] = MATCH_BLOCK if entry.result is StageAction.BLOCK else MATCH_ALLOW
        collected.append(
            StageScores(
                name=stage.name,
                version=stage.version,
                categories=categories,
                scores=scores,
                match=match,
                error=np.array([entry.error is not None for entry, _ in entries], dtype=bool),
                latency_ms=np.array([entry.latency_ms / size for entry, size in entries], dtype=float),
                cost_usd=np.array([entry.cost_usd for entry, _ in entries], dtype=float),
            )
        )
    return ScoreTable(np.array([item.id for item in items], dtype=str), collected)


def cache_key(data_digests: Sequence[dict[str, object]], split: str, stages: Sequence[Stage]) -> str:
    doc = {
        "format": CACHE_FORMAT,
        "data": [d["sha256"] for d in data_digests],
        "split": split,
        # Availability too: a stage that was unavailable (e.g. an empty bank) scored nothing worth keeping.
        "stages": [[s.name, s.version, s.unavailable_reason is None] for s in stages],
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:24]


async def cached_scores(
    stages: Sequence[Stage],
    items: Sequence[ContentItem],
    settings: Settings,
    key: str,
    refresh: bool = False,
    batch_size: int = 64,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[ScoreTable, bool]:
    """The score table for these items, from the cache when it matches; and whether it was cached."""
    path = settings.data_path("scores", f"{key}.npz")
    if path.exists() and not refresh:
        table = ScoreTable.load(path)
        if table.ids.tolist() == [item.id for item in items]:
            return table, True
    table = await collect_scores(stages, items, batch_size, on_batch)
    table.save(path)
    return table, False
