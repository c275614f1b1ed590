"""The hash bank's in-memory index of its live entries: exact keys and near-duplicate LSH.

A dict from exact key to entry ids, and a `datasketch` MinHash LSH built from the stored
signatures (no rehashing on open). It applies rows from the store (`BankStore.rows_since`)
in write order, so it catches up with any process's writes by reading only what changed.
Not thread-safe by itself: `HashBank` serialises its calls.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from datasketch import MinHashLSH

from cascade.hashbank.entries import Hit, MatchKind, Polarity, in_quarantine
from cascade.hashbank.signal import NUM_PERM, SIGNATURE_DTYPE, Shingler, StoredSignature


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
        return in_quarantine(self.quarantine_flag, self.quarantined_until)


class BankIndex:
    """Matching over the live entries the store's rows describe."""

    def __init__(self, near_threshold: float, shingler: Shingler) -> None:
        self.near_threshold = near_threshold
        self.shingler = shingler
        self.seq = 0  # the last row applied
        self._live: dict[str, _Indexed] = {}
        self._by_key: dict[str, set[str]] = {}
        self._signatures: dict[str, np.ndarray] = {}
        self._lsh = MinHashLSH(threshold=near_threshold, num_perm=NUM_PERM)

    def apply(self, rows: Iterable[sqlite3.Row]) -> None:
        """Apply rows written since `seq`, in write order: each replaces its entry, a tombstone drops it."""
        for row in rows:
            self._unindex(row["id"])
            if not row["removed"]:
                self._index(row)
            self.seq = max(self.seq, row["seq"])

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
            signature = np.frombuffer(blob, dtype=SIGNATURE_DTYPE)
            self._signatures[entry_id] = signature
            self._lsh.insert(entry_id, StoredSignature(signature), check_duplication=False)

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

    def __len__(self) -> int:
        return len(self._live)

    def _hit(self, entry_id: str, kind: MatchKind, jaccard: float) -> Hit:
        indexed = self._live[entry_id]
        return Hit(entry_id, indexed.polarity, indexed.categories, kind, jaccard, indexed.quarantined)

    def exact(self, key: str) -> list[Hit]:
        """Entries whose normalised text has this `text_key`."""
        return [self._hit(entry_id, MatchKind.EXACT, 1.0) for entry_id in sorted(self._by_key.get(key, ()))]

    def near(self, normalized: str, exclude_key: str | None = None) -> list[Hit]:
        """Entries whose estimated Jaccard similarity with `normalized` reaches the threshold, best first.

        LSH candidates are verified against the stored signatures, so a hit is never below
        the threshold. Entries with `exclude_key` (the exact hits) are left out.
        """
        if not self._signatures:
            return []
        signature = self.shingler.signature(normalized)
        if signature is None:
            return []
        hits = []
        for entry_id in self._lsh.query(StoredSignature(signature)):
            if self._live[entry_id].text_key == exclude_key:
                continue
            jaccard = float(np.count_nonzero(self._signatures[entry_id] == signature)) / NUM_PERM
            if jaccard >= self.near_threshold:
                hits.append(self._hit(entry_id, MatchKind.NEAR, jaccard))
        return sorted(hits, key=lambda h: (-h.jaccard, h.entry_id))
