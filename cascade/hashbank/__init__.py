"""Persistent banks of known-bad and known-good texts, matched exactly and as near-duplicates.

`HashBank` is the one object the hash stage, the CLI and the banks topic use: a store (one
SQLite file, `store.BankStore`) plus an in-memory index of its live entries (`index.BankIndex`:
exact keys and MinHash LSH), kept apart as python-threatexchange keeps an index apart from
its signal (`signal.Shingler` makes the signatures both sides use). Every write goes to the
store, then the index applies the rows written since its last sync, by this process or any
other; `refresh()` costs one `PRAGMA data_version` when nothing changed.

`FloodGuard` (`floodguard`) watches which entries recent traffic matches: an unconfirmed entry
that suddenly matches too large a share of it is quarantined (it stops deciding) until the
quarantine expires or an operator confirms it. A confirmed entry (added by `bank add`, or
imported with `--confirm`) is never quarantined: a flood of copies of a confirmed known-bad
text is a campaign to block, not a reason to stop blocking it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

from cascade.hashbank.entries import (
    BankEntry,
    BankError,
    BankStats,
    EntryInput,
    Hit,
    MatchKind,
    Polarity,
    UpsertReport,
    derived_entry_id,
    entry_from_record,
)
from cascade.hashbank.floodguard import FloodGuard
from cascade.hashbank.index import BankIndex
from cascade.hashbank.signal import Shingler
from cascade.hashbank.store import BANK_FILE, BankStore
from cascade.normalize import text_key

__all__ = [
    "BANK_FILE",
    "BankEntry",
    "BankError",
    "BankStats",
    "EntryInput",
    "FloodGuard",
    "HashBank",
    "Hit",
    "MatchKind",
    "Polarity",
    "Shingler",
    "UpsertReport",
    "derived_entry_id",
    "entry_from_record",
]


T = TypeVar("T")


class HashBank:
    """The bank file plus the in-memory exact and near-duplicate index of its live entries.

    Thread-safe (one lock around the store's connection and the index); one instance per
    process is enough, several processes may share the file (SQLite WAL).
    """

    def __init__(self, path: Path, near_threshold: float = 0.7, shingler: Shingler | None = None) -> None:
        if not 0 < near_threshold <= 1:
            raise BankError(f"near-duplicate threshold must be in (0, 1], got {near_threshold}")
        self.path = Path(path)
        self.near_threshold = near_threshold
        self.shingler = shingler or Shingler()
        self._lock = threading.RLock()
        self._store = BankStore(self.path, self.shingler)
        self._index = BankIndex(near_threshold, self.shingler)
        self._data_version: int | None = None
        self._sync()

    @classmethod
    def open(cls, data_dir: Path, near_threshold: float = 0.7) -> HashBank:
        return cls(Path(data_dir) / BANK_FILE, near_threshold)

    def _sync(self) -> None:
        """Apply every row written since the last sync (by anyone) to the index."""
        with self._lock:
            self._index.apply(self._store.rows_since(self._index.seq))
            self._data_version = self._store.data_version()

    def refresh(self) -> None:
        """Catch up with writes by other connections; one cheap pragma when there were none."""
        with self._lock:
            if self._store.data_version() != self._data_version:
                self._sync()

    def __len__(self) -> int:
        return len(self._index)

    # ----- matching ------------------------------------------------------------------------

    def exact(self, key: str) -> list[Hit]:
        """Entries whose normalised text has this `text_key`."""
        with self._lock:
            return self._index.exact(key)

    def near(self, normalized: str, exclude_key: str | None = None) -> list[Hit]:
        """Entries whose estimated Jaccard similarity with `normalized` reaches the threshold, best first."""
        with self._lock:
            return self._index.near(normalized, exclude_key)

    def lookup(self, normalized: str) -> list[Hit]:
        """Exact hits, then near hits; for tools and tests (the stage calls `exact`/`near` itself)."""
        key = text_key(normalized)
        return self.exact(key) + self.near(normalized, exclude_key=key)

    # ----- writes: to the store, then the index catches up ---------------------------------

    def _write(self, change: Callable[[], T]) -> T:
        with self._lock:
            result = change()
            self._sync()
        return result

    def upsert(self, entries: Iterable[EntryInput], added_by: str) -> UpsertReport:
        """Add or update entries by id in one transaction. Re-adding an identical entry changes nothing.

        A changed text resets the entry's quarantine and confirmation: they were about the old text.
        """
        return self._write(lambda: self._store.upsert(entries, added_by))

    def remove(self, entry_id: str) -> bool:
        """Remove a live entry (kept as a tombstone so other processes' indexes drop it too)."""
        return self._write(lambda: self._store.remove(entry_id))

    def quarantine(self, entry_id: str, reason: str, duration_s: float) -> bool:
        """Stop an entry from deciding for `duration_s`; False if it is unknown, already quarantined or confirmed."""
        return self._write(lambda: self._store.quarantine(entry_id, reason, duration_s))

    def confirm(self, entry_id: str) -> bool:
        """An operator vouches for the entry: lift its quarantine, and never quarantine it again."""
        return self._write(lambda: self._store.confirm(entry_id))

    # ----- reads for operators -------------------------------------------------------------

    def get(self, entry_id: str) -> BankEntry | None:
        with self._lock:
            return self._store.get(entry_id)

    def entries(self, quarantined_only: bool = False, limit: int | None = None) -> list[BankEntry]:
        with self._lock:
            return self._store.entries(quarantined_only, limit)

    def stats(self) -> BankStats:
        with self._lock:
            return self._store.stats()

    def close(self) -> None:
        with self._lock:
            self._store.close()
