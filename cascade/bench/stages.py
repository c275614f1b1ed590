"""The configured cheap stages as the bench runs them, and the ones it cannot, with the reason."""

from __future__ import annotations

from dataclasses import dataclass, field

from cascade.assembly import build_stages, freeze_loaded_heap, unbilled_stages
from cascade.contract import ContentItem
from cascade.pipeline import new_context
from cascade.settings import Settings
from cascade.stages.base import Stage

PROBE_TEXT = "Are we still meeting for lunch tomorrow?"


@dataclass
class BenchStages:
    stages: list[Stage]
    missing: dict[str, str] = field(default_factory=dict)  # stage name -> why it is not in the run

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.stages]

    async def aclose(self) -> None:
        for stage in self.stages:
            await stage.aclose()


async def open_stages(settings: Settings, names: tuple[str, ...] | None = None) -> BenchStages:
    """Every stage of `names` that can be built and reports itself available, sharing one embedder.

    Default: the unbilled stages. A billed one (the LLM) is never run by the bench: no real LLM is
    reachable here, and a configured one would bill every benchmark item.
    """
    names = unbilled_stages() if names is None else names
    missing: dict[str, str] = {}
    buildable = list(names)
    try:
        built = build_stages(settings, buildable)
    except Exception:  # find out which stage cannot be built, then build the rest together
        buildable = []
        for name in names:
            try:
                (probe,) = build_stages(settings, [name])
            except Exception as exc:
                missing[name] = f"{type(exc).__name__}: {exc}"
                continue
            await probe.aclose()
            buildable.append(name)
        built = build_stages(settings, buildable) if buildable else []
    usable = []
    for stage in built:
        # Probe first: a store held by another process fails the probe with the root cause.
        reason = await _probe_error(stage) or stage.unavailable_reason
        if reason is None:
            usable.append(stage)
        else:
            missing[stage.name] = reason
            await stage.aclose()
    freeze_loaded_heap()  # as `cascade moderate` and the stream workers do once their stages are loaded
    return BenchStages(usable, missing)


async def _probe_error(stage: Stage) -> str | None:
    """Why the stage cannot judge a probe item (e.g. its store is held by another process), or None.

    Timing a stage that errors would time its failure path, not the stage.
    """
    try:
        (result,) = await stage.score([new_context(ContentItem(id="bench-probe", text=PROBE_TEXT))])
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return result.error
