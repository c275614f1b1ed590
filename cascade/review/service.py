"""`cascade review serve`: the consumer, the decisions publisher and the page, in one process.

Any of the three failing stops the process (non-zero), so a supervisor restarts it; the store
and the committed offsets make that safe. SIGTERM / Ctrl-C stop the page, then the consumer
commits what it stored and the publisher drains the outbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable

import uvicorn
from aiokafka import AIOKafkaProducer

from cascade.banktopic import BankTopic
from cascade.contract import Decision
from cascade.review.consumer import consume, input_topics
from cascade.review.feedback import BankFeedback
from cascade.review.publisher import publish_pending, run_publisher
from cascade.review.store import ReviewStore
from cascade.review.web import AppState, create_app
from cascade.settings import Settings
from cascade.stream.kafka import bootstrap_servers, ensure_topics
from cascade.stream.topics import Topics

log = logging.getLogger(__name__)


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def review_topics(topics: Topics) -> list[str]:
    """Every topic the review app reads or writes."""
    return [*input_topics(topics), topics.decisions, topics.verdicts(Decision.ALLOW), topics.deadletter]


async def serve(
    store: ReviewStore, settings: Settings, url: str, host: str, port: int, announce: Callable[[], None] = lambda: None
) -> None:
    """Run until SIGTERM / Ctrl-C; `announce` is called once the broker answered and the page is about to start."""
    topics = Topics(settings.topic_prefix)
    if settings.stream_create_topics:
        await ensure_topics(url, review_topics(topics), settings.stream_partitions, settings.stream_replication_factor)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap_servers(url), acks="all", client_id="cascade-review")
    await producer.start()
    announce()
    stop, ready = asyncio.Event(), asyncio.Event()
    # Through the banks topic, so the stage workers' replicas learn from reviewers too.
    feedback = (
        BankFeedback(store, settings, topic=BankTopic.on(url, settings)) if settings.review_bank_feedback else None
    )
    app = create_app(AppState(store, settings, ready))
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off"))
    parts = {
        asyncio.create_task(server.serve(), name="page"),
        asyncio.create_task(consume(url, store, producer, settings, stop, ready), name="consumer"),
        asyncio.create_task(run_publisher(store, producer, topics, stop, feedback), name="publisher"),
    }
    try:
        done, _ = await asyncio.wait(parts, return_when=asyncio.FIRST_COMPLETED)
        failed = [t for t in done if not t.cancelled() and t.exception() is not None]
    finally:
        stop.set()
        server.should_exit = True
        results = await asyncio.gather(*parts, return_exceptions=True)
        with contextlib.suppress(Exception):
            await publish_pending(store, producer, topics)  # what was decided just before the stop
        await producer.stop()
    for task in failed:
        raise RuntimeError(f"review {task.get_name()} failed: {task.exception()}") from task.exception()
    for result in results:
        if isinstance(result, Exception):
            log.error("review part stopped with %s", result)
