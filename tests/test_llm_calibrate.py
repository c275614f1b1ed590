"""`cascade calibrate` with the LLM stage, end to end against the local OpenAI-compatible server.

Real client, real HTTP, the real CLI: the cost preview and its question, the calls made, the
band written with provenance, and a rerun that makes no call because the answers were kept.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from llm_server import LocalLLMServer, serve
from typer.testing import CliRunner

from cascade.cli import app
from cascade.data import Split, load_labelled, split_of
from cascade.llm.answers import sample_rows
from cascade.thresholds import ThresholdSet

MODEL = "local-moderator-2026-01-01"
BANKED = "you have won a free prize, click here"  # a known-bad text the hash stage blocks (repeats in the data)
VIOLATIONS = ("I will kill you, number {i}", "you are such an idiot {i}", BANKED)
BENIGN = ("lunch at noon on day {i}?", "the train leaves at {i} o'clock", "thanks for the photos from trip {i}")
TARGETS = ["--target-block-precision", "0.5", "--max-allow-miss", "0.5", "--max-llm-rate", "1.0", "--confidence", "0.8"]


def write_rows(path: Path, n: int) -> Path:
    """Rows the server's keyword rules judge right, with 8 % of labels flipped (so it is not trivial).

    One violation in six is the same banked text, so the hash stage settles some items before the LLM.
    """
    rng = random.Random(7)
    lines = []
    for i in range(n):
        violates = i % 2 == 0
        template = (VIOLATIONS if violates else BENIGN)[i % 3]
        label = int(violates) if rng.random() > 0.08 else int(not violates)
        lines.append(json.dumps({"id": f"row-{i}", "text": template.format(i=i), "flagged": label, "source": "t"}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[LocalLLMServer]:
    for name in ("CASCADE_CONFIG", "CASCADE_LLM_BASE_URL", "CASCADE_LLM_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    with serve() as running:
        monkeypatch.setenv("OPENAI_BASE_URL", running.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", "local-key")
        monkeypatch.setenv("CASCADE_DATA_DIR", str(tmp_path / "state"))
        monkeypatch.setenv("CASCADE_LLM_MODEL", MODEL)
        monkeypatch.setenv("CASCADE_LLM_PRICES", json.dumps({MODEL: {"input": 1.0, "output": 2.0}}))
        monkeypatch.setenv("CASCADE_LLM_RATE_PER_S", "1000")
        monkeypatch.setenv("CASCADE_LLM_RATE_BURST", "1000")
        monkeypatch.setenv("CASCADE_LLM_CONCURRENCY", "8")
        yield running


def test_sample_is_capped_per_split_and_stable(tmp_path: Path) -> None:
    rows = load_labelled([write_rows(tmp_path / "rows.jsonl", 500)])
    sample = sample_rows(rows, 30)
    by_split = {split: sum(split_of(r.id) is split for r in sample) for split in Split}
    assert by_split == {Split.TRAIN: 30, Split.CALIBRATION: 30, Split.TEST: 30}
    assert [r.id for r in sample] == [r.id for r in sample_rows(list(reversed(rows)), 30)][::-1]


def test_calibrate_with_the_llm_stage_end_to_end(server: LocalLLMServer, tmp_path: Path) -> None:
    data = write_rows(tmp_path / "labelled.jsonl", 900)
    banked = CliRunner().invoke(app, ["bank", "add", BANKED, "--bad", "-c", "spam"])
    assert banked.exit_code == 0, banked.output
    out = tmp_path / "llm-band.yaml"
    args = ["calibrate", str(data), "-o", str(out), "--stages", "hash,llm", "--llm-sample", "90", *TARGETS]
    scored = [r for r in sample_rows(load_labelled([data]), 90) if split_of(r.id) is not Split.TRAIN]
    texts = {r.text for r in scored}
    assert len(scored) == 180 and BANKED in texts and len(texts) < 180

    # Before spending: the preview (one call per distinct text), and no call without a yes.
    declined = CliRunner().invoke(app, args, input="n\n")
    assert declined.exit_code == 2 and "not confirmed: no llm call made" in declined.output
    assert f"180 items, 0 answered before; about {len(texts)} calls, expected cost $" in declined.output
    unattended = CliRunner().invoke(app, args)  # no stdin, as in a script
    assert unattended.exit_code == 2 and "pass --yes" in unattended.output
    assert server.state.request_count == 0 and not out.exists()

    ran = CliRunner().invoke(app, [*args, "--yes"])
    assert ran.exit_code == 0, ran.output
    assert server.state.request_count == len(texts)  # one call per distinct text; the keyword model needs no repair
    written = ThresholdSet.load(out)
    band = written.stages["llm"]["flagged"]
    assert 0 < band.allow_below <= band.block_at <= 1
    prov = yaml.safe_load(out.read_text())["provenance"]
    assert "llm" in yaml.safe_load(out.read_text())["score_maps"]  # the band comes from the LLM's own scores
    llm = prov["llm"]
    assert llm["backend"] == "chat" and llm["model"] == MODEL and llm["rows_per_split"] == 90
    assert llm["items"] == {"calibration": 90, "test": 90} and llm["errors"] == 0
    assert llm["planned"]["calls"] == len(texts) and llm["planned"]["usd"] > 0
    assert llm["spent_usd"] > 0 and llm["stage_version"].startswith(f"1+{MODEL}+prompt-")
    assert "local-key" not in out.read_text()

    # Rerun with the score cache bypassed: every answer comes from the answer store, no call, no cost.
    again = CliRunner().invoke(app, [*args, "--yes", "--refresh-scores", "-o", str(tmp_path / "again.yaml")])
    assert again.exit_code == 0, again.output
    assert "180 answered before; about 0 calls, expected cost $0.0000" in again.output
    assert server.state.request_count == len(texts)
    rerun = yaml.safe_load((tmp_path / "again.yaml").read_text())["provenance"]["llm"]
    assert rerun["spent_usd"] == 0 and ThresholdSet.load(tmp_path / "again.yaml").stages["llm"] == written.stages["llm"]


def test_calibrate_without_an_endpoint_asks_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OPENAI_BASE_URL", "OPENAI_API_KEY", "CASCADE_LLM_BASE_URL", "CASCADE_LLM_API_KEY", "CASCADE_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CASCADE_DATA_DIR", str(tmp_path / "state"))
    data = write_rows(tmp_path / "labelled.jsonl", 300)
    result = CliRunner().invoke(
        app, ["calibrate", str(data), "-o", str(tmp_path / "x.yaml"), "--stages", "llm", *TARGETS]
    )
    assert "expected cost" not in result.output and "make these llm calls" not in result.output
    # The unavailable stage sends everything to review: nothing to calibrate, said in one line.
    assert result.exit_code == 2 and "nothing to calibrate" in result.output


def test_evaluate_live_reports_shadow_agreement(
    server: LocalLLMServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with serve() as shadow:
        route = {"backend": "guard", "model": "llama-guard3:1b", "base_url": shadow.base_url}
        monkeypatch.setenv("CASCADE_LLM_SHADOW", json.dumps(route))
        monkeypatch.setenv("CASCADE_LLM_SHADOW_SAMPLE", "1.0")
        data = write_rows(tmp_path / "labelled.jsonl", 30)
        bands = tmp_path / "bands.yaml"
        ThresholdSet.model_validate(
            {"version": "t", "stages": {"llm": {"flagged": {"allow_below": 0.5, "block_at": 0.5}}}}
        ).dump(bands)
        report = tmp_path / "report.json"
        args = ["evaluate", str(data), "--live", "--stages", "llm", "--thresholds", str(bands), "--json", str(report)]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        agreement = json.loads(report.read_text())["llm_shadow_model"]
        texts = {json.loads(line)["text"] for line in data.read_text().splitlines()}
        # Every distinct text shadowed once (repeats are cache hits); the fake guard cites no code for
        # insults ("idiot"), so those are the disagreements: flagged by the primary only.
        insults = sum("idiot" in t for t in texts)
        assert agreement["shadow"] == "shadow:guard:llama-guard3:1b" and agreement["shadowed"] == len(texts)
        assert agreement["disagree"] == agreement["primary_only_flagged"] == insults > 0
        assert agreement["agree"] == len(texts) - insults and shadow.state.request_count == len(texts)
        assert f"{agreement['agreement_rate']:.1%}" in result.output and "shadow model" in result.output
