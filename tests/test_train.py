"""`cascade train`: partial labels, source weights, ONNX parity, the card and the CLI, on a tiny fixture."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from model_cache import embedder, model_cache_dir, settings  # noqa: F401  (fixtures)
from typer.testing import CliRunner

from cascade.cli import app
from cascade.data import file_digest, load_labelled
from cascade.embedding import Embedder, cached_embeddings
from cascade.exemplars import POLICY_SEED_SOURCE
from cascade.settings import Settings
from cascade.train import policy_seed_rows, train, write_model
from cascade.train.export import PARITY_TOLERANCE, export_onnx, onnx_scores, sklearn_scores
from cascade.train.fit import TrainError, TrainOptions, fit_head, head_data, source_weights

FIXTURE = Path(__file__).parent / "fixtures" / "classifier_tiny.jsonl"
TINY = TrainOptions(design="logreg", split=None, min_positives=5, folds=3, compare=(), cross_source=False, name="tiny")


@pytest.fixture(scope="module")
def rows_and_vectors(embedder: Embedder, tmp_path_factory: pytest.TempPathFactory) -> tuple[list, np.ndarray]:  # noqa: F811
    rows = load_labelled([FIXTURE])
    cache = tmp_path_factory.mktemp("cache") / "vectors.npz"
    return rows, cached_embeddings([r.text for r in rows], embedder.embed, cache)


def test_heads_take_only_rows_that_carry_their_label() -> None:
    rows = load_labelled([FIXTURE])
    heads, skipped = head_data(rows, TINY)
    by_name = {h.name: h for h in heads}
    assert list(by_name) == ["flagged", "hate", "jailbreak", "offensive", "spam", "toxic"]
    assert skipped == []
    assert len(by_name["flagged"].y) == len(rows)
    for head, source in [("spam", "sms"), ("toxic", "chat"), ("jailbreak", "chat"), ("hate", "tweets")]:
        members = {rows[i].source for i in by_name[head].index}
        assert members == {source}, head
        assert len(by_name[head].y) == sum(r.source == source for r in rows)


def test_rows_without_a_label_do_not_change_that_head(rows_and_vectors: tuple[list, np.ndarray]) -> None:
    """Unknown is not 0: adding rows that lack `spam` leaves the spam head exactly as it was."""
    rows, X = rows_and_vectors
    sms_only = [i for i, r in enumerate(rows) if r.source == "sms"]
    (spam_all,) = [h for h in head_data(rows, TINY)[0] if h.name == "spam"]
    (spam_sms,) = [h for h in head_data([rows[i] for i in sms_only], TINY)[0] if h.name == "spam"]
    with_others = fit_head(X, spam_all, TINY).predict_proba(X)[:, 1]
    without = fit_head(X[sms_only], spam_sms, TINY).predict_proba(X)[:, 1]
    np.testing.assert_allclose(with_others, without, rtol=0, atol=1e-12)
    # Had the other rows counted as spam = 0, the head would have changed.
    (flagged,) = [h for h in head_data(rows, TINY)[0] if h.name == "flagged"]
    assert len(flagged.y) > len(spam_all.y)


def test_source_weights_share_each_source_equally_times_its_multiplier() -> None:
    sources = np.array(["a"] * 90 + ["b"] * 10)
    weight = source_weights(sources, TrainOptions())
    assert weight[sources == "a"].sum() == pytest.approx(weight[sources == "b"].sum())
    assert weight.mean() == pytest.approx(1.0)
    weight = source_weights(sources, TrainOptions(source_weights={"a": 0.25}))
    assert weight[sources == "b"].sum() == pytest.approx(4 * weight[sources == "a"].sum())
    assert len(set(weight[sources == "a"].tolist())) == 1  # equal within a source


@pytest.mark.parametrize("design", ["logreg", pytest.param("mlp", marks=pytest.mark.slow)])
def test_onnx_export_matches_scikit_learn(rows_and_vectors: tuple[list, np.ndarray], design: str) -> None:
    rows, X = rows_and_vectors
    options = TrainOptions(split=None, min_positives=5, folds=2)
    heads = [h for h in head_data(rows, options)[0] if h.name in ("flagged", "spam", "toxic")]
    models = {h.name: fit_head(X, h, options, design) for h in heads}
    graph = export_onnx(models, X.shape[1], "tiny")
    expected = sklearn_scores(models, X)
    got = onnx_scores(graph, X)
    assert got.shape == (len(rows), 3)
    assert np.abs(got - expected).max() <= PARITY_TOLERANCE
    # The scores carry signal: spam texts outscore the rest on the spam head.
    spam = [r.labels.get("spam") == 1 for r in rows]
    column = list(models).index("spam")
    assert got[spam, column].min() > got[[not s for s in spam], column].mean()


@pytest.mark.slow
def test_train_writes_model_and_card(rows_and_vectors: tuple[list, np.ndarray], tmp_path: Path) -> None:
    rows, X = rows_and_vectors
    options = TrainOptions(
        design="logreg", split=None, min_positives=5, folds=2, compare=("mlp",), cross_source=True, name="tiny"
    )

    def refuse(texts: object) -> np.ndarray:
        raise AssertionError("every vector should come from the cache")

    cache = tmp_path / "cache"
    cached_embeddings([r.text for r in rows], lambda texts: _lookup(rows, X, texts), cache / "emb.npz")
    trained = train([FIXTURE], refuse, "emb", cache, options)
    write_model(trained, tmp_path / "model")

    card = json.loads((tmp_path / "model" / "card.json").read_text())
    assert (tmp_path / "model" / "model.onnx").is_file()
    assert card["heads"] == ["flagged", "hate", "jailbreak", "offensive", "spam", "toxic"]
    assert card["data"] == [file_digest(FIXTURE)]
    assert card["label_counts"]["spam"] == {
        "rows": 36,
        "positives": 18,
        "per_source": {"sms": {"rows": 36, "positives": 18}},
    }
    assert card["onnx_parity_max_abs_diff"] <= PARITY_TOLERANCE
    assert set(card["design_comparison"]) == {"logreg", "mlp"}
    for metrics in card["cross_validation"].values():
        assert 0 <= metrics["auprc"] <= 1 and 0 <= metrics["ece"] <= 1
    assert card["cross_validation"]["spam"]["auprc"] > 0.9  # separable fixture
    assert set(card["cross_source"]["flagged"]) == {"chat", "sms", "tweets"}
    assert card["cross_source"]["flagged"]["sms"]["trained_on"] == ["chat", "tweets"]
    markdown = (tmp_path / "model" / "card.md").read_text()
    assert card["version"] in markdown and "Cross-source" in markdown and "Design comparison" in markdown


def _lookup(rows: list, X: np.ndarray, texts: Sequence[str]) -> np.ndarray:
    """The fixture's vectors by text: training reads them from the cache, never from the model, here."""
    by_text = {r.text: X[i] for i, r in enumerate(rows)}
    return np.stack([by_text[t] for t in texts])


def test_training_refuses_bad_requests(rows_and_vectors: tuple[list, np.ndarray], tmp_path: Path) -> None:
    rows, X = rows_and_vectors

    def embed(texts: Sequence[str]) -> np.ndarray:
        return _lookup(rows, X, texts)

    with pytest.raises(TrainError, match="not in the data"):
        train([FIXTURE], embed, "e", tmp_path, TrainOptions(split=None, min_positives=5, source_weights={"nope": 1.0}))
    with pytest.raises(TrainError, match="unknown design"):
        train([FIXTURE], embed, "e", tmp_path, TrainOptions(split=None, min_positives=5, design="forest"))


@pytest.mark.slow
def test_cli_trains_the_fixture(settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    monkeypatch.setenv("CASCADE_DATA_DIR", str(settings.data_dir))
    out = tmp_path / "cli-model"
    args = ["train", str(FIXTURE), "--out", str(out), "--all-splits", "--folds", "3", "--compare", ""]
    args += ["--design", "logreg", "--min-positives", "5", "--source-weight", "tweets=0.5", "--no-cross-source"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    card = json.loads((out / "card.json").read_text())
    assert card["name"] == "cli-model"
    assert card["options"]["source_weights"] == {"tweets": 0.5}
    assert card["command"].startswith(f"cascade train {FIXTURE} --out {out} --name cli-model --design logreg")
    assert "--source-weight tweets=0.5" in card["command"] and "--all-splits" in card["command"]
    assert (settings.data_dir / "train-cache").is_dir()
    bad = CliRunner().invoke(app, ["train", str(FIXTURE), "--out", str(out), "--source-weight", "tweets"])
    assert bad.exit_code == 2 and "SOURCE=" in bad.output


def test_categories_with_too_few_labels_get_no_head() -> None:
    heads, skipped = head_data(load_labelled([FIXTURE]), TrainOptions(split=None, min_positives=10))
    assert skipped == ["hate"]  # 6 positives in the fixture
    assert "hate" not in [h.name for h in heads]


def test_policy_seeds_become_one_more_source() -> None:
    rows, provenance = policy_seed_rows(Settings().policies_dir)
    assert {r.source for r in rows} == {POLICY_SEED_SOURCE}
    assert provenance["rows"] == len(rows) and len(provenance["sha256"]) == 64
    violence = [r for r in rows if "violence" in r.labels]
    assert {r.flagged for r in violence} == {0, 1}
    assert all(r.labels["violence"] == r.flagged for r in violence if r.id.split(":")[1] == "violence")
