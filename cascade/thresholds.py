"""Versioned threshold sets: per stage x category boundary bands.

A band has two edges. `score >= block_at` blocks, `score < allow_below` clears, anything
between is unresolved and escalates. Either edge may be null: a null `allow_below` never
clears, a null `block_at` never blocks. Files live in `thresholds/` and carry provenance
(data, targets, achieved metrics) written by `cascade calibrate`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cascade.contract import Outcome


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

    def outcome(self, score: float) -> Outcome:
        if self.block_at is not None and score >= self.block_at:
            return Outcome.BLOCK
        if self.allow_below is not None and score < self.allow_below:
            return Outcome.CLEARED
        return Outcome.UNRESOLVED


class ThresholdSet(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str = Field(min_length=1)
    created_at: str | None = None
    description: str | None = None
    provenance: dict[str, Any] = Field(default_factory=dict)
    stages: dict[str, dict[str, Band]] = Field(default_factory=dict)

    def bands(self, stage: str) -> Mapping[str, Band]:
        return self.stages.get(stage, {})

    def check_names(self, stages: Iterable[str], categories: Iterable[str]) -> None:
        """Fail on a stage or category this deployment does not know (a typo would silently disable a band)."""
        known_stages, known_categories = set(stages), set(categories)
        for stage, bands in self.stages.items():
            if stage not in known_stages:
                raise ThresholdError(
                    f"thresholds {self.version!r}: unknown stage {stage!r} (known: {', '.join(sorted(known_stages))})"
                )
            for category in bands:
                if category not in known_categories:
                    raise ThresholdError(
                        f"thresholds {self.version!r}: stage {stage!r} has unknown category {category!r} "
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
