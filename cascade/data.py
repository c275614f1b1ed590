"""Labelled JSONL data sets (format: shared/data/README.md) and the deterministic split.

Every row: `id`, `text`, `flagged` (0/1), `labels` {category: 0/1} (a category missing from
`labels` is unknown, not 0), `source`, and optionally `surface` (where the content
appeared; otherwise `SOURCE_SURFACES` maps the source to one). The split is a pure function of the id, so training,
calibration and reporting never see each other's rows, whatever file order or subset.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import xxhash

from cascade.contract import SURFACE_PATTERN
from cascade.jsonl import JsonlError, read_jsonl

FLAGGED = "flagged"
# The labelled data sets sit next to the checkout (the Makefile's SHARED_DATA); relative to the
# working directory, so an installed package finds them from the project root as well.
DEFAULT_DATA_DIR = Path("../shared/data")

# The surface of a row that does not name one, by its source (docs/calibration.md, "Surfaces").
SOURCE_SURFACES: dict[str, str] = {
    "toxicchat0124": "chat_prompt",
    "sms_spam_collection": "sms",
    "davidson2017": "post",
}


class Split(StrEnum):
    TRAIN = "train"  # models and banks are built from it
    CALIBRATION = "calibration"  # thresholds are chosen on it
    TEST = "test"  # figures are reported on it, never tuned on


# Percent of ids per split: train [0, 60), calibration [60, 80), test [80, 100).
_SPLIT_EDGES = ((60, Split.TRAIN), (80, Split.CALIBRATION), (100, Split.TEST))


def split_of(item_id: str) -> Split:
    bucket = xxhash.xxh64_intdigest(item_id.encode("utf-8", "surrogatepass"), seed=20261127) % 100
    for edge, split in _SPLIT_EDGES:
        if bucket < edge:
            return split
    raise AssertionError("unreachable: bucket < 100")


@dataclass(frozen=True)
class LabelledItem:
    id: str
    text: str
    flagged: int
    labels: dict[str, int] = field(default_factory=dict)
    source: str = ""
    surface: str | None = None

    def __post_init__(self) -> None:
        if self.surface is None and self.source in SOURCE_SURFACES:
            object.__setattr__(self, "surface", SOURCE_SURFACES[self.source])
        elif self.surface is not None and not re.fullmatch(SURFACE_PATTERN, self.surface):
            raise ValueError(f"surface {self.surface!r} must match {SURFACE_PATTERN}")

    def item_record(self) -> dict[str, str]:
        """The row as a ContentItem record (id, text, surface): what the cascade sees of it, no labels."""
        return {"id": self.id, "text": self.text} | ({"surface": self.surface} if self.surface else {})

    def label(self, category: str) -> int | None:
        """0/1 for `flagged` and annotated categories, None where the source did not annotate."""
        if category == FLAGGED:
            return self.flagged
        return self.labels.get(category)


class DataError(ValueError):
    pass


def _is_bit(value: object) -> bool:
    # Strictly the integers 0 and 1: `True == 1` and `1.0 == 1` in Python, and neither is a label.
    return type(value) is int and value in (0, 1)


def labelled_from_record(record: object, default_source: str = "") -> LabelledItem:
    """The one parser of a labelled row (parsed JSON); a DataError says what is wrong."""
    if not isinstance(record, dict):
        raise DataError("not a JSON object")
    item_id, text, flagged = record.get("id"), record.get("text"), record.get("flagged")
    labels = record.get("labels") or {}
    if not isinstance(item_id, str | int) or isinstance(item_id, bool) or str(item_id) == "":
        raise DataError("missing or empty 'id'")
    if not isinstance(text, str) or not text.strip():
        raise DataError("missing or empty 'text'")
    if not _is_bit(flagged):
        raise DataError("'flagged' must be 0 or 1")
    if not isinstance(labels, dict) or not all(_is_bit(v) for v in labels.values()):
        raise DataError("'labels' must map category names to 0 or 1")
    source, surface = record.get("source"), record.get("surface")
    if surface is not None and not isinstance(surface, str):
        raise DataError("'surface' must be a string")
    return LabelledItem(
        id=str(item_id),
        text=text,
        flagged=flagged,
        labels={str(k): v for k, v in labels.items()},
        source=str(source) if source else default_source,
        surface=surface,
    )


def read_labelled(path: Path) -> Iterator[LabelledItem]:
    for lineno, value in read_jsonl(path):
        try:
            if isinstance(value, JsonlError):
                raise DataError(value.problem)
            yield labelled_from_record(value)
        except ValueError as exc:  # DataError, and a value LabelledItem refuses (e.g. the surface)
            raise DataError(f"{path}:{lineno}: not a labelled row ({exc})") from exc


class SplitChoice(StrEnum):
    """A split, or all rows: what the commands that filter labelled data by split accept."""

    ALL = "all"
    TRAIN = Split.TRAIN.value
    CALIBRATION = Split.CALIBRATION.value
    TEST = Split.TEST.value

    def keeps(self, item_id: str) -> bool:
        return self is SplitChoice.ALL or split_of(item_id).value == self.value


def in_split(rows: Iterable[LabelledItem], split: Split) -> list[LabelledItem]:
    return [row for row in rows if split_of(row.id) is split]


def load_labelled(paths: Iterable[Path], split: Split | None = None) -> list[LabelledItem]:
    rows = [row for path in paths for row in read_labelled(path)]
    return rows if split is None else in_split(rows, split)


def labelled_files(directory: Path = DEFAULT_DATA_DIR) -> list[Path]:
    """The labelled JSONL files of a data directory, in a stable order."""
    return sorted(Path(directory).glob("*.jsonl"))


def categories_of(rows: Iterable[LabelledItem]) -> list[str]:
    """`flagged` first, then every annotated category, sorted."""
    seen = {c for row in rows for c in row.labels}
    return [FLAGGED, *sorted(seen - {FLAGGED})]


def file_digest(path: Path) -> dict[str, object]:
    """Provenance of a data file: path, sha256, row count."""
    sha = hashlib.sha256()
    rows = 0
    with Path(path).open("rb") as fh:
        for line in fh:
            sha.update(line)
            rows += bool(line.strip())
    return {"path": str(path), "sha256": sha.hexdigest(), "rows": rows}
