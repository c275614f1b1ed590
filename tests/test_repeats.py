"""The repeat cache: repeats skip the cascade, verdicts stay identical, and stale judgements are never re-issued."""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Sequence
from pathlib import Path

from prometheus_client import REGISTRY
from synthetic_scores import SyntheticStage
from typer.testing import CliRunner

from cascade.assembly import build_runner
from cascade.bankversion import VERSION_FILE, bank_version, bump_bank_version
from cascade.cli import app
from cascade.contract import ContentItem, Verdict
from cascade.hashbank import EntryInput, HashBank, Polarity
from cascade.pipeline import CascadeRunner, judge_batches, new_context
from cascade.repeats import REPEAT_OF, RepeatCache, RepeatingRunner, is_repeat
from cascade.settings import Settings
from cascade.stages.base import ItemContext, Stage, StageResult
from cascade.stream import metrics
from cascade.thresholds import Band, BandSet, ThresholdSet


class CountingStage(SyntheticStage):
    """A synthetic stage that counts the items it scored.

    Like MiniLM's uncased tokenizer it sees neither case nor spacing: the content key's contract.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.scored = 0

    async def score(self, batch: Sequence[ItemContext]) -> list[StageResult]:
        self.scored += len(batch)
        return [self._result(" ".join(ctx.item.text.casefold().split())) for ctx in batch]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


BANDS = {"flagged": Band(allow_below=0.3, block_at=0.8)}


def thresholds(version: str = "t-1") -> ThresholdSet:
    return ThresholdSet(version=version, stages={"first": BANDS, "second": BANDS})


def stages() -> list[CountingStage]:
    return [CountingStage("first", 0.3, matches=True, errors=True), CountingStage("second", 0.6)]


def repeating(stage_list: Sequence[Stage], cache: RepeatCache, data_dir: Path, version: str = "t-1") -> RepeatingRunner:
    return RepeatingRunner(
        stage_list,
        thresholds(version),
        "p-1",
        None,
        cache,
        data_dir,
        lambda: {s.name: s.version for s in stage_list},
    )


def stream_with_repeats(n: int, share: float, seed: int = 7) -> list[ContentItem]:
    """`n` items, `share` of them repeating an earlier text up to case and spacing; some match or fail."""
    rng = random.Random(seed)
    texts: list[str] = []
    items = []
    for i in range(n):
        if texts and rng.random() < share:
            earlier = rng.choice(texts)
            text = "  ".join(earlier.upper().split()) if rng.random() < 0.5 else earlier
        else:
            tag = rng.choice(["", "", "", "", "known-bad", "broken"])
            text = f"{rng.choice(['bad', 'ok'])} item {i} {tag}".strip()
            texts.append(text)
        items.append(ContentItem(id=f"id-{i}", text=text))
    return items


async def run_all(runner: CascadeRunner, items: Sequence[ContentItem], batch: int = 16) -> list[Verdict]:
    verdicts: list[Verdict] = []
    for start in range(0, len(items), batch):
        verdicts += await runner.run([new_context(item) for item in items[start : start + batch]])
    return verdicts


def decision_of(verdict: Verdict) -> tuple:
    return (
        verdict.id,
        verdict.decision,
        verdict.decided_by,
        verdict.categories,
        verdict.flagged_categories,
        verdict.reason,
        [(e.stage, e.stage_version, e.scores, e.outcomes, e.result) for e in verdict.trace],
    )


async def test_cached_and_uncached_runs_give_identical_verdicts_and_repeats_skip_the_stages(tmp_path: Path) -> None:
    items = stream_with_repeats(300, 0.3)
    plain_stages, cached_stages = stages(), stages()
    uncached = await run_all(CascadeRunner(plain_stages, thresholds(), "p-1"), items)
    cache = RepeatCache(1000, 600)
    cached = await run_all(repeating(cached_stages, cache, tmp_path), items)

    assert [decision_of(v) for v in cached] == [decision_of(v) for v in uncached]
    repeats = [v for v in cached if is_repeat(v)]
    assert len(repeats) > 40 and cache.stats.hits == len(repeats)
    assert cached_stages[0].scored == plain_stages[0].scored - len(repeats)
    assert cached_stages[1].scored < plain_stages[1].scored
    by_id = {v.id: v for v in cached}
    for verdict in repeats:
        earlier = by_id[verdict.trace[-1].details[REPEAT_OF]]
        assert earlier.decision == verdict.decision and not is_repeat(earlier)
        assert all(e.latency_ms == 0 and e.cost_usd == 0 for e in verdict.trace)
    # A bank match (the flood guard must see every copy) and a failed stage are judged every time.
    texts = {item.id: item.text.lower() for item in items}
    special = [v for v in cached if "known-bad" in texts[v.id] or "broken" in texts[v.id]]
    repeated_special = len(special) - len({" ".join(texts[v.id].split()) for v in special})
    assert repeated_special > 0 and not any(is_repeat(v) for v in special)


async def test_a_bank_change_drops_the_cache(tmp_path: Path) -> None:
    cache = RepeatCache(100, 600)
    runner = repeating(stages(), cache, tmp_path)
    item = [ContentItem(id="a", text="ok something")]
    await run_all(runner, item)
    assert is_repeat((await run_all(runner, [ContentItem(id="b", text="OK  something")]))[0])

    bank = HashBank.open(tmp_path)  # the real bank bumps the counter on every write
    try:
        bank.upsert([EntryInput(id="e1", polarity=Polarity.BAD, text="ok something", categories=("spam",))], "t")
    finally:
        bank.close()
    assert bank_version(tmp_path) == 1
    again = (await run_all(runner, [ContentItem(id="c", text="ok something")]))[0]
    assert not is_repeat(again) and cache.stats.invalidations == 1
    bump_bank_version(tmp_path)  # e.g. `cascade bank import --kind exemplars` in another process
    assert not is_repeat((await run_all(runner, [ContentItem(id="d", text="ok something")]))[0])
    assert cache.stats.invalidations == 2


async def test_a_threshold_or_stage_version_change_is_a_miss(tmp_path: Path) -> None:
    cache = RepeatCache(100, 600)
    stage_list = stages()
    await run_all(repeating(stage_list, cache, tmp_path), [ContentItem(id="a", text="ok text")])
    assert len(cache) == 1
    recalibrated = repeating(stage_list, cache, tmp_path, version="t-2")
    assert not is_repeat((await run_all(recalibrated, [ContentItem(id="b", text="ok text")]))[0])
    assert cache.stats.invalidations == 1

    stage_list[0].version = "retrained"
    assert not is_repeat((await run_all(recalibrated, [ContentItem(id="c", text="ok text")]))[0])
    assert cache.stats.stale == 1


async def test_entries_expire_after_the_ttl(tmp_path: Path) -> None:
    clock = Clock()
    cache = RepeatCache(100, ttl_s=60, clock=clock)
    runner = repeating(stages(), cache, tmp_path)
    await run_all(runner, [ContentItem(id="a", text="ok text")])
    clock.now += 59
    assert is_repeat((await run_all(runner, [ContentItem(id="b", text="ok text")]))[0])
    clock.now += 2  # 61 s after it was judged: the hit above did not refresh it
    assert not is_repeat((await run_all(runner, [ContentItem(id="c", text="ok text")]))[0])
    assert cache.stats.stale == 1


async def test_the_cache_is_bounded_least_recently_used_first(tmp_path: Path) -> None:
    verdicts = await run_all(CascadeRunner(stages(), thresholds(), "p-1"), [ContentItem(id="v", text="ok text")])
    cache = RepeatCache(3, 600)
    stamp = repeating(stages(), cache, tmp_path).current_stamp()
    cache.align(stamp)
    versions = {"first": "synthetic-0.3", "second": "synthetic-0.6"}
    for key in ("k0", "k1", "k2"):
        cache.put(key, verdicts[0], stamp)
    assert cache.get("k0", versions) is not None  # k0 is now the most recently used
    cache.put("k3", verdicts[0], stamp)  # over the bound: k1 leaves
    assert len(cache) == 3 and cache.stats.evictions == 1
    assert [cache.get(k, versions) is not None for k in ("k0", "k1", "k2", "k3")] == [True, False, True, True]

    runner = repeating(stages(), cache, tmp_path)
    await run_all(runner, [ContentItem(id=f"x{i}", text=f"ok text {i}") for i in range(40)])
    assert len(cache) == 3 and cache.stats.evictions == 1 + 40


async def test_copies_inside_one_batch_wait_for_the_first(tmp_path: Path) -> None:
    cache = RepeatCache(100, 600)
    stage_list = stages()
    texts = ["ok one", "OK one", "bad known-bad two", "ok three", "ok  ONE", "bad known-bad two"]
    batch = [ContentItem(id=f"i{n}", text=t) for n, t in enumerate(texts)]
    verdicts = await repeating(stage_list, cache, tmp_path).run([new_context(item) for item in batch])
    assert [v.id for v in verdicts] == [item.id for item in batch]
    # Copies of "ok one" are re-issued; the bank match is judged again (the flood guard must see it).
    assert [is_repeat(v) for v in verdicts] == [False, True, False, False, True, False]
    assert stage_list[0].scored == 4
    uncached = await CascadeRunner(stages(), thresholds(), "p-1").run([new_context(item) for item in batch])
    assert [decision_of(v) for v in verdicts] == [decision_of(v) for v in uncached]


def test_build_runner_uses_the_cache_unless_it_is_off(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    assert isinstance(build_runner(settings, stage_names=["hash"]), RepeatingRunner)
    off = build_runner(settings.model_copy(update={"repeat_cache_size": 0}), stage_names=["hash"])
    assert type(off) is CascadeRunner


def test_moderate_reports_the_hit_rate(tmp_path: Path) -> None:
    texts = ["hello there", "HELLO   there", "another text", "hello there"]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"id": f"i{n}", "text": t}) + "\n" for n, t in enumerate(texts)))
    out = tmp_path / "out.jsonl"
    result = CliRunner().invoke(
        app,
        ["moderate", str(source), "-o", str(out), "--stages", "hash", "--batch-size", "1"],
        env={"CASCADE_DATA_DIR": str(tmp_path / "data"), "COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.stderr
    verdicts = [Verdict.model_validate_json(line) for line in out.read_text().splitlines()]
    assert [is_repeat(v) for v in verdicts] == [False, True, False, True]
    assert len({v.decision for v in verdicts}) == 1
    batched = tmp_path / "batched.jsonl"  # one batch: the copies wait for the first occurrence
    result = CliRunner().invoke(
        app,
        ["moderate", str(source), "-o", str(batched), "--stages", "hash"],
        env={"CASCADE_DATA_DIR": str(tmp_path / "data"), "COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.stderr
    again = [Verdict.model_validate_json(line) for line in batched.read_text().splitlines()]
    assert [is_repeat(v) for v in again] == [False, True, False, True]
    row = next(line for line in result.stderr.splitlines() if "re-issued" in line)
    assert "2" in row and "50.0%" in row


async def test_worker_metrics_count_repeats_apart_from_stage_work(tmp_path: Path) -> None:
    cache = RepeatCache(10, 600)
    collector = metrics.watch_repeats(cache)
    try:
        runner = repeating(stages(), cache, tmp_path)
        await run_all(runner, [ContentItem(id="m1", text="ok metric text"), ContentItem(id="m0", text="ok other")])
        contexts = [new_context(ContentItem(id="m2", text="OK metric text"))]
        outputs = await runner.run_stage(0, contexts)
        assert REGISTRY.get_sample_value("cascade_repeat_cache_hit_ratio") == 1 / 3
        assert REGISTRY.get_sample_value("cascade_repeat_cache_lookups_total", {"result": "miss"}) == 2
        assert REGISTRY.get_sample_value("cascade_repeat_cache_entries") == 2
    finally:
        REGISTRY.unregister(collector)

    def sample(name: str, labels: dict[str, str]) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    repeat = outputs[0]
    assert isinstance(repeat, Verdict) and is_repeat(repeat)
    labels = {"decision": repeat.decision.value, "decided_by": repeat.decided_by}
    before_repeats = sample("cascade_repeat_verdicts_total", labels)
    before_verdicts = sample("cascade_verdicts_total", labels)
    before_items = sample("cascade_stage_items_total", {"stage": "first", "result": repeat.decision.value})
    metrics.record_batch("first", contexts, outputs, 0.001)
    assert sample("cascade_repeat_verdicts_total", labels) == before_repeats + 1
    metrics.record_delivered("first", repeat)  # verdicts count once the broker has them, repeats too
    assert sample("cascade_verdicts_total", labels) == before_verdicts + 1
    # The first stage did no work on it: its item counts (and drift windows) do not see it.
    assert sample("cascade_stage_items_total", {"stage": "first", "result": repeat.decision.value}) == before_items


async def test_the_same_text_on_another_surface_is_judged_by_that_surface_s_bands(tmp_path: Path) -> None:
    # chat prompts have no bands of their own here: the first stage settles nothing for them.
    by_surface = thresholds().model_copy(update={"surfaces": {"chat_prompt": BandSet()}})
    stage_list = stages()
    runner = RepeatingRunner(
        stage_list,
        by_surface,
        "p-1",
        None,
        RepeatCache(100, 600),
        tmp_path,
        lambda: {s.name: s.version for s in stage_list},
    )
    post = ContentItem(id="on-a-post", text="ok one", surface="post")
    prompt = ContentItem(id="in-a-chat", text="ok one", surface="chat_prompt")
    again = ContentItem(id="on-a-post-again", text="OK  one", surface="post")
    cached = [v for item in (post, prompt, again) for v in await runner.run([new_context(item)])]
    uncached = await CascadeRunner(stages(), by_surface, "p-1").run([new_context(i) for i in (post, prompt, again)])
    assert [decision_of(v) for v in cached] == [decision_of(v) for v in uncached]
    assert cached[0].band_set == "default" and cached[1].band_set == "chat_prompt"
    assert [is_repeat(v) for v in cached] == [False, False, True]
    # A re-issued verdict carries its own item, not the one it repeats.
    assert cached[2].item is not None and cached[2].item.id == "on-a-post-again" and cached[2].item.text == "OK  one"


def test_bank_version_polling_sees_every_change(tmp_path: Path) -> None:
    """The counter is memoised by file identity, but a file changed within the last second is read again."""
    path = tmp_path / VERSION_FILE
    path.write_text("5", encoding="ascii")
    past = time.time() - 10
    os.utime(path, (past, past))
    assert bank_version(tmp_path) == 5
    assert bump_bank_version(tmp_path) == 6
    assert bank_version(tmp_path) == 6
    # Rewritten in place within the same clock tick (same inode, size, maybe mtime): still read again.
    path.write_text("7", encoding="ascii")
    assert bank_version(tmp_path) == 7
    path.write_text("8", encoding="ascii")
    assert bank_version(tmp_path) == 8


async def test_a_copy_in_a_batch_judged_at_the_same_time_waits_for_the_first(tmp_path: Path) -> None:
    stage_list = stages()
    runner = repeating(stage_list, RepeatCache(100, 600), tmp_path)
    first = [ContentItem(id="a0", text="ok wave"), ContentItem(id="a1", text="ok other")]
    second = [ContentItem(id="b0", text="OK  wave"), ContentItem(id="b1", text="ok third")]
    batches = [[new_context(item) for item in batch] for batch in (first, second)]
    verdicts = [v async for judged in judge_batches(runner, batches, 2) for v in judged]
    assert [v.id for v in verdicts] == ["a0", "a1", "b0", "b1"]
    assert [is_repeat(v) for v in verdicts] == [False, False, True, False]
    assert stage_list[0].scored == 3  # the wave's copy skipped the cascade although both batches ran at once
    assert verdicts[2].trace[-1].details[REPEAT_OF] == "a0"
