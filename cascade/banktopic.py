"""Hash banks shared by every replica through a compacted Kafka topic, `{prefix}moderation.banks`.

Each message is the whole state of one bank entry after a change (added, updated, removed,
quarantined, confirmed), keyed by the entry id, so log compaction keeps exactly the latest state
of every entry and a reader that replays the topic from the start ends with the same bank as
everyone else. Removals stay as `removed: true` states rather than tombstones: compaction keeps
them, so a replica whose local store still holds the entry drops it too.

Writers with a broker configured (`cascade bank add|import|remove|confirm`, and the review
service's bank feedback) first replay the topic into their local store, apply the change there,
then publish the touched entries' new states (`change_shared`). A worker's flood guard publishes
the entries it quarantines. Every stage worker that runs the hash stage replays the topic at
start and then follows it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from cascade.hashbank import BankEntry, EntryInput, HashBank, Polarity
from cascade.settings import Settings
from cascade.stream.client import produce, read_topics
from cascade.stream.kafka import ensure_topics
from cascade.stream.security import KafkaSecurity
from cascade.stream.topics import Topics

log = logging.getLogger(__name__)
T = TypeVar("T")

# A compacted topic: the latest state per entry id is what matters, forever.
TOPIC_CONFIG = {"cleanup.policy": "compact"}
_CAUGHT_UP_IDLE_POLLS = 2  # consecutive empty polls that count as "replayed to the end"


@dataclass(frozen=True)
class EntryState:
    """The wire form of one entry's state (the message value; the key is `id`)."""

    id: str
    text: str
    polarity: str
    categories: tuple[str, ...]
    source: str
    added_by: str
    quarantined: bool = False
    quarantine_reason: str | None = None
    quarantined_until: str | None = None  # ISO 8601 UTC; the quarantine expires then on every replica
    confirmed: bool = False
    removed: bool = False

    @classmethod
    def of(cls, entry: BankEntry, removed: bool = False) -> EntryState:
        return cls(
            id=entry.id,
            text=entry.original,
            polarity=entry.polarity.value,
            categories=entry.categories,
            source=entry.source,
            added_by=entry.added_by,
            quarantined=entry.quarantined,
            quarantine_reason=entry.quarantine_reason,
            quarantined_until=entry.quarantined_until,
            confirmed=entry.confirmed,
            removed=removed,
        )

    def to_wire(self) -> bytes:
        return json.dumps(asdict(self), ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_wire(cls, value: bytes) -> EntryState:
        doc: dict[str, Any] = json.loads(value)
        return cls(**{**doc, "categories": tuple(doc.get("categories", ()))})

    def apply(self, bank: HashBank) -> None:
        """Make the local store hold this state (idempotent: replaying a state changes nothing)."""
        if self.removed:
            bank.remove(self.id)
            return
        entry = EntryInput(self.id, self.text, Polarity(self.polarity), self.categories, self.source)
        bank.upsert([entry], self.added_by)
        if self.confirmed:
            bank.confirm(self.id)
        elif self.quarantined and self.quarantined_until is not None:
            remaining_s = (datetime.fromisoformat(self.quarantined_until) - datetime.now(UTC)).total_seconds()
            if remaining_s > 0:
                bank.quarantine(self.id, self.quarantine_reason or "quarantined on another replica", remaining_s)


class BankTopic:
    """The banks topic of one deployment on one cluster."""

    def __init__(
        self, url: str, prefix: str, security: KafkaSecurity, replication_factor: int = 1, poll_ms: int = 200
    ) -> None:
        self.url = url
        self.name = Topics(prefix).banks
        self.security = security
        self.replication_factor = replication_factor
        self.poll_ms = poll_ms

    @classmethod
    def of_settings(cls, settings: Settings) -> BankTopic | None:
        """The topic of this deployment on CASCADE_KAFKA_URL; None without a broker.

        Raises KafkaSecurityError on bad TLS/SASL settings (as `on`).
        """
        return cls.on(settings.kafka_url, settings) if settings.kafka_url else None

    @classmethod
    def on(cls, url: str, settings: Settings) -> BankTopic:
        """The topic of this deployment on the cluster at `url`, with the settings' TLS/SASL."""
        security = KafkaSecurity.from_settings(settings)
        return cls(url, settings.topic_prefix, security, settings.stream_replication_factor)

    async def ensure(self) -> None:
        # One partition: the topic is small, and one reader replays it in order.
        await ensure_topics(
            self.url, [self.name], 1, self.replication_factor, security=self.security, configs=TOPIC_CONFIG
        )

    async def publish(self, states: list[EntryState]) -> None:
        await produce(self.url, self.name, [s.to_wire() for s in states], self.security)

    async def follow(self, bank: HashBank, caught_up: asyncio.Event | None = None, forever: bool = True) -> int:
        """Apply every state from the start of the topic to `bank`; then keep following if `forever`.

        Sets `caught_up` once the replay reached the end (a few empty polls in a row). Returns the
        number of states applied (when not `forever`). A malformed message is logged and skipped:
        one bad state must not stop a replica from following the rest.
        """
        applied, idle = 0, 0
        async for _, _, value in read_topics(self.url, [self.name], self.poll_ms, security=self.security):
            if not value:
                idle += 1
                if idle >= _CAUGHT_UP_IDLE_POLLS:
                    if caught_up is not None and not caught_up.is_set():
                        log.info("banks: replayed %d state(s) from %s", applied, self.name)
                        caught_up.set()
                    if not forever:
                        return applied
                continue
            idle = 0
            try:
                # SQLite writes block: off the event loop the worker's consumers and probes run on.
                await asyncio.to_thread(EntryState.from_wire(value).apply, bank)
            except (ValueError, TypeError) as exc:
                log.warning("banks: skipped a malformed state on %s: %s", self.name, exc)
                continue
            applied += 1
        return applied

    async def replay(self, bank: HashBank) -> int:
        """Bring `bank` up to date with the topic (creating the topic if needed)."""
        await self.ensure()
        return await self.follow(bank, forever=False)


async def change_shared(
    bank: HashBank,
    topic: BankTopic | None,
    entry_ids: Collection[str],
    change: Callable[[], T],
    replay: bool = True,
) -> T:
    """Apply a change to the entries `entry_ids` of `bank`, through the shared topic when there is one.

    With a topic: replay it first (the change applies to the bank every replica has; a caller
    making many changes replays once and passes `replay=False` after), make the change locally,
    then publish the touched entries' new states for the replicas to follow.
    """
    if topic is None:
        return change()
    if replay:
        await topic.replay(bank)
    before = {entry_id: bank.get(entry_id) for entry_id in entry_ids}
    result = change()
    states = []
    for entry_id, old in before.items():
        new = bank.get(entry_id)
        if new is not None:
            states.append(EntryState.of(new))
        elif old is not None:
            states.append(EntryState.of(old, removed=True))
    if states:
        await topic.publish(states)
    return result
