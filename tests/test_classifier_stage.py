"""The classifier stage: serving a trained model through the cascade, and refusing bad model files."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from model_cache import embedder, model_cache_dir, settings  # noqa: F401  (fixtures)

from cascade.assembly import build_stages
from cascade.contract import ContentItem, Decision
from cascade.data import load_labelled
from cascade.embedding import Embedder, serves_int8
from cascade.pipeline import CascadeRunner, new_context
from cascade.settings import Settings
from cascade.stages.base import Resources
from cascade.stages.classifier import ClassifierModel, ClassifierStage, ModelError
from cascade.thresholds import Band, ThresholdSet
from cascade.train import train, write_model
from cascade.train.export import export_onnx
from cascade.train.fit import TrainOptions, fit_head, head_data

FIXTURE = Path(__file__).parent / "fixtures" / "classifier_tiny.jsonl"
HEADS = ["flagged", "hate", "jailbreak", "offensive", "spam", "toxic"]
SPAM = "WINNER! You have been selected for a free cruise. Call 09061234567 now to claim your prize!"
CHAT = "Hey, are we still meeting at the museum later?"


@pytest.fixture(scope="module")
def model_dir(embedder: Embedder, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("model") / "tiny"
    cache = tmp_path_factory.mktemp("cache")
    options = TrainOptions(
        design="logreg", split=None, min_positives=5, folds=2, compare=(), cross_source=False, name="tiny"
    )
    write_model(train([FIXTURE], embedder.embed, embedder.identity, cache, options), out)
    return out


def _copy(model_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(model_dir, target)
    return target


def _stage(settings: Settings, model_dir: Path) -> ClassifierStage:  # noqa: F811
    configured = settings.model_copy(update={"model_dir": model_dir})
    return ClassifierStage.from_settings(configured, Resources(configured))


async def test_stage_scores_every_head_through_the_runner(settings: Settings, model_dir: Path) -> None:  # noqa: F811
    configured = settings.model_copy(update={"model_dir": model_dir})
    (stage,) = build_stages(configured, ["classifier"])
    assert isinstance(stage, ClassifierStage)
    card = json.loads((model_dir / "card.json").read_text())
    assert stage.version == f"tiny@{card['version']}"
    bands = {"classifier": {"spam": Band(allow_below=0.2, block_at=0.8)}}
    runner = CascadeRunner([stage], ThresholdSet(version="t1", stages=bands), "p1")
    items = [ContentItem(id="spam", text=SPAM), ContentItem(id="chat", text=CHAT)]
    spam, chat = await runner.run([new_context(item) for item in items])
    assert spam.decision is Decision.BLOCK and spam.flagged_categories == ["spam"]
    assert chat.decision is Decision.ALLOW
    for verdict in (spam, chat):
        (entry,) = verdict.trace
        assert entry.stage == "classifier" and entry.stage_version == stage.version
        assert sorted(entry.scores) == HEADS
        assert all(0.0 <= s <= 1.0 for s in entry.scores.values())


async def test_stage_reuses_the_embedding_in_the_context(
    settings: Settings,  # noqa: F811
    model_dir: Path,
    embedder: Embedder,  # noqa: F811
) -> None:
    stage = _stage(settings, model_dir)
    spam_vector = embedder.embed([SPAM])[0]
    # A chat text carrying the spam text's vector: only a reused embedding scores it as spam.
    reused = new_context(ContentItem(id="a", text=CHAT))
    reused.embedding = spam_vector
    fresh = new_context(ContentItem(id="b", text=CHAT))
    before = stage._embedder.cache_len
    result_reused, result_fresh = await stage.score([reused, fresh])
    assert reused.embedding is spam_vector
    assert stage._embedder.cache_len == before + 1  # only the item without a vector was embedded
    expected = ClassifierModel(model_dir).predict(spam_vector[None, :])[0]
    assert result_reused.scores["spam"] == pytest.approx(float(expected[HEADS.index("spam")]), abs=1e-6)
    assert result_reused.scores["spam"] > 0.5 > result_fresh.scores["spam"]
    assert fresh.embedding is not None


def test_missing_model_fails_at_start_up(settings: Settings, tmp_path: Path) -> None:  # noqa: F811
    with pytest.raises(ModelError, match=r"missing: .*model\.onnx"):
        _stage(settings, tmp_path / "nowhere")


def test_missing_card_fails_at_start_up(settings: Settings, model_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    copy = _copy(model_dir, tmp_path)
    (copy / "card.json").unlink()
    with pytest.raises(ModelError, match=r"missing: .*card\.json"):
        _stage(settings, copy)


def test_truncated_model_fails_at_start_up(settings: Settings, model_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    copy = _copy(model_dir, tmp_path)
    blob = (copy / "model.onnx").read_bytes()
    (copy / "model.onnx").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ModelError, match="does not match its card"):
        _stage(settings, copy)


def test_garbage_model_with_matching_card_fails_at_start_up(model_dir: Path, tmp_path: Path) -> None:
    """Even a card rewritten to the file's digest cannot make onnxruntime load garbage."""
    copy = _copy(model_dir, tmp_path)
    garbage = b"not an onnx graph at all" * 10
    (copy / "model.onnx").write_bytes(garbage)
    _rewrite_card(copy, garbage)
    with pytest.raises(ModelError, match="not a loadable ONNX model"):
        ClassifierModel(copy)


def test_unreadable_card_fails_at_start_up(model_dir: Path, tmp_path: Path) -> None:
    copy = _copy(model_dir, tmp_path)
    (copy / "card.json").write_text("{not json")
    with pytest.raises(ModelError, match=r"card .* is unreadable"):
        ClassifierModel(copy)


def test_wrong_head_count_fails_at_start_up(model_dir: Path, tmp_path: Path) -> None:
    copy = _copy(model_dir, tmp_path)
    card = json.loads((copy / "card.json").read_text())
    card["heads"] = card["heads"][:-1]
    (copy / "card.json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match="does not match the card's 5 heads"):
        ClassifierModel(copy)


def test_wrong_input_width_fails_at_start_up(settings: Settings, tmp_path: Path) -> None:  # noqa: F811
    """A graph trained on 16-d vectors cannot serve 384-d embeddings."""
    rows = load_labelled([FIXTURE])
    X = np.random.default_rng(0).normal(size=(len(rows), 16)).astype(np.float32)
    options = TrainOptions(design="logreg", split=None, min_positives=5, folds=2)
    head = head_data(rows, options)[0][0]
    graph = export_onnx({"flagged": fit_head(X, head, options)}, 16, "narrow")
    out = tmp_path / "narrow"
    out.mkdir()
    (out / "model.onnx").write_bytes(graph.SerializeToString())
    (out / "card.json").write_text(json.dumps({"name": "narrow", "version": "", "heads": ["flagged"]}))
    _rewrite_card(out, graph.SerializeToString())
    with pytest.raises(ModelError, match="takes 16-d input, the embedder gives 384"):
        _stage(settings, out)


def _rewrite_card(model_dir: Path, blob: bytes) -> None:
    card = json.loads((model_dir / "card.json").read_text())
    card["version"] = hashlib.sha256(blob).hexdigest()[:12]
    (model_dir / "card.json").write_text(json.dumps(card))


def test_serving_imports_neither_scikit_learn_nor_torch(model_dir: Path) -> None:
    script = (
        "import sys, numpy as np\n"
        "from cascade.stages.classifier import ClassifierModel\n"
        f"model = ClassifierModel(__import__('pathlib').Path({str(model_dir)!r}))\n"
        "scores = model.predict(np.ones((3, 384), dtype=np.float32) / 384 ** 0.5)\n"
        "assert scores.shape == (3, 6), scores.shape\n"
        "heavy = sorted(m for m in ('sklearn', 'torch', 'skl2onnx', 'onnx') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == ""


def test_shipped_default_model_loads() -> None:
    """The packaged default: the tuned encoder, served int8 from its card, with its heads, within git's budget."""
    default = Settings()
    card = json.loads((default.model_dir / "card.json").read_text())
    assert card["design"] == "tuned" and card["default_precision"] == "int8" and serves_int8(default)
    assert (default.model_dir / "card.md").is_file()
    shipped = sum(p.stat().st_size for p in default.model_dir.iterdir())
    assert shipped < 100_000_000, "models/ in git stays within ~100 MB"
    served = Embedder.from_settings(default)
    assert served.heads[0] == "flagged" and served.identity.endswith("-int8")
    vectors, scores = served.encode(["hello there", "you are an idiot"])
    assert vectors.shape == (2, 384) and scores is not None and np.all((scores >= 0) & (scores <= 1))
