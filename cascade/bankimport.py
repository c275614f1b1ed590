"""Bulk imports into the banks: a JSONL file into the hash bank or the exemplar bank.

Each kind is one `BankKind` member and one importer (`import_file` picks it), sharing
`parsed_batches` and `ImportReport`. Imports are idempotent by id. A hash import with a
banks topic goes through it (`cascade.banktopic.change_shared`), so every replica gets the
entries; the banks topic carries hash entries only (exemplars live in the vector index).
`cascade bank import` parses flags, calls `import_file` and prints the report.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import TypeVar

from cascade.banktopic import BankTopic, change_shared
from cascade.bankversion import bump_bank_version
from cascade.data import LabelledItem, SplitChoice, labelled_from_record
from cascade.hashbank import BankError, EntryInput, HashBank, entry_from_record
from cascade.jsonl import JsonlError, read_jsonl
from cascade.policy import load_policy
from cascade.settings import Settings

RowT = TypeVar("RowT", EntryInput, LabelledItem)


class BankKind(StrEnum):
    HASH = "hash"
    EXEMPLARS = "exemplars"


# Exemplars vote at serving time: by default only train rows, so evaluation rows never sit in the bank.
DEFAULT_SPLIT: dict[BankKind, SplitChoice] = {BankKind.HASH: SplitChoice.ALL, BankKind.EXEMPLARS: SplitChoice.TRAIN}


@dataclass
class ImportReport:
    added: int = 0
    updated: int = 0
    skipped: int = 0  # already in the bank, identical
    filtered: int = 0  # outside the requested split
    errors: list[str] = field(default_factory=list)
    unknown_categories: set[str] = field(default_factory=set)

    @property
    def imported(self) -> int:
        """Lines that are in the bank now (added, updated or already there)."""
        return self.added + self.updated + self.skipped


@dataclass(frozen=True)
class ImportJob:
    """One import: the file, which rows, how many per transaction, and who runs it."""

    path: Path
    split: SplitChoice
    batch_size: int
    added_by: str
    confirm: bool = False  # hash bank: vouch for the entries (the flood guard never quarantines them)
    on_read: Callable[[int], None] | None = None  # bytes read, for a progress bar


def parsed_batches(
    job: ImportJob,
    parse: Callable[[object], RowT],
    categories_of: Callable[[RowT], Iterable[str]],
    report: ImportReport,
    known: frozenset[str],
) -> Iterator[list[RowT]]:
    """The file's rows of the job's split, parsed, in batches; bad lines go to `report.errors`, not up."""
    pending: list[RowT] = []
    for lineno, record in read_jsonl(job.path, job.on_read):
        try:
            if isinstance(record, JsonlError):
                raise BankError(record.problem)
            row = parse(record)
        except (BankError, ValueError) as exc:
            report.errors.append(f"{job.path.name}:{lineno}: {exc}")
            continue
        if not job.split.keeps(row.id):
            report.filtered += 1
            continue
        report.unknown_categories.update(set(categories_of(row)) - known)
        pending.append(row)
        if len(pending) >= job.batch_size:
            yield pending
            pending = []
    if pending:
        yield pending


def import_hash(job: ImportJob, settings: Settings, topic: BankTopic | None) -> ImportReport:
    """Upsert the file's entries into the hash bank; through `topic` (replayed once first) when given.

    Raises KafkaError when the topic cannot be reached.
    """
    report = ImportReport()
    known = load_policy(settings.policies_dir).names
    bank = HashBank.open(settings.data_dir, settings.near_dup_threshold)
    batches = parsed_batches(
        job,
        lambda record: replace(entry_from_record(record, default_source=job.path.name), confirmed=job.confirm),
        lambda entry: entry.categories,
        report,
        known,
    )

    async def run() -> None:
        if topic is not None:
            await topic.replay(bank)
        for batch in batches:
            done = await change_shared(
                bank, topic, [e.id for e in batch], lambda batch=batch: bank.upsert(batch, job.added_by), replay=False
            )
            report.added += done.added
            report.updated += done.updated
            report.skipped += done.unchanged

    try:
        asyncio.run(run())
    finally:
        bank.close()
    return report


def import_exemplars(job: ImportJob, settings: Settings) -> ImportReport:
    """Embed the file's labelled rows into the exemplar bank; StoreInUseError when another process holds it."""
    from cascade.embedding import Embedder
    from cascade.exemplars import add_exemplars
    from cascade.vectorindex import open_vector_index

    report = ImportReport()
    known = load_policy(settings.policies_dir).names
    embedder = Embedder.from_settings(settings)
    index = open_vector_index(settings)
    before = index.count()
    try:
        for batch in parsed_batches(
            job,
            lambda record: labelled_from_record(record, default_source=job.path.name),
            lambda row: row.labels,
            report,
            known,
        ):
            report.updated += add_exemplars(index, embedder, batch, job.added_by)
        bump_bank_version(settings.data_dir)
        index.optimize()
        # Upserts by id: what did not grow the bank replaced an exemplar with the same id.
        report.added = index.count() - before
        report.updated -= report.added
    finally:
        index.close()
    return report


def import_file(kind: BankKind, job: ImportJob, settings: Settings, topic: BankTopic | None) -> ImportReport:
    """Import `job` into the bank of `kind`; hash entries go through `topic` when there is one."""
    if kind is BankKind.HASH:
        return import_hash(job, settings, topic)
    return import_exemplars(job, settings)
