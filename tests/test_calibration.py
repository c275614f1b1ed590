"""`cascade calibrate`: the Learn-then-Test guarantee, infeasible targets, the written file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy.stats import binom
from synthetic_scores import SyntheticStage, synthetic_table, write_dataset
from typer.testing import CliRunner

import cascade.cli.calibrate as calibrate_cli
from cascade.calibration import (
    CalibrationMap,
    Family,
    InfeasibleTargets,
    Targets,
    choose_thresholds,
    fit_half,
    fit_maps,
    level_grid,
    rows_to_certify,
)
from cascade.cli import app
from cascade.evaluation import guarantee_metrics
from cascade.scoring import LabelMatrix, ScoreTable, StageScores
from cascade.simulation import simulate
from cascade.thresholds import Band, ThresholdSet

TARGETS = Targets(block_precision=0.9, max_allow_miss=0.05, max_llm_rate=0.5, confidence=0.9)


def _holds(values: dict[str, dict[str, object]], targets: Targets) -> bool:
    precision = values["block_precision"]["value"]
    return (
        (precision is None or precision >= targets.block_precision)
        and values["allow_miss"]["value"] <= targets.max_allow_miss
        and values["llm_rate"]["value"] <= targets.max_llm_rate
    )


def _plug_in_choice(table, labels, targets: Targets) -> ThresholdSet:  # type: ignore[no-untyped-def]
    """The naive rule LTT replaces: the cheapest candidate whose *empirical* risks meet the targets."""
    fitting = fit_half(table.ids)
    maps = fit_maps(table.take(np.flatnonzero(fitting)), labels.take(np.flatnonzero(fitting)))
    family = Family.build(table.stage_names, maps, level_grid(), level_grid())
    counts = family.counts(table, labels.flagged)
    r_hat, _ = counts.risks()
    ok = np.flatnonzero((r_hat <= targets.alphas[:, None]).all(axis=0))
    llm, reviews = counts.cost_key()
    return family.thresholds(int(ok[np.lexsort((reviews[ok], llm[ok]))[0]]), "plug-in")


@pytest.mark.slow
def test_guarantee_holds_across_random_calibration_sets() -> None:
    """Over many independent calibration sets, the chosen bands meet every target on the
    population at least `confidence` of the time; the plug-in rule, which ignores sampling
    error, fails far more often (so this test can tell the two apart)."""
    rng = np.random.default_rng(20261127)
    population, population_labels = synthetic_table(60_000, rng)
    trials, failures, plug_in_failures = 40, 0, 0
    for _ in range(trials):
        table, labels = synthetic_table(2_000, rng)
        chosen = choose_thresholds(table, labels, TARGETS, "t").thresholds
        truth = guarantee_metrics(simulate(population, chosen), population_labels.flagged, TARGETS.confidence)
        failures += not _holds(truth, TARGETS)
        naive = _plug_in_choice(table, labels, TARGETS)
        naive_truth = guarantee_metrics(simulate(population, naive), population_labels.flagged, TARGETS.confidence)
        plug_in_failures += not _holds(naive_truth, TARGETS)
    # Allowed failures: the 99th percentile of Binomial(trials, δ), so a correct method passes.
    allowed = int(binom.ppf(0.99, trials, TARGETS.delta))
    assert failures <= allowed, f"{failures}/{trials} calibrations broke a target (allowed {allowed})"
    assert plug_in_failures > allowed, f"plug-in failed only {plug_in_failures}/{trials}: the check has no power"


def test_family_counts_match_the_written_threshold_set() -> None:
    """The counts LTT tests for the chosen candidate are those of the file it writes (cut rounding included)."""
    rng = np.random.default_rng(3)
    table, labels = synthetic_table(3_000, rng, llm=True)
    calibrated = choose_thresholds(
        table, labels, Targets(0.95, 0.03, 0.3, 0.95), "t", levels=level_grid(), llm_levels=level_grid()
    )
    assert calibrated.thresholds.bands("llm"), "the LLM stage gets its own band"
    counts = calibrated.family.counts(table, labels.flagged)
    k1, k2 = divmod(calibrated.chosen, counts.blocks.shape[1])
    outcome = simulate(table, calibrated.thresholds)
    assert counts.blocks[k1, k2] == (outcome.decision == 1).sum()
    assert counts.llm_calls[k1] == outcome.llm_calls.sum()
    assert counts.missed[k1, k2] == ((outcome.decision == 0) & (labels.flagged == 1)).sum()
    assert counts.reviews[k1, k2] == (outcome.decision == 2).sum()


def test_infeasible_targets_name_the_best_trade_off() -> None:
    table, labels = synthetic_table(2_000, np.random.default_rng(5))
    with pytest.raises(InfeasibleTargets) as raised:
        choose_thresholds(table, labels, Targets(0.999, 0.001, 0.05, 0.95), "t")
    message = str(raised.value)
    assert "infeasible" in message and "Closest trade-off: block precision" in message
    closest = raised.value.best["closest"]
    assert 0 < closest["block_precision"] < 0.999 or closest["llm_rate"] > 0.05


@pytest.mark.parametrize("level", [0.0, 0.05, 0.3, 0.5, 0.77, 0.99, 1.0])
def test_raw_cut_inverts_the_calibration_map(level: float) -> None:
    rng = np.random.default_rng(1)
    scores = rng.random(500)
    cal = CalibrationMap.fit(scores, (rng.random(500) < scores**2).astype(int))
    cut = cal.raw_cut(level)
    grid = np.linspace(0, 1, 2001)
    reaching = grid[cal(grid) >= level]
    if cut is None:
        assert reaching.size == 0
    else:
        assert reaching.size and abs(reaching.min() - cut) <= 1e-3 and cal(np.array([cut]))[0] >= level - 1e-9


def _stages() -> list[SyntheticStage]:
    return [
        SyntheticStage("hash", 0.0, matches=True, scores=False),
        SyntheticStage("classifier", 0.3, categories=("flagged", "spam"), errors=True),
        SyntheticStage("llm", 0.6),
    ]


@pytest.fixture
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CASCADE_DATA_DIR", str(tmp_path / "state"))
    monkeypatch.setattr(calibrate_cli, "build_stages", lambda settings, names: _stages())
    return write_dataset(tmp_path / "labelled.jsonl", 4_000)


def test_calibrate_cli_writes_provenance(cli_env: Path, tmp_path: Path) -> None:
    out = tmp_path / "thresholds" / "synthetic.yaml"
    args = ["calibrate", str(cli_env), "-o", str(out), "--version", "syn-1"]
    targets = ["--target-block-precision", "0.9", "--max-allow-miss", "0.1", "--max-llm-rate", "0.6"]
    result = CliRunner().invoke(app, [*args, *targets])
    assert result.exit_code == 0, result.output
    written = ThresholdSet.load(out)
    assert written.version == "syn-1" and written.stages["hash"] == {}
    assert set(written.stages["classifier"]) >= {"flagged"}
    prov = yaml.safe_load(out.read_text())["provenance"]
    assert prov["data"][0]["sha256"] and prov["data"][0]["rows"] == 4_000
    assert prov["targets"]["confidence"] == 0.95
    assert {s["name"] for s in prov["stages"]} == {"hash", "classifier", "llm"}
    test = prov["achieved"]["test"]
    assert test["block_precision"]["value"] >= 0.85 and len(test["block_precision"]["ci"]) == 2
    assert prov["libraries"]["mapie"] and written.score_maps["classifier"]["flagged"].x
    # The second run reuses the cached scores.
    again = CliRunner().invoke(app, [*args, *targets, "-o", str(tmp_path / "again.yaml")])
    assert again.exit_code == 0 and "from the score cache" in again.output


def test_calibrate_cli_infeasible_exits_2_without_a_file(cli_env: Path, tmp_path: Path) -> None:
    out = tmp_path / "impossible.yaml"
    result = CliRunner().invoke(
        app,
        [
            *("calibrate", str(cli_env), "-o", str(out)),
            *("--target-block-precision", "0.999", "--max-allow-miss", "0.001", "--max-llm-rate", "0.01"),
        ],
    )
    assert result.exit_code == 2
    assert "infeasible" in result.output and "No file written" in result.output
    assert not out.exists()


def _two_sources(n: int, rng: np.random.Generator) -> tuple[ScoreTable, LabelMatrix]:
    """A mix where a pooled guarantee hides a weak source: 'hard' is rarer, noisier and low in base rate."""
    hard = rng.random(n) < 0.3
    flagged = (rng.random(n) < np.where(hard, 0.15, 0.6)).astype(np.int8)
    a, b = np.where(hard, 5.0, 8.0), 2.0
    scores = np.where(flagged == 1, rng.beta(a, b), rng.beta(b, a))
    stage = StageScores(
        "classifier",
        "v1",
        ["flagged"],
        scores[:, None],
        np.zeros(n, np.int8),
        np.zeros(n, bool),
        np.ones(n),
        np.zeros(n),
    )
    ids = np.char.add(f"m{rng.integers(1 << 62)}-", np.arange(n).astype(str))
    return ScoreTable(ids, [stage]), LabelMatrix(["flagged"], flagged[:, None], np.where(hard, "hard", "easy"))


def test_per_source_certification_protects_the_weak_source() -> None:
    rng = np.random.default_rng(17)
    population, population_labels = _two_sources(100_000, rng)
    table, labels = _two_sources(6_000, rng)
    targets = Targets(0.8, 0.1, 0.6, 0.95)
    hard = population_labels.sources == "hard"

    def hard_figures(thresholds: ThresholdSet) -> tuple[float, float]:
        outcome = simulate(population, thresholds)
        flagged = population_labels.flagged[hard] == 1
        blocked, allowed = outcome.decision[hard] == 1, outcome.decision[hard] == 0
        return float(flagged[blocked].mean()), float(allowed[flagged].mean())

    pooled = choose_thresholds(table, labels, targets, "pooled")
    stratified = choose_thresholds(table, labels, targets, "stratified", per_source=True)
    assert stratified.certified_sources == ["easy", "hard"] and pooled.certified_sources == []
    precision, miss = hard_figures(pooled.thresholds)
    assert precision < targets.block_precision and miss > targets.max_allow_miss, "the mix hides a weak source"
    precision, miss = hard_figures(stratified.thresholds)
    assert precision >= targets.block_precision and miss <= targets.max_allow_miss
    overall = guarantee_metrics(simulate(population, stratified.thresholds), population_labels.flagged, 0.95)
    assert _holds(overall, targets)


def test_rows_to_certify_follows_the_hoeffding_bentkus_bound() -> None:
    # With no errors observed, Hoeffding–Bentkus reduces to (1 - target)^n <= δ: 0.95^59 < 0.05 < 0.95^58.
    assert rows_to_certify(0.05, 0.95) == 59
    assert rows_to_certify(0.05, 1 - 0.05 / 4) == 86  # Bonferroni over 4 band sets: δ/4
    with_errors = rows_to_certify(0.05, 0.95, observed=0.02)
    assert with_errors is not None and with_errors > 59
    assert rows_to_certify(0.05, 0.95, observed=0.05) is None, "an observed risk at the target never certifies"


def test_calibrate_cli_hand_set_band_fills_only_uncalibrated_stages(
    cli_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(calibrate_cli, "build_stages", lambda settings, names: _stages()[:2])  # no LLM stage
    targets = ["--target-block-precision", "0.9", "--max-allow-miss", "0.1", "--max-llm-rate", "0.6"]
    out = tmp_path / "hand.yaml"
    result = CliRunner().invoke(
        app,
        [
            *("calibrate", str(cli_env), "-o", str(out), *targets),
            *("--hand-set-band", "llm.flagged=0.5:0.5", "--hand-set-band", "classifier.flagged=:0.99"),
        ],
    )
    assert result.exit_code == 0, result.output
    written = ThresholdSet.load(out)
    assert written.stages["llm"] == {"flagged": Band(allow_below=0.5, block_at=0.5)}
    assert written.stages["classifier"]["flagged"].allow_below is not None, "a calibrated band is never replaced"
    assert set(written.provenance["hand_set_bands"]["bands"]) == {"llm"}
    for bad in ("llm.flagged=0.7:0.2", "llm.flagged", "lm.flagged=0.5:0.5", "llm.flaged=0.5:0.5"):
        refused = CliRunner().invoke(app, ["calibrate", str(cli_env), "-o", str(out), *targets, "--hand-set-band", bad])
        assert refused.exit_code == 2 and "--hand-set-band" in refused.output, bad
        assert "Traceback" not in refused.output
