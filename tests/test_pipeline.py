"""Band logic and degradation of the cascade, with scripted stages standing in for real ones."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np
import pytest

from cascade.contract import BandOutcome, ContentItem, Decision, StageAction, Verdict
from cascade.pipeline import CascadeRunner, apply_bands, judge_batches, new_context
from cascade.settings import Settings
from cascade.stages.base import ItemContext, Match, Stage, StageResult
from cascade.thresholds import Band, ThresholdSet


class ScriptedStage(Stage):
    """Returns fixed results by item id; records what it was asked."""

    def __init__(self, name: str, results: dict[str, StageResult], fail: Exception | None = None) -> None:
        self.name, self.version = name, f"{name}-test"
        self.results, self.fail = results, fail
        self.seen: list[list[str]] = []
        self.unavailable: str | None = None

    @property
    def unavailable_reason(self) -> str | None:
        return self.unavailable

    async def score(self, batch: Sequence[ItemContext]) -> list[StageResult]:
        self.seen.append([ctx.item.id for ctx in batch])
        if self.fail is not None:
            raise self.fail
        return [self.results.get(ctx.item.id, StageResult()) for ctx in batch]


def ctx(item_id: str, text: str = "some text") -> ItemContext:
    return new_context(ContentItem(id=item_id, text=text))


def thresholds(**stages: dict[str, Band]) -> ThresholdSet:
    return ThresholdSet(version="t-1", stages=stages)


BANDS = {"flagged": Band(allow_below=0.2, block_at=0.9), "spam": Band(allow_below=0.3, block_at=0.95)}


@pytest.mark.parametrize(
    ("scores", "decision"),
    [
        ({"flagged": 0.1, "spam": 0.1}, Decision.ALLOW),  # every banded category cleared
        ({"flagged": 0.95, "spam": 0.0}, Decision.BLOCK),  # any category blocks
        ({"flagged": 0.1, "spam": 0.96}, Decision.BLOCK),
        ({"flagged": 0.5, "spam": 0.1}, None),  # one unresolved → escalate
        ({"flagged": 0.1}, None),  # a banded category without a score cannot be cleared
        ({"flagged": 0.9, "spam": 0.1}, Decision.BLOCK),  # block_at is inclusive
        ({"flagged": 0.2, "spam": 0.1}, None),  # allow_below is exclusive
    ],
)
def test_apply_bands(scores: dict[str, float], decision: Decision | None) -> None:
    assert apply_bands("s", StageResult(scores=scores), BANDS).decision is decision


def test_bands_with_open_edges() -> None:
    never_blocks = {"flagged": Band(allow_below=0.5, block_at=None)}
    assert apply_bands("s", StageResult(scores={"flagged": 1.0}), never_blocks).decision is None
    never_clears = {"flagged": Band(allow_below=None, block_at=0.5)}
    assert apply_bands("s", StageResult(scores={"flagged": 0.0}), never_clears).decision is None


def test_no_bands_and_errors_escalate_and_matches_decide() -> None:
    assert apply_bands("s", StageResult(scores={"flagged": 0.0}), {}).decision is None
    assert apply_bands("s", StageResult(error="boom", scores={"flagged": 0.0}), BANDS).decision is None
    match = Match(Decision.BLOCK, ("spam",), "known spam")
    decided = apply_bands("s", StageResult(match=match), {})
    assert decided.decision is Decision.BLOCK and decided.flagged == ["spam"]


async def test_cascade_escalates_only_unresolved_items_and_keeps_order() -> None:
    first = ScriptedStage(
        "first",
        {
            "a": StageResult(scores={"flagged": 0.01}),
            "b": StageResult(scores={"flagged": 0.99}),
            "c": StageResult(scores={"flagged": 0.5}),
            "d": StageResult(scores={"flagged": 0.5}),
        },
    )
    second = ScriptedStage(
        "second", {"c": StageResult(scores={"flagged": 0.05}), "d": StageResult(scores={"flagged": 0.6})}
    )
    band = {"flagged": Band(allow_below=0.1, block_at=0.9)}
    runner = CascadeRunner([first, second], thresholds(first=band, second=band), policy_version="p-1")
    verdicts = await runner.run([ctx(i) for i in "abcd"])

    assert [v.id for v in verdicts] == list("abcd")
    assert [v.decision for v in verdicts] == [Decision.ALLOW, Decision.BLOCK, Decision.ALLOW, Decision.REVIEW]
    assert [v.decided_by for v in verdicts] == ["first", "first", "second", "pipeline"]
    assert second.seen == [["c", "d"]]  # only what the first stage could not settle
    d = verdicts[3]
    assert [t.stage for t in d.trace] == ["first", "second"]
    assert d.trace[-1].result is StageAction.REVIEW and d.trace[0].result is StageAction.ESCALATE
    assert d.trace[1].outcomes == {"flagged": BandOutcome.UNRESOLVED}
    assert d.categories == {"flagged": 0.6}  # latest score wins
    assert verdicts[1].flagged_categories == ["flagged"]
    assert all(v.policy_version == "p-1" and v.thresholds_version == "t-1" for v in verdicts)


async def test_a_verdict_carries_its_item_without_metadata() -> None:
    stage = ScriptedStage("only", {})
    runner = CascadeRunner([stage], thresholds(only={"flagged": Band(allow_below=0.1, block_at=0.9)}), "p-1")
    with_metadata = ContentItem(id="m", text="hello there", surface="post", metadata={"user": "u-1", "ip": "10.0.0.1"})
    plain = ContentItem(id="p", text="hello there", surface="post")
    verdicts = await runner.run([new_context(with_metadata), new_context(plain)])

    assert verdicts[0].item == with_metadata.model_copy(update={"metadata": None})
    assert verdicts[0].item.metadata is None and with_metadata.metadata == {"user": "u-1", "ip": "10.0.0.1"}
    assert verdicts[1].item == plain
    assert "10.0.0.1" not in verdicts[0].model_dump_json()


async def test_evidence_is_built_only_for_items_the_stage_leaves_unsettled(caplog: pytest.LogCaptureFixture) -> None:
    built: list[str] = []

    def evidence(item_id: str) -> StageResult:
        def build() -> dict[str, object]:
            built.append(item_id)
            if item_id == "e":
                raise ValueError("bad payload")
            return {"neighbours": [item_id]}

        score = {"a": 0.01, "b": 0.99}.get(item_id, 0.5)
        return StageResult(scores={"flagged": score}, evidence=build)

    first = ScriptedStage("first", {i: evidence(i) for i in "abce"})
    last = ScriptedStage("last", {})
    band = {"flagged": Band(allow_below=0.1, block_at=0.9)}
    runner = CascadeRunner([first, last], thresholds(first=band, last=band), policy_version="p")
    items = [ctx(i) for i in "abce"]
    verdicts = await runner.run(items)

    assert sorted(built) == ["c", "e"]  # the allowed and the blocked item never built theirs
    assert [v.decision for v in verdicts] == [Decision.ALLOW, Decision.BLOCK, Decision.REVIEW, Decision.REVIEW]
    assert items[2].evidence == {"neighbours": ["c"]} and verdicts[2].evidence == {"neighbours": ["c"]}
    # Evidence that fails to build is logged; the item goes on without it.
    assert items[3].evidence == {} and verdicts[3].evidence is None
    assert "building the evidence of item 'e' failed" in caplog.text


async def test_failing_stage_escalates_its_batch_and_never_clears() -> None:
    broken = ScriptedStage("broken", {}, fail=RuntimeError("qdrant down"))
    last = ScriptedStage("last", {"a": StageResult(scores={"flagged": 0.0})})
    band = {"flagged": Band(allow_below=0.1, block_at=0.9)}
    runner = CascadeRunner([broken, last], thresholds(broken=band, last=band), policy_version="p")
    a, b = await runner.run([ctx("a"), ctx("b")])
    assert a.decision is Decision.ALLOW and a.decided_by == "last"
    assert b.decision is Decision.REVIEW
    assert "qdrant down" in (a.trace[0].error or "")


async def test_unavailable_last_stage_sends_to_review_with_the_reason() -> None:
    llm = ScriptedStage("llm", {})
    llm.unavailable = "no endpoint configured"
    runner = CascadeRunner([llm], thresholds(llm={"flagged": Band(allow_below=0.5, block_at=0.5)}), "p")
    (verdict,) = await runner.run([ctx("a")])
    assert verdict.decision is Decision.REVIEW
    assert "no endpoint configured" in verdict.reason
    assert llm.seen == []  # an unavailable stage is not called


async def test_wrong_result_count_is_treated_as_a_stage_failure() -> None:
    class Short(ScriptedStage):
        async def score(self, batch: Sequence[ItemContext]) -> list[StageResult]:
            return []

    runner = CascadeRunner([Short("short", {})], thresholds(), "p")
    (verdict,) = await runner.run([ctx("a")])
    assert verdict.decision is Decision.REVIEW and "returned 0 results" in (verdict.trace[0].error or "")


async def test_shadow_thresholds_are_recorded_not_acted_on() -> None:
    stage = ScriptedStage("s", {"a": StageResult(scores={"flagged": 0.5})})
    live = thresholds(s={"flagged": Band(allow_below=0.1, block_at=0.9)})
    shadow = ThresholdSet(version="shadow-2", stages={"s": {"flagged": Band(allow_below=0.1, block_at=0.4)}})
    runner = CascadeRunner([stage], live, "p", shadow_thresholds=shadow)
    (verdict,) = await runner.run([ctx("a")])
    assert verdict.decision is Decision.REVIEW
    assert verdict.shadow is not None
    assert (verdict.shadow.decision, verdict.shadow.decided_by, verdict.shadow.thresholds_version) == (
        Decision.BLOCK,
        "s",
        "shadow-2",
    )


async def test_run_stage_returns_contexts_for_escalation_that_survive_the_wire() -> None:
    stage = ScriptedStage("s", {"a": StageResult(scores={"flagged": 0.5}, details={"k": 1})})
    runner = CascadeRunner(
        [stage, ScriptedStage("t", {})], thresholds(s={"flagged": Band(allow_below=0.1, block_at=0.9)}), "p"
    )
    item = ctx("a", "Ünïcode text")
    item.embedding = np.arange(4, dtype=np.float32)
    (out,) = await runner.run_stage(0, [item])
    assert isinstance(out, ItemContext)
    back = ItemContext.from_wire(out.to_wire())
    assert back.item == out.item and back.trace == out.trace and back.normalized == out.normalized
    assert back.embedding is not None and np.array_equal(back.embedding, item.embedding)
    (final,) = await runner.run_stage(1, [back])
    assert isinstance(final, Verdict) and [t.stage for t in final.trace] == ["s", "t"]


def test_runner_rejects_duplicate_or_missing_stages() -> None:
    with pytest.raises(ValueError):
        CascadeRunner([], thresholds(), "p")
    with pytest.raises(ValueError):
        CascadeRunner([ScriptedStage("x", {}), ScriptedStage("x", {})], thresholds(), "p")


class OverlapStage(ScriptedStage):
    """Yields to the event loop mid-batch and records how many batches it held at once."""

    def __init__(self) -> None:
        super().__init__("first", {})
        self.holding = 0
        self.most = 0

    async def score(self, batch: Sequence[ItemContext]) -> list[StageResult]:
        self.holding += 1
        self.most = max(self.most, self.holding)
        await asyncio.sleep(0.01)  # an encoder pass in a thread, as far as the event loop can tell
        self.holding -= 1
        return await super().score(batch)


@pytest.mark.parametrize("in_flight", [1, 2, 3])
async def test_judge_batches_overlaps_batches_and_keeps_their_order(in_flight: int) -> None:
    stage = OverlapStage()
    runner = CascadeRunner([stage], thresholds(first=BANDS), "p-1")
    batches = [[ctx(f"b{b}i{i}") for i in range(3)] for b in range(7)]
    out = [[v.id for v in verdicts] async for verdicts in judge_batches(runner, batches, in_flight)]
    assert out == [[c.item.id for c in batch] for batch in batches]
    assert stage.most == in_flight


def test_batches_in_flight_by_stage() -> None:
    settings = Settings()
    assert settings.batches_in_flight(["hash", "retrieval", "classifier"]) == 2
    assert settings.batches_in_flight(["llm"]) == 4
    custom = Settings(stream_concurrency={"retrieval": 1, "hash": 1, "classifier": 1})
    assert custom.batches_in_flight(["hash", "retrieval", "classifier"]) == 1
