"""Review verdicts, block verdicts, appeals and audit samples from Kafka into the review store; at-least-once.

Offsets are committed only after the store holds a batch, so a crash redelivers it, and the store
is idempotent by item id (a redelivered verdict never makes a second task). A record that is not
a verdict or an appeal, or an appeal of an item with no known block, goes to the dead-letter topic
with the reason: every record gets exactly one outcome.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import ConsumerRecord
from pydantic import ValidationError

from cascade.contract import Appeal, DeadLetter, DeadLetterCode, Decision, Verdict
from cascade.intake import dead_letter
from cascade.review import metrics
from cascade.review.store import Audit, ReviewStore
from cascade.settings import Settings
from cascade.stream.kafka import bootstrap_servers
from cascade.stream.processor import record_source
from cascade.stream.topics import Topics

log = logging.getLogger(__name__)

RETRY_S = 1.0  # after a store failure: wait, rewind to the committed offsets, try again


def input_topics(topics: Topics) -> list[str]:
    return [topics.verdicts(Decision.REVIEW), topics.verdicts(Decision.BLOCK), topics.appeals, topics.audit]


def parse(record: ConsumerRecord, topics: Topics, settings: Settings) -> Verdict | Appeal | Audit | DeadLetter:
    """The verdict, appeal or audit sample a record holds, or its dead letter."""
    value: bytes = record.value or b""
    try:
        if record.topic == topics.appeals:
            return Appeal.model_validate_json(value)
        if record.topic == topics.audit:
            return Audit(Verdict.model_validate_json(value))
        return Verdict.model_validate_json(value)
    except ValidationError as exc:
        kind = "an appeal" if record.topic == topics.appeals else "a verdict"
        reason = f"not {kind}: {exc.errors()[0]['msg'] if exc.errors() else exc}"
        return dead_letter(value, DeadLetterCode.INVALID_VALUE, reason, settings, _source(record), _key(record))


def store_batch(
    records: Sequence[ConsumerRecord], store: ReviewStore, topics: Topics, settings: Settings
) -> list[tuple[ConsumerRecord, DeadLetter]]:
    """Store what can become tasks in one transaction; the dead letters of the rest. Store failures raise."""
    parsed = [(record, parse(record, topics, settings)) for record in records]
    usable = [(record, item) for record, item in parsed if not isinstance(item, DeadLetter)]
    letters = [(record, item) for record, item in parsed if isinstance(item, DeadLetter)]
    for (record, _), refused in zip(usable, store.ingest([item for _, item in usable]), strict=True):
        if refused is None:
            metrics.CONSUMED.labels(record.topic).inc()
        else:
            letter = dead_letter(
                record.value or b"", DeadLetterCode.INVALID_VALUE, str(refused), settings, _source(record), _key(record)
            )
            letters.append((record, letter))
    return letters


def _source(record: ConsumerRecord) -> str:
    return record_source(record.topic, record.partition, record.offset)


def _key(record: ConsumerRecord) -> str | None:
    return record.key.decode("utf-8", "replace") if record.key else None


async def consume(
    url: str,
    store: ReviewStore,
    producer: AIOKafkaProducer,
    settings: Settings,
    stop: asyncio.Event,
    ready: asyncio.Event | None = None,
) -> None:
    """Run until `stop` is set; `ready` is set once the consumer has joined its group."""
    topics = Topics(settings.topic_prefix)
    session_ms = int(settings.stream_session_timeout_s * 1000)
    consumer = AIOKafkaConsumer(
        *input_topics(topics),
        bootstrap_servers=bootstrap_servers(url),
        group_id=settings.review_group,
        client_id="cascade-review",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=session_ms,
        heartbeat_interval_ms=max(100, session_ms // 6),
    )
    await consumer.start()
    try:
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=300, max_records=200)
            if ready is not None and consumer.assignment():
                ready.set()
            if not batches:
                continue
            try:
                records = [record for part in batches.values() for record in part]
                letters = await asyncio.to_thread(store_batch, records, store, topics, settings)
                for record, letter in letters:
                    await producer.send_and_wait(topics.deadletter, letter.model_dump_json().encode(), key=record.key)
                    metrics.DEAD_LETTERS.inc()
                await consumer.commit()
            except Exception:  # the store or the broker failed: nothing is committed, the batch comes again
                log.exception("review intake failed; retrying from the committed offsets in %.0f s", RETRY_S)
                await asyncio.sleep(RETRY_S)
                for partition in consumer.assignment():
                    committed = await consumer.committed(partition)
                    if committed is None:
                        await consumer.seek_to_beginning(partition)
                    else:
                        consumer.seek(partition, committed)
    finally:
        await consumer.stop()
