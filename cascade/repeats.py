"""Repeats for free: a repeated text gets the verdict the cascade gave it before, without the cascade.

Real traffic repeats (spam waves, copypasta, retweets). `RepeatingRunner` looks every item up
by `repeat_key` before the first stage: the item's surface (it picks the band set) and
`ItemContext.content_key` (the text up to case, Unicode form and spacing; not the lossy bank
`text_key`). A hit is the earlier verdict re-issued under the item's own id and item: same
decision, scores and trace, its trace entries costing nothing (latency and cost 0), the last one
naming the item it repeats (`details.repeat_of`). Misses run through the cascade as usual and
their verdicts are remembered. One cache per process, shared by its stages.

What is remembered, and for how long:
- only verdicts that every stage they reached could judge (no error, no unavailable stage: a
  degraded verdict must not outlive the outage) and that no definitive match decided (a bank
  match is cheap, and the bank's flood guard must see every copy to do its job);
- stamped with the policy, threshold and shadow-threshold versions and the bank counter
  (`cascade.bankversion`): when any of them moves, the whole cache is dropped; an entry whose
  trace names a stage version that is no longer current is a miss;
- at most `repeat_cache_size` entries (least recently used leave first), each re-issued for at
  most `repeat_cache_ttl_s` seconds after it was judged.

`run` (the whole cascade in one call: `cascade moderate`, the bench) also serves copies inside
one batch, or inside another batch judged at the same time, from the cache; a stream worker,
which calls `run_stage` stage by stage, judges copies inside one batch each, since the first
one's verdict is not known before the batch has passed its last stage.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cascade.bankversion import bank_version
from cascade.contract import TraceEntry, Verdict, utc_now
from cascade.pipeline import CascadeRunner, judged_item
from cascade.stages.base import ItemContext, Stage
from cascade.thresholds import ThresholdSet

REPEAT_OF = "repeat_of"  # key in the last trace entry's details of a re-issued verdict


@dataclass(frozen=True)
class Stamp:
    """Everything besides the stage versions that a cached verdict depends on."""

    policy_version: str
    thresholds_version: str
    shadow_thresholds_version: str | None
    bank_version: int


@dataclass
class RepeatStats:
    lookups: int = 0
    hits: int = 0
    stale: int = 0  # entries found but past their TTL or judged by an outdated stage version
    invalidations: int = 0  # whole-cache drops on a stamp change
    evictions: int = 0  # entries dropped to stay within the size bound

    @property
    def hit_ratio(self) -> float | None:
        return self.hits / self.lookups if self.lookups else None


class RepeatCache:
    """A bounded LRU of verdicts by content key, with a TTL and a version stamp."""

    def __init__(self, max_items: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if max_items < 0 or ttl_s <= 0:
            raise ValueError(f"a repeat cache needs max_items >= 0 and ttl_s > 0, got {max_items} and {ttl_s}")
        self.max_items = max_items
        self.ttl_s = ttl_s
        self.clock = clock
        self.stamp: Stamp | None = None
        self.stats = RepeatStats()
        self._entries: OrderedDict[str, tuple[float, Verdict]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def align(self, stamp: Stamp) -> None:
        """Drop everything judged under another stamp."""
        if stamp != self.stamp:
            if self._entries:
                self.stats.invalidations += 1
                self._entries.clear()
            self.stamp = stamp

    def get(self, key: str, stage_versions: Mapping[str, str]) -> Verdict | None:
        """The verdict judged for `key`, if still fresh and judged by the current version of every stage."""
        self.stats.lookups += 1
        found = self._entries.get(key)
        if found is None:
            return None
        stored_at, verdict = found
        outdated = any(stage_versions.get(entry.stage) != entry.stage_version for entry in verdict.trace)
        if outdated or self.clock() - stored_at > self.ttl_s:
            del self._entries[key]
            self.stats.stale += 1
            return None
        self._entries.move_to_end(key)
        self.stats.hits += 1
        return verdict

    def put(self, key: str, verdict: Verdict, stamp: Stamp) -> None:
        """Remember a verdict judged under `stamp` (ignored when the cache has moved on since)."""
        if self.max_items == 0 or stamp != self.stamp:
            return
        self._entries[key] = (self.clock(), verdict)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_items:
            self._entries.popitem(last=False)
            self.stats.evictions += 1


def reusable(verdict: Verdict) -> bool:
    """Whether a verdict may be re-issued for a repeat of its text (see the module docstring)."""
    return all(entry.error is None and not entry.matched for entry in verdict.trace)


def is_repeat(verdict: Verdict) -> bool:
    """Whether a verdict was re-issued from the repeat cache rather than judged."""
    return bool(verdict.trace) and REPEAT_OF in verdict.trace[-1].details


def reissue(earlier: Verdict, ctx: ItemContext) -> Verdict:
    """The earlier verdict for this item: its own id and time, a trace that cost nothing and says why."""
    trace = [entry.model_copy(update={"latency_ms": 0.0, "cost_usd": 0.0}) for entry in earlier.trace]
    last: TraceEntry = trace[-1]
    trace[-1] = last.model_copy(
        update={"details": {**last.details, REPEAT_OF: earlier.id, "judged_at": earlier.processed_at.isoformat()}}
    )
    return earlier.model_copy(
        update={"id": ctx.item.id, "item": judged_item(ctx.item), "processed_at": utc_now(), "trace": trace}
    )


def repeat_key(ctx: ItemContext) -> str:
    """What makes two items the same judgement: the text up to case, Unicode form and spacing, and the
    surface (it picks the band set, so the same text may be decided differently on another surface)."""
    return f"{ctx.item.surface or ''}\x1f{ctx.content_key}"


class RepeatingRunner(CascadeRunner):
    """A `CascadeRunner` that answers repeated texts from a `RepeatCache` before its first stage.

    `stage_versions` gives the current version of each stage this process has built (stages
    it only defers must not be built to be asked); `data_dir` holds the bank counter.
    """

    def __init__(
        self,
        stages: Sequence[Stage],
        thresholds: ThresholdSet,
        policy_version: str,
        shadow_thresholds: ThresholdSet | None,
        cache: RepeatCache,
        data_dir: Path,
        stage_versions: Callable[[], Mapping[str, str]],
    ) -> None:
        super().__init__(stages, thresholds, policy_version, shadow_thresholds)
        self.cache = cache
        self.data_dir = data_dir
        self.stage_versions = stage_versions
        self._judging: dict[str, asyncio.Future[None]] = {}  # repeat key -> done when its verdict is known

    def current_stamp(self) -> Stamp:
        shadow = self.shadow_thresholds.version if self.shadow_thresholds is not None else None
        return Stamp(self.policy_version, self.thresholds.version, shadow, bank_version(self.data_dir))

    async def run(self, batch: Sequence[ItemContext]) -> list[Verdict]:
        """The whole cascade; copies of a text being judged wait for its first occurrence's verdict.

        First occurrences run first, the later copies after them, so a copy is a cache hit when its
        first occurrence's verdict may be re-issued, and is judged like any item when it may not.
        The first occurrence may be in this batch or in another one judged at the same time
        (`cascade.pipeline.judge_batches`).
        """
        seen: set[str] = set()
        firsts: list[int] = []
        copies: list[int] = []
        elsewhere: set[asyncio.Future[None]] = set()
        for position, ctx in enumerate(batch):
            key = repeat_key(ctx)
            judging = self._judging.get(key)
            if judging is not None:
                elsewhere.add(judging)
            (copies if key in seen or judging is not None else firsts).append(position)
            seen.add(key)
        if not copies:
            return await self._run_firsts(batch, range(len(batch)))
        verdicts = dict(zip(firsts, await self._run_firsts(batch, firsts), strict=True))
        if elsewhere:
            await asyncio.wait(elsewhere)
        judged = await super().run([batch[position] for position in copies])
        verdicts.update(zip(copies, judged, strict=True))
        return [verdicts[position] for position in range(len(batch))]

    async def _run_firsts(self, batch: Sequence[ItemContext], positions: Sequence[int]) -> list[Verdict]:
        """The cascade on these items, marked as being judged until their verdicts are known (or it fails)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        keys = [repeat_key(batch[position]) for position in positions]
        for key in keys:
            self._judging[key] = done
        try:
            return await super().run([batch[position] for position in positions])
        finally:
            for key in keys:
                if self._judging.get(key) is done:
                    del self._judging[key]
            done.set_result(None)

    async def run_stage(self, index: int, batch: Sequence[ItemContext]) -> list[Verdict | ItemContext]:
        stamp = self.current_stamp()
        self.cache.align(stamp)
        repeats: dict[int, Verdict] = {}
        if index == 0:
            versions = self.stage_versions()
            for position, ctx in enumerate(batch):
                earlier = self.cache.get(repeat_key(ctx), versions)
                if earlier is not None:
                    repeats[position] = reissue(earlier, ctx)
        fresh = [ctx for position, ctx in enumerate(batch) if position not in repeats]
        judged = await super().run_stage(index, fresh) if fresh else []
        for ctx, out in zip(fresh, judged, strict=True):
            if isinstance(out, Verdict) and reusable(out):
                self.cache.put(repeat_key(ctx), out, stamp)
        outputs = iter(judged)
        return [repeats[position] if position in repeats else next(outputs) for position in range(len(batch))]
