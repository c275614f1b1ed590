"""What a hash bank holds and answers: entries, their inputs, hits, and the reports of writes."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum

from cascade.normalize import has_content, normalize, text_key


class BankError(ValueError):
    """An entry or request the bank cannot accept, with a message for the operator."""


class Polarity(StrEnum):
    BAD = "bad"  # a match blocks
    GOOD = "good"  # a match clears: a known false positive


class MatchKind(StrEnum):
    EXACT = "exact"
    NEAR = "near"


@dataclass(frozen=True)
class EntryInput:
    """What an operator or an import adds. Categories matter for bad entries only."""

    id: str
    text: str
    polarity: Polarity
    categories: tuple[str, ...] = ()
    source: str = ""
    confirmed: bool = False  # an operator vouches for it: the flood guard never quarantines it

    def __post_init__(self) -> None:
        if not self.id.strip():
            raise BankError("an entry needs a non-empty id")
        if not has_content(normalize(self.text)):
            raise BankError(
                f"entry {self.id!r}: the text has no letters or digits once normalised; it could never match"
            )


def derived_entry_id(polarity: Polarity, text: str) -> str:
    """The id of an entry added without one: from the normalised text, so adding a disguised copy
    of a banked text updates that entry."""
    return f"{polarity.value}-{text_key(normalize(text))[:16]}"


def entry_from_record(record: object, default_source: str = "") -> EntryInput:
    """An entry from one JSON record, in either accepted shape.

    - bank-entry shape: `{"id", "text", "polarity": "bad"|"good", "categories": [...], "source"?}`;
    - labelled-data shape (shared/data): `{"id", "text", "flagged": 0|1, "labels": {cat: 0|1}, "source"?}`:
      flagged rows become bad entries with the categories labelled 1, the others good entries.
    """
    if not isinstance(record, dict):
        raise BankError(f"expected a JSON object, got {type(record).__name__}")
    entry_id, text = record.get("id"), record.get("text")
    if not isinstance(entry_id, str) or not isinstance(text, str):
        raise BankError("'id' and 'text' must be strings")
    source = record.get("source") or default_source
    if not isinstance(source, str):
        raise BankError("'source' must be a string")
    if "polarity" in record:
        try:
            polarity = Polarity(record["polarity"])
        except ValueError:
            raise BankError(f"'polarity' must be 'bad' or 'good', got {record['polarity']!r}") from None
        categories = record.get("categories") or []
        if not isinstance(categories, list) or not all(isinstance(c, str) for c in categories):
            raise BankError("'categories' must be a list of strings")
    elif "flagged" in record:
        flagged, labels = record["flagged"], record.get("labels") or {}
        if flagged not in (0, 1) or isinstance(flagged, bool) or not isinstance(labels, dict):
            raise BankError("'flagged' must be 0 or 1 and 'labels' an object")
        polarity = Polarity.BAD if flagged else Polarity.GOOD
        categories = sorted(str(c) for c, v in labels.items() if v == 1) if flagged else []
    else:
        raise BankError("a record needs 'polarity' (bank entry) or 'flagged' (labelled data)")
    return EntryInput(entry_id, text, polarity, tuple(categories), source)


@dataclass(frozen=True)
class BankEntry:
    id: str
    polarity: Polarity
    original: str
    normalized: str
    text_key: str
    categories: tuple[str, ...]
    source: str
    added_at: str
    added_by: str
    quarantined: bool
    quarantine_reason: str | None
    confirmed: bool
    quarantined_until: str | None = None


@dataclass(frozen=True)
class Hit:
    """One bank entry that an item matched."""

    entry_id: str
    polarity: Polarity
    categories: tuple[str, ...]
    kind: MatchKind
    jaccard: float
    quarantined: bool

    def as_detail(self) -> dict[str, object]:
        return {
            "entry_id": self.entry_id,
            "polarity": self.polarity.value,
            "bank": self.kind.value,
            "jaccard": round(self.jaccard, 4),
            "categories": list(self.categories),
        }


@dataclass
class UpsertReport:
    added: int = 0
    updated: int = 0
    unchanged: int = 0

    def __iadd__(self, other: UpsertReport) -> UpsertReport:
        self.added += other.added
        self.updated += other.updated
        self.unchanged += other.unchanged
        return self


@dataclass(frozen=True)
class BankStats:
    by_polarity: dict[str, int]
    by_category: dict[str, int]
    quarantined: int
    confirmed: int
    removed: int


def now_iso(after_s: float = 0.0) -> str:
    """Now (plus `after_s`) as the ISO 8601 UTC text the store keeps and compares."""
    return (datetime.now(UTC) + timedelta(seconds=after_s)).isoformat(timespec="seconds")


def in_quarantine(flag: object, until: str | None) -> bool:
    """A quarantine holds until its end time (none: until an operator lifts it, as before expiry existed)."""
    return bool(flag) and (until is None or until > now_iso())
