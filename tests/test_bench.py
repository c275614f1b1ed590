"""`cascade bench`: every section on tiny inputs, real stages; missing pieces reported, never invented."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from cascade.bench import BenchConfig, run_bench
from cascade.bench.report import render, write_json, write_plots
from cascade.cli import app
from cascade.data import Split, load_labelled, split_of
from cascade.embedding import Embedder
from cascade.evaluation import CostModel
from cascade.exemplars import add_exemplars
from cascade.settings import Settings
from cascade.thresholds import Band, ThresholdSet
from cascade.train import train, write_model
from cascade.train.fit import TrainOptions
from cascade.vectorindex import EdgeIndex

pytest_plugins = ["model_cache"]  # fixtures: settings, embedder, frozen_embedder

FIXTURE = Path(__file__).parent / "fixtures" / "classifier_tiny.jsonl"
THROUGHPUT_ROWS = {"hash_stage", "embedding_onnx_b64", "embedding_onnx_b1", "cascade_inprocess"}


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """The classifier fixture with its tweets renamed to Davidson's source, for the per-source view."""
    path = tmp_path / "labelled.jsonl"
    lines = []
    for line in FIXTURE.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        row["source"] = "davidson2017" if row["source"] == "tweets" else row["source"]
        lines.append(json.dumps(row))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def bands(tmp_path: Path) -> Path:
    """Bands on the classifier only, so the tests do not depend on the project's calibrated file."""
    path = tmp_path / "bands.yaml"
    flagged = Band(allow_below=0.2, block_at=0.8)
    ThresholdSet(version="bench-test", stages={"classifier": {"flagged": flagged}}).dump(path)
    return path


def tiny(data: Path, **overrides: object) -> BenchConfig:
    sizes: dict[str, object] = {
        "rounds": 2,
        "throughput_items": 16,
        "single_items": 4,
        "batch_size": 8,
        "torch": False,
        "stream": False,
        "stream_rounds": 1,
        "bank_sizes": (300,),
        "knn_queries": 10,
        "batch_sizes": (1, 8),
    }
    return BenchConfig(data=(data,), quick=True, **{**sizes, **overrides})  # type: ignore[arg-type]


@pytest.fixture
def every_piece(settings: Settings, frozen_embedder: Embedder, data: Path, tmp_path: Path) -> Settings:
    """A trained (frozen-design) classifier and an exemplar bank built from the train split with the
    frozen MiniLM it serves, in this test's data dir."""
    train_rows = [r for r in load_labelled([data]) if split_of(r.id) is Split.TRAIN]
    index = EdgeIndex(settings.data_path("exemplars"))
    add_exemplars(index, frozen_embedder, train_rows, added_by="test")
    index.close()
    options = TrainOptions(min_positives=5, folds=2, compare=(), cross_source=False, name="bench-tiny")
    trained = train([data], frozen_embedder.embed, frozen_embedder.identity, settings.data_path("train-cache"), options)
    write_model(trained, tmp_path / "model")
    return settings.model_copy(update={"model_dir": tmp_path / "model"})


def _in_unit(value: object) -> bool:
    return value is None or (isinstance(value, float) and 0.0 <= value <= 1.0)


@pytest.mark.slow
def test_every_section_on_tiny_inputs(every_piece: Settings, data: Path, bands: Path, tmp_path: Path) -> None:
    result, curves = run_bench(tiny(data, thresholds=bands), every_piece)
    assert result["meta"]["thresholds"]["version"] == "bench-test"

    throughput = result["throughput"]
    rows = throughput["rows"]
    assert set(rows) >= THROUGHPUT_ROWS
    for name in THROUGHPUT_ROWS:
        row = rows[name]
        assert row["available"], row
        assert len(row["samples"]) == 2 and all(s > 0 for s in row["samples"])
        assert row["best"] == max(row["samples"]) and min(row["samples"]) <= row["median"] <= row["best"]
    assert rows["cascade_inprocess"]["stages"] == ["hash", "retrieval", "classifier"]
    assert sum(rows["cascade_inprocess"]["decided_by"].values()) == pytest.approx(1.0)
    for key in ("embedding_torch_b64", "stream_broker", "stream_broker_live"):
        assert rows[key] == {"label": rows[key]["label"], "available": False, "reason": rows[key]["reason"]}
        assert "disabled" in rows[key]["reason"]
    ratios = throughput["ratios"]
    made = ratios["cascade_vs_embedding"]
    assert made["available"]
    assert made["value"] == pytest.approx(rows["cascade_inprocess"]["median"] / rows["embedding_onnx_b64"]["median"])
    pairs = zip(rows["cascade_inprocess"]["samples"], rows["embedding_onnx_b64"]["samples"], strict=True)
    assert made["paired_median"] == pytest.approx(statistics.median([a / b for a, b in pairs]))
    assert not ratios["stream_vs_inprocess"]["available"] and not ratios["onnx_vs_torch_b64"]["available"]

    quality = result["quality"]
    assert quality["available"] and quality["n"] == sum(split_of(r.id) is Split.TEST for r in load_labelled([data]))
    systems = quality["systems"]
    assert {"cascade", "retrieval_only", "classifier_only", "peer", "all_llm"} <= set(systems)
    for key in ("cascade", "retrieval_only", "classifier_only", "peer"):
        row = systems[key]
        assert row["available"], row
        for metric in ("auprc", "precision", "recall", "f1", "llm_rate"):
            assert _in_unit(row[metric]), (key, metric, row[metric])
    assert systems["classifier_only"]["auprc"] > 0.5  # a separable fixture
    # Relative cost = LLM calls + every cheap stage's unit cost x the share of items that reached it.
    cascade = systems["cascade"]
    reached = {name: row["reached"] for name, row in quality["escalation"].items()}
    cheap = sum(CostModel.of_stages().of(name) * share for name, share in reached.items())
    assert cascade["cost_relative_to_all_llm"] == pytest.approx(cascade["llm_rate"] + cheap)
    assert 0 < cascade["llm_rate"] < 1  # the classifier's band settles some items, not all
    assert sum(quality["decisions"].values()) == pytest.approx(1.0)
    assert systems["all_llm"]["cost_relative_to_all_llm"] == 1.0 and "not measurable" in systems["all_llm"]["quality"]
    assert systems["all_llm"]["usd_per_1k_items"] > 0
    groups = quality["per_source"]["groups"]
    assert "all but davidson2017" in groups
    assert groups["all but davidson2017"]["n"] + groups["davidson2017"]["n"] == quality["n"]

    knn = result["scaling"]["knn"]
    (bank,) = knn["rows"]
    assert bank["available"] and bank["bank_size"] == 300
    assert 0 <= bank["recall@10"] <= 1 and bank["query_p50_ms"] > 0 and bank["index_rss_mb"] > 0
    batches = result["scaling"]["embedding_batch"]["rows"]
    assert [r["batch"] for r in batches] == [1, 8] and all(r["median"] > 0 for r in batches)

    out = tmp_path / "bench.json"
    write_json(result, out)
    assert json.loads(out.read_text())["throughput"]["ratios"]["cascade_vs_embedding"]["value"] == made["value"]
    written = write_plots(result, curves, tmp_path / "plots")
    assert {p.name for p in written} >= {"throughput.png", "quality_pr.png", "scaling_knn.png", "scaling_batch.png"}
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in written)


def test_missing_pieces_are_reported_not_invented(settings: Settings, data: Path, bands: Path, tmp_path: Path) -> None:
    """No classifier model, an empty exemplar bank: their rows say why; the hash stage still runs."""
    bare = settings.model_copy(update={"model_dir": tmp_path / "no-model"})
    result, _ = run_bench(tiny(data, sections=("throughput", "quality"), thresholds=bands), bare)

    missing = result["throughput"]["stages_missing"]
    assert set(missing) == {"retrieval", "classifier"}
    assert "model file missing" in missing["classifier"] and "empty" in missing["retrieval"]
    assert result["throughput"]["rows"]["cascade_inprocess"]["stages"] == ["hash"]
    systems = result["quality"]["systems"]
    for key in ("retrieval_only", "classifier_only"):
        assert systems[key]["available"] is False and systems[key]["reason"] == missing[key.removesuffix("_only")]
    assert "scaling" not in result
    console = Console(record=True, width=200)
    render(result, console)
    assert "not available" in console.export_text()


def test_repeat_rows_reissue_repeats_and_keep_the_verdicts(settings: Settings, data: Path, bands: Path) -> None:
    """The repeat-stream rows on the hash stage alone: same length, a share repeated, same verdicts."""
    bare = settings.model_copy(update={"model_dir": settings.data_dir / "no-model"})
    config = tiny(data, sections=("throughput",), thresholds=bands, throughput_items=60, repeat_share=0.5)
    result, _ = run_bench(config, bare)
    rows, ratios = result["throughput"]["rows"], result["throughput"]["ratios"]
    repeats, plain = rows["cascade_repeats"], rows["cascade_no_repeats"]
    assert repeats["available"] and plain["available"]
    assert len(repeats["samples"]) == len(plain["samples"]) == config.rounds
    assert 0 < repeats["reissued"] <= repeats["repeated_items"] < result["throughput"]["input"]["items"]
    assert repeats["verdicts_identical_to_uncached"] is True
    made = ratios["repeats_vs_no_repeats"]
    assert made["value"] == pytest.approx(repeats["median"] / plain["median"]) and "paired_median" in made
    console = Console(record=True, width=200)
    render(result, console)
    assert repeats["largest_score_change"] == 0.0  # the hash stage's scores do not depend on batch make-up
    assert "re-issued from the cache; decisions vs the uncached cascade: identical" in console.export_text()


def test_cli_rejects_unknown_sections_and_missing_files(data: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    bad = runner.invoke(app, ["bench", "--data", str(data), "--sections", "speed"])
    assert bad.exit_code == 2 and "unknown sections" in bad.output
    gone = runner.invoke(app, ["bench", "--data", str(tmp_path / "nope.jsonl")])
    assert gone.exit_code == 2 and "not found" in gone.output


@pytest.mark.slow
@pytest.mark.broker
def test_stream_row_through_the_embedded_broker(settings: Settings, data: Path, bands: Path) -> None:
    """One worker, hash stage only: the broker rows (a backlog; live) and the ratio to the in-process cascade."""
    bare = settings.model_copy(update={"model_dir": settings.data_dir / "no-model"})
    config = tiny(data, sections=("throughput",), stream=True, thresholds=bands)
    result, _ = run_bench(config, bare)
    rows = result["throughput"]["rows"]
    stream = rows["stream_broker"]
    assert stream["available"], stream
    assert stream["stages"] == ["hash"] and stream["samples"][0] > 0 and stream["worker_ready_s"] > 0
    assert len(rows["cascade_inprocess"]["samples"]) == config.rounds + config.stream_rounds  # A B A
    assert stream["decided_by"] == rows["cascade_inprocess"]["decided_by"]  # same bands, same work
    live = rows["stream_broker_live"]
    assert live["available"] and live["decided_by"] == stream["decided_by"], live
    assert len(live["samples"]) == len(stream["samples"]) == config.stream_rounds
    made = result["throughput"]["ratios"]["stream_vs_inprocess"]
    assert "paired_median" not in made  # the broker rounds are not interleaved with the others
    assert made["value"] == pytest.approx(stream["median"] / rows["cascade_inprocess"]["median"])

    latency = result["throughput"]["latency"]
    assert set(latency) == {"latency_50", "latency_90"}
    for key, share in (("latency_50", 0.5), ("latency_90", 0.9)):
        row = latency[key]
        assert row["available"], row
        assert row["offered_rate"] == pytest.approx(share * live["median"]) and row["achieved_rate"] > 0
        every = row["all"]
        assert every["n"] == result["throughput"]["input"]["items"]
        assert 0 < every["p50_ms"] <= every["p95_ms"] <= every["p99_ms"]
        assert set(row["by_stage"]) <= {"hash", "pipeline"}
        assert sum(p["n"] for p in row["by_stage"].values()) == every["n"]
    one, two = rows["scale_one_worker"], rows["scale_two_workers"]
    assert one["available"] and two["available"], (one, two)
    assert (one["workers"], two["workers"], one["threads_per_worker"]) == (1, 2, 1)
    scaling = result["throughput"]["ratios"]["two_vs_one_worker"]
    assert scaling["value"] == pytest.approx(two["median"] / one["median"])
    assert scaling["efficiency"] == pytest.approx(scaling["value"] / 2)
    console = Console(record=True, width=200)
    render(result, console)
    assert "Latency under load" in console.export_text()
