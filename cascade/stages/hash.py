"""The hash stage: known-bad and known-good banks, matched exactly and as near-duplicates.

Cheapest stage, first in the cascade. It decides only on bank matches and never scores:
a miss escalates. Precedence when an item matches several entries (docs/hash.md):

1. exact bad and exact good entries together: the banks contradict each other on this
   very text, so neither decides; the item escalates with the conflict in the trace;
2. an exact bad match blocks, an exact good match clears (it beats any near-duplicate:
   that is what a negative bank entry is for);
3. near-duplicates only: the most similar entry decides; on a tie, bad wins.

Quarantined entries never decide (see `cascade.hashbank.FloodGuard`); items that would
have matched them escalate with a note naming them. Only unconfirmed entries are
quarantined, for `CASCADE_FLOOD_QUARANTINE_S`; a confirmed entry keeps deciding.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from cascade.contract import Decision
from cascade.hashbank import BankEntry, FloodGuard, HashBank, Hit, MatchKind, Polarity
from cascade.normalize import NORMALIZE_VERSION, has_content
from cascade.settings import Settings
from cascade.stages.base import ItemContext, Match, Stage, StageResult

if TYPE_CHECKING:
    from cascade.stages.base import Resources

log = logging.getLogger(__name__)

# Category reported for a bad entry that was added without one.
FALLBACK_CATEGORY = "flagged"
_MAX_DETAILED_HITS = 5


class HashStage(Stage):
    name = "hash"
    relative_cost = 0.0001  # an SQLite lookup and a MinHash: cheaper still than an embedding

    def __init__(self, bank: HashBank, flood_guard: FloodGuard, quarantine_s: float = 3600.0) -> None:
        self.bank = bank
        self.flood_guard = flood_guard
        self.quarantine_s = quarantine_s
        # Set by a stream worker whose banks are shared (cascade.stream.worker): gets the entries this
        # replica's flood guard quarantined, to publish them so every replica stops trusting them.
        self.on_quarantine: Callable[[list[BankEntry]], Awaitable[None]] | None = None
        self._publishing: set[asyncio.Task[None]] = set()
        self.version = f"1+normalize{NORMALIZE_VERSION}+{bank.shingler.version}@{bank.near_threshold:g}"

    @classmethod
    def from_settings(cls, settings: Settings, resources: Resources | None = None) -> HashStage:
        bank = HashBank.open(settings.data_dir, settings.near_dup_threshold)
        guard = FloodGuard(settings.flood_window, settings.flood_share, settings.flood_min_items)
        return cls(bank, guard, settings.flood_quarantine_s)

    async def score(self, batch: Sequence[ItemContext]) -> list[StageResult]:
        # SQLite reads (and flood-guard quarantines) block: off the event loop, which also serves
        # the worker's consumer heartbeats and health probes.
        results = await asyncio.to_thread(self._score_batch, batch)
        quarantined = [entry_id for r in results for entry_id in r.details.get("newly_quarantined", ())]
        if quarantined and self.on_quarantine is not None:
            entries = await asyncio.to_thread(lambda: [e for e in map(self.bank.get, quarantined) if e is not None])
            # In the background: the batch's verdicts do not wait for the broker. The quarantine
            # already holds here; a failed publish only leaves the other replicas to their own guard.
            task = asyncio.create_task(self.on_quarantine(entries))
            self._publishing.add(task)
            task.add_done_callback(self._published)
        return results

    def _published(self, task: asyncio.Task[None]) -> None:
        self._publishing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("hash: could not share a flood-guard quarantine: %s", task.exception())

    def _score_batch(self, batch: Sequence[ItemContext]) -> list[StageResult]:
        # One pragma per batch picks up entries added or quarantined by other processes.
        self.bank.refresh()
        return [self._score_one(ctx) for ctx in batch]

    def _score_one(self, ctx: ItemContext) -> StageResult:
        if not has_content(ctx.normalized):
            self.flood_guard.record(())
            return StageResult(details={"skipped": "no letters or digits after normalisation"})
        hits = self.bank.exact(ctx.text_key)
        if not any(not h.quarantined for h in hits):
            hits += self.bank.near(ctx.normalized, exclude_key=ctx.text_key)
        flooded = self.flood_guard.record(h.entry_id for h in hits)
        newly_quarantined = [entry_id for entry_id in flooded if self._quarantine(entry_id)]
        if newly_quarantined:
            hits = [replace(h, quarantined=True) if h.entry_id in newly_quarantined else h for h in hits]
        return _decide(hits, newly_quarantined)

    def _quarantine(self, entry_id: str) -> bool:
        window = len(self.flood_guard)
        reason = f"flood guard: matched {self.flood_guard.count(entry_id)} of the last {window} items"
        return self.bank.quarantine(entry_id, reason, self.quarantine_s)

    async def aclose(self) -> None:
        if self._publishing:
            await asyncio.wait(self._publishing)
        self.bank.close()


def _decide(hits: list[Hit], newly_quarantined: list[str]) -> StageResult:
    active = [h for h in hits if not h.quarantined]
    details: dict[str, object] = {}
    quarantined = [h.entry_id for h in hits if h.quarantined]
    if quarantined:
        details["quarantined"] = quarantined
    if newly_quarantined:
        details["newly_quarantined"] = newly_quarantined
    if not active:
        note = f"matched only quarantined entries: {', '.join(quarantined)}" if quarantined else None
        return StageResult(note=note, details=details)

    exact = [h for h in active if h.kind is MatchKind.EXACT]
    bad_exact = [h for h in exact if h.polarity is Polarity.BAD]
    good_exact = [h for h in exact if h.polarity is Polarity.GOOD]
    if bad_exact and good_exact:
        details["conflict"] = [h.as_detail() for h in exact[:_MAX_DETAILED_HITS]]
        ids = ", ".join(h.entry_id for h in exact[:_MAX_DETAILED_HITS])
        return StageResult(note=f"bad and good bank entries hold this same text ({ids}): escalated", details=details)
    if exact:
        winner = (bad_exact or good_exact)[0]
    else:
        # Near hits come best first; on equal similarity, a bad entry wins.
        best = active[0].jaccard
        tied = [h for h in active if h.jaccard == best]
        winner = next((h for h in tied if h.polarity is Polarity.BAD), tied[0])
    details.update(winner.as_detail())
    others = [h.as_detail() for h in active if h is not winner][:_MAX_DETAILED_HITS]
    if others:
        details["other_hits"] = others
    return StageResult(scores=_scores(winner), match=_match(winner), details=details)


def _match(hit: Hit) -> Match:
    similarity = "exact copy" if hit.kind is MatchKind.EXACT else f"near-duplicate (Jaccard {hit.jaccard:.2f})"
    if hit.polarity is Polarity.BAD:
        categories = hit.categories or (FALLBACK_CATEGORY,)
        return Match(Decision.BLOCK, categories, f"{similarity} of known-bad entry {hit.entry_id}")
    return Match(Decision.ALLOW, (), f"{similarity} of known-good entry {hit.entry_id}")


def _scores(hit: Hit) -> dict[str, float]:
    """A known-bad match scores its categories 1.0, so verdicts show them; a good match scores nothing."""
    if hit.polarity is Polarity.GOOD:
        return {}
    return dict.fromkeys(hit.categories or (FALLBACK_CATEGORY,), 1.0)
