"""What the cascade learns from reviewers: labelled rows for calibration and training, and bank updates.

`labelled_rows` writes decisions in the labelled format of shared/data (source `review`), the
latest decision per item: a block labels its categories 1 (the others stay unknown); an allow
labels every policy category 0. `cascade calibrate`, `cascade train` and `cascade bank import`
read the file as it is.

`BankFeedback` (off by default, `CASCADE_REVIEW_BANK_FEEDBACK=true`) adds blocked items to the
known-bad hash bank and the exemplar bank, and items allowed although blocked or near-matching a
bank entry to the known-good bank. Entries are keyed `review-<item id>`, so an overturned block
flips the same entry. Every change is audited in the store: who, when, which decision, which bank.
The review service gives it the banks topic, so hash-bank changes reach every stage worker.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict
from datetime import datetime
from typing import TYPE_CHECKING, Any

from cascade.banktopic import BankTopic, change_shared
from cascade.contract import Decision, ReviewDecision
from cascade.data import FLAGGED, LabelledItem
from cascade.hashbank import BankError, EntryInput, HashBank, Polarity
from cascade.review.store import ReviewStore
from cascade.settings import Settings
from cascade.stages.hash import HashStage

if TYPE_CHECKING:  # the embedder (onnxruntime) loads only when exemplar feedback is on
    from cascade.embedding import Embedder

log = logging.getLogger(__name__)

REVIEW_SOURCE = "review"


def labelled_rows(
    store: ReviewStore, categories: Iterable[str], since: datetime | None = None
) -> Iterator[dict[str, Any]]:
    """One labelled row per decided item (its latest decision), oldest first."""
    known = sorted(set(categories) - {FLAGGED})
    latest: dict[str, tuple[ReviewDecision, str]] = {}
    for record, text in store.decisions(since):
        latest.pop(record.id, None)  # re-insert: order by the latest decision
        latest[record.id] = (record, text)
    for record, text in latest.values():
        row = asdict(labelled_row(record, text, known))
        if row["surface"] is None:  # the labelled format has no null surface: absent means "not known"
            del row["surface"]
        yield row


def labelled_row(record: ReviewDecision, text: str, categories: Iterable[str]) -> LabelledItem:
    if record.decision == Decision.BLOCK.value:
        return LabelledItem(record.id, text, 1, {c: 1 for c in record.categories}, REVIEW_SOURCE)
    return LabelledItem(record.id, text, 0, dict.fromkeys(categories, 0), REVIEW_SOURCE)


def bank_entry_id(item_id: str) -> str:
    return f"review-{item_id}"


def _near_matching(record: ReviewDecision) -> bool:
    """The hash stage found a bank entry close to the item (a hit, whatever its band said)."""
    return any(entry.stage == HashStage.name and entry.scores for entry in record.settles.trace)


class BankFeedback:
    """Applies decided items to the banks; the bank APIs are the ones `cascade bank` uses.

    With a banks topic (a broker configured), hash-bank changes go through it, as `cascade bank
    add` does: every stage worker's replica gets them.
    """

    def __init__(
        self, store: ReviewStore, settings: Settings, exemplars: bool = True, topic: BankTopic | None = None
    ) -> None:
        self.store = store
        self.settings = settings
        self.exemplars = exemplars
        self.topic = topic
        self._embedder: Embedder | None = None  # loaded on the first exemplar, then kept

    def _get_embedder(self) -> Embedder:
        if self._embedder is None:
            from cascade.embedding import Embedder

            self._embedder = Embedder.from_settings(self.settings)
        return self._embedder

    def apply_pending(self) -> int:
        """Feed the banks from every decision not yet applied; blocking (the publisher runs it in a thread).

        Raises KafkaError when the banks topic cannot be reached: nothing is marked applied then,
        so the next round retries (every change is idempotent by entry id).
        """
        records = self.store.pending_feedback()
        if not records:
            return 0
        bank = HashBank.open(self.settings.data_dir, self.settings.near_dup_threshold)
        try:
            return asyncio.run(self._apply(bank, records))
        finally:
            bank.close()

    async def _apply(self, bank: HashBank, records: Sequence[ReviewDecision]) -> int:
        if self.topic is not None:
            await self.topic.replay(bank)  # once per round: changes apply to the bank every replica has
        for record in records:
            text = self._text(record)
            changes = await self._changes_for(bank, record, text) if text.strip() else [("none", "no text to bank")]
            self.store.record_feedback(record, changes)
        return len(records)

    def _text(self, record: ReviewDecision) -> str:
        item = record.settles.item
        return item.text if item is not None else ""

    async def _changes_for(self, bank: HashBank, record: ReviewDecision, text: str) -> list[tuple[str, str]]:
        blocked = record.decision == Decision.BLOCK.value
        if not blocked and record.settles.decision is not Decision.BLOCK and not _near_matching(record):
            return []  # an ordinary allow teaches the banks nothing
        changes = [await self._hash(bank, record, text, blocked)]
        if self.exemplars:
            changes.append(self._exemplar(record, text, blocked))
        return changes

    async def _hash(self, bank: HashBank, record: ReviewDecision, text: str, blocked: bool) -> tuple[str, str]:
        polarity = Polarity.BAD if blocked else Polarity.GOOD
        entry_id = bank_entry_id(record.id)
        entry = EntryInput(entry_id, text, polarity, tuple(record.categories), REVIEW_SOURCE)
        try:
            report = await change_shared(
                bank, self.topic, [entry_id], lambda: bank.upsert([entry], f"review:{record.reviewer}"), replay=False
            )
        except BankError as exc:
            return "hash", f"not banked: {exc}"
        outcome = "added" if report.added else "updated" if report.updated else "unchanged"
        return "hash", f"{outcome} {polarity.value} entry {entry_id}"

    def _exemplar(self, record: ReviewDecision, text: str, blocked: bool) -> tuple[str, str]:
        from cascade.exemplars import add_exemplars
        from cascade.vectorindex import open_vector_index

        row = labelled_row(record, text, [])
        row = LabelledItem(bank_entry_id(record.id), row.text, row.flagged, row.labels, REVIEW_SOURCE)
        try:
            index = open_vector_index(self.settings)
        except Exception as exc:  # e.g. the embedded index is held by a worker: audited, not fatal
            log.warning("exemplar feedback for %s skipped: %s", record.id, exc)
            return "exemplars", f"not added: {exc}"
        try:
            add_exemplars(index, self._get_embedder(), [row], f"review:{record.reviewer}")
        finally:
            index.close()
        return "exemplars", f"upserted {'violating' if blocked else 'benign'} exemplar {row.id}"
