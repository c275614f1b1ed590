"""Versioned threshold sets: per stage x category boundary bands.

A band has two edges. `score >= block_at` blocks, `score < allow_below` clears, anything
between is unresolved and escalates. Either edge may be null: a null `allow_below` never
clears, a null `block_at` never blocks. Files live in `thresholds/` and carry provenance
(data, targets, achieved metrics) written by `cascade calibrate`.

A file holds a default band set (`stages`, `score_maps`) and optionally one band set per
surface (`surfaces`): an item is judged by its surface's set when the file has one, by the
default otherwise. `score_maps` are the isotonic maps calibration fitted (raw score →
probability of the label): the runtime applies them to report one score scale across stages.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cascade.contract import DEFAULT_BAND_SET, SURFACE_PATTERN, BandOutcome


class ThresholdError(ValueError):
    """A threshold file that cannot be used, with a message for the operator."""


class Band(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    allow_below: float | None = Field(default=None, ge=0, le=1)
    block_at: float | None = Field(default=None, ge=0, le=1)

    @model_validator(mode="after")
    def _ordered(self) -> Band:
        if self.allow_below is not None and self.block_at is not None and self.allow_below > self.block_at:
            raise ValueError(f"allow_below ({self.allow_below}) must be <= block_at ({self.block_at})")
        return self

    def outcome(self, score: float) -> BandOutcome:
        if self.block_at is not None and score >= self.block_at:
            return BandOutcome.BLOCK
        if self.allow_below is not None and score < self.allow_below:
            return BandOutcome.CLEARED
        return BandOutcome.UNRESOLVED


TIE_BREAK = 1e-6


class ScoreMap(BaseModel):
    """A non-decreasing piecewise-linear map raw score → probability: the knots of an isotonic fit."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    x: list[float] = Field(min_length=1)
    y: list[float] = Field(min_length=1)

    @model_validator(mode="after")
    def _monotone(self) -> ScoreMap:
        if len(self.x) != len(self.y):
            raise ValueError(f"x has {len(self.x)} knots and y {len(self.y)}")
        if any(b < a for a, b in zip(self.x, self.x[1:], strict=False)) or any(
            b < a for a, b in zip(self.y, self.y[1:], strict=False)
        ):
            raise ValueError("knots must be non-decreasing in x and y")
        if not 0 <= self.y[0] <= self.y[-1] <= 1:
            raise ValueError("probabilities (y) must lie in [0, 1]")
        return self

    def probabilities(self, scores: np.ndarray) -> np.ndarray:
        """The isotonic fit (clipped at the ends), with ties broken by the raw score.

        An isotonic map is flat on each plateau; items a stage ranks apart would tie there and
        rank worse than the raw score alone. Mixing in TIE_BREAK of the raw score keeps the
        stage's own order and moves no probability by more than TIE_BREAK.
        """
        scores = np.asarray(scores, dtype=float)
        return (1 - TIE_BREAK) * np.interp(scores, self.x, self.y) + TIE_BREAK * np.clip(scores, 0, 1)

    def probability(self, score: float) -> float:
        """`probabilities` of one score, equal to it bit for bit: the same operations as `np.interp` in
        plain floats, without numpy's per-call overhead (it ran for every category of every verdict)."""
        x, y, s = self.x, self.y, float(score)
        j = bisect_right(x, s) - 1  # np.interp's segment: x[j] <= s < x[j + 1]
        if j < 0:
            value = y[0]
        elif j >= len(x) - 1 or x[j] == s:
            value = y[j]
        else:
            value = (y[j + 1] - y[j]) / (x[j + 1] - x[j]) * (s - x[j]) + y[j]
        return (1 - TIE_BREAK) * value + TIE_BREAK * min(max(s, 0.0), 1.0)


StageBands = dict[str, dict[str, Band]]
StageMaps = dict[str, dict[str, ScoreMap]]


class BandSet(BaseModel):
    """The bands one group of items is judged by, and the maps that put its stages' scores on one scale."""

    model_config = ConfigDict(extra="forbid")

    stages: StageBands = Field(default_factory=dict)
    score_maps: StageMaps = Field(default_factory=dict)
    provenance: dict[str, Any] = Field(default_factory=dict)

    def bands(self, stage: str) -> Mapping[str, Band]:
        return self.stages.get(stage, {})

    def probability(self, stage: str, category: str, score: float) -> float | None:
        """The calibrated probability of `category` for a raw `stage` score; None without a map."""
        score_map = self.score_maps.get(stage, {}).get(category)
        return None if score_map is None else score_map.probability(score)

    def violation_probability(self, stage: str, scores: Mapping[str, float]) -> float | None:
        """The largest calibrated probability among a stage's scored categories; None without maps.

        A row is flagged when it violates any category, so P(flagged) >= every P(category): on a
        surface where `flagged` is not what the heads learned (spam on SMS), the category's map
        still ranks the item.
        """
        known = self.score_maps.get(stage, {})
        mapped = [known[c].probability(v) for c, v in scores.items() if c in known]
        return max(mapped) if mapped else None


class ThresholdSet(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str = Field(min_length=1)
    created_at: str | None = None
    description: str | None = None
    provenance: dict[str, Any] = Field(default_factory=dict)
    stages: StageBands = Field(default_factory=dict, description="The default band set.")
    score_maps: StageMaps = Field(default_factory=dict, description="The default band set's score maps.")
    surfaces: dict[str, BandSet] = Field(default_factory=dict, description="Band sets of surfaces calibrated alone.")

    @model_validator(mode="after")
    def _surface_names(self) -> ThresholdSet:
        for name in self.surfaces:
            if name == DEFAULT_BAND_SET or not re.fullmatch(SURFACE_PATTERN, name):
                raise ValueError(f"surface {name!r} must match {SURFACE_PATTERN} and not be {DEFAULT_BAND_SET!r}")
        return self

    def bands(self, stage: str) -> Mapping[str, Band]:
        """The default band set's bands of one stage."""
        return self.stages.get(stage, {})

    def band_set_name(self, surface: str | None) -> str:
        """The band set an item of this surface is judged by: its own if calibrated, else the default."""
        return surface if surface is not None and surface in self.surfaces else DEFAULT_BAND_SET

    def band_sets(self) -> dict[str, BandSet]:
        """Every band set by name; a surface set uses the default's maps for a stage it has none of its own for.

        Per stage, not per category: a verdict's score is the largest of a stage's calibrated
        category probabilities, and a pooled map of a category the surface never labels (profanity
        on chat prompts) would speak for the wrong traffic.
        """
        default = BandSet(stages=self.stages, score_maps=self.score_maps)
        out = {DEFAULT_BAND_SET: default}
        for name, own in self.surfaces.items():
            maps = {stage: dict(cats) for stage, cats in self.score_maps.items()} | {
                stage: dict(cats) for stage, cats in own.score_maps.items() if cats
            }
            out[name] = BandSet(stages=own.stages, score_maps=maps, provenance=own.provenance)
        return out

    def check_names(self, stages: Iterable[str], categories: Iterable[str]) -> None:
        """Fail on a stage or category this deployment does not know (a typo would silently disable a band)."""
        known_stages, known_categories = set(stages), set(categories)
        named: list[tuple[str, Mapping[str, Mapping[str, object]]]] = [
            (DEFAULT_BAND_SET, self.stages),
            (DEFAULT_BAND_SET, self.score_maps),
        ]
        for surface, band_set in self.surfaces.items():
            named += [(surface, band_set.stages), (surface, band_set.score_maps)]
        for set_name, by_stage in named:
            where = f"thresholds {self.version!r}" + ("" if set_name == DEFAULT_BAND_SET else f" surface {set_name!r}")
            for stage, by_category in by_stage.items():
                if stage not in known_stages:
                    raise ThresholdError(f"{where}: unknown stage {stage!r} (known: {', '.join(sorted(known_stages))})")
                for category in by_category:
                    if category not in known_categories:
                        raise ThresholdError(
                            f"{where}: stage {stage!r} has unknown category {category!r} "
                            f"(known: {', '.join(sorted(known_categories))})"
                        )

    @classmethod
    def load(cls, path: Path) -> ThresholdSet:
        try:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ThresholdError(f"thresholds file not found: {path}") from exc
        except yaml.YAMLError as exc:
            raise ThresholdError(f"thresholds file {path} is not valid YAML: {exc}") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise ThresholdError(f"thresholds file {path} is not a readable UTF-8 YAML file: {exc}") from exc
        if not isinstance(raw, dict):
            raise ThresholdError(f"thresholds file {path} must hold a mapping with 'version' and 'stages'")
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors())
            raise ThresholdError(f"thresholds file {path} is invalid: {problems}") from exc

    def dump(self, path: Path) -> None:
        Path(path).write_text(
            yaml.safe_dump(self.model_dump(mode="json", exclude_none=False), sort_keys=False, allow_unicode=True),
            encoding="utf-8",
        )
