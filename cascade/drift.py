"""Drift: how far traffic has moved from the mix a threshold file was certified on.

A threshold file's guarantees hold only while live items look like its calibration items.
`Reference.of` summarises the calibration split under the chosen bands (what `cascade
calibrate` writes to `provenance.reference`): per stage, the share of items that reach it,
what it does with them (allow / block / escalate / review) and, per category, a decile
histogram of its scores over the items it judged; for the cascade, the decision mix, the
share decided per stage, the LLM rate and the review rate.

`StageWindow` keeps the same per-stage summary over live items (a sliding window in the
workers, everything in `cascade drift`), fed with the stage's trace entries, and
`ScoreSketch.psi` compares it with the reference: the population-stability index over the
reference deciles (< 0.1 stable, 0.1-0.25 moving, > 0.25 moved: `PSI_ALERT`).

`AuditPrecision` estimates the precision of automatic blocks from audited items (a random
share of automatic decisions also sent to human review, see `audited`).
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np
import xxhash

from cascade.assembly import adjudicator_stage
from cascade.contract import Decision, StageAction, TraceEntry
from cascade.pipeline import UNDECIDED_STAGE
from cascade.scoring import ScoreTable
from cascade.simulation import ALLOW, BLOCK, DECISION_NAMES, PIPELINE, REVIEW, simulate
from cascade.thresholds import ThresholdSet

BINS = 10  # reference deciles: each bin holds a tenth of the calibration scores (ties merge bins)
PSI_WATCH = 0.1
PSI_ALERT = 0.25  # the conventional "population has shifted" level; the PrometheusRule uses it too
MIN_SKETCH_ITEMS = 50  # fewer calibration scores than this make no usable reference
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
RESULTS = tuple(o.value for o in StageAction)  # allow, block, escalate, review
ALL_SURFACES = "_all"  # the surface label of figures over every item (no surface can be named so)
_AUDIT_SEED = 20261130


class DriftError(ValueError):
    """A reference that cannot be used, with a message for the operator."""


@dataclass(frozen=True)
class ScoreSketch:
    """A histogram of scores over the reference's deciles: bin i is (edges[i-1], edges[i]]."""

    edges: tuple[float, ...]
    shares: tuple[float, ...]
    n: int
    quantiles: dict[str, float]

    @classmethod
    def of(cls, scores: np.ndarray) -> ScoreSketch | None:
        scores = scores[~np.isnan(scores)]
        if scores.size < MIN_SKETCH_ITEMS:
            return None
        cuts = np.unique(np.round(np.quantile(scores, np.linspace(0, 1, BINS + 1)[1:-1]), 6))
        counts = np.bincount(np.searchsorted(cuts, scores, side="left"), minlength=cuts.size + 1)
        # A point mass (e.g. many scores of exactly 1.0) leaves a bin empty: merge it into its left neighbour.
        cuts = cuts[counts[1:] > 0]
        counts = counts[counts > 0]
        return cls(
            edges=tuple(float(c) for c in cuts),
            shares=tuple(round(float(c) / scores.size, 6) for c in counts),
            n=int(scores.size),
            quantiles=quantiles(scores),
        )

    def bin(self, score: float) -> int:
        """The bin of one score (per item on the hot path: no array round trip)."""
        return bisect.bisect_left(self.edges, score)

    def psi(self, counts: np.ndarray) -> float:
        """Population-stability index of live bin counts against the reference shares.

        Live shares are smoothed by half an item per bin, so an empty bin costs a finite amount.
        """
        live = (counts + 0.5) / (counts.sum() + 0.5 * counts.size)
        ref = np.maximum(np.asarray(self.shares), 0.5 / self.n)
        return float(np.sum((live - ref) * np.log(live / ref)))

    def ks(self, counts: np.ndarray) -> float:
        """Kolmogorov–Smirnov distance between the binned distributions (a lower bound of the exact one)."""
        live = np.cumsum(counts) / max(counts.sum(), 1)
        return float(np.max(np.abs(live - np.cumsum(self.shares))))

    def to_doc(self) -> dict[str, Any]:
        return {"n": self.n, "edges": list(self.edges), "shares": list(self.shares), "quantiles": self.quantiles}

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> ScoreSketch:
        edges, shares = tuple(float(e) for e in doc["edges"]), tuple(float(s) for s in doc["shares"])
        if len(shares) != len(edges) + 1 or list(edges) != sorted(edges):
            raise DriftError(f"a score sketch needs ascending edges and one more share than edges, got {dict(doc)}")
        return cls(edges, shares, int(doc["n"]), {str(k): float(v) for k, v in doc.get("quantiles", {}).items()})


def quantiles(scores: np.ndarray) -> dict[str, float]:
    values = np.quantile(scores, QUANTILES) if scores.size else np.full(len(QUANTILES), np.nan)
    return {f"p{round(q * 100):02d}": round(float(v), 4) for q, v in zip(QUANTILES, values, strict=True)}


@dataclass(frozen=True)
class StageReference:
    reached: float  # share of all items that reach the stage
    results: dict[str, float]  # among them: allow, block, escalate, review
    scores: dict[str, ScoreSketch]  # category -> scores of the items it judged

    def to_doc(self) -> dict[str, Any]:
        return {
            "reached": self.reached,
            "results": self.results,
            "scores": {c: s.to_doc() for c, s in self.scores.items()},
        }

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> StageReference:
        return cls(
            float(doc["reached"]),
            {str(k): float(v) for k, v in doc["results"].items()},
            {str(c): ScoreSketch.from_doc(s) for c, s in doc.get("scores", {}).items()},
        )


def _shares(counts: Mapping[str, float], total: float) -> dict[str, float]:
    return {k: round(v / total, 6) if total else 0.0 for k, v in counts.items()}


@dataclass(frozen=True)
class Reference:
    """What the calibration items looked like under the chosen bands (`provenance.reference`)."""

    items: int
    stages: dict[str, StageReference]
    decisions: dict[str, float]  # allow, block, review
    decided_by: dict[str, float]  # stage (or "pipeline") -> share of all items
    llm_rate: float
    review_rate: float

    @classmethod
    def of(cls, table: ScoreTable, thresholds: ThresholdSet) -> Reference:
        outcome = simulate(table, thresholds)
        n = len(table)
        stages = {}
        last = len(table.stages) - 1
        for index, stage in enumerate(table.stages):
            reached = outcome.reached[:, index]
            here = reached & (outcome.decided_by == index)
            passed = int((reached & ~here).sum())
            counts = {
                "allow": int((here & (outcome.decision == ALLOW)).sum()),
                "block": int((here & (outcome.decision == BLOCK)).sum()),
                "escalate": 0 if index == last else passed,
                "review": passed if index == last else 0,
            }
            judged = reached & ~stage.error
            sketches = {c: ScoreSketch.of(stage.column(c)[judged]) for c in stage.categories}
            stages[stage.name] = StageReference(
                round(float(reached.mean()), 6) if n else 0.0,
                _shares(counts, int(reached.sum())),
                {c: s for c, s in sketches.items() if s is not None},
            )
        decided = {name: int((outcome.decided_by == i).sum()) for i, name in enumerate(table.stage_names)}
        decided[UNDECIDED_STAGE] = int((outcome.decided_by == PIPELINE).sum())
        return cls(
            items=n,
            stages=stages,
            decisions=_shares(
                {name: int((outcome.decision == code).sum()) for code, name in enumerate(DECISION_NAMES)}, n
            ),
            decided_by=_shares(decided, n),
            llm_rate=round(float(outcome.llm_calls.mean()), 6) if n else 0.0,
            review_rate=round(float((outcome.decision == REVIEW).mean()), 6) if n else 0.0,
        )

    def to_doc(self) -> dict[str, Any]:
        return {
            "method": f"calibration split under the chosen bands; scores as {BINS}-bin decile histograms",
            "items": self.items,
            "decisions": self.decisions,
            "decided_by": self.decided_by,
            "llm_rate": self.llm_rate,
            "review_rate": self.review_rate,
            "stages": {name: s.to_doc() for name, s in self.stages.items()},
        }

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> Reference:
        return cls(
            int(doc["items"]),
            {str(name): StageReference.from_doc(s) for name, s in doc["stages"].items()},
            {str(k): float(v) for k, v in doc["decisions"].items()},
            {str(k): float(v) for k, v in doc["decided_by"].items()},
            float(doc["llm_rate"]),
            float(doc["review_rate"]),
        )

    @classmethod
    def from_thresholds(cls, thresholds: ThresholdSet) -> Reference | None:
        """The file's reference; None for files calibrated before references existed."""
        doc = thresholds.provenance.get("reference")
        if doc is None:
            return None
        try:
            return cls.from_doc(doc)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DriftError(
                f"thresholds {thresholds.version!r}: provenance.reference is malformed ({type(exc).__name__}: {exc}); "
                "re-run `cascade calibrate` to rewrite it"
            ) from exc


@dataclass
class _Observation:
    result: int
    bins: dict[str, int]


class StageWindow:
    """One stage's live summary: what it did and its score histograms, over the last `size` items (None: all)."""

    def __init__(self, reference: StageReference, size: int | None = None) -> None:
        self.reference = reference
        self.size = size
        self.items: deque[_Observation] = deque()
        self.results = np.zeros(len(RESULTS), dtype=np.int64)
        self.counts = {c: np.zeros(len(s.shares), dtype=np.int64) for c, s in reference.scores.items()}

    def __len__(self) -> int:
        return len(self.items)

    def add(self, entry: TraceEntry) -> None:
        bins: dict[str, int] = {}
        if entry.error is None:
            for category, sketch in self.reference.scores.items():
                score = entry.scores.get(category)
                if score is not None and not math.isnan(score):
                    bins[category] = sketch.bin(score)
        observation = _Observation(RESULTS.index(entry.result.value), bins)
        self.items.append(observation)
        self._count(observation, 1)
        if self.size is not None and len(self.items) > self.size:
            self._count(self.items.popleft(), -1)

    def _count(self, observation: _Observation, sign: int) -> None:
        self.results[observation.result] += sign
        for category, index in observation.bins.items():
            self.counts[category][index] += sign

    def scored(self, category: str) -> int:
        return int(self.counts[category].sum())

    def psi(self, min_items: int) -> dict[str, float]:
        """PSI per category with at least `min_items` scores in the window."""
        return {
            c: self.reference.scores[c].psi(counts) for c, counts in self.counts.items() if counts.sum() >= min_items
        }

    def result_shares(self) -> dict[str, float]:
        total = int(self.results.sum())
        return {name: float(count) / total if total else 0.0 for name, count in zip(RESULTS, self.results, strict=True)}


class SurfaceLimit:
    """Admits the first `limit` distinct surfaces; items of later ones count in the totals only.

    Surfaces come from producers: the cap bounds memory and Prometheus label cardinality.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.seen: set[str] = set()

    def admit(self, surface: str | None) -> str | None:
        if surface is None or (surface not in self.seen and len(self.seen) >= self.limit):
            return None
        self.seen.add(surface)
        return surface


class DriftMonitor:
    """Sliding windows per (stage, surface) against a reference, as the workers keep them.

    Every item counts in the `_all` window of its stage and, when it carries a surface the
    `surfaces` limit admits, in that surface's window too.
    """

    def __init__(self, reference: Reference, size: int, min_items: int, surfaces: SurfaceLimit) -> None:
        self.reference = reference
        self.size = size
        self.min_items = min_items
        self.surfaces = surfaces
        self.windows: dict[tuple[str, str], StageWindow] = {}

    def observe(self, stage: str, surface: str | None, entry: TraceEntry) -> list[tuple[str, str]]:
        """Count one trace entry; the (stage, surface) windows it changed."""
        stage_reference = self.reference.stages.get(stage)
        if stage_reference is None:  # a stage the thresholds were not calibrated with
            return []
        admitted = self.surfaces.admit(surface)
        keys = [(stage, ALL_SURFACES)] if admitted is None else [(stage, ALL_SURFACES), (stage, admitted)]
        for key in keys:
            if key not in self.windows:
                self.windows[key] = StageWindow(stage_reference, self.size)
            self.windows[key].add(entry)
        return keys


def audited(item_id: str, share: float) -> bool:
    """Whether an automatically decided item is also sent to review as an audit.

    A pure function of the id, so a redelivered item is audited again or not at all, and
    independent of the item's content and scores, so the audited items are a uniform sample.
    """
    if share <= 0:
        return False
    return xxhash.xxh64_intdigest(item_id.encode("utf-8", "surrogatepass"), seed=_AUDIT_SEED) / 2.0**64 < share


def wilson(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float] | None:
    """Wilson score interval of a binomial proportion (no scipy: it runs in serving processes)."""
    if trials <= 0:
        return None
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class AuditPrecision:
    """Precision of automatic blocks, estimated from audited items that reviewers decided.

    Feed it (the audited verdict's decision, the reviewer's final decision) pairs; only pairs
    whose automatic decision was `block` count, over the last `size` of them.
    """

    size: int = 500
    confidence: float = 0.95
    pairs: deque[bool] = field(default_factory=deque)  # per audited block: did the reviewer agree?

    def add(self, automatic: Decision, human: Decision) -> None:
        if automatic is not Decision.BLOCK or human is Decision.REVIEW:
            return  # only blocks have a precision; a reviewer's "review" settles nothing
        self.pairs.append(human is Decision.BLOCK)
        while len(self.pairs) > self.size:
            self.pairs.popleft()

    def extend(self, pairs: Iterable[tuple[Decision, Decision]]) -> None:
        for automatic, human in pairs:
            self.add(automatic, human)

    @property
    def audited_blocks(self) -> int:
        return len(self.pairs)

    @property
    def estimate(self) -> float | None:
        return sum(self.pairs) / len(self.pairs) if self.pairs else None

    @property
    def interval(self) -> tuple[float, float] | None:
        return wilson(sum(self.pairs), len(self.pairs), self.confidence)


def rows_to_label(targets: Mapping[str, Any], block_rate: float, calibration_share: float = 0.2) -> int | None:
    """Labelled rows from current traffic for `cascade calibrate` to certify the targets again.

    Enough automatic blocks (and violations, taken to be about as frequent) in the test half
    of the calibration split that a 95 % interval on block precision and on allow-miss is at
    most half as wide as the slack the target leaves (1 - P, and M): k = z² t (1 - t) / (s / 2)²
    for target t and slack s. Only `calibration_share` of labelled rows land in the
    calibration split, and half of those in its test half.
    """
    precision, miss = targets.get("block_precision"), targets.get("max_allow_miss")
    if not block_rate or precision is None or miss is None:
        return None
    z2 = 1.96**2
    needed = [z2 * float(t) * (1 - float(t)) / (s / 2) ** 2 for t, s in ((precision, 1 - precision), (miss, miss)) if s]
    if not needed:
        return None
    return math.ceil(max(needed) / block_rate * 2 / calibration_share)


def summarise(reference: Reference, traces: Iterable[tuple[Sequence[TraceEntry], Decision, str]]) -> dict[str, Any]:
    """Everything `cascade drift` reports: live figures next to the reference's, per stage and category.

    `traces` holds (trace, decision, decided_by) per verdict.
    """
    windows = {name: StageWindow(ref) for name, ref in reference.stages.items()}
    raw: dict[tuple[str, str], list[float]] = {}
    decisions: dict[str, int] = dict.fromkeys(DECISION_NAMES, 0)
    decided_by: dict[str, int] = dict.fromkeys(reference.decided_by, 0)
    n = llm = 0
    costly = adjudicator_stage()
    cheap = [s for s in reference.stages if s != costly]
    for trace, decision, by in traces:
        n += 1
        decisions[decision.value] += 1
        decided_by[by] = decided_by.get(by, 0) + 1
        llm += by not in cheap  # escalated past every cheap stage: an LLM call (see simulation.llm_calls)
        for entry in trace:
            window = windows.get(entry.stage)
            if window is None:
                continue
            window.add(entry)
            if entry.error is None:
                for category in window.reference.scores:
                    if category in entry.scores:
                        raw.setdefault((entry.stage, category), []).append(entry.scores[category])
    stages = []
    for name, window in windows.items():
        ref = reference.stages[name]
        categories = []
        for category, sketch in ref.scores.items():
            counts = window.counts[category]
            scored = int(counts.sum())
            categories.append(
                {
                    "category": category,
                    "scored": scored,
                    "psi": sketch.psi(counts) if scored else None,
                    "ks": sketch.ks(counts) if scored else None,
                    "quantiles": quantiles(np.asarray(raw.get((name, category), []), dtype=float)),
                    "reference_quantiles": sketch.quantiles,
                    "bin_shares": (counts / scored).round(4).tolist() if scored else [],
                    "reference_bin_shares": list(sketch.shares),
                }
            )
        stages.append(
            {
                "stage": name,
                "reached": len(window) / n if n else 0.0,
                "reference_reached": ref.reached,
                "results": window.result_shares(),
                "reference_results": ref.results,
                "categories": categories,
            }
        )
    return {
        "items": n,
        "reference_items": reference.items,
        "decisions": _shares(decisions, n),
        "reference_decisions": reference.decisions,
        "decided_by": _shares(decided_by, n),
        "reference_decided_by": reference.decided_by,
        "llm_rate": llm / n if n else 0.0,
        "reference_llm_rate": reference.llm_rate,
        "review_rate": decisions["review"] / n if n else 0.0,
        "reference_review_rate": reference.review_rate,
        "stages": stages,
    }


def moved(summary: Mapping[str, Any], min_items: int, level: float = PSI_ALERT) -> list[dict[str, Any]]:
    """The (stage, category) pairs whose PSI is at least `level`, on at least `min_items` scores; worst first."""
    out = [
        {"stage": stage["stage"], **category}
        for stage in summary["stages"]
        for category in stage["categories"]
        if category["psi"] is not None and category["scored"] >= min_items and category["psi"] >= level
    ]
    return sorted(out, key=lambda m: -m["psi"])
