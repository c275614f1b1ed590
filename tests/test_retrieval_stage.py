"""The retrieval stage: scoring formula, evidence, pipeline integration, empty bank and outages."""

from __future__ import annotations

import json
import logging
import socket
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from click.testing import Result
from typer.testing import CliRunner

from cascade.assembly import build_stages
from cascade.contract import ContentItem, Decision
from cascade.data import LabelledItem, Split, split_of
from cascade.embedding import Embedder, encoder_identity, near_copy_similarity
from cascade.exemplars import add_exemplars, exemplar_payload, load_seed_sets, seed_policy_exemplars
from cascade.pipeline import CascadeRunner, new_context
from cascade.policy import load_policy
from cascade.settings import Settings
from cascade.stages.base import ItemContext
from cascade.stages.retrieval import RetrievalStage, evidence_neighbours, score_item, vote
from cascade.thresholds import Band, ThresholdSet
from cascade.vectorindex import EdgeIndex, Neighbour, VectorIndex

pytest_plugins = ["model_cache"]  # fixtures: settings, embedder, frozen_settings, frozen_embedder
# qdrant-client warns when it cannot read the version of an unreachable server: that is the point here.
pytestmark = pytest.mark.filterwarnings("ignore:Failed to obtain server version:UserWarning")

BANK = [
    LabelledItem("bad-1", "Send me your bank password or your account will be closed today", 1, {"spam": 1}, "t"),
    LabelledItem("bad-2", "Congratulations! You won a free cruise, call now to claim your prize", 1, {"spam": 1}, "t"),
    LabelledItem("bad-3", "I am going to find you and beat you until you stop breathing", 1, {"violence": 1}, "t"),
    LabelledItem("ok-1", "Are we still meeting for lunch at noon tomorrow?", 0, {"spam": 0}, "t"),
    LabelledItem("ok-2", "Happy birthday! Hope you have a wonderful day with your family", 0, {"spam": 0}, "t"),
    LabelledItem("ok-3", "The recipe needs two cups of flour and a pinch of salt", 0, {"spam": 0, "violence": 0}, "t"),
]
THRESHOLDS = ThresholdSet(
    version="test",
    stages={"retrieval": {"flagged": Band(allow_below=0.2, block_at=0.9)}},
)


def _neighbour(id_: str, similarity: float, flagged: int, labels: dict[str, int], text: str = "") -> Neighbour:
    violates = sorted(c for c, v in labels.items() if v)
    payload = {"text": text or id_, "flagged": flagged, "labels": labels, "violates": violates}
    return Neighbour(id=id_, similarity=similarity, payload=payload)


def _ctx(item_id: str, text: str) -> ItemContext:
    return new_context(ContentItem(id=item_id, text=text))


def test_vote_weights_by_similarity_and_skips_unknown_and_far_neighbours() -> None:
    neighbours = [
        _neighbour("a", 0.9, 1, {"hate": 1, "offensive": 1}),
        _neighbour("b", 0.6, 0, {"hate": 0}),  # offensive unknown: not counted for it
        _neighbour("c", 0.2, 1, {"spam": 1}),  # below the floor: no vote at all
    ]
    scores = vote(neighbours, min_similarity=0.3, prior_weight=0.0)
    assert scores["hate"] == pytest.approx(0.9 / 1.5)
    assert scores["flagged"] == pytest.approx(0.9 / 1.5)
    assert scores["offensive"] == pytest.approx(1.0)
    assert "spam" not in scores
    assert vote(neighbours, min_similarity=0.95, prior_weight=0.0) == {}
    # The prior pseudo-neighbour votes 0: thin evidence cannot score high.
    shrunk = vote(neighbours, min_similarity=0.3, prior_weight=0.5)
    assert shrunk["offensive"] == pytest.approx(0.9 / 1.4)
    assert shrunk["hate"] == pytest.approx(0.9 / 2.0)


def test_near_copy_of_a_violation_lifts_flagged_and_its_categories() -> None:
    benign = [_neighbour(f"ok{i}", 0.8, 0, {"spam": 0, "hate": 0}) for i in range(4)]
    bad = _neighbour("bad", 0.97, 1, {"spam": 1})
    lifted = score_item([bad, *benign], bad, min_similarity=0.3, near_copy=0.95, prior_weight=0.5)
    assert lifted.scores["flagged"] == pytest.approx(0.97)
    assert lifted.scores["spam"] == pytest.approx(0.97)
    assert lifted.scores["hate"] == 0.0  # not a category the near copy violates
    assert lifted.details["max_bad_similarity"] == pytest.approx(0.97) and "near-copy" in (lifted.note or "")
    far_bad = _neighbour("bad", 0.6, 1, {"spam": 1})
    plain = score_item(benign, far_bad, min_similarity=0.3, near_copy=0.95, prior_weight=0.5)
    assert plain.scores["flagged"] == 0.0 and plain.note is None
    assert plain.details["max_bad_similarity"] == pytest.approx(0.6)


def test_evidence_is_deduplicated_by_normalised_text_best_first() -> None:
    found = [
        _neighbour("x1", 0.7, 1, {"spam": 1}, "WIN a prize now"),
        _neighbour("x2", 0.9, 1, {"spam": 1}, "win a  prize now"),
        _neighbour("x3", 0.5, 0, {"spam": 0}, "see you soon"),
    ]
    evidence = evidence_neighbours(found, found[0])
    assert [e["id"] for e in evidence] == ["x2", "x3"]
    assert evidence[0] == {
        "id": "x2",
        "text": "win a  prize now",
        "flagged": 1,
        "labels": {"spam": 1},
        "similarity": 0.9,
    }


@pytest.fixture
def bank(frozen_settings: Settings, frozen_embedder: Embedder) -> Settings:
    """The stage's mechanics on the frozen MiniLM, whose similarity scale the bands below assume
    (the tuned encoder packs each class tight: docs/retrieval.md, "Near copies")."""
    index = EdgeIndex(frozen_settings.data_path("exemplars"))
    add_exemplars(index, frozen_embedder, BANK, added_by="test")
    index.close()
    return frozen_settings


async def test_stage_blocks_near_copies_clears_lookalikes_and_escalates_the_unknown(bank: Settings) -> None:
    (stage,) = build_stages(bank, ["retrieval"])
    assert isinstance(stage, RetrievalStage) and encoder_identity(bank) in stage.version
    runner = CascadeRunner([stage], THRESHOLDS, "test-policy")
    batch = [
        _ctx("1", "Congratulations!! You won a free cruise - call now to claim your prize"),
        _ctx("2", "are we still meeting for lunch at noon tomorrow"),
        _ctx("3", "Quantum chromodynamics describes the strong interaction between quarks"),
    ]
    verdicts = await runner.run(batch)
    assert [v.decision for v in verdicts] == [Decision.BLOCK, Decision.ALLOW, Decision.REVIEW]
    blocked = verdicts[0].trace[0]
    assert blocked.scores["spam"] >= 0.95 and blocked.details["nearest_bad_id"] == "bad-2"
    assert "near-copy" in (blocked.note or "")
    # Neighbours for the LLM's few-shot and the review page, built only for the unsettled item;
    # the embedding kept for the classifier.
    assert "neighbours" not in batch[0].evidence and "neighbours" not in batch[1].evidence
    shown = batch[2].evidence["neighbours"]
    assert shown and shown[0]["id"] == verdicts[2].trace[0].details["nearest_bad_id"]
    assert verdicts[2].evidence == {"neighbours": shown}
    assert all(ctx.embedding is not None for ctx in batch)
    # An unrelated text has no neighbour close enough to vote: nothing scored, nothing cleared.
    assert verdicts[2].trace[0].scores == {} and verdicts[2].trace[0].error is None
    await runner.aclose()


class _FilteredQueries(EdgeIndex):
    """The real embedded index, counting the vectors sent to filtered queries."""

    filtered = 0

    def search(self, vectors, k, where=None, exact=False):  # type: ignore[no-untyped-def]
        if where:
            type(self).filtered += len(vectors)
        return super().search(vectors, k, where, exact)


async def test_nearest_violation_comes_from_the_top_k_and_a_filtered_query_only_without_one(
    bank: Settings, embedder: Embedder
) -> None:
    path = bank.data_path("exemplars")
    stage = RetrievalStage(lambda: embedder, "model", lambda: _FilteredQueries(path), "edge", k=1)
    texts = ["Congratulations!! You won a free cruise - call now to claim your prize", "lunch at noon tomorrow?"]
    batch = [_ctx(str(n), text) for n, text in enumerate(texts)]
    results = await stage.score(batch)
    await stage.aclose()
    # The spam's top-1 is a violation (no filtered query); the lunch text's top-1 is benign (one).
    assert _FilteredQueries.filtered == 1
    index = EdgeIndex(path)
    for ctx, result in zip(batch, results, strict=True):
        (worst,) = index.search(ctx.embedding[None, :], 1, where={"flagged": 1}, exact=True)[0]
        assert result.details["nearest_bad_id"] == worst.id
        assert result.details["max_bad_similarity"] == round(worst.similarity, 4)
    index.close()


async def test_empty_bank_makes_the_stage_unavailable(settings: Settings, embedder: Embedder) -> None:
    stage = RetrievalStage(lambda: embedder, "model", lambda: EdgeIndex(settings.data_path("exemplars")), "edge")
    assert "empty" in (stage.unavailable_reason or "")
    verdicts = await CascadeRunner([stage], THRESHOLDS, "p").run([_ctx("1", "hello")])
    assert verdicts[0].decision is Decision.REVIEW
    assert "stage unavailable" in (verdicts[0].trace[0].error or "")
    await stage.aclose()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_unreachable_server_escalates_every_item_and_logs_once(
    settings: Settings, embedder: Embedder, caplog: pytest.LogCaptureFixture
) -> None:
    down = settings.model_copy(update={"qdrant_url": f"http://127.0.0.1:{_closed_port()}", "qdrant_timeout_s": 1})
    stage = RetrievalStage.from_settings(down, _Resources(embedder))
    assert "+qdrant:exemplars+k10+copy" in stage.version and stage.near_copy == near_copy_similarity(down)
    runner = CascadeRunner([stage], THRESHOLDS, "p")
    with caplog.at_level(logging.WARNING, logger="cascade.stages.retrieval"):
        for round_ in range(3):
            verdicts = await runner.run([_ctx(f"{round_}-a", "win a prize"), _ctx(f"{round_}-b", "hi")])
            assert [v.decision for v in verdicts] == [Decision.REVIEW, Decision.REVIEW]
            assert all("vector index unavailable" in (v.trace[0].error or "") for v in verdicts)
    assert sum("unavailable" in r.getMessage() for r in caplog.records) == 1


class _Resources:
    """What `from_settings` reads from `cascade.assembly.Resources`: the shared embedder."""

    def __init__(self, embedder: Embedder) -> None:
        self.embedder = embedder


async def test_recovers_when_the_store_comes_back(
    bank: Settings, frozen_embedder: Embedder, caplog: pytest.LogCaptureFixture
) -> None:
    path = bank.data_path("exemplars")
    holder: VectorIndex | None = EdgeIndex(path)  # another process-like holder of the store's lock
    stage = RetrievalStage(lambda: frozen_embedder, "model", lambda: EdgeIndex(path), "edge", retry_after_s=0.0)
    runner = CascadeRunner([stage], THRESHOLDS, "p")
    item = "Congratulations! You won a free cruise, call now to claim your prize"
    with caplog.at_level(logging.WARNING, logger="cascade.stages.retrieval"):
        failed = await runner.run([_ctx("1", item)])
        assert failed[0].decision is Decision.REVIEW and failed[0].trace[0].error
        assert holder is not None
        holder.close()
        recovered = await runner.run([_ctx("2", item)])
    assert recovered[0].decision is Decision.BLOCK
    messages = [r.getMessage() for r in caplog.records]
    assert any("unavailable" in m for m in messages) and any("back after" in m for m in messages)
    await runner.aclose()


def test_added_exemplars_carry_the_documented_payload() -> None:
    row = LabelledItem("r1", "text", 1, {"hate": 1, "offensive": 0}, "davidson2017")
    payload = exemplar_payload(row, "alice", datetime(2026, 11, 27, tzinfo=UTC))
    assert payload == {
        "text": "text",
        "flagged": 1,
        "labels": {"hate": 1, "offensive": 0},
        "label_keys": ["hate", "offensive"],
        "violates": ["hate"],
        "source": "davidson2017",
        "added_at": "2026-11-27T00:00:00+00:00",
        "added_by": "alice",
    }


def test_policy_seeds_cover_every_category_and_are_versioned() -> None:
    policy = load_policy(Settings().policies_dir)
    sets = {s.category: s for s in load_seed_sets(Settings().policies_dir)}
    assert set(sets) == set(policy.names) - {"flagged"}
    for seed_set in sets.values():
        assert seed_set.version and len(seed_set.violating) >= 15 and len(seed_set.benign) >= 15
        assert set(seed_set.also_violates) <= policy.names
    rows = [row for s in sets.values() for row in s.rows()]
    assert len({r.id for r in rows}) == len(rows)
    minors = [r for r in sets["sexual_minors"].rows() if r.flagged]
    assert all(r.labels == {"sexual_minors": 1, "sexual": 1} for r in minors)


def _cli(settings: Settings, *args: str) -> Result:
    from cascade.cli import app

    result = CliRunner().invoke(app, list(args), env={"CASCADE_DATA_DIR": str(settings.data_dir)})
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.slow
def test_bank_cli_imports_train_rows_idempotently_seeds_and_shows_stats(settings: Settings, tmp_path: Path) -> None:
    rows = [
        {
            "id": f"row-{i}",
            "text": f"sample message number {i} about the weekend",
            "flagged": i % 2,
            "labels": {"spam": i % 2, "newcat": 1},
            "source": "fixture",
        }
        for i in range(40)
    ]
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n", encoding="utf-8")
    train_ids = {r["id"] for r in rows if split_of(r["id"]) is Split.TRAIN}
    assert 0 < len(train_ids) < len(rows)

    first = _cli(settings, "bank", "import", str(data), "--kind", "exemplars")
    assert "newcat" in first.output  # a category outside the policy is reported, not fatal
    again = _cli(settings, "bank", "import", str(data), "--kind", "exemplars")
    index = EdgeIndex(settings.data_path("exemplars"))
    assert index.count() == len(train_ids)  # only train rows, once
    assert all(index.count({"exemplar_id": i}) == 1 for i in train_ids)
    index.close()
    assert "1" in again.output.split("errors")[1]  # the malformed line, reported each time

    _cli(settings, "bank", "seed")
    stats = _cli(settings, "bank", "stats").output
    index = EdgeIndex(settings.data_path("exemplars"))
    seeds = sum(len(s.rows()) for s in load_seed_sets(settings.policies_dir))
    assert index.count() == len(train_ids) + seeds
    assert index.count({"source": "policy-seed"}) == seeds
    index.close()
    assert "exemplar bank" in stats and "sexual_minors" in stats


def test_seeding_replaces_older_seeds(settings: Settings, embedder: Embedder, tmp_path: Path) -> None:
    seeds = tmp_path / "policies" / "seeds"
    seeds.mkdir(parents=True)

    def write(version: str, violating: list[str]) -> None:
        doc = {"category": "spam", "version": version, "violating": violating, "benign": ["see you at lunch"]}
        (seeds / "spam.yaml").write_text(yaml.safe_dump(doc), encoding="utf-8")

    index = EdgeIndex(settings.data_path("exemplars"))
    add_exemplars(index, embedder, BANK[:2], added_by="test")
    write("1", ["win a free cruise now", "claim your prize today"])
    assert seed_policy_exemplars(index, embedder, tmp_path / "policies", "test") == 3
    write("2", ["claim your prize today"])
    assert seed_policy_exemplars(index, embedder, tmp_path / "policies", "test") == 2
    assert index.count({"source": "policy-seed"}) == 2  # the dropped seed left the bank
    assert index.count() == 4  # imported exemplars untouched
    (top,) = index.search(embedder.embed(["claim your prize today"]), 1)[0]
    assert top.payload["seed_version"] == "2" and top.payload["labels"] == {"spam": 1}
    index.close()
