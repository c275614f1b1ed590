"""The hash stage in the cascade: bank matches block or clear, misses escalate, floods quarantine."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from cascade.assembly import build_stages
from cascade.contract import ContentItem, Decision, StageAction, Verdict
from cascade.hashbank import EntryInput, HashBank, Polarity
from cascade.pipeline import CascadeRunner, new_context
from cascade.settings import Settings
from cascade.stages.hash import HashStage
from cascade.stream import metrics
from cascade.thresholds import ThresholdSet

THREAT = "I know where you live and I will hurt your family tonight"
SPAM = "Congratulations you won a free cruise call now to claim your prize"
# A benign text that is a near-duplicate of SPAM: the bad entry alone would block it.
BENIGN_NEAR_SPAM = "Congratulations you won a free cruise, call mum now to claim your prize"


def settings_for(tmp_path: Path, **overrides: object) -> Settings:
    return Settings(data_dir=tmp_path / "data", **overrides)


def seed(settings: Settings, *entries: EntryInput) -> None:
    bank = HashBank.open(settings.data_dir, settings.near_dup_threshold)
    bank.upsert(entries, "tester")
    bank.close()


async def moderate(runner: CascadeRunner, *texts: str) -> list[Verdict]:
    return await runner.run([new_context(ContentItem(id=f"item-{i}", text=t)) for i, t in enumerate(texts)])


@pytest.fixture
async def runner(tmp_path: Path) -> AsyncIterator[CascadeRunner]:
    settings = settings_for(tmp_path)
    seed(
        settings,
        EntryInput("threat-1", THREAT, Polarity.BAD, ("violence", "harassment"), "test"),
        EntryInput("spam-1", SPAM, Polarity.BAD, ("spam",), "test"),
        EntryInput("word-1", "lovely weather today", Polarity.BAD, (), "test"),
    )
    stages = build_stages(settings, ["hash"])  # through assembly, as `cascade moderate` builds it
    assert [type(s) for s in stages] == [HashStage]
    built = CascadeRunner(stages, ThresholdSet(version="t-1"), policy_version="p-1")
    yield built
    await built.aclose()


async def test_bank_match_blocks_and_miss_escalates(runner: CascadeRunner) -> None:
    disguised = "І knοw whеrе уοu l1v3 and I w1ll h.u.r.t your fam\u200bily tonight!!!"
    blocked, edited, missed, emoji = await moderate(
        runner, disguised, SPAM + " today only", "what a nice morning", "😂😂😂"
    )

    assert blocked.decision is Decision.BLOCK and blocked.decided_by == "hash"
    assert sorted(blocked.flagged_categories) == ["harassment", "violence"]
    assert blocked.categories == {"harassment": 1.0, "violence": 1.0}
    entry = blocked.trace[0]
    assert entry.matched and entry.result is StageAction.BLOCK
    assert entry.details["entry_id"] == "threat-1" and entry.details["bank"] == "exact"
    assert "known-bad entry threat-1" in blocked.reason

    assert edited.decision is Decision.BLOCK and edited.flagged_categories == ["spam"]
    assert edited.trace[0].details["bank"] == "near" and 0.7 <= edited.trace[0].details["jaccard"] < 1

    # The only stage: a miss is unresolved after the last stage, so a human reviews it.
    for verdict in (missed, emoji):
        assert verdict.decision is Decision.REVIEW and verdict.decided_by == "pipeline"
        assert not verdict.trace[0].matched and verdict.trace[0].result is StageAction.REVIEW
    assert emoji.trace[0].details == {"skipped": "no letters or digits after normalisation"}


async def test_bad_entry_without_category_reports_flagged(runner: CascadeRunner) -> None:
    (verdict,) = await moderate(runner, "Lovely weather today!")
    assert verdict.decision is Decision.BLOCK and verdict.flagged_categories == ["flagged"]


async def test_miss_escalates_to_the_next_stage(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    seed(settings, EntryInput("spam-1", SPAM, Polarity.BAD, ("spam",), "test"))
    # A second, real stage behind the hash stage: a second hash stage under another name.
    replica = HashStage.from_settings(settings)
    replica.name = "hash-replica"
    runner = CascadeRunner([HashStage.from_settings(settings), replica], ThresholdSet(version="t-1"), "p-1")
    missed, matched = await moderate(runner, "nothing banked here", SPAM)
    assert [(t.stage, t.result) for t in missed.trace] == [
        ("hash", StageAction.ESCALATE),
        ("hash-replica", StageAction.REVIEW),
    ]
    assert [(t.stage, t.result) for t in matched.trace] == [("hash", StageAction.BLOCK)]  # settled first
    await runner.aclose()


async def test_good_entry_prevents_a_known_false_positive(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    seed(settings, EntryInput("spam-1", SPAM, Polarity.BAD, ("spam",), "test"))
    runner = CascadeRunner(build_stages(settings, ["hash"]), ThresholdSet(version="t-1"), policy_version="p-1")
    (before,) = await moderate(runner, BENIGN_NEAR_SPAM)
    assert before.decision is Decision.BLOCK  # the false positive

    seed(settings, EntryInput("ok-1", BENIGN_NEAR_SPAM, Polarity.GOOD, (), "test"))
    cleared, still_blocked = await moderate(runner, BENIGN_NEAR_SPAM.upper(), SPAM)
    assert cleared.decision is Decision.ALLOW and cleared.decided_by == "hash"
    assert cleared.trace[0].details["entry_id"] == "ok-1" and cleared.flagged_categories == []
    assert cleared.trace[0].details["bank"] == "exact"  # an exact good match beats the near bad one
    assert still_blocked.decision is Decision.BLOCK
    await runner.aclose()


async def test_same_text_in_both_banks_escalates(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    seed(
        settings,
        EntryInput("bad-1", SPAM, Polarity.BAD, ("spam",), "test"),
        EntryInput("good-1", SPAM.lower(), Polarity.GOOD, (), "test"),
    )
    runner = CascadeRunner(build_stages(settings, ["hash"]), ThresholdSet(version="t-1"), policy_version="p-1")
    (verdict,) = await moderate(runner, SPAM)
    assert verdict.decision is Decision.REVIEW
    assert "bad and good bank entries" in (verdict.trace[0].note or "")
    assert {d["entry_id"] for d in verdict.trace[0].details["conflict"]} == {"bad-1", "good-1"}
    await runner.aclose()


async def test_near_matches_closest_entry_decides(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    seed(
        settings,
        EntryInput("bad-1", SPAM, Polarity.BAD, ("spam",), "test"),
        EntryInput("good-1", BENIGN_NEAR_SPAM, Polarity.GOOD, (), "test"),
    )
    runner = CascadeRunner(build_stages(settings, ["hash"]), ThresholdSet(version="t-1"), policy_version="p-1")
    closer_to_good, closer_to_bad = await moderate(runner, BENIGN_NEAR_SPAM + " ok", SPAM + " ok")
    assert closer_to_good.decision is Decision.ALLOW
    assert closer_to_bad.decision is Decision.BLOCK
    await runner.aclose()


async def test_stage_sees_bank_changes_from_other_processes(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    runner = CascadeRunner(build_stages(settings, ["hash"]), ThresholdSet(version="t-1"), policy_version="p-1")
    (before,) = await moderate(runner, THREAT)
    assert before.decision is Decision.REVIEW
    seed(settings, EntryInput("threat-1", THREAT, Polarity.BAD, ("violence",), "cli"))  # e.g. `cascade bank add`
    (after,) = await moderate(runner, THREAT)
    assert after.decision is Decision.BLOCK
    await runner.aclose()


async def test_flood_guard_quarantines_until_confirmed(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, flood_window=20, flood_share=0.25, flood_min_items=10)
    seed(settings, EntryInput("generic-1", "lol ok", Polarity.BAD, ("offensive",), "test"))
    runner = CascadeRunner(build_stages(settings, ["hash"]), ThresholdSet(version="t-1"), policy_version="p-1")

    # Ordinary traffic with an occasional match: under the share, the entry keeps blocking.
    ordinary = [f"ordinary message number {i}" for i in range(8)]
    verdicts = await moderate(runner, *ordinary, "LOL ok", "lol  ok!!")
    assert [v.decision for v in verdicts[-2:]] == [Decision.BLOCK, Decision.BLOCK]

    # A burst: the entry now matches more than 25% of the last items → quarantined, stops deciding.
    burst = await moderate(runner, *["lol ok"] * 3)
    assert burst[0].decision is Decision.REVIEW  # 3 of 11 items > 25%: the trigger itself escalates
    assert burst[0].trace[0].details["newly_quarantined"] == ["generic-1"]
    assert all(v.decision is Decision.REVIEW for v in burst)
    assert "quarantined entries: generic-1" in (burst[1].trace[0].note or "")

    bank = HashBank.open(settings.data_dir)
    entry = bank.get("generic-1")
    assert entry is not None and entry.quarantined and "flood guard" in (entry.quarantine_reason or "")
    assert bank.confirm("generic-1")  # what `cascade bank confirm generic-1` does
    bank.close()

    confirmed = await moderate(runner, *["lol ok"] * 10)
    assert all(v.decision is Decision.BLOCK for v in confirmed)  # never quarantined again
    await runner.aclose()


async def test_a_flood_of_copies_never_quarantines_a_confirmed_known_bad_entry(tmp_path: Path) -> None:
    """The attack of issue 13: spamming copies of a banked text to switch its entry off. Default guard settings."""
    settings = settings_for(tmp_path)
    threat = "I know where you live and I will hurt your family tonight"
    spam = "Congratulations you won a free cruise call now to claim your prize"
    seed(
        settings,
        EntryInput("threat-1", threat, Polarity.BAD, ("violence",), "ticket-1", confirmed=True),
        EntryInput("auto-1", spam, Polarity.BAD, ("spam",), "review-feedback"),
    )
    runner = CascadeRunner(build_stages(settings, ["hash"]), ThresholdSet(version="t-1"), policy_version="p-1")
    quarantines_before = REGISTRY.get_sample_value("cascade_bank_quarantines_total", {"stage": "hash"}) or 0.0

    ordinary = await moderate(runner, *[f"ordinary message number {i}" for i in range(200)])
    flood_texts = [threat, spam] * 30
    flood = await moderate(runner, *flood_texts)
    inputs = [new_context(ContentItem(id=v.id, text=t)) for v, t in zip(flood, flood_texts, strict=True)]
    metrics.record_batch("hash", inputs, flood, 0.01)  # what a stream worker does with the stage's outputs

    threats, spams = flood[0::2], flood[1::2]
    assert all(v.decision is Decision.BLOCK and v.decided_by == "hash" for v in threats)
    assert all(not v.trace[0].details.get("quarantined") for v in threats)
    # The unconfirmed entry is quarantined once it floods: its copies escalate instead of being decided.
    assert spams[0].decision is Decision.BLOCK and spams[-1].decision is Decision.REVIEW
    assert sum("newly_quarantined" in v.trace[0].details for v in spams) == 1
    assert REGISTRY.get_sample_value("cascade_bank_quarantines_total", {"stage": "hash"}) == quarantines_before + 1
    bank = HashBank.open(settings.data_dir)
    assert [e.id for e in bank.entries(quarantined_only=True)] == ["auto-1"]
    threat_entry = bank.get("threat-1")
    assert threat_entry is not None and threat_entry.confirmed and not threat_entry.quarantined
    assert bank.stats().quarantined == 1
    bank.close()
    assert len(ordinary) == 200
    await runner.aclose()
