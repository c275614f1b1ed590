"""The LLM stage inside `cascade calibrate`: a labelled sample, answers kept on disk, a cost preview.

Calibrating the LLM band means running the configured backend over labelled rows, which costs
real money. This module keeps that cheap and explicit:

- `sample_rows` caps each split at N rows, chosen by a hash of the id (the same rows every run);
- `AnswerStore` keeps every successful answer in SQLite, keyed like the stage's own cache
  (content, policy version, route identity = backend + model + prompt or mapping hash), so a
  rerun, or a run after a change elsewhere in the cascade, makes no call it already paid for;
- `LLMRun.plan` counts the calls still to make and their expected dollars before anything is
  spent (the CLI prints it and asks), and `provenance` records what was run in the threshold file.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

from cascade.contract import ContentItem
from cascade.data import LabelledItem, split_of
from cascade.pipeline import new_context
from cascade.scoring import ScoreTable
from cascade.stages.base import Stage, StageResult
from cascade.stages.llm import CacheKey, LLMStage

ANSWERS_FILE = "llm-answers.sqlite"


def sample_rows(rows: Sequence[LabelledItem], per_split: int) -> list[LabelledItem]:
    """At most `per_split` rows of each split, the same ones every run (lowest id hash first)."""
    ranked = sorted(rows, key=lambda row: xxhash.xxh64_intdigest(row.id.encode("utf-8", "surrogatepass"), seed=18))
    taken: dict[str, int] = {}
    kept = []
    for row in ranked:
        split = split_of(row.id)
        if taken.get(split, 0) < per_split:
            taken[split] = taken.get(split, 0) + 1
            kept.append(row)
    order = {row.id: i for i, row in enumerate(rows)}
    return sorted(kept, key=lambda row: order[row.id])


class AnswerStore:
    """The LLM stage's result cache, on disk: successful answers only (the stage never stores failures)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS answers (content TEXT, policy TEXT, route TEXT, result TEXT, "
            "PRIMARY KEY (content, policy, route))"
        )
        self._db.commit()

    def get(self, key: CacheKey) -> StageResult | None:
        row = self._db.execute(
            "SELECT result FROM answers WHERE content = ? AND policy = ? AND route = ?", key
        ).fetchone()
        if row is None:
            return None
        doc = json.loads(row[0])
        return StageResult(scores=doc["scores"], note=doc["note"], cost_usd=doc["cost_usd"], details=doc["details"])

    def put(self, key: CacheKey, value: StageResult) -> None:
        doc = {"scores": value.scores, "note": value.note, "cost_usd": value.cost_usd, "details": value.details}
        self._db.execute("INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?)", (*key, json.dumps(doc)))
        self._db.commit()

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0])

    def close(self) -> None:
        self._db.close()


@dataclass(frozen=True)
class Plan:
    items: int  # items the LLM stage will see
    cached: int  # of which answered before (no call)
    calls: float  # expected requests for the rest
    usd: float  # expected dollars for them

    def describe(self, model: str) -> str:
        return (
            f"llm stage ({model}): {self.items} items, {self.cached} answered before; "
            f"about {self.calls:.0f} calls, expected cost ${self.usd:.4f}"
        )


class LLMRun:
    """The configured LLM stage of one calibration run, with its answers kept in an `AnswerStore`."""

    def __init__(self, stage: LLMStage, store: AnswerStore) -> None:
        self.stage = stage
        self.store = store
        stage.cache = store
        self.planned: Plan | None = None

    @classmethod
    def attach(cls, stages: Sequence[Stage], data_dir: Path) -> LLMRun | None:
        """The run for the LLM stage among `stages`, or None if there is none or it cannot run (nothing to spend)."""
        stage = next((s for s in stages if isinstance(s, LLMStage)), None)
        if stage is None or stage.unavailable_reason is not None:
            return None
        return cls(stage, AnswerStore(data_dir / ANSWERS_FILE))

    def plan(self, items: Sequence[ContentItem]) -> Plan:
        backend, route = self.stage.primary.backend, self.stage.primary
        todo: dict[CacheKey, float] = {}
        cached = 0
        for item in items:
            ctx = new_context(item)
            key = self.stage.cache_key(ctx, route)
            if self.store.get(key) is not None:
                cached += 1
            elif key not in todo:
                todo[key] = backend.estimate_usd(ctx)
        self.planned = Plan(len(items), cached, len(todo) * backend.requests_per_item, sum(todo.values()))
        return self.planned

    def provenance(self, tables: dict[str, ScoreTable], per_split: int | None) -> dict[str, Any]:
        """What the threshold file records about the LLM answers its band was fitted on."""
        spent, errors = 0.0, 0
        for table in tables.values():
            for stage in table.stages:
                if stage.name == self.stage.name:
                    spent += float(stage.cost_usd.sum())
                    errors += int(stage.error.sum())
        endpoint = self.stage.primary.endpoint
        return {
            "backend": endpoint.backend,
            "model": endpoint.model,
            "stage_version": self.stage.version,
            "rows_per_split": per_split,
            "items": {split: len(table) for split, table in tables.items()},
            "planned": None if self.planned is None else dict(self.planned.__dict__),
            "spent_usd": round(spent, 6),
            "errors": errors,
            "answers": str(self.store.path),
        }
