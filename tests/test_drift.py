"""Drift monitor, audit precision and `cascade drift` on a stream whose source mix shifts halfway.

The real classifier stage (shipped model, MiniLM ONNX embeddings) scores Davidson tweets from
the calibration split for the reference; the replayed stream is Davidson test-split tweets
(surface `post`), then ToxicChat test-split prompts (surface `chat_prompt`), through the stream
worker's own `StageProcessor` and its metrics hook, batch by batch.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import yaml
from model_cache import model_cache_dir  # noqa: F401  (fixture)
from prometheus_client import REGISTRY
from synthetic_scores import SyntheticStage, synthetic_table, write_dataset
from typer.testing import CliRunner

import cascade.cli.calibrate as calibrate_cli
from cascade.assembly import build_stages
from cascade.cli import app
from cascade.contract import ContentItem, Decision, StageAction, TraceEntry, Verdict
from cascade.data import LabelledItem, Split, load_labelled, split_of
from cascade.drift import (
    ALL_SURFACES,
    PSI_ALERT,
    AuditPrecision,
    DriftMonitor,
    Reference,
    ScoreSketch,
    StageReference,
    SurfaceLimit,
    audited,
    rows_to_label,
    wilson,
)
from cascade.pipeline import CascadeRunner
from cascade.scoring import ScoreTable, collect_scores
from cascade.settings import Settings
from cascade.stream import metrics
from cascade.stream.processor import Record, StageProcessor
from cascade.stream.topics import Topics
from cascade.thresholds import ThresholdSet

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
REFERENCE_ROWS, HALF, BATCH = 400, 250, 25
WINDOW = MIN_ITEMS = 200
AUDIT_SHARE = 0.6
TOPICS = Topics("drift.")


def _rows(name: str, split: Split, n: int) -> list[LabelledItem]:
    return load_labelled([SHARED_DATA / name], split)[:n]


@dataclass
class Replay:
    thresholds: ThresholdSet
    rows: list[LabelledItem]  # the stream, in order: HALF Davidson, then HALF ToxicChat
    psi: list[dict[str, float | None]] = field(default_factory=list)  # after each batch, by surface
    verdicts: dict[str, Verdict] = field(default_factory=dict)
    verdict_messages: int = 0
    audits: list[Verdict] = field(default_factory=list)


def _gauge(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


@pytest.fixture(scope="module")
def replay(model_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replay]:  # noqa: F811
    data_dir = tmp_path_factory.mktemp("drift")
    (data_dir / "models").symlink_to(model_cache_dir, target_is_directory=True)
    settings = Settings(data_dir=data_dir, audit_share=AUDIT_SHARE)
    shipped = ThresholdSet.load(Settings().thresholds)
    thresholds = ThresholdSet(
        version="drift-test",
        provenance={"targets": shipped.provenance["targets"]},
        stages={"classifier": dict(shipped.bands("classifier"))},
    )
    stages = build_stages(settings, ["classifier"])
    reference_items = [
        ContentItem(id=r.id, text=r.text) for r in _rows("davidson_tweets.jsonl", Split.CALIBRATION, REFERENCE_ROWS)
    ]
    rows = [
        *_rows("davidson_tweets.jsonl", Split.TEST, HALF),
        *_rows("toxicchat_train.jsonl", Split.TEST, HALF),
    ]
    surface = {"davidson2017": "post"}

    async def run() -> Replay:
        table = await collect_scores(stages, reference_items)
        # What `cascade calibrate` writes into the file it produces.
        thresholds.provenance["reference"] = Reference.of(table, thresholds).to_doc()
        metrics.start_drift(thresholds, WINDOW, MIN_ITEMS, max_surfaces=4)
        runner = CascadeRunner(stages, thresholds, policy_version="test")
        processor = StageProcessor(runner, 0, TOPICS, settings)
        result = Replay(thresholds, rows)
        for start in range(0, len(rows), BATCH):
            records = [
                Record(
                    r.id.encode(),
                    json.dumps({"id": r.id, "text": r.text, "surface": surface.get(r.source, "chat_prompt")}).encode(),
                    f"replay@{start + i}",
                )
                for i, r in enumerate(rows[start : start + BATCH])
            ]
            for message in await processor.process(records):
                verdict = Verdict.model_validate_json(message.value)
                if message.topic == TOPICS.audit:
                    result.audits.append(verdict)
                else:
                    assert message.topic in TOPICS.all_verdicts, message.topic
                    result.verdict_messages += 1
                    result.verdicts[verdict.id] = verdict
            result.psi.append(
                {
                    s: _gauge("cascade_drift_psi", stage="classifier", category="flagged", surface=s)
                    for s in (ALL_SURFACES, "post", "chat_prompt")
                }
            )
        await runner.aclose()
        return result

    yield asyncio.run(run())
    metrics.start_drift(ThresholdSet(version="none"), WINDOW, MIN_ITEMS, 4)  # later tests: no drift monitor


def test_every_replayed_item_gets_exactly_one_verdict(replay: Replay) -> None:
    assert replay.verdict_messages == len(replay.rows) == len(replay.verdicts)


def test_drift_crosses_the_alert_threshold_after_the_shift_and_not_before(replay: Replay) -> None:
    shift = HALF // BATCH  # batches before the first ToxicChat item
    overall = [p[ALL_SURFACES] for p in replay.psi]
    before = [p for p in overall[:shift] if p is not None]
    assert before, "the window should have filled before the shift"
    assert max(before) < PSI_ALERT, before
    crossed = [i for i, p in enumerate(overall) if p is not None and p >= PSI_ALERT]
    assert crossed and crossed[0] >= shift and overall[-1] >= PSI_ALERT, overall
    # Per surface: the tweets' own window never moved; the prompts' window is far off the reference.
    assert max(p["post"] for p in replay.psi if p["post"] is not None) < PSI_ALERT
    assert replay.psi[-1]["chat_prompt"] is not None and replay.psi[-1]["chat_prompt"] >= PSI_ALERT


def test_reference_figures_are_exported_for_comparison(replay: Replay) -> None:
    reference = Reference.from_thresholds(replay.thresholds)
    assert reference is not None
    assert _gauge("cascade_reference_rate", rate="review") == pytest.approx(reference.review_rate)
    shares = {r: _gauge("cascade_reference_stage_share", stage="classifier", result=r) for r in ("allow", "block")}
    assert shares == pytest.approx({r: reference.stages["classifier"].results[r] for r in shares})
    assert _gauge("cascade_audit_block_precision_target") == replay.thresholds.provenance["targets"]["block_precision"]
    live = {r: _gauge("cascade_drift_stage_share", stage="classifier", surface="chat_prompt", result=r) for r in shares}
    assert sum(live.values()) <= 1 and all(v is not None for v in live.values())


def test_audit_sample_is_a_share_of_automatic_decisions_only(replay: Replay) -> None:
    automatic = [v for v in replay.verdicts.values() if v.decision is not Decision.REVIEW]
    assert all(a.decision is not Decision.REVIEW for a in replay.audits)
    assert {a.id for a in replay.audits} == {v.id for v in automatic if audited(v.id, AUDIT_SHARE)}
    assert 0.35 < len(replay.audits) / len(automatic) < 0.65


def test_audit_precision_interval_covers_the_true_precision_after_the_shift(replay: Replay) -> None:
    label = {r.id: r.flagged for r in replay.rows[HALF:]}
    human = {i: Decision.BLOCK if flagged else Decision.ALLOW for i, flagged in label.items()}
    estimator = AuditPrecision(size=10_000)
    estimator.extend((a.decision, human[a.id]) for a in replay.audits if a.id in human)
    metrics.export_audit(estimator)
    blocks = [v for v in replay.verdicts.values() if v.id in label and v.decision is Decision.BLOCK]
    true_precision = sum(label[v.id] for v in blocks) / len(blocks)
    low, high = (_gauge("cascade_audit_block_precision", bound=b) for b in ("low", "high"))
    assert estimator.audited_blocks >= 10 and _gauge("cascade_audit_blocks") == estimator.audited_blocks
    assert low is not None and high is not None
    assert low <= true_precision <= high, (low, true_precision, high, estimator.audited_blocks, len(blocks))
    # Below the certified 0.95: the alert "audit precision below target" compares `high` with the target.
    assert true_precision < replay.thresholds.provenance["targets"]["block_precision"]


def _write_log(path: Path, verdicts: list[Verdict]) -> Path:
    path.write_text("".join(v.model_dump_json() + "\n" for v in verdicts) + "not a verdict\n", encoding="utf-8")
    return path


def test_cascade_drift_names_what_moved_and_how_many_rows_to_label(replay: Replay, tmp_path: Path) -> None:
    thresholds = tmp_path / "thresholds.yaml"
    replay.thresholds.dump(thresholds)
    ordered = [replay.verdicts[r.id] for r in replay.rows]
    log = _write_log(tmp_path / "verdicts.jsonl", ordered)
    report_path, plots = tmp_path / "drift.json", tmp_path / "plots"
    args = ["drift", str(log), "--thresholds", str(thresholds), "--json", str(report_path), "--plots", str(plots)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    moved = {(m["stage"], m["category"]) for m in report["moved"]}
    assert ("classifier", "flagged") in moved
    assert "MOVED" in result.output and "classifier/flagged" in result.output
    assert report["rows_to_label"] and f"{report['rows_to_label']:,}" in result.output
    assert (plots / "drift.png").stat().st_size > 0
    assert report["items"] == len(ordered)

    # The tweets alone look like the reference: nothing moved.
    calm = _write_log(tmp_path / "calm.jsonl", ordered[:HALF])
    result = CliRunner().invoke(app, ["drift", str(calm), "--thresholds", str(thresholds), "--min-items", "100"])
    assert result.exit_code == 0, result.output
    assert "No stage or category moved" in result.output


def test_cascade_drift_operator_errors_exit_2_with_one_line(tmp_path: Path) -> None:
    bare = tmp_path / "bare.yaml"
    ThresholdSet(version="old").dump(bare)
    log = tmp_path / "v.jsonl"
    log.write_text("", encoding="utf-8")
    cases = {
        ("drift", "--thresholds", str(bare)): "not both and not neither",
        ("drift", str(log), "--thresholds", str(bare)): "no drift reference",
        ("drift", str(log), "--broker", "127.0.0.1:9"): "not both and not neither",
        ("drift", str(log), "--thresholds", str(tmp_path / "nope.yaml")): "thresholds file not found",
        ("drift", str(log), "--since", "yesterday"): "--since/--until",
    }
    for args, message in cases.items():
        result = CliRunner().invoke(app, list(args))
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output and "Traceback" not in result.output, (args, result.output)


# Unit behaviour of the pieces, on known distributions.


def test_psi_is_small_for_the_same_distribution_and_large_for_a_shifted_one() -> None:
    rng = np.random.default_rng(1)
    sketch = ScoreSketch.of(rng.beta(2, 5, 5000))
    assert sketch is not None and len(sketch.shares) == 10
    same = np.bincount([sketch.bin(s) for s in rng.beta(2, 5, 1000)], minlength=10)
    shifted = np.bincount([sketch.bin(s) for s in rng.beta(5, 2, 1000)], minlength=10)
    assert sketch.psi(same) < 0.05 and sketch.psi(shifted) > 1.0
    assert sketch.ks(same) < 0.05 and sketch.ks(shifted) > 0.5


def test_point_masses_merge_bins_and_the_sketch_round_trips() -> None:
    scores = np.concatenate([np.zeros(600), np.linspace(0, 1, 300), np.ones(100)])
    sketch = ScoreSketch.of(scores)
    assert sketch is not None and all(s > 0 for s in sketch.shares) and sum(sketch.shares) == pytest.approx(1)
    assert ScoreSketch.from_doc(yaml.safe_load(yaml.safe_dump(sketch.to_doc()))) == sketch
    assert ScoreSketch.of(np.ones(10)) is None  # too few to be a reference


def _entry(score: float, result: StageAction = StageAction.ESCALATE) -> TraceEntry:
    return TraceEntry(stage="classifier", stage_version="v", scores={"flagged": score}, result=result, latency_ms=1)


def test_monitor_windows_slide_and_bound_the_surfaces() -> None:
    rng = np.random.default_rng(2)
    sketch = ScoreSketch.of(rng.random(1000))
    assert sketch is not None
    reference = Reference(1000, {"classifier": StageReference(1.0, {}, {"flagged": sketch})}, {}, {}, 0.0, 0.0)
    monitor = DriftMonitor(reference, size=100, min_items=50, surfaces=SurfaceLimit(1))
    for score in rng.random(150):
        monitor.observe("classifier", "post", _entry(float(score)))
    assert monitor.observe("classifier", "sms", _entry(0.5)) == [("classifier", ALL_SURFACES)]  # over the cap
    assert monitor.observe("llm", "post", _entry(0.5)) == []  # a stage without a reference
    window = monitor.windows[("classifier", ALL_SURFACES)]
    assert len(window) == 100 and window.scored("flagged") == 100
    assert window.psi(min_items=50)["flagged"] < PSI_ALERT
    for _ in range(100):  # the window forgets the old items: only the new, shifted ones remain
        monitor.observe("classifier", None, _entry(0.99, StageAction.BLOCK))
    assert window.psi(min_items=50)["flagged"] > 2 and window.result_shares()["block"] == 1.0
    assert monitor.windows[("classifier", "post")].scored("flagged") == 100


def test_audit_sampling_is_deterministic_and_uniform() -> None:
    ids = [f"item-{i}" for i in range(20_000)]
    picked = [audited(i, 0.05) for i in ids]
    assert picked == [audited(i, 0.05) for i in ids]
    assert 0.045 < sum(picked) / len(ids) < 0.055
    assert not any(audited(i, 0.0) for i in ids[:100]) and all(audited(i, 1.0) for i in ids[:100])


def test_audit_precision_counts_blocks_only_and_wilson_covers() -> None:
    estimator = AuditPrecision(size=4)
    estimator.extend(
        [
            (Decision.ALLOW, Decision.BLOCK),  # an allow has no block precision
            (Decision.BLOCK, Decision.REVIEW),  # a reviewer who did not decide
            *[(Decision.BLOCK, Decision.BLOCK)] * 3,
            (Decision.BLOCK, Decision.ALLOW),
            (Decision.BLOCK, Decision.BLOCK),
        ]
    )
    assert estimator.audited_blocks == 4 and estimator.estimate == 0.75  # the window keeps the last 4
    rng = np.random.default_rng(3)
    covered = 0
    for _ in range(400):
        interval = wilson(int((rng.random(200) < 0.8).sum()), 200)
        assert interval is not None
        covered += interval[0] <= 0.8 <= interval[1]
    assert covered / 400 > 0.92
    assert wilson(0, 0) is None


def test_rows_to_label_grows_as_blocks_get_rarer() -> None:
    targets = {"block_precision": 0.95, "max_allow_miss": 0.03}
    common, rare = rows_to_label(targets, 0.5), rows_to_label(targets, 0.05)
    assert common is not None and rare is not None and rare == pytest.approx(10 * common, rel=0.01)
    assert rows_to_label({}, 0.5) is None and rows_to_label(targets, 0.0) is None


def test_reference_is_consistent_with_the_simulated_cascade() -> None:
    table, _ = synthetic_table(2000, np.random.default_rng(4), llm=True)
    thresholds = ThresholdSet(
        version="t",
        stages={
            "retrieval": {"flagged": {"allow_below": 0.2, "block_at": 0.9}},
            "classifier": {"flagged": {"allow_below": 0.3, "block_at": 0.8}},
            "llm": {"flagged": {"allow_below": 0.5, "block_at": 0.5}},
        },
    )
    reference = Reference.of(table, thresholds)
    assert sum(reference.decisions.values()) == pytest.approx(1)
    assert sum(reference.decided_by.values()) == pytest.approx(1)
    retrieval, classifier = reference.stages["retrieval"], reference.stages["classifier"]
    assert retrieval.reached == 1 and classifier.reached == pytest.approx(retrieval.results["escalate"], abs=1e-5)
    assert reference.llm_rate == pytest.approx(reference.stages["llm"].reached, abs=1e-5)
    assert reference.review_rate == reference.decisions["review"] == pytest.approx(0.0)
    assert Reference.from_doc(yaml.safe_load(yaml.safe_dump(reference.to_doc()))) == reference


def test_calibrate_writes_the_reference_of_its_calibration_split(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:

    state = tmp_path / "state"
    monkeypatch.setenv("CASCADE_DATA_DIR", str(state))
    stages = [SyntheticStage("classifier", 0.3, categories=("flagged", "spam")), SyntheticStage("llm", 0.6)]
    monkeypatch.setattr(calibrate_cli, "build_stages", lambda settings, names: stages)
    data = write_dataset(tmp_path / "labelled.jsonl", 3_000)
    out = tmp_path / "t.yaml"
    targets = ["--target-block-precision", "0.9", "--max-allow-miss", "0.1", "--max-llm-rate", "0.6"]
    result = CliRunner().invoke(app, ["calibrate", str(data), "-o", str(out), "--version", "ref-1", *targets])
    assert result.exit_code == 0, result.output
    written = ThresholdSet.load(out)
    reference = Reference.from_thresholds(written)
    assert reference is not None and reference.items == written.provenance["splits"]["calibration"]
    (calibration,) = [
        t
        for t in map(ScoreTable.load, (state / "scores").glob("*.npz"))
        if split_of(str(t.ids[0])) is Split.CALIBRATION
    ]
    assert reference == Reference.from_doc(yaml.safe_load(yaml.safe_dump(Reference.of(calibration, written).to_doc())))
    assert set(reference.stages) == {"classifier", "llm"} and set(reference.stages["classifier"].scores) == {
        "flagged",
        "spam",
    }
    assert reference.llm_rate <= 0.6 and reference.stages["llm"].reached == pytest.approx(reference.llm_rate, abs=1e-5)


def test_worker_refuses_a_malformed_reference_with_one_line(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    ThresholdSet(version="broken", provenance={"reference": {"items": 10, "stages": {"hash": {}}}}).dump(broken)
    done = subprocess.run(
        [
            *(sys.executable, "-m", "cascade.stream", "--broker", "127.0.0.1:9", "--cascade", "hash"),
            *("--thresholds", str(broken), "--health-port", "0"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "CASCADE_DATA_DIR": str(tmp_path / "data")},
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "provenance.reference is malformed" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_cascade_drift_unreachable_broker_is_one_line(tmp_path: Path) -> None:
    table, _ = synthetic_table(500, np.random.default_rng(5))
    thresholds = ThresholdSet(version="r", stages={"classifier": {"flagged": {"allow_below": 0.2, "block_at": 0.9}}})
    thresholds.provenance["reference"] = Reference.of(table, thresholds).to_doc()
    path = tmp_path / "r.yaml"
    thresholds.dump(path)
    done = subprocess.run(
        [str(Path(sys.executable).parent / "cascade"), "drift", "--broker", "127.0.0.1:9", "--thresholds", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert "cannot read the verdict topics from 127.0.0.1:9" in line and "check --broker" in line
