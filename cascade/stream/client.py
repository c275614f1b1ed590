"""Producer and consumer helpers for the edges of the stream: publish items, read verdicts.

Used by `cascade publish`, `cascade tail`, `cascade run`, the tests and the benchmark. They
are plain aiokafka clients: anything that speaks Kafka can do the same.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import NamedTuple

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from cascade.contract import MAX_ID_CHARS, DeadLetter, DeadLetterCode, Decision, Verdict
from cascade.intake import dead_letter
from cascade.settings import Settings
from cascade.stream.kafka import bootstrap_servers
from cascade.stream.processor import record_source
from cascade.stream.security import PLAINTEXT, KafkaSecurity
from cascade.stream.topics import Topics

Offsets = Mapping[tuple[str, int], int]  # (topic, partition) -> offset

PUBLISH_WINDOW = 500  # sends awaited together; bounds memory, keeps the pipe full


def key_of(line: bytes) -> bytes | None:
    """The item id of a JSONL line, as the message key; None when the line has none (it will dead-letter)."""
    try:
        doc = json.loads(line.removeprefix(codecs.BOM_UTF8))
    except ValueError:
        return None
    item_id = doc.get("id") if isinstance(doc, dict) else None
    if not isinstance(item_id, str) or not item_id or len(item_id) > MAX_ID_CHARS:
        return None
    return item_id.encode("utf-8", "surrogatepass")


class NoTopicsError(RuntimeError):
    """None of the topics to read exist (yet)."""


@dataclass(frozen=True)
class Published:
    key: bytes | None
    source: str
    sent_at: datetime  # wall clock just before the send: where publish-to-verdict latency starts
    skipped: bool = False  # over the message limit: not published, dead-lettered by the publisher

    @property
    def item_id(self) -> str | None:
        return self.key.decode("utf-8", "surrogatepass") if self.key else None


async def produce(url: str, topic: str, values: Iterable[bytes], security: KafkaSecurity = PLAINTEXT) -> None:
    """Produce each JSON value to `topic`, keyed by its `id` (`key_of`), and wait for the broker's acks.

    For the app's own records (bank changes, verdicts, appeals); user content goes through `publish`.
    """
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap_servers(url), acks="all", client_id="cascade-produce", **security.aiokafka_options()
    )
    try:
        await producer.start()  # inside the try: a failed bootstrap must still release the client
        sent = [await producer.send(topic, value=value, key=key_of(value)) for value in values]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()


async def publish(
    url: str,
    topics: Topics,
    lines: Iterable[bytes],
    rate: float | None = None,
    linger_ms: int = 5,
    settings: Settings | None = None,
    origin: str = "publish",
    security: KafkaSecurity = PLAINTEXT,
) -> list[Published]:
    """Produce each line to the content topic as one message keyed by its id; at most `rate` messages/s.

    A line over the record limit cannot travel through Kafka: it is not published, and its
    dead letter (`line_too_large`, source `ORIGIN#N` for the N-th line) goes to the dead-letter
    topic instead, so it still gets its one outcome. Such lines come back with `skipped`.
    """
    settings = settings or Settings()
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap_servers(url),
        acks="all",
        linger_ms=linger_ms,
        max_request_size=settings.stream_max_message_bytes,
        client_id="cascade-publish",
        **security.aiokafka_options(),
    )
    published: list[Published] = []
    try:
        await producer.start()  # inside the try: a failed bootstrap must still release the client
        started = time.monotonic()
        # (key, send time, send future, the dead letter's source when the line was dead-lettered instead)
        window: list[tuple[bytes | None, datetime, asyncio.Future, str | None]] = []
        for count, line in enumerate(lines):
            if rate:
                ahead = count / rate - (time.monotonic() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)
            key = key_of(line)
            sent_at = datetime.now(UTC)
            if len(line) > settings.line_limit:
                source = f"{origin}#{count + 1}"
                letter = dead_letter(
                    line,
                    DeadLetterCode.LINE_TOO_LARGE,
                    f"record is {len(line)} bytes; the limit is {settings.line_limit}"
                    " (CASCADE_STREAM_MAX_MESSAGE_BYTES): not published",
                    settings,
                    source,
                    None if key is None else key.decode("utf-8", "surrogatepass"),
                )
                sent = await producer.send(topics.deadletter, value=letter.model_dump_json().encode(), key=key)
                window.append((key, sent_at, sent, source))
            else:
                window.append((key, sent_at, await producer.send(topics.content, value=line, key=key), None))
            # Paced or not, acks are awaited a window at a time: awaiting each send's ack in turn would cap
            # a paced publisher at one broker round trip per record (~150/s here), below the offered rate.
            if len(window) >= PUBLISH_WINDOW:
                published.extend(await _settle(window))
                window = []
        published.extend(await _settle(window))
    finally:
        await producer.stop()
    return published


async def _settle(window: Sequence[tuple[bytes | None, datetime, asyncio.Future, str | None]]) -> list[Published]:
    results = await asyncio.gather(*(future for _, _, future, _ in window))
    return [
        Published(key, record_source(meta.topic, meta.partition, meta.offset), sent_at)
        if dead_letter_source is None
        else Published(key, dead_letter_source, sent_at, skipped=True)
        for (key, sent_at, _, dead_letter_source), meta in zip(window, results, strict=True)
    ]


def _reader(url: str, security: KafkaSecurity) -> AIOKafkaConsumer:
    # No consumer group: it assigns partitions itself, so it joins nothing and commits nothing.
    return AIOKafkaConsumer(
        bootstrap_servers=bootstrap_servers(url),
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        client_id="cascade-read",
        **security.aiokafka_options(),
    )


async def _partitions(consumer: AIOKafkaConsumer, url: str, topics: Sequence[str]) -> list[TopicPartition]:
    await consumer.topics()  # fetch metadata so partitions are known
    partitions = [
        TopicPartition(topic, p) for topic in topics for p in sorted(consumer.partitions_for_topic(topic) or ())
    ]
    if not partitions:
        raise NoTopicsError(f"none of the topics {', '.join(topics)} exist on {url}")
    return partitions


async def end_offsets(url: str, topics: Sequence[str], security: KafkaSecurity = PLAINTEXT) -> Offsets:
    """Where each partition of `topics` ends now: `read_topics(..., start=)` from there sees only what comes next."""
    consumer = _reader(url, security)
    try:
        await consumer.start()
        ends = await consumer.end_offsets(await _partitions(consumer, url, topics))
        return {(tp.topic, tp.partition): offset for tp, offset in ends.items()}
    finally:
        await consumer.stop()


class Consumed(NamedTuple):
    """One message read by `read_topics`; all empty after a poll that found nothing."""

    topic: str
    key: bytes | None
    value: bytes


async def read_topics(
    url: str,
    topics: Sequence[str],
    poll_ms: int = 200,
    security: KafkaSecurity = PLAINTEXT,
    start: Offsets | None = None,
) -> AsyncIterator[Consumed]:
    """Every message of `topics` from the beginning (or from the `start` offsets), then new ones as they
    come. Yields an empty `Consumed` ("", None, b"") after each empty poll so callers can notice idleness.
    """
    consumer = _reader(url, security)
    try:
        await consumer.start()  # inside the try: a consumer that failed to connect must still be closed
        partitions = await _partitions(consumer, url, topics)
        consumer.assign(partitions)
        if start is None:
            await consumer.seek_to_beginning(*partitions)
        else:
            for tp in partitions:
                consumer.seek(tp, start.get((tp.topic, tp.partition), 0))
        while True:
            batches = await consumer.getmany(timeout_ms=poll_ms)
            if not any(batches.values()):
                yield Consumed("", None, b"")
                continue
            for tp, records in batches.items():
                for record in records:
                    yield Consumed(tp.topic, record.key, record.value or b"")
    finally:
        await consumer.stop()


@dataclass
class StreamOutputs:
    """What came out of the cascade: verdicts by id (duplicates counted) and dead letters.

    A verdict message that carries a key (every cascade producer keys it by the item id) is
    counted at once but parsed only when `verdicts` is first read: a reader sharing the
    workers' cores (`cascade run`, `cascade bench`) would otherwise spend them validating
    JSON while the items are still being judged. A keyless one is parsed on arrival.
    """

    topics: Topics
    deliveries: Counter[str] = field(default_factory=Counter)  # verdict messages per id
    dead_letters: list[DeadLetter] = field(default_factory=list)
    decisions: Counter[Decision] = field(default_factory=Counter)  # of the first verdict of each id
    _verdicts: dict[str, Verdict] = field(default_factory=dict, init=False, repr=False)
    _unparsed: dict[str, bytes] = field(default_factory=dict, init=False, repr=False)  # first message per id, unread
    _decision_of_topic: dict[str, Decision] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._decision_of_topic = {self.topics.verdicts(d): d for d in Decision}

    def add(self, topic: str, value: bytes, key: bytes | None = None) -> None:
        """One message of a verdict topic or of the dead-letter topic."""
        if topic == self.topics.deadletter:
            self.dead_letters.append(DeadLetter.model_validate_json(value))
            return
        if key:
            item_id, verdict = key.decode("utf-8", "surrogatepass"), None
        else:
            verdict = Verdict.model_validate_json(value)
            item_id = verdict.id
        if item_id not in self.deliveries:  # first verdict wins (see docs/stream.md)
            if verdict is None:
                self._unparsed[item_id] = value
            else:
                self._verdicts[item_id] = verdict
            self.decisions[self._decision_of_topic[topic]] += 1
        self.deliveries[item_id] += 1

    @property
    def verdicts(self) -> dict[str, Verdict]:
        """The first verdict of each id, in arrival order of the ids."""
        if self._unparsed:
            parsed = {i: Verdict.model_validate_json(v) for i, v in self._unparsed.items()}
            self._unparsed.clear()
            self._verdicts = {i: self._verdicts.get(i) or parsed[i] for i in self.deliveries}
        return self._verdicts

    @property
    def decided(self) -> int:
        """Ids with a verdict, without parsing any."""
        return len(self.deliveries)

    @property
    def duplicates(self) -> int:
        return sum(self.deliveries.values()) - len(self.deliveries)

    def missing(self, published: Sequence[Published]) -> list[Published]:
        """Published records with neither a verdict nor a dead letter yet."""
        dead_ids = {d.id for d in self.dead_letters if d.id}
        dead_sources = {d.source for d in self.dead_letters if d.source}
        return [
            p
            for p in published
            if p.item_id not in self.deliveries and p.item_id not in dead_ids and p.source not in dead_sources
        ]

    def restricted_to(self, published: Sequence[Published]) -> StreamOutputs:
        """Only the outcomes of these records (topics read from the beginning hold older runs too)."""
        ids = {p.item_id for p in published if p.item_id}
        sources = {p.source for p in published}
        kept = StreamOutputs(self.topics)
        kept._verdicts = {i: v for i, v in self.verdicts.items() if i in ids}
        kept.deliveries = Counter({i: n for i, n in self.deliveries.items() if i in ids})
        kept.decisions = Counter(v.decision for v in kept._verdicts.values())
        kept.dead_letters = [d for d in self.dead_letters if d.id in ids or d.source in sources]
        return kept
