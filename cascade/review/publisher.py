"""Decisions out: the store's outbox to `moderation.decisions` and `moderation.verdicts.allow|block`.

A decision is marked published only after the broker acknowledged both messages, so a crash
republishes it (at-least-once; consumers dedupe by `decision_id`, and by item id on the verdict
topics, where the human verdict supersedes the cascade's `review` verdict).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiokafka import AIOKafkaProducer

from cascade.contract import Decision
from cascade.review import metrics
from cascade.review.feedback import BankFeedback
from cascade.review.store import ReviewStore, human_verdict
from cascade.stream.topics import Topics

log = logging.getLogger(__name__)

POLL_S = 0.3


async def publish_pending(store: ReviewStore, producer: AIOKafkaProducer, topics: Topics) -> int:
    """Publish every decision not yet on the topics; returns how many."""
    records = await asyncio.to_thread(store.unpublished)
    if not records:
        return 0
    sent = []
    for record in records:
        key = record.id.encode("utf-8", "surrogatepass")
        sent.append(await producer.send(topics.decisions, record.model_dump_json().encode(), key=key))
        verdict = human_verdict(record)
        sent.append(
            await producer.send(topics.verdicts(Decision(record.decision)), verdict.model_dump_json().encode(), key=key)
        )
    await asyncio.gather(*sent)
    await asyncio.to_thread(store.mark_published, [r.decision_id for r in records])
    for record in records:
        metrics.PUBLISHED.labels(record.decision).inc()
    return len(records)


async def run_publisher(
    store: ReviewStore, producer: AIOKafkaProducer, topics: Topics, stop: asyncio.Event, feedback: BankFeedback | None
) -> None:
    while not stop.is_set():
        try:
            await publish_pending(store, producer, topics)
            if feedback is not None:
                await asyncio.to_thread(feedback.apply_pending)
        except Exception:  # the broker or the store is down: the outbox keeps the decisions until it is back
            log.exception("publishing decisions failed; retrying")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), POLL_S)
