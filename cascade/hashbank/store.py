"""The hash bank's store: one SQLite file (`data_dir/banks.sqlite`) with every entry.

Each row holds the original text, its normalised form (`cascade.normalize`), the exact key of
that form and its MinHash signature (`cascade.hashbank.signal`). Every write bumps a per-row
sequence number and soft-deletes on removal, so an index catches up with any process's writes
by reading only the rows changed since its last sync (`rows_since`); `data_version` tells
whether anything changed at all. Not thread-safe by itself: `HashBank` serialises its calls.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from cascade.bankversion import bump_bank_version
from cascade.hashbank.entries import BankEntry, BankStats, EntryInput, Polarity, UpsertReport, in_quarantine, now_iso
from cascade.hashbank.signal import NUM_PERM, Shingler
from cascade.locks import process_lock
from cascade.normalize import NORMALIZE_VERSION, normalize, text_key

BANK_FILE = "banks.sqlite"
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
        quarantined=in_quarantine(row["quarantined"], row["quarantined_until"]),
        quarantine_reason=row["quarantine_reason"],
        quarantined_until=row["quarantined_until"],
        confirmed=bool(row["confirmed"]),
    )


def _chunks(items: Sequence[str], size: int = _SQL_CHUNK) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class BankStore:
    """The entries table of one bank file, with its schema migrations."""

    def __init__(self, path: Path, shingler: Shingler) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.shingler = shingler
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA busy_timeout=10000")
        # One process at a time sets the file up: on a new file, turning WAL on and creating the schema
        # need locks SQLite refuses at once rather than wait for (two workers starting together failed
        # with "database is locked").
        with process_lock(self.path.with_name(self.path.name + ".lock")):
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(entries)")}
            if "quarantined_until" not in columns:  # a bank file from before quarantines expired
                self._db.execute("ALTER TABLE entries ADD COLUMN quarantined_until TEXT")
            self._upgrade_stored_keys()

    def _upgrade_stored_keys(self) -> None:
        """Recompute normalised forms and signatures written by another normaliser or shingler version."""
        wanted = {"normalize_version": NORMALIZE_VERSION, "shingler": self.shingler.version, "num_perm": str(NUM_PERM)}
        stored = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        if all(stored.get(k) == v for k, v in wanted.items()):
            return
        rows = self._db.execute("SELECT id, original FROM entries").fetchall()
        with self._transaction():
            for row in rows:
                normalized = normalize(row["original"])
                signature = self.shingler.signature(normalized)
                self._db.execute(
                    "UPDATE entries SET normalized = ?, text_key = ?, signature = ? WHERE id = ?",
                    (normalized, text_key(normalized), None if signature is None else signature.tobytes(), row["id"]),
                )
            self._db.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", wanted.items())

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """One write transaction, taken up front (IMMEDIATE: no upgrade deadlock with another writer)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def data_version(self) -> int:
        """Changes whenever any connection committed a write (SQLite's `PRAGMA data_version`)."""
        return int(self._db.execute("PRAGMA data_version").fetchone()[0])

    def rows_since(self, seq: int) -> list[sqlite3.Row]:
        """What the index needs of every row written after `seq`, in write order (tombstones too)."""
        return self._db.execute(
            "SELECT id, polarity, text_key, signature, categories, quarantined, quarantined_until, confirmed, "
            "removed, seq "
            "FROM entries WHERE seq > ? ORDER BY seq",
            (seq,),
        ).fetchall()

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
        with self._transaction():
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
                    "added_at": before["added_at"] if before is not None else now_iso(),
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
        with self._transaction():
            changed = self._db.execute(
                f"UPDATE entries SET {assignments}, seq = ? WHERE id = ? AND removed = 0 AND {condition}",
                (*params, self._next_seq(), entry_id, *condition_params),
            ).rowcount
        if changed:
            bump_bank_version(self.path.parent)
        return changed > 0

    def remove(self, entry_id: str) -> bool:
        """Remove a live entry (kept as a tombstone so other processes' indexes drop it too)."""
        return self._update_flags(entry_id, "removed = 1", (), "1")

    def quarantine(self, entry_id: str, reason: str, duration_s: float) -> bool:
        """Stop an entry from deciding for `duration_s`; False if it is unknown, already quarantined or confirmed."""
        now = now_iso()
        return self._update_flags(
            entry_id,
            "quarantined = 1, quarantine_reason = ?, quarantined_until = ?",
            (reason, now_iso(duration_s)),
            "confirmed = 0 AND (quarantined = 0 OR (quarantined_until IS NOT NULL AND quarantined_until <= ?))",
            (now,),
        )

    def confirm(self, entry_id: str) -> bool:
        """An operator vouches for the entry: lift its quarantine, and never quarantine it again."""
        return self._update_flags(entry_id, "confirmed = 1, quarantined = 0, quarantined_until = NULL", (), "1")

    # ----- reads for operators -------------------------------------------------------------

    def get(self, entry_id: str) -> BankEntry | None:
        row = self._db.execute(f"SELECT {_COLUMNS} FROM entries WHERE id = ? AND removed = 0", (entry_id,)).fetchone()
        return None if row is None else _entry_from_row(row)

    def entries(self, quarantined_only: bool = False, limit: int | None = None) -> list[BankEntry]:
        where = "removed = 0" + (f" AND {_ACTIVE_QUARANTINE}" if quarantined_only else "")
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM entries WHERE {where} ORDER BY added_at DESC, id LIMIT :limit",
            {"limit": -1 if limit is None else limit, "now": now_iso()},
        ).fetchall()
        return [_entry_from_row(row) for row in rows]

    def stats(self) -> BankStats:
        by_polarity = dict(
            self._db.execute("SELECT polarity, COUNT(*) FROM entries WHERE removed = 0 GROUP BY polarity").fetchall()
        )
        by_category: Counter[str] = Counter()
        for (categories,) in self._db.execute("SELECT categories FROM entries WHERE removed = 0 AND polarity = 'bad'"):
            by_category.update(json.loads(categories))
        quarantined, confirmed, removed = self._db.execute(
            f"SELECT COALESCE(SUM({_ACTIVE_QUARANTINE} AND NOT removed), 0),"
            " COALESCE(SUM(confirmed AND NOT removed), 0), COALESCE(SUM(removed), 0) FROM entries",
            {"now": now_iso()},
        ).fetchone()
        return BankStats(
            by_polarity={p.value: int(by_polarity.get(p.value, 0)) for p in Polarity},
            by_category=dict(sorted(by_category.items())),
            quarantined=int(quarantined),
            confirmed=int(confirmed),
            removed=int(removed),
        )

    def close(self) -> None:
        self._db.close()
