"""Wiring: a worker builds only the stages it runs, and fails fast on the ones it does."""

from __future__ import annotations

from pathlib import Path

import pytest

from cascade.assembly import STAGE_ORDER, DeferredStage, build_runner, build_stages
from cascade.settings import Settings
from cascade.stages.classifier import ModelError


def settings_without_model(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", model_dir=tmp_path / "no-model")


def test_stages_outside_load_are_deferred_and_not_built(tmp_path: Path) -> None:
    stages = build_stages(settings_without_model(tmp_path), load={"hash"})
    assert [s.name for s in stages] == list(STAGE_ORDER)
    assert not isinstance(stages[0], DeferredStage)
    assert all(isinstance(s, DeferredStage) for s in stages[1:])
    # The classifier model is missing, yet nothing failed: it was never built.
    classifier = stages[STAGE_ORDER.index("classifier")]
    with pytest.raises(ModelError):
        _ = classifier.version  # first use builds it, and the missing model surfaces then


def test_a_loaded_stage_that_cannot_be_built_fails_at_start_up(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no-model"):
        build_runner(settings_without_model(tmp_path), load={"hash", "classifier"})


def test_unknown_stage_names_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown stages"):
        build_stages(settings_without_model(tmp_path), names=["hash", "ocr"])
