"""`cascade evaluate`: the replay equals a live run, the report keys, the plots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from synthetic_scores import SyntheticStage, write_dataset
from typer.testing import CliRunner

import cascade.cli.calibrate as calibrate_cli
from cascade.cli import app
from cascade.data import LabelledItem, Split, load_labelled, split_of
from cascade.evaluation import leakage_warnings
from cascade.hashbank import EntryInput, HashBank, Polarity
from cascade.pipeline import CascadeRunner, new_context
from cascade.scoring import admit, collect_scores
from cascade.settings import Settings
from cascade.simulation import run_from_verdicts, simulate, simulate_shadow
from cascade.thresholds import Band, ThresholdSet


def _stages() -> list[SyntheticStage]:
    return [
        SyntheticStage("hash", 0.0, matches=True, scores=False),
        SyntheticStage("classifier", 0.3, categories=("flagged", "spam"), errors=True),
        SyntheticStage("llm", 0.6),
    ]


THRESHOLD_SETS = {
    "typical": {
        "classifier": {"flagged": Band(allow_below=0.3, block_at=0.8), "spam": Band(allow_below=0.25, block_at=0.9)},
        "llm": {"flagged": Band(allow_below=0.2, block_at=0.8)},
    },
    "open_edges": {
        "hash": {},
        "classifier": {"flagged": Band(allow_below=0.2, block_at=None), "spam": Band(allow_below=None, block_at=0.7)},
        "llm": {"flagged": Band(allow_below=None, block_at=0.9)},
    },
    "unscored_category": {  # nothing scores toxic: the classifier can block but never clear
        "classifier": {"flagged": Band(allow_below=0.4, block_at=0.7), "toxic": Band(allow_below=0.5, block_at=0.6)},
    },
}


@pytest.mark.parametrize("name", sorted(THRESHOLD_SETS))
async def test_replay_equals_a_live_cascade_run(name: str, tmp_path: Path) -> None:
    rows = load_labelled([write_dataset(tmp_path / "d.jsonl", 700, seed=11)])
    _, items, _ = admit(rows, Settings(data_dir=tmp_path))
    primary = ThresholdSet(version=name, stages=THRESHOLD_SETS[name])
    shadow = ThresholdSet(version="shadow", stages=THRESHOLD_SETS["typical" if name != "typical" else "open_edges"])
    stages = _stages()
    runner = CascadeRunner(stages, primary, "p-1", shadow)
    verdicts, batch_of = [], []
    for number, start in enumerate(range(0, len(items), 50)):
        batch = [new_context(item) for item in items[start : start + 50]]
        verdicts.extend(await runner.run(batch))
        batch_of.extend([number] * len(batch))
    live = run_from_verdicts(verdicts, runner.stage_names, batch_of, ["flagged", "spam"])

    table = await collect_scores(stages, items, batch_size=64)
    replay = simulate(table, primary, ["flagged", "spam"])
    assert len(set(live.decision.tolist())) == (3 if name == "typical" else 2), "decisions are not trivial"
    np.testing.assert_array_equal(replay.decision, live.decision)
    np.testing.assert_array_equal(replay.decided_by, live.decided_by)
    np.testing.assert_array_equal(replay.reached, live.reached)
    np.testing.assert_array_equal(replay.errored, live.errored)
    for category in ("flagged", "spam"):
        np.testing.assert_array_equal(replay.final_scores[category], live.final_scores[category])
    live_shadow = [{"allow": 0, "block": 1, "review": 2}[v.shadow.decision.value] for v in verdicts if v.shadow]
    np.testing.assert_array_equal(simulate_shadow(table, replay, shadow), live_shadow)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """State dir, thresholds calibrated on a synthetic file, and a held-out file with an unseen category."""
    root = tmp_path_factory.mktemp("evaluate")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CASCADE_DATA_DIR", str(root / "state"))
        patch.setattr(calibrate_cli, "build_stages", lambda settings, names: _stages())
        train = write_dataset(root / "labelled.jsonl", 4_000)
        thresholds = root / "t.yaml"
        result = CliRunner().invoke(
            app,
            [
                *("calibrate", str(train), "-o", str(thresholds), "--version", "syn-1"),
                *("--target-block-precision", "0.9", "--max-allow-miss", "0.1", "--max-llm-rate", "0.6"),
            ],
        )
    assert result.exit_code == 0, result.output
    return root, thresholds, write_dataset(root / "heldout.jsonl", 600, seed=9, extra_category="sexual")


@pytest.fixture
def cli_env(calibrated: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    root, thresholds, heldout = calibrated
    monkeypatch.setenv("CASCADE_DATA_DIR", str(root / "state"))
    monkeypatch.setattr(calibrate_cli, "build_stages", lambda settings, names: _stages())
    return thresholds, heldout


REPORT_KEYS = {
    "n",
    "decisions",
    "stages",
    "llm_rate",
    "auto",
    "review_as_human",
    "review_as_allow",
    "auprc",
    "cost_relative_to_all_llm",
    "latency_ms",
    "per_category",
}


def _evaluate(*args: str) -> dict[str, object]:
    result = CliRunner().invoke(app, ["evaluate", *args])
    assert result.exit_code == 0, result.output
    return result


def test_evaluate_report_keys_plots_and_unseen_categories(cli_env: tuple[Path, Path], tmp_path: Path) -> None:
    thresholds, heldout = cli_env
    shadow = tmp_path / "shadow.yaml"
    ThresholdSet(version="shadow-1", stages={"classifier": {"flagged": Band(allow_below=0.1, block_at=0.95)}}).dump(
        shadow
    )
    report_path, plots = tmp_path / "report.json", tmp_path / "plots"
    result = _evaluate(
        str(heldout),
        *("--thresholds", str(thresholds), "--shadow-thresholds", str(shadow)),
        *("--json", str(report_path), "--plots", str(plots)),
    )
    report = json.loads(report_path.read_text())
    assert set(report) >= REPORT_KEYS
    assert report["n"] == 600 and report["thresholds_version"] == "syn-1"
    assert set(report["decisions"]) == {"allow", "block", "review"}
    assert sum(report["decisions"].values()) == pytest.approx(1.0)
    assert set(report["stages"]) == {"hash", "classifier", "llm"}
    assert report["stages"]["hash"]["reached"] == 1.0
    for stage in report["stages"].values():
        assert stage["reached"] == pytest.approx(stage["decided"] + stage["escalated"]) and stage["errors"] >= 0
    assert report["llm_rate"] == report["stages"]["classifier"]["escalated"]
    assert set(report["auto"]) == {"coverage", "precision", "recall", "f1"}
    assert report["auto"]["precision"] > 0.85 and 0.5 < report["auprc"] <= 1
    assert 0 < report["cost_relative_to_all_llm"] < 1
    assert set(report["latency_ms"]["classifier"]) == {"p50", "p95", "p99"}
    assert report["per_category"]["spam"]["calibrated"] is True
    assert report["per_source"]["synthetic"]["n"] == 600
    unseen = report["per_category"]["sexual"]
    assert unseen["calibrated"] is False and unseen["positives"] > 0 and unseen["auprc_score"] == "flagged"
    assert 0 <= report["shadow"]["agreement"] <= 1 and report["shadow"]["thresholds_version"] == "shadow-1"
    assert report["frontier"] and all(0 <= p["f1_review_as_human"] <= 1 for p in report["frontier"])
    for name in ("pr_curves.png", "reliability.png", "cost_f1_frontier.png"):
        assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert "per category" in result.output and "sexual" in result.output
    assert report["stale_stages"] == [] and "calibrated on" not in result.output


def test_live_run_reports_the_same_figures_as_the_replay(cli_env: tuple[Path, Path], tmp_path: Path) -> None:
    thresholds, heldout = cli_env
    replay, live = tmp_path / "replay.json", tmp_path / "live.json"
    _evaluate(str(heldout), "--thresholds", str(thresholds), "--json", str(replay))
    _evaluate(str(heldout), "--thresholds", str(thresholds), "--json", str(live), "--live")
    a, b = json.loads(replay.read_text()), json.loads(live.read_text())
    assert (a["mode"], b["mode"]) == ("replay", "live")
    for key in ("n", "decisions", "stages", "llm_rate", "auto", "review_as_human", "review_as_allow", "auprc"):
        assert a[key] == b[key], key
    assert a["per_category"]["spam"]["auto"] == b["per_category"]["spam"]["auto"]


def test_evaluate_warns_when_scoring_calibration_data(cli_env: tuple[Path, Path]) -> None:
    thresholds, _ = cli_env
    calibration_data = thresholds.parent / "labelled.jsonl"
    result = _evaluate(str(calibration_data), "--thresholds", str(thresholds), "--split", "calibration")
    assert "were calibrated on this data" in " ".join(result.output.split())
    honest = _evaluate(str(calibration_data), "--thresholds", str(thresholds), "--split", "test")
    assert "were calibrated on this data" not in honest.output


def test_evaluate_warns_when_a_stage_changed_since_calibration(
    cli_env: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    thresholds, heldout = cli_env
    retrained = _stages()
    retrained[1].version = "synthetic-retrained"
    monkeypatch.setattr(calibrate_cli, "build_stages", lambda settings, names: retrained)
    report_path = tmp_path / "r.json"
    result = _evaluate(str(heldout), "--thresholds", str(thresholds), "--json", str(report_path))
    assert "were calibrated on classifier synthetic-0.3, this is synthetic-retrained" in " ".join(result.output.split())
    assert len(json.loads(report_path.read_text())["stale_stages"]) == 1


def test_leakage_warnings_name_train_rows_and_banked_rows(tmp_path: Path) -> None:
    train_ids = [i for i in (f"row-{n}" for n in range(200)) if split_of(i) is Split.TRAIN][:3]
    test_ids = [i for i in (f"row-{n}" for n in range(200)) if split_of(i) is Split.TEST][:7]
    rows = [LabelledItem(i, f"ordinary text number {i}", 0) for i in [*train_ids, *test_ids]]
    assert leakage_warnings(rows[3:], tmp_path) == []  # test rows, no bank file: nothing to say

    bank = HashBank.open(tmp_path)
    bank.upsert([EntryInput("b-1", rows[5].text.upper(), Polarity.BAD, ("spam",))], "tester")  # a normalised copy
    bank.close()
    warnings = leakage_warnings(rows, tmp_path)
    assert len(warnings) == 2
    assert warnings[0].startswith("3 of 10 rows (30%) are in the train split")
    assert warnings[1].startswith("1 of 10 rows (10%) are in the hash bank")
