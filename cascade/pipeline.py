"""The banded cascade: run stages in order, let each settle what it can, escalate the rest.

The pipeline knows stages only through `cascade.stages.base.Stage`. For each stage it
sends the still-unresolved items as one batch, applies the stage's bands per category
(`cascade.thresholds`), and:

- blocks an item as soon as any category's band says block (or the stage returns a
  blocking match),
- allows it when every banded category is cleared (or the stage returns an allowing match),
- otherwise escalates it to the next stage; unresolved after the last stage means `review`.

Each item is judged by the band set of its surface (`ContentItem.surface`) when the
threshold file has one, by the default set otherwise; the verdict names the set
(`band_set`) and reports `score`, the deciding stage's `flagged` score mapped through that
set's calibration map, so scores from different stages share one probability scale.

A stage that raises, or reports itself unavailable, settles nothing: its items escalate
with the reason in the trace. `CascadeRunner` offers both the whole run (CLI, tests) and
one stage at a time (the stream workers, one agent per stage).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from cascade.contract import BandOutcome, ContentItem, Decision, ShadowDecision, StageAction, TraceEntry, Verdict
from cascade.data import FLAGGED
from cascade.normalize import normalize, text_key
from cascade.stages.base import ItemContext, Stage, StageResult
from cascade.thresholds import Band, BandSet, ThresholdSet

log = logging.getLogger(__name__)

UNDECIDED_STAGE = "pipeline"


def judged_item(item: ContentItem) -> ContentItem:
    """The item as its verdict carries it: what reviewers, appeals and audits show.

    Metadata stays on the input topic, so a verdict is never larger than its item's text allows
    (CASCADE_STREAM_MAX_MESSAGE_BYTES).
    """
    # Items are frozen: one without metadata already is what its verdict carries (a copy cost ~8 µs).
    return item if item.metadata is None else item.model_copy(update={"metadata": None})


def new_context(item: ContentItem, source: str | None = None) -> ItemContext:
    normalized = normalize(item.text)
    return ItemContext(item=item, normalized=normalized, text_key=text_key(normalized), source=source)


@dataclass(frozen=True)
class StageDecision:
    """The band outcome of one stage for one item: a decision, or None to escalate."""

    decision: Decision | None
    outcomes: dict[str, BandOutcome]
    flagged: list[str]
    reason: str


def apply_bands(stage: str, result: StageResult, bands: dict[str, Band] | None) -> StageDecision:
    """Turn one stage result into block / allow / escalate. Pure: used live and for shadow mode."""
    if result.error is not None:
        return StageDecision(None, {}, [], f"{stage} could not judge: {result.error}")
    if result.match is not None:
        m = result.match
        flagged = list(m.categories) if m.decision is Decision.BLOCK else []
        return StageDecision(m.decision, {}, flagged, f"{stage}: {m.reason}")
    bands = bands or {}
    outcomes: dict[str, BandOutcome] = {}
    for category, band in bands.items():
        score = result.scores.get(category)
        # A banded category the stage did not score cannot be cleared: it stays unresolved.
        outcomes[category] = BandOutcome.UNRESOLVED if score is None else band.outcome(score)
    blocked = [c for c, o in outcomes.items() if o is BandOutcome.BLOCK]
    if blocked:
        detail = ", ".join(f"{c} {result.scores[c]:.3f} >= {bands[c].block_at}" for c in blocked)
        return StageDecision(Decision.BLOCK, outcomes, blocked, f"blocked by {stage}: {detail}")
    if outcomes and all(o is BandOutcome.CLEARED for o in outcomes.values()):
        return StageDecision(Decision.ALLOW, outcomes, [], f"cleared by {stage}: every category below its allow band")
    unresolved = [c for c, o in outcomes.items() if o is BandOutcome.UNRESOLVED]
    why = f"unresolved: {', '.join(unresolved)}" if unresolved else "no bands for this stage"
    return StageDecision(None, outcomes, [], f"{stage} escalated ({why})")


def _merged_scores(trace: Sequence[TraceEntry]) -> dict[str, float]:
    scores: dict[str, float] = {}
    for entry in trace:
        scores.update(entry.scores)
    return scores


def calibrated_score(trace: Sequence[TraceEntry], band_set: BandSet) -> float | None:
    """The verdict's score: the last judging stage's calibrated violation probability under `band_set`.

    That is the largest of its categories' calibrated probabilities (`BandSet.violation_probability`);
    a stage without maps reports its raw `flagged` score (hand-set files); a definitive match
    without a score counts 1.0 (block) or 0.0 (allow). `cascade.simulation.final_scores` is the
    same in numpy.
    """
    for entry in reversed(trace):
        if entry.error is not None:
            continue
        mapped = band_set.violation_probability(entry.stage, entry.scores)
        if mapped is not None:
            return mapped
        raw = entry.scores.get(FLAGGED)
        if raw is not None:
            return raw
        if entry.matched:
            return 1.0 if entry.result is StageAction.BLOCK else 0.0
    return None


def _add_evidence(stage: str, ctx: ItemContext, build: Callable[[], dict[str, Any]]) -> None:
    try:
        ctx.evidence.update(build())
    except Exception:  # evidence only informs later stages: the item goes on without it
        log.exception("stage %s: building the evidence of item %r failed", stage, ctx.item.id)


class CascadeRunner:
    """Runs items through an ordered list of stages under a threshold set."""

    def __init__(
        self,
        stages: Sequence[Stage],
        thresholds: ThresholdSet,
        policy_version: str,
        shadow_thresholds: ThresholdSet | None = None,
    ) -> None:
        if not stages:
            raise ValueError("a cascade needs at least one stage")
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        self.stages = list(stages)
        self.thresholds = thresholds
        self.shadow_thresholds = shadow_thresholds
        self.policy_version = policy_version
        self._band_sets = thresholds.band_sets()
        self._shadow_band_sets = shadow_thresholds.band_sets() if shadow_thresholds is not None else {}

    @property
    def stage_names(self) -> list[str]:
        return [s.name for s in self.stages]

    async def run(self, batch: Sequence[ItemContext]) -> list[Verdict]:
        """Every item through as many stages as it needs; verdicts in input order."""
        verdicts: dict[int, Verdict] = {}
        pending = list(enumerate(batch))
        for index in range(len(self.stages)):
            if not pending:
                break
            outputs = await self.run_stage(index, [ctx for _, ctx in pending])
            still_pending = []
            for (position, _), out in zip(pending, outputs, strict=True):
                if isinstance(out, Verdict):
                    verdicts[position] = out
                else:
                    still_pending.append((position, out))
            pending = still_pending
        return [verdicts[i] for i in range(len(batch))]

    async def run_stage(self, index: int, batch: Sequence[ItemContext]) -> list[Verdict | ItemContext]:
        """One stage over a batch: a verdict for each settled item, the context for each escalated one.

        After the last stage nothing escalates: unresolved items get a `review` verdict.
        """
        stage = self.stages[index]
        is_last = index == len(self.stages) - 1
        results, elapsed_ms = await self._score(stage, batch)
        outputs: list[Verdict | ItemContext] = []
        for ctx, result in zip(batch, results, strict=True):
            band_set = self._band_sets[self.thresholds.band_set_name(ctx.item.surface)]
            decided = apply_bands(stage.name, result, dict(band_set.bands(stage.name)))
            if decided.decision is not None:
                overall = StageAction(decided.decision.value)
            else:
                overall = StageAction.REVIEW if is_last else StageAction.ESCALATE
            if result.evidence is not None and decided.decision in (None, Decision.REVIEW):
                _add_evidence(stage.name, ctx, result.evidence)
            ctx.trace.append(
                TraceEntry(
                    stage=stage.name,
                    stage_version=stage.version,
                    scores=result.scores,
                    outcomes=decided.outcomes,
                    result=overall,
                    matched=result.match is not None and result.error is None,
                    error=result.error,
                    latency_ms=elapsed_ms,
                    cost_usd=result.cost_usd,
                    note=result.note or (result.match.reason if result.match else None),
                    details=result.details,
                )
            )
            if decided.decision is not None:
                outputs.append(self._verdict(ctx, decided.decision, stage.name, decided.reason, decided.flagged))
            elif is_last:
                outputs.append(
                    self._verdict(ctx, Decision.REVIEW, UNDECIDED_STAGE, f"needs human review: {decided.reason}", [])
                )
            else:
                outputs.append(ctx)
        return outputs

    async def _score(self, stage: Stage, batch: Sequence[ItemContext]) -> tuple[list[StageResult], float]:
        started = time.perf_counter()
        unavailable = stage.unavailable_reason
        if unavailable is not None:
            results = [StageResult(error=f"stage unavailable: {unavailable}") for _ in batch]
        else:
            try:
                results = await stage.score(batch)
                if len(results) != len(batch):
                    raise RuntimeError(f"returned {len(results)} results for a batch of {len(batch)}")
            except Exception as exc:  # a failing stage must degrade, never lose or crash on items
                log.exception("stage %s failed on a batch of %d", stage.name, len(batch))
                results = [StageResult(error=f"stage failed: {type(exc).__name__}: {exc}") for _ in batch]
        # Batch wall time is shared by its items; per-item cost is latency / batch size if needed.
        return results, (time.perf_counter() - started) * 1000.0

    def _verdict(
        self, ctx: ItemContext, decision: Decision, decided_by: str, reason: str, flagged: list[str]
    ) -> Verdict:
        band_set = self.thresholds.band_set_name(ctx.item.surface)
        return Verdict(
            id=ctx.item.id,
            decision=decision,
            categories=_merged_scores(ctx.trace),
            flagged_categories=flagged,
            decided_by=decided_by,
            reason=reason,
            trace=list(ctx.trace),
            policy_version=self.policy_version,
            thresholds_version=self.thresholds.version,
            band_set=band_set,
            score=calibrated_score(ctx.trace, self._band_sets[band_set]),
            shadow=self._shadow(ctx.trace, ctx.item.surface),
            item=judged_item(ctx.item),
            evidence=(ctx.evidence or None) if decision is Decision.REVIEW else None,
        )

    def _shadow(self, trace: Sequence[TraceEntry], surface: str | None) -> ShadowDecision | None:
        """The decision the shadow thresholds would have made on the same stage scores.

        Only stages this item reached have scores; if the shadow set would escalate past
        them, the shadow decision is `review` by `pipeline` (it would have needed more).
        """
        if self.shadow_thresholds is None:
            return None
        band_set = self._shadow_band_sets[self.shadow_thresholds.band_set_name(surface)]
        for entry in trace:
            if entry.error is not None:
                continue
            if entry.matched:  # a definitive match does not depend on thresholds
                decision = Decision(entry.result.value)
            else:
                result = StageResult(scores=entry.scores)
                decision = apply_bands(entry.stage, result, dict(band_set.bands(entry.stage))).decision
            if decision is not None:
                return ShadowDecision(
                    thresholds_version=self.shadow_thresholds.version, decision=decision, decided_by=entry.stage
                )
        return ShadowDecision(
            thresholds_version=self.shadow_thresholds.version, decision=Decision.REVIEW, decided_by=UNDECIDED_STAGE
        )

    async def aclose(self) -> None:
        for stage in self.stages:
            await stage.aclose()


async def judge_batches(
    runner: CascadeRunner, batches: Iterable[Sequence[ItemContext]], in_flight: int
) -> AsyncIterator[list[Verdict]]:
    """Each batch's verdicts, in order, with up to `in_flight` batches judged at once: one batch's
    kNN and bookkeeping then run while the next one's encoder pass does (`Settings.batches_in_flight`)."""
    running: deque[asyncio.Future[list[Verdict]]] = deque()
    try:
        for batch in batches:
            running.append(asyncio.ensure_future(runner.run(batch)))
            if len(running) >= in_flight:
                yield await running.popleft()
        while running:
            yield await running.popleft()
    finally:
        for future in running:
            future.cancel()
