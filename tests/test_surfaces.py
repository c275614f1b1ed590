"""Surfaces: per-surface band sets with a default fallback, `calibrate --by surface`, one score scale."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from synthetic_scores import SyntheticStage, write_dataset
from typer.testing import CliRunner

import cascade.cli.calibrate as calibrate_cli
from cascade.calibration import Targets, choose_thresholds, choose_thresholds_by_surface
from cascade.cli import app
from cascade.contract import ContentItem, Decision
from cascade.data import DataError, Split, load_labelled, split_of
from cascade.evaluation import auprc
from cascade.pipeline import CascadeRunner, new_context
from cascade.scoring import LabelMatrix, ScoreTable, StageScores, admit, collect_scores
from cascade.settings import Settings
from cascade.simulation import run_from_verdicts, simulate
from cascade.thresholds import Band, BandSet, ScoreMap, ThresholdError, ThresholdSet


def test_labelled_rows_get_their_surface(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    rows = [
        {"id": "a", "text": "t", "flagged": 0, "source": "toxicchat0124"},
        {"id": "b", "text": "t", "flagged": 0, "source": "sms_spam_collection"},
        {"id": "c", "text": "t", "flagged": 1, "source": "davidson2017"},
        {"id": "d", "text": "t", "flagged": 1, "source": "davidson2017", "surface": "comment"},
        {"id": "e", "text": "t", "flagged": 1, "source": "my_forum"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [r.surface for r in load_labelled([path])] == ["chat_prompt", "sms", "post", "comment", None]
    path.write_text(json.dumps({"id": "x", "text": "t", "flagged": 0, "surface": "Chat Prompt!"}) + "\n")
    with pytest.raises(DataError, match="surface"):
        load_labelled([path])


@pytest.mark.parametrize(
    ("doc", "problem"),
    [
        ({"surfaces": {"Bad Name": {}}}, "surface 'Bad Name'"),
        ({"surfaces": {"default": {}}}, "surface 'default'"),
        ({"surfaces": {"sms": {"stages": {"clasifier": {}}}}}, "surface 'sms': unknown stage 'clasifier'"),
        ({"surfaces": {"sms": {"stages": {"classifier": {"flaged": {}}}}}}, "unknown category 'flaged'"),
        ({"score_maps": {"classifier": {"flagged": {"x": [0.1, 0.5], "y": [0.6, 0.2]}}}}, "non-decreasing"),
        ({"score_maps": {"classifier": {"flagged": {"x": [0.1, 0.5], "y": [0.2]}}}}, "knots"),
    ],
)
def test_threshold_file_rejects_bad_surface_sets(doc: dict[str, object], problem: str, tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump({"version": "v", **doc}))
    with pytest.raises(ThresholdError, match=problem):
        ThresholdSet.load(path).check_names(["hash", "classifier"], ["flagged", "spam"])


def _stages() -> list[SyntheticStage]:
    return [
        SyntheticStage("hash", 0.0, matches=True, scores=False),
        SyntheticStage("classifier", 0.3, categories=("flagged", "spam"), errors=True),
        SyntheticStage("llm", 0.6),
    ]


# A score map that halves the classifier's raw score: its probabilities differ visibly from the raw scores.
HALVING = ScoreMap(x=[0.0, 1.0], y=[0.0, 0.5])
SURFACE_SETS = ThresholdSet(
    version="by-surface",
    stages={"classifier": {"flagged": Band(allow_below=0.3, block_at=0.8)}, "llm": {"flagged": Band(block_at=0.9)}},
    surfaces={
        # chat prompts: the classifier never blocks, the LLM decides more
        "chat_prompt": BandSet(
            stages={"classifier": {"flagged": Band(allow_below=0.2, block_at=None)}, "llm": {"flagged": Band()}},
            score_maps={"classifier": {"flagged": HALVING}},
        )
    },
)


async def test_pipeline_picks_the_band_set_by_surface_and_falls_back(tmp_path: Path) -> None:
    """Same texts on three surfaces: chat_prompt gets its own set; an unknown surface and none get the default.
    The replay over cached scores agrees with the live run item by item, band set included."""
    rows = load_labelled([write_dataset(tmp_path / "d.jsonl", 300, seed=4)])
    _, base, _ = admit(rows, Settings(data_dir=tmp_path))
    surfaces = ["chat_prompt", "dm", None]
    items = [
        ContentItem(id=f"{surface}-{item.id}", text=item.text, surface=surface) for surface in surfaces for item in base
    ]
    stages = _stages()
    runner = CascadeRunner(stages, SURFACE_SETS, "p-1")
    verdicts = await runner.run([new_context(item) for item in items])
    n = len(base)
    by_surface = {surface: verdicts[i * n : (i + 1) * n] for i, surface in enumerate(surfaces)}
    assert {v.band_set for v in by_surface["chat_prompt"]} == {"chat_prompt"}
    assert {v.band_set for v in by_surface["dm"] + by_surface[None]} == {"default"}
    assert [v.decision for v in by_surface["dm"]] == [v.decision for v in by_surface[None]]
    assert not any(v.decided_by == "classifier" and v.decision is Decision.BLOCK for v in by_surface["chat_prompt"])
    assert any(v.decided_by == "classifier" and v.decision is Decision.BLOCK for v in by_surface[None])
    for verdict in by_surface["chat_prompt"]:
        raw = verdict.trace[-1].scores.get("flagged")
        if verdict.decided_by == "classifier":
            assert verdict.score == pytest.approx(raw / 2, abs=1e-5), "the chat_prompt set's map gives the score"
    for verdict in by_surface[None]:
        if verdict.decided_by == "classifier":
            assert verdict.score == verdict.trace[-1].scores["flagged"], "no map in the default set: raw"

    live = run_from_verdicts(verdicts, runner.stage_names, [0] * len(verdicts))
    table = await collect_scores(stages, items)
    replay = simulate(table, SURFACE_SETS, surfaces=np.array([i.surface for i in items], dtype=object))
    np.testing.assert_array_equal(replay.decision, live.decision)
    np.testing.assert_array_equal(replay.decided_by, live.decided_by)
    np.testing.assert_array_equal(replay.band_set, live.band_set)
    np.testing.assert_allclose(replay.final_scores["flagged"], live.final_scores["flagged"])


def test_score_maps_keep_a_stage_s_order_on_their_plateaus() -> None:
    plateau = ScoreMap(x=[0.0, 0.5, 1.0], y=[0.2, 0.2, 0.9])
    low, high, top = plateau.probabilities(np.array([0.1, 0.3, 1.0]))
    assert 0.2 - 1e-6 <= low < high <= 0.2 + 1e-6, "ties broken by the raw score, probability kept"
    assert top == pytest.approx(0.9, abs=1e-6) and plateau.probability(0.3) == high


def _scale_table(n: int, rng: np.random.Generator) -> tuple[ScoreTable, LabelMatrix]:
    """Two stages on different raw scales: retrieval's scores are a steep power of a weaker signal."""
    flagged = (rng.random(n) < 0.3).astype(np.int8)

    def stage(name: str, a: float, b: float, power: float) -> StageScores:
        scores = np.where(flagged == 1, rng.beta(a, b, n), rng.beta(b, a, n)) ** power
        zeros = np.zeros(n)
        return StageScores(
            name, "v1", ["flagged"], scores[:, None], zeros.astype(np.int8), zeros.astype(bool), zeros + 1, zeros
        )

    ids = np.char.add(f"c{rng.integers(1 << 62)}-", np.arange(n).astype(str))
    return ScoreTable(ids, [stage("retrieval", 4, 2, 4.0), stage("classifier", 5, 2, 1.0)]), LabelMatrix(
        ["flagged"], flagged[:, None], np.full(n, "s")
    )


def test_scores_share_one_scale_across_stages() -> None:
    """The cascade's score is each deciding stage's calibrated probability: it is reliable whichever
    stage decided, and it ranks at least as well as the classifier alone, where the raw mix does not."""
    rng = np.random.default_rng(1)
    calibration, calibration_labels = _scale_table(4_000, rng)
    population, labels = _scale_table(50_000, rng)
    chosen = choose_thresholds(calibration, calibration_labels, Targets(0.9, 0.05, 0.6, 0.95), "t")
    with_maps = chosen.thresholds.model_copy(update={"score_maps": chosen.score_maps()})
    positive = labels.flagged == 1
    outcome = simulate(population, with_maps)
    score = outcome.final_scores["flagged"]
    for index in (0, 1):
        decided = outcome.decided_by == index
        assert decided.sum() > 5_000, "both stages decide a share of the items"
        for low, high in ((0.0, 0.2), (0.8, 1.0)):
            part = decided & (score >= low) & (score < high + 1e-9)
            if part.sum() > 500:
                assert abs(score[part].mean() - positive[part].mean()) < 0.03, (index, low)
    classifier_alone = auprc(population.stages[1].column("flagged"), positive)
    raw_mix = auprc(simulate(population, chosen.thresholds).final_scores["flagged"], positive)
    assert auprc(score, positive) >= classifier_alone > raw_mix


def _spam_table(n: int, rng: np.random.Generator) -> tuple[ScoreTable, LabelMatrix]:
    """An SMS-like source: the classifier's `flagged` head never learned spam (noise), its `spam` head did."""
    spam = (rng.random(n) < 0.15).astype(np.int8)
    scores = np.column_stack([rng.random(n), np.where(spam == 1, rng.beta(6, 2, n), rng.beta(2, 6, n))])
    zeros = np.zeros(n)
    stage = StageScores(
        "classifier", "v1", ["flagged", "spam"], scores, zeros.astype(np.int8), zeros.astype(bool), zeros + 1, zeros
    )
    ids = np.char.add(f"s{rng.integers(1 << 62)}-", np.arange(n).astype(str))
    return ScoreTable(ids, [stage]), LabelMatrix(["flagged", "spam"], np.column_stack([spam, spam]), np.full(n, "s"))


def test_verdict_score_is_the_largest_calibrated_category_probability() -> None:
    """A row is flagged when any category is violated: where `flagged` is noise and `spam` is not,
    the verdict score ranks by spam, live (`calibrated_score`) and in replay (`final_scores`) alike."""
    rng = np.random.default_rng(3)
    calibration, calibration_labels = _spam_table(4_000, rng)
    population, labels = _spam_table(20_000, rng)
    chosen = choose_thresholds(calibration, calibration_labels, Targets(0.8, 0.2, 0.9, 0.95), "t")
    maps = chosen.score_maps()["classifier"]
    assert set(maps) == {"flagged", "spam"}
    band_set = BandSet(score_maps={"classifier": maps})
    positive = labels.flagged == 1
    score = simulate(population, chosen.thresholds.model_copy(update={"score_maps": {"classifier": maps}}))
    verdict_score = score.final_scores["flagged"]
    assert auprc(verdict_score, positive) > 0.8 > auprc(population.stages[0].column("flagged"), positive) + 0.5
    for i in range(20):
        raw = dict(zip(["flagged", "spam"], population.stages[0].scores[i], strict=True))
        expected = max(maps["flagged"].probability(raw["flagged"]), maps["spam"].probability(raw["spam"]))
        assert band_set.violation_probability("classifier", raw) == pytest.approx(expected)
        assert verdict_score[i] == pytest.approx(expected)
    assert band_set.violation_probability("retrieval", {"flagged": 0.7}) is None, "no maps: the raw score is used"


def _surfaces_table(n: int, rng: np.random.Generator) -> tuple[ScoreTable, LabelMatrix]:
    """'post' is clean and common, 'chat_prompt' noisier with a low base rate, 'dm' rare, 'sms' pure noise."""
    surface = rng.choice(np.array(["post", "chat_prompt", "dm", "sms"], dtype=object), n, p=[0.6, 0.3, 0.005, 0.095])
    rate = np.select([surface == "post", surface == "chat_prompt"], [0.6, 0.15], 0.3)
    flagged = (rng.random(n) < rate).astype(np.int8)
    a = np.select([surface == "post", surface == "chat_prompt"], [8.0, 5.0], 2.0)
    scores = np.where(flagged == 1, rng.beta(a, 2.0), rng.beta(2.0, a))
    zeros = np.zeros(n)
    stage = StageScores(
        "classifier", "v1", ["flagged"], scores[:, None], zeros.astype(np.int8), zeros.astype(bool), zeros + 1, zeros
    )
    ids = np.char.add(f"m{rng.integers(1 << 62)}-", np.arange(n).astype(str))
    return ScoreTable(ids, [stage]), LabelMatrix(["flagged"], flagged[:, None], surface.astype(str), surface)


def test_calibrate_by_surface_certifies_each_surface_and_reports_fallbacks() -> None:
    rng = np.random.default_rng(17)
    population, population_labels = _surfaces_table(150_000, rng)
    table, labels = _surfaces_table(8_000, rng)
    targets = Targets(0.8, 0.1, 0.6, 0.95)
    result = choose_thresholds_by_surface(table, labels, targets, "by-surface")
    assert sorted(result.surfaces) == ["chat_prompt", "post"]
    assert "too few labelled rows" in result.fallbacks["dm"]
    assert "infeasible" in result.fallbacks["sms"]
    # m = default + post + chat_prompt + sms (tried, infeasible); dm was never tried.
    assert result.band_sets_tested == 4 and result.band_set_confidence == pytest.approx(1 - 0.05 / 4)

    decision_set = result.decision_set("by-surface")
    outcome = simulate(population, decision_set, surfaces=population_labels.surfaces)
    pooled = simulate(population, result.default.thresholds)
    flagged = population_labels.flagged == 1
    for surface in ("post", "chat_prompt"):
        rows = population_labels.surfaces == surface
        assert set(outcome.band_set[rows]) == {surface}
        blocked, allowed = outcome.decision[rows] == 1, outcome.decision[rows] == 0
        assert flagged[rows][blocked].mean() >= targets.block_precision, surface
        assert allowed[flagged[rows]].mean() <= targets.max_allow_miss, surface
    chat = population_labels.surfaces == "chat_prompt"
    assert flagged[chat][pooled.decision[chat] == 1].mean() < targets.block_precision, "the pool hides chat_prompt"
    assert set(outcome.band_set[population_labels.surfaces == "dm"]) == {"default"}


@pytest.fixture
def surface_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CASCADE_DATA_DIR", str(tmp_path / "state"))
    monkeypatch.setattr(calibrate_cli, "build_stages", lambda settings, names: _stages())
    source = write_dataset(tmp_path / "base.jsonl", 6_000)
    path = tmp_path / "surfaces.jsonl"
    with source.open() as fh, path.open("w") as out:
        for i, line in enumerate(fh):
            row = json.loads(line)
            row["surface"] = "post" if i % 50 else "dm"  # dm: 2 % of the rows, too few to certify alone
            row["source"] = "shop" if i % 3 == 0 else "forum"
            out.write(json.dumps(row) + "\n")
    return path


def test_calibrate_cli_by_surface_writes_band_sets_and_evaluate_reports_them(
    surface_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "by-surface.yaml"
    result = CliRunner().invoke(
        app,
        [
            *("calibrate", str(surface_data), "-o", str(out), "--by", "surface", "--version", "syn-s"),
            *("--target-block-precision", "0.9", "--max-allow-miss", "0.1", "--max-llm-rate", "0.6"),
        ],
    )
    assert result.exit_code == 0, result.output
    written = ThresholdSet.load(out)
    assert list(written.surfaces) == ["post"] and written.score_maps["classifier"]["flagged"].x
    assert written.surfaces["post"].score_maps["classifier"]["flagged"].x
    by_surface = written.provenance["by_surface"]
    assert by_surface["certified"] == ["post"] and "too few labelled rows" in by_surface["not_certified"]["dm"]
    assert by_surface["band_set_confidence"] == pytest.approx(1 - 0.05 / 2)
    assert written.surfaces["post"].provenance["achieved"]["test"]["block_precision"]["n"] > 0
    assert "surface dm falls back to the default band set: too few labelled rows" in " ".join(result.output.split())
    pooled = CliRunner().invoke(
        app,
        [
            *("calibrate", str(surface_data), "-o", str(out), "--fallback", "escalate"),
            *("--target-block-precision", "0.9", "--max-allow-miss", "0.1", "--max-llm-rate", "0.6"),
        ],
    )
    assert pooled.exit_code == 2 and "--fallback escalate applies to surfaces: add --by surface" in pooled.output

    report_path = tmp_path / "r.json"
    evaluated = CliRunner().invoke(
        app,
        [
            *("evaluate", str(surface_data), "--thresholds", str(out), "--split", "test"),
            *("--json", str(report_path), "--leave-one-source-out"),
        ],
    )
    assert evaluated.exit_code == 0, evaluated.output
    report = json.loads(report_path.read_text())
    assert set(report["per_band_set"]) == {"post", "default"}
    assert report["per_band_set"]["post"]["n"] + report["per_band_set"]["default"]["n"] == report["n"]
    shop = report["per_source"]["shop"]
    assert 0.5 < shop["auprc"] <= 1 and shop["band_sets"] == ["default", "post"]
    assert 0 < shop["auto"]["coverage"] <= 1 and shop["intervals"]["block_precision"]["n"] > 0
    assert set(report["stage_auprc"]) == {"hash", "classifier", "llm"} and report["stage_auprc"]["hash"] is None
    assert 0.5 < shop["stage_auprc"]["classifier"] < 1
    cross = report["leave_one_source_out"]
    assert set(cross) == {"forum", "shop"}
    forum_calibration = [
        r for r in load_labelled([surface_data]) if r.source == "forum" and split_of(r.id) is Split.CALIBRATION
    ]
    assert cross["shop"]["calibrated_without_it"] == len(forum_calibration), "only the other source's rows"
    assert 0.5 < cross["shop"]["auprc"] <= 1 and cross["shop"]["intervals"]["block_precision"]["n"] > 0
    assert "leave one source out" in evaluated.output

    no_targets = tmp_path / "hand.yaml"
    ThresholdSet(version="hand-set").dump(no_targets)
    refused = CliRunner().invoke(
        app, ["evaluate", str(surface_data), "--thresholds", str(no_targets), "--leave-one-source-out"]
    )
    assert refused.exit_code == 2 and "record no calibration targets" in refused.output
    assert "Traceback" not in refused.output


def test_escalating_fallback_settles_nothing_by_score_for_uncertified_surfaces() -> None:
    rng = np.random.default_rng(17)
    table, labels = _surfaces_table(8_000, rng)
    result = choose_thresholds_by_surface(table, labels, Targets(0.8, 0.1, 0.6, 0.95), "t", escalate_fallbacks=True)
    decision_set = result.decision_set("t")
    assert sorted(decision_set.surfaces) == ["chat_prompt", "dm", "post", "sms"]
    assert decision_set.surfaces["sms"].stages == {"classifier": {}}
    outcome = simulate(table, decision_set, surfaces=labels.surfaces)
    for surface in ("dm", "sms"):
        rows = labels.surfaces == surface
        assert set(outcome.band_set[rows]) == {surface} and (outcome.decision[rows] == 2).all(), surface
    post = labels.surfaces == "post"
    assert (outcome.decision[post] != 2).any(), "certified surfaces still decide"
    # Uncertified sets still score on their own scale: maps fitted on their own rows (sms is noise,
    # so its map stays near its base rate); a surface too rare for maps uses the default's.
    sms_map = decision_set.surfaces["sms"].score_maps["classifier"]["flagged"]
    assert max(sms_map.y) - min(sms_map.y) < 0.5 < max(decision_set.score_maps["classifier"]["flagged"].y)
    resolved = decision_set.band_sets()
    assert resolved["sms"].score_maps["classifier"] == decision_set.surfaces["sms"].score_maps["classifier"]
    assert not decision_set.surfaces["dm"].score_maps
    assert resolved["dm"].score_maps["classifier"] == decision_set.score_maps["classifier"]


def test_sample_items_carry_their_surface(tmp_path: Path) -> None:
    labelled = tmp_path / "rows.jsonl"
    sources = ["toxicchat0124", "sms_spam_collection", "my_forum"]
    rows = [{"id": f"r{i}", "text": f"text {i}", "flagged": i % 2, "source": sources[i % 3]} for i in range(300)]
    labelled.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "items.jsonl"
    result = CliRunner().invoke(app, ["sample", str(labelled), "-o", str(out), "-n", "300"])
    assert result.exit_code == 0, result.output
    items = [ContentItem.model_validate_json(line) for line in out.read_text().splitlines()]
    assert items and "flagged" not in out.read_text()
    expected = {"toxicchat0124": "chat_prompt", "sms_spam_collection": "sms", "my_forum": None}
    source_of = {row["id"]: row["source"] for row in rows}
    assert {(source_of[item.id], item.surface) for item in items} == set(expected.items())


@given(
    knots=st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1)), min_size=1, max_size=12),
    scores=st.lists(st.floats(-0.5, 1.5), min_size=1, max_size=20),
)
def test_one_score_maps_bit_for_bit_as_the_vector_calibration_does(
    knots: list[tuple[float, float]], scores: list[float]
) -> None:
    """A verdict's score (one item) and the calibration's simulation (numpy, all items) must agree exactly."""
    xs = sorted(k[0] for k in knots)
    xs = [xs[0], *xs[:-1]] if len(xs) > 2 else xs  # a repeated knot: a plateau's edge
    score_map = ScoreMap(x=xs, y=sorted(k[1] for k in knots))
    probes = [*scores, *xs, 0.0, 1.0]
    assert [score_map.probability(s) for s in probes] == score_map.probabilities(np.array(probes)).tolist()
