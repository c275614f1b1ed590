"""Wires settings to concrete stages. The only module that names them; the pipeline does not."""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Collection, Sequence
from functools import partial
from pathlib import Path

from cascade.pipeline import CascadeRunner
from cascade.policy import load_policy
from cascade.repeats import RepeatCache, RepeatingRunner
from cascade.settings import Settings
from cascade.stages.base import ItemContext, Resources, Stage, StageResult, StageUnavailable
from cascade.thresholds import ThresholdSet

log = logging.getLogger(__name__)

# Every stage this project knows, cheapest first. Threshold files may name only these.
STAGE_ORDER: tuple[str, ...] = ("hash", "retrieval", "classifier", "llm")


StageFactory = Callable[[Settings, Resources], Stage]


def stage_classes() -> dict[str, type[Stage]]:
    """The registry: every stage class this project knows, by name, in cascade order."""
    from cascade.stages.classifier import ClassifierStage
    from cascade.stages.hash import HashStage
    from cascade.stages.llm import LLMStage
    from cascade.stages.retrieval import RetrievalStage

    return {cls.name: cls for cls in (HashStage, RetrievalStage, ClassifierStage, LLMStage)}


def unbilled_stages() -> tuple[str, ...]:
    """The stages whose calls cost nothing (all but those calling a paid API), in cascade order."""
    return tuple(name for name, cls in stage_classes().items() if not cls.billed)


def adjudicator_stage() -> str:
    """The costly last-resort stage (the one billed stage): calibration tunes its bands apart, and
    evaluation counts the items that reach it as "LLM calls"."""
    (name,) = (name for name, cls in stage_classes().items() if cls.billed)
    return name


def relative_costs() -> dict[str, float]:
    """Each stage's assumed cost per item, relative to one call of the adjudicator (`Stage.relative_cost`)."""
    return {name: cls.relative_cost for name, cls in stage_classes().items()}


class UnavailableStage(Stage):
    """Stands in for a stage this installation cannot build: every item it sees escalates."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.version = "unavailable"
        self._reason = reason

    @property
    def unavailable_reason(self) -> str:
        return self._reason

    async def score(self, batch: Sequence[ItemContext]) -> list[StageResult]:
        return [StageResult(error=f"stage unavailable: {self._reason}") for _ in batch]


def _build(name: str, factory: StageFactory, settings: Settings, resources: Resources) -> Stage:
    try:
        return factory(settings, resources)
    except StageUnavailable as exc:
        return UnavailableStage(name, str(exc))


def _warn_unavailable(stages: Sequence[Stage]) -> None:
    """One line per reason: stages that share a missing piece (the encoder) are named together."""
    by_reason: dict[str, list[str]] = {}
    for stage in stages:
        if isinstance(stage, UnavailableStage):
            by_reason.setdefault(stage.unavailable_reason, []).append(stage.name)
    for reason, names in by_reason.items():
        log.warning("stage%s %s unavailable: %s", "s" if len(names) > 1 else "", ", ".join(names), reason)


class DeferredStage(Stage):
    """A stage of the cascade that this process builds only if it ever runs it.

    A stream worker runs one or two stages but must know the whole cascade (a stage's place
    decides where its undecided items go); building the others would load models it never
    uses and lock embedded stores that the worker owning them needs.
    """

    def __init__(self, name: str, build: Callable[[], Stage]) -> None:
        self.name = name
        self._build = build
        self._stage: Stage | None = None

    def _built(self) -> Stage:
        if self._stage is None:
            self._stage = self._build()
        return self._stage

    @property
    def version(self) -> str:  # type: ignore[override]
        return self._built().version

    @property
    def unavailable_reason(self) -> str | None:
        return self._built().unavailable_reason

    async def score(self, batch: Sequence[ItemContext]) -> list[StageResult]:
        return await self._built().score(batch)

    @property
    def built(self) -> bool:
        return self._stage is not None

    async def aclose(self) -> None:
        if self._stage is not None:
            await self._stage.aclose()


def freeze_loaded_heap() -> None:
    """Exempt what is loaded so far (the stages' banks) from the cyclic garbage collector's scans.

    A process that judges items keeps its stages for its lifetime. The hash bank's LSH tables are
    ~500k Python objects, which every full collection walked: 0.26 s about once per 1,000 items
    (docs/bench.md, "Where the time went around the encoder"). Call it once the stages are built.
    """
    gc.collect()
    gc.freeze()


def built_stage_versions(stages: Sequence[Stage]) -> dict[str, str]:
    """Versions of the stages this process has built; asking a deferred one would build it."""
    return {s.name: s.version for s in stages if not (isinstance(s, DeferredStage) and not s.built)}


def check_stage_names(names: Sequence[str]) -> None:
    """Raise ValueError, saying how to fix it, unless `names` are known stages, each once, cheapest first."""
    if not names:
        raise ValueError(f"no stages given; choose from {','.join(STAGE_ORDER)}")
    unknown = [n for n in names if n not in STAGE_ORDER]
    if unknown:
        raise ValueError(f"unknown stages {', '.join(unknown)}; known: {','.join(STAGE_ORDER)}")
    repeated = sorted({n for n in names if list(names).count(n) > 1})
    if repeated:
        raise ValueError(f"stage {', '.join(repeated)} listed more than once in {','.join(names)}")
    in_order = sorted(names, key=STAGE_ORDER.index)
    if list(names) != in_order:
        raise ValueError(f"stages {','.join(names)} are out of order: list them cheapest first, {','.join(in_order)}")


def single_process_stages(settings: Settings) -> set[str]:
    """Stages whose state only one process at a time can open, as configured.

    Retrieval's embedded exemplar store (qdrant-edge in the data directory) is locked by the
    process that opens it; with a Qdrant server (`CASCADE_QDRANT_URL`) any number may share it.
    """
    return set() if settings.qdrant_url else {"retrieval"}


def build_stages(
    settings: Settings, names: Sequence[str] = STAGE_ORDER, load: Collection[str] | None = None
) -> list[Stage]:
    """The configured stages, in cascade order, sharing one `Resources`.

    `load` names the stages to build now (default: all); the others are `DeferredStage`s.
    """
    check_stage_names(names)
    classes = stage_classes()
    resources = Resources(settings)
    stages: list[Stage] = []
    for name in names:
        factory = classes[name].from_settings
        build = partial(_build, name, factory, settings, resources)
        stages.append(build() if load is None or name in load else DeferredStage(name, build))
    _warn_unavailable(stages)
    return stages


def build_runner(
    settings: Settings,
    thresholds_path: Path | None = None,
    shadow_thresholds_path: Path | None = None,
    stage_names: Sequence[str] = STAGE_ORDER,
    load: Collection[str] | None = None,
) -> CascadeRunner:
    policy = load_policy(settings.policies_dir)
    thresholds = ThresholdSet.load(thresholds_path or settings.thresholds)
    thresholds.check_names(STAGE_ORDER, policy.names)
    shadow = None
    if shadow_thresholds_path is not None:
        shadow = ThresholdSet.load(shadow_thresholds_path)
        shadow.check_names(STAGE_ORDER, policy.names)
    stages = build_stages(settings, stage_names, load)
    if settings.repeat_cache_size == 0:
        return CascadeRunner(stages, thresholds, policy.version, shadow)
    cache = RepeatCache(settings.repeat_cache_size, settings.repeat_cache_ttl_s)
    return RepeatingRunner(
        stages, thresholds, policy.version, shadow, cache, settings.data_dir, lambda: built_stage_versions(stages)
    )
