"""The faust application: one agent per cascade stage, each a thin loop around `StageProcessor`.

Delivery is at-least-once. An agent takes a batch without acknowledging it, runs the stage,
produces every output and waits for the broker to confirm them, and only then acknowledges the
batch's records, so the committed offset never passes an item whose output is not durable. A
crash (even SIGKILL) at any point redelivers the unacknowledged items; consumers dedupe by key.

Faust's own shutdown (SIGTERM) stops fetching, waits until every record taken has been
acknowledged (the in-flight batches finish), commits, and exits.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import faust
from faust.types import EventT, StreamT

from cascade.pipeline import CascadeRunner
from cascade.settings import Settings
from cascade.stream import metrics
from cascade.stream.health import WorkerState
from cascade.stream.kafka import bootstrap_servers
from cascade.stream.processor import Message, Record, StageProcessor, record_source
from cascade.stream.security import KafkaSecurity
from cascade.stream.topics import Topics

log = logging.getLogger(__name__)

MAX_RETRY_DELAY_S = 30.0


def create_app(
    settings: Settings,
    runner: CascadeRunner,
    stages: Sequence[str],
    state: WorkerState,
    broker_url: str | None = None,
) -> faust.App:
    """A faust app running the agents of `stages` (a subset of the runner's cascade, in any order)."""
    unknown = [s for s in stages if s not in runner.stage_names]
    if unknown:
        raise ValueError(f"stages {unknown} are not in the cascade {runner.stage_names}")
    url = broker_url or settings.kafka_url
    app = faust.App(
        settings.stream_group,
        broker=[f"kafka://{server}" for server in bootstrap_servers(url)] if url else "memory://",
        store="memory://",
        datadir=str(settings.data_path("stream")),
        key_serializer="raw",
        value_serializer="raw",
        # Items published before a worker's first join must still be processed.
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        topic_partitions=settings.stream_partitions,
        topic_replication_factor=settings.stream_replication_factor,
        topic_allow_declare=settings.stream_create_topics,
        # A short session makes group joins (and takeover after a crash) take seconds, not a minute.
        broker_session_timeout=settings.stream_session_timeout_s,
        broker_heartbeat_interval=max(settings.stream_session_timeout_s / 6, 0.5),
        broker_commit_interval=1.0,
        stream_wait_empty=True,
        web_enabled=False,
        broker_credentials=KafkaSecurity.from_settings(settings).faust_credentials() if url else None,
    )
    _track_state(app, state)
    topics = Topics(settings.topic_prefix)
    producer_topics: dict[str, faust.TopicT] = {}

    def output_topic(name: str) -> faust.TopicT:
        if name not in producer_topics:
            producer_topics[name] = app.topic(name, partitions=settings.stream_partitions)
        return producer_topics[name]

    for name in stages:
        processor = StageProcessor(runner, runner.stage_names.index(name), topics, settings)
        source = app.topic(processor.input_topic, partitions=settings.stream_partitions)
        concurrency = settings.stream_concurrency.get(name, 1)
        agent = _stage_agent(processor, settings, concurrency, output_topic, state)
        app.agent(source, name=f"cascade.stage.{name}")(agent)
    return app


def _track_state(app: faust.App, state: WorkerState) -> None:
    @app.on_partitions_revoked.connect
    async def _revoked(sender: faust.App, revoked: set[Any], **kwargs: Any) -> None:
        state.rebalancing = True

    @app.on_partitions_assigned.connect
    async def _assigned(sender: faust.App, assigned: set[Any], **kwargs: Any) -> None:
        state.assigned, state.partitions = True, len(assigned)

    @app.on_rebalance_complete.connect
    async def _rebalanced(sender: faust.App, **kwargs: Any) -> None:
        state.rebalancing = False


AgentFun = Callable[[StreamT], Coroutine[Any, Any, None]]


def _stage_agent(
    processor: StageProcessor,
    settings: Settings,
    concurrency: int,
    output_topic: Callable[[str], faust.TopicT],
    state: WorkerState,
) -> AgentFun:
    stage = processor.stage

    async def deliver(messages: Sequence[Message]) -> None:
        """Produce and wait for the broker's acks; retry until it works (the records stay unacked meanwhile)."""
        delay = 0.5
        while True:
            try:
                pending = [await output_topic(m.topic).send(key=m.key, value=m.value) for m in messages]
                await asyncio.gather(*pending)
                return
            except Exception:
                metrics.DELIVERY_RETRIES.labels(stage).inc()
                log.exception("stage %s: producing %d messages failed; retrying in %.1f s", stage, len(messages), delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_RETRY_DELAY_S)

    async def handle(stream: StreamT, events: Sequence[EventT]) -> None:
        metrics.IN_FLIGHT.labels(stage).inc()
        try:
            records = [
                Record(
                    key=event.message.key,
                    value=event.message.value or b"",
                    source=record_source(event.message.topic, event.message.partition, event.message.offset),
                )
                for event in events
            ]
            await deliver(await processor.process(records))
            for event in events:
                await stream.ack(event)
        finally:
            metrics.IN_FLIGHT.labels(stage).dec()

    async def run_stage(stream: StreamT) -> None:
        slots = asyncio.Semaphore(concurrency)
        in_flight: set[asyncio.Task[None]] = set()

        async def handle_in_slot(events: Sequence[EventT]) -> None:
            try:
                await handle(stream, events)
            except Exception as exc:  # processing is total and delivery retries, so this is a bug
                # The batch stays unacknowledged, which blocks its partitions' commits: fail the
                # liveness probe so that the orchestrator restarts the worker and the batch is redelivered.
                log.exception("stage %s: batch of %d left unacknowledged", stage, len(events))
                state.crashed = f"stage {stage}: {type(exc).__name__}: {exc}"
            finally:
                slots.release()

        try:
            async for events in stream.noack_take(settings.stream_batch_size, within=settings.stream_batch_wait_s):
                await slots.acquire()
                task = asyncio.ensure_future(handle_in_slot(list(events)))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
        finally:
            # Stopping: let batches in flight finish producing and acking (shielded from the cancellation).
            if in_flight:
                await asyncio.shield(asyncio.gather(*in_flight, return_exceptions=True))

    run_stage.__name__ = run_stage.__qualname__ = f"run_stage_{stage}"  # faust labels agents by it
    return run_stage
