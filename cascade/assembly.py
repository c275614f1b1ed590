"""Wires settings to concrete stages. The only module that names them; the pipeline does not."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from cascade.pipeline import CascadeRunner
from cascade.policy import load_policy
from cascade.settings import Settings
from cascade.stages.base import Stage
from cascade.thresholds import ThresholdSet

if TYPE_CHECKING:
    from cascade.embedding import Embedder

# Every stage this project knows, cheapest first. Threshold files may name only these.
STAGE_ORDER: tuple[str, ...] = ("hash", "retrieval", "classifier", "llm")


class Resources:
    """Heavy objects that several stages share within one process (one embedder, loaded lazily)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._embedder: Embedder | None = None

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            from cascade.embedding import Embedder

            self._embedder = Embedder.from_settings(self.settings)
        return self._embedder


StageFactory = Callable[[Settings, Resources], Stage]


def _factories() -> dict[str, StageFactory]:
    from cascade.stages.hash import HashStage
    from cascade.stages.llm import LLMStage

    return {
        "hash": HashStage.from_settings,
        "llm": LLMStage.from_settings,
    }


def build_stages(settings: Settings, names: Sequence[str] = STAGE_ORDER) -> list[Stage]:
    """The configured stages, in cascade order, sharing one `Resources`."""
    unknown = set(names) - set(STAGE_ORDER)
    if unknown:
        raise ValueError(f"unknown stages {sorted(unknown)}; known: {', '.join(STAGE_ORDER)}")
    factories = _factories()
    resources = Resources(settings)
    return [factories[name](settings, resources) for name in STAGE_ORDER if name in names and name in factories]


def build_runner(
    settings: Settings,
    thresholds_path: Path | None = None,
    shadow_thresholds_path: Path | None = None,
    stage_names: Sequence[str] = STAGE_ORDER,
) -> CascadeRunner:
    policy = load_policy(settings.policies_dir)
    thresholds = ThresholdSet.load(thresholds_path or settings.thresholds)
    thresholds.check_names(STAGE_ORDER, policy.names)
    shadow = None
    if shadow_thresholds_path is not None:
        shadow = ThresholdSet.load(shadow_thresholds_path)
        shadow.check_names(STAGE_ORDER, policy.names)
    return CascadeRunner(build_stages(settings, stage_names), thresholds, policy.version, shadow)
