"""Persistent banks of known-bad and known-good texts, matched exactly and as near-duplicates.

One SQLite file (`data_dir/banks.sqlite`) holds every entry with its original text, its
normalised form (`cascade.normalize`), the exact key of that form and its MinHash
signature. A `HashBank` keeps an in-memory index of the live entries: a dict from exact
key to entry ids, and a `datasketch` MinHash LSH built from the stored signatures (no
rehashing on open). Every write bumps a per-row sequence number and soft-deletes on
removal, so an index catches up with other processes' writes by reading only the rows
changed since its last sync; `refresh()` costs one `PRAGMA data_version` when nothing
changed.

`FloodGuard` watches which entries recent traffic matches: an unconfirmed entry that suddenly
matches too large a share of it is quarantined (it stops deciding) until the quarantine expires
or an operator confirms it. A confirmed entry (added by `bank add`, or imported with
`--confirm`) is never quarantined: a flood of copies of a confirmed known-bad text is a
campaign to block, not a reason to stop blocking it.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path

import numpy as np
import xxhash
from datasketch import MinHash, MinHashLSH

from cascade.bankversion import bump_bank_version
from cascade.normalize import NORMALIZE_VERSION, has_content, normalize, text_key

BANK_FILE = "banks.sqlite"
NUM_PERM = 128
_MINHASH_SCHEME = "affine32"
# Fixed permutations: signatures stored today must stay comparable with queries tomorrow.
_PERMUTATIONS = MinHash(num_perm=NUM_PERM, seed=1, scheme=_MINHASH_SCHEME).permutations
_SIGNATURE_DTYPE = np.dtype("<u4")
_SQL_CHUNK = 500  # ids per `IN (...)` query, well under SQLite's variable limit

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    id TEXT PRIMARY KEY,
    polarity TEXT NOT NULL CHECK (polarity IN ('bad', 'good')),
    original TEXT NOT NULL,
    normalized TEXT NOT NULL,
    text_key TEXT NOT NULL,
    signature BLOB,
    categories TEXT NOT NULL,
    source TEXT NOT NULL,
    added_at TEXT NOT NULL,
    added_by TEXT NOT NULL,
    quarantined INTEGER NOT NULL DEFAULT 0,
    quarantine_reason TEXT,
    confirmed INTEGER NOT NULL DEFAULT 0,
    removed INTEGER NOT NULL DEFAULT 0,
    seq INTEGER NOT NULL,
    quarantined_until TEXT
);
CREATE INDEX IF NOT EXISTS entries_seq ON entries (seq);
CREATE INDEX IF NOT EXISTS entries_text_key ON entries (text_key);
"""
_COLUMN_NAMES = (
    "id",
    "polarity",
    "original",
    "normalized",
    "text_key",
    "signature",
    "categories",
    "source",
    "added_at",
    "added_by",
    "quarantined",
    "quarantine_reason",
    "confirmed",
    "removed",
    "seq",
    "quarantined_until",
)
_COLUMNS = ", ".join(_COLUMN_NAMES)


# SQL: a quarantine in force now (`:now` bound to the current time).
_ACTIVE_QUARANTINE = "(quarantined = 1 AND (quarantined_until IS NULL OR quarantined_until > :now))"


class BankError(ValueError):
    """An entry or request the bank cannot accept, with a message for the operator."""


class Polarity(StrEnum):
    BAD = "bad"  # a match blocks
    GOOD = "good"  # a match clears: a known false positive


class MatchKind(StrEnum):
    EXACT = "exact"
    NEAR = "near"


@dataclass(frozen=True)
class Shingler:
    """The sets that MinHash compares: word n-grams plus character n-grams of the normalised text.

    Word bigrams alone miss on short texts (few shingles, one changed word halves the
    overlap); character n-grams carry typos and small edits. Measured in docs/hash.md.
    """

    word_n: int = 2
    char_n: int = 4

    @property
    def version(self) -> str:
        return f"w{self.word_n}c{self.char_n}"

    def shingles(self, normalized: str) -> set[str]:
        words = normalized.split()
        found = {" ".join(words[i : i + self.word_n]) for i in range(max(1, len(words) - self.word_n + 1))}
        if self.char_n:
            padded = f" {normalized} "
            # A "\x01" prefix keeps character grams apart from one-word word grams.
            found.update("\x01" + padded[i : i + self.char_n] for i in range(len(padded) - self.char_n + 1))
        found.discard("")
        return found

    def signature(self, normalized: str) -> np.ndarray | None:
        """The MinHash signature (NUM_PERM uint32), or None for a text with nothing to match."""
        if not has_content(normalized):
            return None
        minhash = MinHash(
            num_perm=NUM_PERM, permutations=_PERMUTATIONS, hashfunc=xxhash.xxh32_intdigest, scheme=_MINHASH_SCHEME
        )
        minhash.update_batch([s.encode("utf-8", "surrogatepass") for s in self.shingles(normalized)])
        return minhash.hashvalues.astype(_SIGNATURE_DTYPE, copy=False)


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


@dataclass
class _Indexed:
    """What matching needs of a live entry."""

    polarity: Polarity
    categories: tuple[str, ...]
    text_key: str
    quarantine_flag: bool
    quarantined_until: str | None
    confirmed: bool
    has_signature: bool

    @property
    def quarantined(self) -> bool:
        return _in_quarantine(self.quarantine_flag, self.quarantined_until)


def _now(after_s: float = 0.0) -> str:
    return (datetime.now(UTC) + timedelta(seconds=after_s)).isoformat(timespec="seconds")


def _in_quarantine(flag: object, until: str | None) -> bool:
    """A quarantine holds until its end time (none: until an operator lifts it, as before expiry existed)."""
    return bool(flag) and (until is None or until > _now())


def _entry_from_row(row: sqlite3.Row) -> BankEntry:
    return BankEntry(
        id=row["id"],
        polarity=Polarity(row["polarity"]),
        original=row["original"],
        normalized=row["normalized"],
        text_key=row["text_key"],
        categories=tuple(json.loads(row["categories"])),
        source=row["source"],
        added_at=row["added_at"],
        added_by=row["added_by"],
        quarantined=_in_quarantine(row["quarantined"], row["quarantined_until"]),
        quarantine_reason=row["quarantine_reason"],
        quarantined_until=row["quarantined_until"],
        confirmed=bool(row["confirmed"]),
    )


def _chunks(items: Sequence[str], size: int = _SQL_CHUNK) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class HashBank:
    """The bank file plus the in-memory exact and near-duplicate index of its live entries.

    Thread-safe (one lock around the connection and the index); one instance per process
    is enough, several processes may share the file (SQLite WAL).
    """

    def __init__(self, path: Path, near_threshold: float = 0.7, shingler: Shingler | None = None) -> None:
        if not 0 < near_threshold <= 1:
            raise BankError(f"near-duplicate threshold must be in (0, 1], got {near_threshold}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.near_threshold = near_threshold
        self.shingler = shingler or Shingler()
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA busy_timeout=10000")
        self._db.executescript(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(entries)")}
        if "quarantined_until" not in columns:  # a bank file from before quarantines expired
            self._db.execute("ALTER TABLE entries ADD COLUMN quarantined_until TEXT")
        self._reset_index()
        self._upgrade_stored_keys()
        self._sync()

    @classmethod
    def open(cls, data_dir: Path, near_threshold: float = 0.7) -> HashBank:
        return cls(Path(data_dir) / BANK_FILE, near_threshold)

    # ----- index ---------------------------------------------------------------------------

    def _reset_index(self) -> None:
        self._seq = 0
        self._data_version: int | None = None
        self._live: dict[str, _Indexed] = {}
        self._by_key: dict[str, set[str]] = {}
        self._signatures: dict[str, np.ndarray] = {}
        self._lsh = MinHashLSH(threshold=self.near_threshold, num_perm=NUM_PERM)

    def _upgrade_stored_keys(self) -> None:
        """Recompute normalised forms and signatures written by another normaliser or shingler version."""
        wanted = {"normalize_version": NORMALIZE_VERSION, "shingler": self.shingler.version, "num_perm": str(NUM_PERM)}
        with self._lock:
            stored = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
            if all(stored.get(k) == v for k, v in wanted.items()):
                return
            rows = self._db.execute("SELECT id, original FROM entries").fetchall()
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for row in rows:
                    normalized = normalize(row["original"])
                    signature = self.shingler.signature(normalized)
                    self._db.execute(
                        "UPDATE entries SET normalized = ?, text_key = ?, signature = ? WHERE id = ?",
                        (
                            normalized,
                            text_key(normalized),
                            None if signature is None else signature.tobytes(),
                            row["id"],
                        ),
                    )
                self._db.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", wanted.items())
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _sync(self) -> None:
        """Apply every row written since the last sync (by anyone) to the in-memory index."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, polarity, text_key, signature, categories, quarantined, quarantined_until, confirmed, "
                "removed, seq "
                "FROM entries WHERE seq > ? ORDER BY seq",
                (self._seq,),
            ).fetchall()
            for row in rows:
                self._unindex(row["id"])
                if not row["removed"]:
                    self._index(row)
                self._seq = max(self._seq, row["seq"])
            self._data_version = self._db.execute("PRAGMA data_version").fetchone()[0]

    def _index(self, row: sqlite3.Row) -> None:
        entry_id = row["id"]
        blob = row["signature"]
        self._live[entry_id] = _Indexed(
            polarity=Polarity(row["polarity"]),
            categories=tuple(json.loads(row["categories"])),
            text_key=row["text_key"],
            quarantine_flag=bool(row["quarantined"]),
            quarantined_until=row["quarantined_until"],
            confirmed=bool(row["confirmed"]),
            has_signature=blob is not None,
        )
        self._by_key.setdefault(row["text_key"], set()).add(entry_id)
        if blob is not None:
            signature = np.frombuffer(blob, dtype=_SIGNATURE_DTYPE)
            self._signatures[entry_id] = signature
            self._lsh.insert(entry_id, _StoredSignature(signature), check_duplication=False)

    def _unindex(self, entry_id: str) -> None:
        indexed = self._live.pop(entry_id, None)
        if indexed is None:
            return
        ids = self._by_key.get(indexed.text_key)
        if ids is not None:
            ids.discard(entry_id)
            if not ids:
                del self._by_key[indexed.text_key]
        if self._signatures.pop(entry_id, None) is not None:
            self._lsh.remove(entry_id)

    def refresh(self) -> None:
        """Catch up with writes by other connections; one cheap pragma when there were none."""
        with self._lock:
            if self._db.execute("PRAGMA data_version").fetchone()[0] != self._data_version:
                self._sync()

    def __len__(self) -> int:
        return len(self._live)

    # ----- matching ------------------------------------------------------------------------

    def _hit(self, entry_id: str, kind: MatchKind, jaccard: float) -> Hit:
        indexed = self._live[entry_id]
        return Hit(entry_id, indexed.polarity, indexed.categories, kind, jaccard, indexed.quarantined)

    def exact(self, key: str) -> list[Hit]:
        """Entries whose normalised text has this `text_key`."""
        with self._lock:
            return [self._hit(entry_id, MatchKind.EXACT, 1.0) for entry_id in sorted(self._by_key.get(key, ()))]

    def near(self, normalized: str, exclude_key: str | None = None) -> list[Hit]:
        """Entries whose estimated Jaccard similarity with `normalized` reaches the threshold, best first.

        LSH candidates are verified against the stored signatures, so a hit is never below
        the threshold. Entries with `exclude_key` (the exact hits) are left out.
        """
        with self._lock:
            if not self._signatures:
                return []
            signature = self.shingler.signature(normalized)
            if signature is None:
                return []
            hits = []
            for entry_id in self._lsh.query(_StoredSignature(signature)):
                if self._live[entry_id].text_key == exclude_key:
                    continue
                jaccard = float(np.count_nonzero(self._signatures[entry_id] == signature)) / NUM_PERM
                if jaccard >= self.near_threshold:
                    hits.append(self._hit(entry_id, MatchKind.NEAR, jaccard))
            return sorted(hits, key=lambda h: (-h.jaccard, h.entry_id))

    def lookup(self, normalized: str) -> list[Hit]:
        """Exact hits, then near hits; for tools and tests (the stage calls `exact`/`near` itself)."""
        key = text_key(normalized)
        return self.exact(key) + self.near(normalized, exclude_key=key)

    # ----- writes --------------------------------------------------------------------------

    def _next_seq(self) -> int:
        return int(self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM entries").fetchone()[0]) + 1

    def _existing(self, ids: Sequence[str]) -> dict[str, sqlite3.Row]:
        found: dict[str, sqlite3.Row] = {}
        for chunk in _chunks(ids):
            marks = ",".join("?" * len(chunk))
            for row in self._db.execute(f"SELECT {_COLUMNS} FROM entries WHERE id IN ({marks})", tuple(chunk)):
                found[row["id"]] = row
        return found

    def upsert(self, entries: Iterable[EntryInput], added_by: str) -> UpsertReport:
        """Add or update entries by id in one transaction. Re-adding an identical entry changes nothing.

        A changed text resets the entry's quarantine and confirmation: they were about the old text.
        """
        batch = list(entries)
        report = UpsertReport()
        if not batch:
            return report
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                current = {entry_id: dict(row) for entry_id, row in self._existing([e.id for e in batch]).items()}
                seq = self._next_seq()
                changed: dict[str, dict[str, object]] = {}
                for entry in batch:
                    before = current.get(entry.id)
                    categories = json.dumps(sorted(set(entry.categories)))
                    if (
                        before is not None
                        and not before["removed"]
                        and bool(before["confirmed"]) >= entry.confirmed
                        and before["polarity"] == entry.polarity.value
                        and before["original"] == entry.text
                        and before["categories"] == categories
                        and before["source"] == entry.source
                    ):
                        report.unchanged += 1
                        continue
                    same_text = before is not None and before["original"] == entry.text
                    if same_text:
                        normalized, key, signature = before["normalized"], before["text_key"], before["signature"]
                    else:
                        normalized = normalize(entry.text)
                        key = text_key(normalized)
                        computed = self.shingler.signature(normalized)
                        signature = None if computed is None else computed.tobytes()
                    keep_flags = same_text and not before["removed"]
                    row = {
                        "id": entry.id,
                        "polarity": entry.polarity.value,
                        "original": entry.text,
                        "normalized": normalized,
                        "text_key": key,
                        "signature": signature,
                        "categories": categories,
                        "source": entry.source,
                        "added_at": before["added_at"] if before is not None else _now(),
                        "added_by": before["added_by"] if before is not None else added_by,
                        "quarantined": before["quarantined"] if keep_flags and not entry.confirmed else 0,
                        "quarantine_reason": before["quarantine_reason"] if keep_flags else None,
                        "confirmed": 1 if entry.confirmed else before["confirmed"] if keep_flags else 0,
                        "removed": 0,
                        "seq": seq,
                        "quarantined_until": before["quarantined_until"] if keep_flags else None,
                    }
                    seq += 1
                    if before is None or before["removed"]:
                        report.added += 1
                    else:
                        report.updated += 1
                    current[entry.id] = changed[entry.id] = row
                self._db.executemany(
                    f"INSERT OR REPLACE INTO entries ({_COLUMNS}) VALUES ({','.join('?' * len(_COLUMN_NAMES))})",
                    [tuple(row[c] for c in _COLUMN_NAMES) for row in changed.values()],
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._sync()
        if changed:
            bump_bank_version(self.path.parent)
        return report

    def _update_flags(
        self,
        entry_id: str,
        assignments: str,
        params: tuple[object, ...],
        condition: str,
        condition_params: tuple[object, ...] = (),
    ) -> bool:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                changed = self._db.execute(
                    f"UPDATE entries SET {assignments}, seq = ? WHERE id = ? AND removed = 0 AND {condition}",
                    (*params, self._next_seq(), entry_id, *condition_params),
                ).rowcount
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._sync()
        if changed:
            bump_bank_version(self.path.parent)
        return changed > 0

    def remove(self, entry_id: str) -> bool:
        """Remove a live entry (kept as a tombstone so other processes' indexes drop it too)."""
        return self._update_flags(entry_id, "removed = 1", (), "1")

    def quarantine(self, entry_id: str, reason: str, duration_s: float) -> bool:
        """Stop an entry from deciding for `duration_s`; False if it is unknown, already quarantined or confirmed."""
        now = _now()
        return self._update_flags(
            entry_id,
            "quarantined = 1, quarantine_reason = ?, quarantined_until = ?",
            (reason, _now(duration_s)),
            "confirmed = 0 AND (quarantined = 0 OR (quarantined_until IS NOT NULL AND quarantined_until <= ?))",
            (now,),
        )

    def confirm(self, entry_id: str) -> bool:
        """An operator vouches for the entry: lift its quarantine, and never quarantine it again."""
        return self._update_flags(entry_id, "confirmed = 1, quarantined = 0, quarantined_until = NULL", (), "1")

    # ----- reads for operators -------------------------------------------------------------

    def get(self, entry_id: str) -> BankEntry | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {_COLUMNS} FROM entries WHERE id = ? AND removed = 0", (entry_id,)
            ).fetchone()
        return None if row is None else _entry_from_row(row)

    def entries(self, quarantined_only: bool = False, limit: int | None = None) -> list[BankEntry]:
        where = "removed = 0" + (f" AND {_ACTIVE_QUARANTINE}" if quarantined_only else "")
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM entries WHERE {where} ORDER BY added_at DESC, id LIMIT :limit",
                {"limit": -1 if limit is None else limit, "now": _now()},
            ).fetchall()
        return [_entry_from_row(row) for row in rows]

    def stats(self) -> BankStats:
        with self._lock:
            by_polarity = dict(
                self._db.execute(
                    "SELECT polarity, COUNT(*) FROM entries WHERE removed = 0 GROUP BY polarity"
                ).fetchall()
            )
            by_category: Counter[str] = Counter()
            for (categories,) in self._db.execute(
                "SELECT categories FROM entries WHERE removed = 0 AND polarity = 'bad'"
            ):
                by_category.update(json.loads(categories))
            quarantined, confirmed, removed = self._db.execute(
                f"SELECT COALESCE(SUM({_ACTIVE_QUARANTINE} AND NOT removed), 0),"
                " COALESCE(SUM(confirmed AND NOT removed), 0), COALESCE(SUM(removed), 0) FROM entries",
                {"now": _now()},
            ).fetchone()
        return BankStats(
            by_polarity={p.value: int(by_polarity.get(p.value, 0)) for p in Polarity},
            by_category=dict(sorted(by_category.items())),
            quarantined=int(quarantined),
            confirmed=int(confirmed),
            removed=int(removed),
        )

    def close(self) -> None:
        with self._lock:
            self._db.close()


class _StoredSignature:
    """What `MinHashLSH` reads of a MinHash, around a stored signature (a full MinHash costs ~40 µs to build)."""

    scheme = _MINHASH_SCHEME

    def __init__(self, hashvalues: np.ndarray) -> None:
        self.hashvalues = hashvalues

    def __len__(self) -> int:
        return len(self.hashvalues)


@dataclass
class FloodGuard:
    """Counts which entries the last `window` items matched, to catch an entry matching too much.

    A bank entry is a statement about one text; when it suddenly matches more than `share`
    of recent traffic it is more likely too generic (or the normaliser folds too much) than a
    real campaign of copies, and auto-deciding on it would block or clear traffic wholesale.
    """

    window: int
    share: float
    min_items: int
    _recent: deque[tuple[str, ...]] = field(default_factory=deque, init=False)
    _counts: Counter[str] = field(default_factory=Counter, init=False)

    def record(self, entry_ids: Iterable[str]) -> list[str]:
        """Record one item's matched entries; return those now over the share."""
        matched = tuple(sorted(set(entry_ids)))
        if len(self._recent) == self.window:
            for expired in self._recent.popleft():
                self._counts[expired] -= 1
                if not self._counts[expired]:
                    del self._counts[expired]  # keep the counter as small as the window
        self._recent.append(matched)
        self._counts.update(matched)
        seen = len(self._recent)
        if seen < self.min_items:
            return []
        return [entry_id for entry_id in matched if self._counts[entry_id] > self.share * seen]

    def count(self, entry_id: str) -> int:
        return self._counts[entry_id]

    def __len__(self) -> int:
        return len(self._recent)
