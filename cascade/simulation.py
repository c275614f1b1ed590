"""The banded cascade replayed over cached scores, vectorised over many threshold sets.

`stage_decisions` is `cascade.pipeline.apply_bands` in numpy: same edges (block_at
inclusive, allow_below exclusive, null edges never fire), a missing score is unresolved,
any block wins, allow needs every banded category cleared, errors escalate, matches decide.
`simulate` chains stages like `CascadeRunner.run`; a test holds the two to exact agreement.
`run_from_verdicts` turns a live run into the same `SimulatedRun`, so reports do
not care which produced it.

The replay assumes a stage's scores for an item do not depend on which other items share
its batch (true of every stage here; the hash stage's flood guard sees every item both
live and during collection, because it runs first).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from cascade.assembly import adjudicator_stage
from cascade.contract import DEFAULT_BAND_SET, Decision, Verdict
from cascade.data import FLAGGED
from cascade.pipeline import UNDECIDED_STAGE
from cascade.scoring import MATCH_ALLOW, MATCH_BLOCK, ScoreTable, StageScores
from cascade.thresholds import Band, BandSet, ThresholdSet

# Decision codes. Within one stage REVIEW means "escalate"; after the last stage it is review.
ALLOW, BLOCK, REVIEW = 0, 1, 2
ESCALATE = REVIEW
DECISION_NAMES = ("allow", "block", "review")
DECISION_CODES = {Decision.ALLOW: ALLOW, Decision.BLOCK: BLOCK, Decision.REVIEW: REVIEW}
PIPELINE = -1  # decided_by index of items nobody decided


@dataclass(frozen=True)
class BandArrays:
    """One stage's bands under K threshold sets: (K, C) edges, ±inf for a null edge."""

    categories: list[str]
    allow_below: np.ndarray  # (K, C); -inf = never clears
    block_at: np.ndarray  # (K, C); +inf = never blocks
    banded: np.ndarray  # (K, C) bool; False = the category has no band in that set

    @classmethod
    def from_bands(cls, bands: Mapping[str, Band]) -> BandArrays:
        categories = list(bands)
        allow = [-np.inf if b.allow_below is None else b.allow_below for b in bands.values()]
        block = [np.inf if b.block_at is None else b.block_at for b in bands.values()]
        shape = (1, len(categories))
        return cls(
            categories,
            np.array(allow, dtype=float).reshape(shape),
            np.array(block, dtype=float).reshape(shape),
            np.ones(shape, dtype=bool),
        )

    def band(self, k: int, category: str) -> Band | None:
        j = self.categories.index(category)
        if not self.banded[k, j]:
            return None
        allow, block = self.allow_below[k, j], self.block_at[k, j]
        return Band(
            allow_below=None if np.isneginf(allow) else float(allow),
            block_at=None if np.isposinf(block) else float(block),
        )


def stage_decisions(stage: StageScores, bands: BandArrays) -> np.ndarray:
    """(K, n) ALLOW / BLOCK / ESCALATE for every threshold set and item."""
    scores = np.stack([stage.column(c) for c in bands.categories], axis=1) if bands.categories else None
    k, n = len(bands.banded), len(stage.match)
    decisions = np.full((k, n), ESCALATE, dtype=np.int8)
    if scores is not None:
        banded = bands.banded[:, None, :]
        with np.errstate(invalid="ignore"):  # NaN (no score) compares False: neither blocks nor clears
            blocks = (scores[None] >= bands.block_at[:, None, :]) & banded
            clears = scores[None] < bands.allow_below[:, None, :]
        all_cleared = np.where(banded, clears, True).all(axis=2) & bands.banded.any(axis=1)[:, None]
        decisions[all_cleared] = ALLOW
        decisions[blocks.any(axis=2)] = BLOCK
    decisions[:, stage.match == MATCH_ALLOW] = ALLOW
    decisions[:, stage.match == MATCH_BLOCK] = BLOCK
    decisions[:, stage.error] = ESCALATE  # an error outranks everything, as in apply_bands
    return decisions


@dataclass
class SimulatedRun:
    """What the cascade did with n items."""

    stage_names: list[str]
    decision: np.ndarray  # (n,) ALLOW / BLOCK / REVIEW
    decided_by: np.ndarray  # (n,) stage index, PIPELINE for review
    reached: np.ndarray  # (n, S) bool
    errored: np.ndarray  # (n, S) bool: reached the stage, which could not judge it
    final_scores: dict[str, np.ndarray]  # category -> (n,) the last reached stage's score (NaN if none)
    latency_ms: dict[str, np.ndarray]  # stage -> per-item latency of the items that reached it
    thresholds_version: str
    band_set: np.ndarray  # (n,) object: the band set each item was judged by

    def escalated_past(self, index: int) -> np.ndarray:
        """Items that reached stage `index` and were not decided there."""
        return self.reached[:, index] & (self.decided_by != index)

    @property
    def llm_calls(self) -> np.ndarray:
        """Items that escalated past the last cheap stage: LLM calls, whether or not an LLM stage runs."""
        return llm_calls(self.stage_names, self.reached, self.decided_by)


def llm_calls(stage_names: Sequence[str], reached: np.ndarray, decided_by: np.ndarray) -> np.ndarray:
    costly = adjudicator_stage()
    cheap = [i for i, name in enumerate(stage_names) if name != costly]
    if not cheap:
        return np.ones(len(decided_by), dtype=bool)
    last = cheap[-1]
    return reached[:, last] & (decided_by != last)


def violation_column(stage: StageScores, band_sets: Mapping[str, BandSet], names: np.ndarray) -> np.ndarray:
    """A stage's verdict score per item (`BandSet.violation_probability` in numpy; raw `flagged` without maps)."""
    column = stage.column(FLAGGED).copy()
    for name, band_set in band_sets.items():
        rows = names == name
        maps = band_set.score_maps.get(stage.name, {})
        mapped = [maps[c].probabilities(stage.column(c)[rows]) for c in stage.categories if c in maps]
        if not mapped or not rows.any():
            continue
        best = np.fmax.reduce(np.vstack(mapped), axis=0)  # NaN only where no category was scored
        column[rows] = np.where(np.isnan(best), column[rows], best)
    return column


def final_scores(
    stages: Sequence[StageScores],
    reached: np.ndarray,
    categories: Sequence[str],
    band_sets: Mapping[str, BandSet] | None = None,
    names: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Per category, the score of the last reached stage that scored it.

    `flagged` is the verdict's `score` (`cascade.pipeline.calibrated_score`): the largest
    calibrated category probability under the item's band set when `band_sets` are given, and
    an item settled by a definitive match with no score gets 1.0 (block) or 0.0 (allow): the
    match is the cascade's last word on it.
    Other categories stay raw, as in the verdict's `categories`.
    """
    out: dict[str, np.ndarray] = {}
    n = len(reached)
    for category in categories:
        final = np.full(n, np.nan)
        for index, stage in enumerate(stages):
            column = stage.column(category)
            if category == FLAGGED:
                if band_sets is not None and names is not None:
                    column = violation_column(stage, band_sets, names)
                else:
                    column = column.copy()
                unscored = np.isnan(column)
                column[unscored & (stage.match == MATCH_BLOCK)] = 1.0
                column[unscored & (stage.match == MATCH_ALLOW)] = 0.0
            take = reached[:, index] & ~np.isnan(column) & ~stage.error
            final[take] = column[take]
        out[category] = final
    return out


def band_set_names(thresholds: ThresholdSet, surfaces: np.ndarray | None, n: int) -> np.ndarray:
    """(n,) the band set each item is judged by (`ThresholdSet.band_set_name` of its surface)."""
    if surfaces is None:
        return np.full(n, DEFAULT_BAND_SET, dtype=object)
    return np.array([thresholds.band_set_name(s) for s in surfaces], dtype=object)


def _decisions_by_band_set(stage: StageScores, band_sets: Mapping[str, BandSet], names: np.ndarray) -> np.ndarray:
    """(n,) one stage's decisions, each item under its own band set."""
    decided = np.full(len(names), ESCALATE, dtype=np.int8)
    for name, band_set in band_sets.items():
        rows = np.flatnonzero(names == name)
        if rows.size:
            decided[rows] = stage_decisions(stage.take(rows), BandArrays.from_bands(band_set.bands(stage.name)))[0]
    return decided


def simulate(
    table: ScoreTable,
    thresholds: ThresholdSet,
    categories: Sequence[str] = (FLAGGED,),
    surfaces: np.ndarray | None = None,
) -> SimulatedRun:
    """`CascadeRunner.run` over the cached scores under one threshold set (items of `surfaces`)."""
    n, count = len(table), len(table.stages)
    band_sets, names = thresholds.band_sets(), band_set_names(thresholds, surfaces, n)
    decision = np.full(n, REVIEW, dtype=np.int8)
    decided_by = np.full(n, PIPELINE, dtype=np.int16)
    reached = np.zeros((n, count), dtype=bool)
    errored = np.zeros((n, count), dtype=bool)
    pending = np.ones(n, dtype=bool)
    for index, stage in enumerate(table.stages):
        reached[:, index] = pending
        errored[:, index] = pending & stage.error
        decided = _decisions_by_band_set(stage, band_sets, names)
        settled = pending & (decided != ESCALATE)
        decision[settled] = decided[settled]
        decided_by[settled] = index
        pending &= ~settled
    return SimulatedRun(
        stage_names=table.stage_names,
        decision=decision,
        decided_by=decided_by,
        reached=reached,
        errored=errored,
        final_scores=final_scores(table.stages, reached, categories, band_sets, names),
        latency_ms={s.name: s.latency_ms[reached[:, i]] for i, s in enumerate(table.stages)},
        thresholds_version=thresholds.version,
        band_set=names,
    )


def simulate_shadow(
    table: ScoreTable, primary: SimulatedRun, shadow: ThresholdSet, surfaces: np.ndarray | None = None
) -> np.ndarray:
    """The shadow decision per item, as `CascadeRunner._shadow` records it in verdicts.

    Only the stages the primary run reached have scores live, so the shadow set looks at
    those alone; where it would have escalated past them, the shadow decision is review.
    """
    n = len(table)
    band_sets, names = shadow.band_sets(), band_set_names(shadow, surfaces, n)
    decision = np.full(n, REVIEW, dtype=np.int8)
    pending = np.ones(n, dtype=bool)
    for index, stage in enumerate(table.stages):
        decided = _decisions_by_band_set(stage, band_sets, names)
        settled = pending & primary.reached[:, index] & (decided != ESCALATE)
        decision[settled] = decided[settled]
        pending &= ~settled
    return decision


def run_from_verdicts(
    verdicts: Sequence[Verdict],
    stage_names: Sequence[str],
    batch_of: Sequence[int],
    categories: Sequence[str] = (FLAGGED,),
) -> SimulatedRun:
    """The same `SimulatedRun` from a live run's verdicts (their traces).

    `batch_of[i]` is the batch verdict i was run in: a trace's latency is its stage's batch
    wall time, shared by the batch's items that reached the stage.
    """
    n, index_of = len(verdicts), {name: i for i, name in enumerate(stage_names)}
    decision = np.array([DECISION_CODES[v.decision] for v in verdicts], dtype=np.int8)
    decided_by = np.array(
        [PIPELINE if v.decided_by == UNDECIDED_STAGE else index_of[v.decided_by] for v in verdicts], dtype=np.int16
    )
    reached = np.zeros((n, len(stage_names)), dtype=bool)
    errored = np.zeros((n, len(stage_names)), dtype=bool)
    batch_ms = np.zeros((n, len(stage_names)))
    scores = {c: np.full(n, np.nan) for c in categories}
    for i, verdict in enumerate(verdicts):
        for entry in verdict.trace:
            j = index_of[entry.stage]
            reached[i, j], batch_ms[i, j] = True, entry.latency_ms
            if entry.error is not None:
                errored[i, j] = True
                continue
            for category in categories:
                if category in entry.scores and category != FLAGGED:
                    scores[category][i] = entry.scores[category]
        if FLAGGED in scores and verdict.score is not None:
            scores[FLAGGED][i] = verdict.score
    batches = np.asarray(batch_of)
    latency = {}
    for j, name in enumerate(stage_names):
        rows = np.flatnonzero(reached[:, j])
        _, inverse, sizes = np.unique(batches[rows], return_inverse=True, return_counts=True)
        latency[name] = batch_ms[rows, j] / sizes[inverse] if rows.size else np.zeros(0)
    return SimulatedRun(
        stage_names=list(stage_names),
        decision=decision,
        decided_by=decided_by,
        reached=reached,
        errored=errored,
        final_scores=scores,
        latency_ms=latency,
        thresholds_version=verdicts[0].thresholds_version if verdicts else "",
        band_set=np.array([v.band_set for v in verdicts], dtype=object),
    )
