"""Synthetic stages and data with known score distributions, for calibration and evaluation tests.

`SyntheticStage` is a real `Stage`: deterministic scores from the item text, so a live
`CascadeRunner` run and a replay over collected scores must agree exactly. Texts look like
"bad 123 ..." / "ok 123 ...": the first word is the hidden truth, the stage sees only a noisy
score of it (uniform on [lift, 1] for bad, [0, 1 - lift] for ok).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import xxhash

from cascade.contract import Decision
from cascade.scoring import LabelMatrix, ScoreTable, StageScores
from cascade.stages.base import ItemContext, Match, Stage, StageResult


def _uniform(text: str, salt: str) -> float:
    return xxhash.xxh64_intdigest(f"{salt}|{text}".encode()) / 2.0**64


class SyntheticStage(Stage):
    """Scores `flagged` (and `spam` when asked) from the item text; optional matches and errors.

    - texts containing "known-bad" get a blocking match (like a hash bank hit) when `matches`;
    - texts containing "broken" get an error result when `errors`;
    - texts containing "unscored" get no `spam` score (a banded category without a score).
    """

    def __init__(
        self,
        name: str,
        lift: float,
        categories: Sequence[str] = ("flagged",),
        matches: bool = False,
        errors: bool = False,
        scores: bool = True,
    ) -> None:
        self.name, self.version = name, f"synthetic-{lift}"
        self.lift, self.categories = lift, tuple(categories)
        self.matches, self.errors, self.scores = matches, errors, scores

    def _result(self, text: str) -> StageResult:
        if self.errors and "broken" in text:
            return StageResult(error="synthetic failure")
        if self.matches and "known-bad" in text:
            return StageResult(match=Match(Decision.BLOCK, ("spam",), "known bad entry"))
        if not self.scores:
            return StageResult()
        bad = text.startswith("bad")
        out = {}
        for category in self.categories:
            if category != "flagged" and "unscored" in text:
                continue
            u = _uniform(text, f"{self.name}/{category}")
            out[category] = round(self.lift * bad + (1 - self.lift) * u, 6)
        return StageResult(scores=out)

    async def score(self, batch: Sequence[ItemContext]) -> list[StageResult]:
        return [self._result(ctx.item.text) for ctx in batch]


def write_dataset(path: Path, n: int, seed: int = 0, extra_category: str | None = None) -> Path:
    """A labelled JSONL: 40% bad (flagged), spam labelled on half the rows, a few special rows
    (known-bad bank hits among the bad ones, stage errors, missing spam scores)."""
    rng = np.random.default_rng(seed)
    with path.open("w", encoding="utf-8") as fh:
        for i in range(n):
            bad = rng.random() < 0.4
            odds = (("known-bad", 0.05 * bad), ("broken", 0.03), ("unscored", 0.05))
            tags = " ".join(tag for tag, p in odds if rng.random() < p)
            row = {
                "id": f"{path.stem}-{seed}-{i}",
                "text": f"{'bad' if bad else 'ok'} {i} {tags}".strip(),
                "flagged": int(bad),
                "labels": {"spam": int(bad)} if i % 2 else {},
                "source": "synthetic",
            }
            if extra_category:
                row["labels"][extra_category] = int(bad and rng.random() < 0.5)
            fh.write(json.dumps(row) + "\n")
    return path


def synthetic_table(n: int, rng: np.random.Generator, llm: bool = False) -> tuple[ScoreTable, LabelMatrix]:
    """Scores drawn from known Beta distributions: positives Beta(a, b), negatives Beta(b, a)."""
    flagged = (rng.random(n) < 0.4).astype(np.int8)

    def stage(name: str, a: float, b: float) -> StageScores:
        scores = np.where(flagged == 1, rng.beta(a, b, n), rng.beta(b, a, n))
        return StageScores(
            name, "v1", ["flagged"], scores[:, None], np.zeros(n, np.int8), np.zeros(n, bool), np.ones(n), np.zeros(n)
        )

    stages = [stage("retrieval", 3, 2), stage("classifier", 6, 2)]
    if llm:
        stages.append(stage("llm", 12, 2))
    ids = np.char.add(f"s{rng.integers(1 << 62)}-", np.arange(n).astype(str))
    return ScoreTable(ids, stages), LabelMatrix(["flagged"], flagged[:, None], np.full(n, "synthetic"))
