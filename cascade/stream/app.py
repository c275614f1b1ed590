"""The faust application: one agent per owned stage, each a thin loop around `StageProcessor`.

A worker that owns consecutive stages runs them in process on the same batch (`fused_runs`):
Kafka hops remain only where ownership changes, e.g. from cheap-stage workers to LLM workers.

Delivery is at-least-once. An agent takes a batch without acknowledging it, runs the stage,
produces every output and waits for the broker to confirm them, and only then acknowledges the
batch's records, so the committed offset never passes an item whose output is not durable. A
crash (even SIGKILL) at any point redelivers the unacknowledged items; consumers dedupe by key.

An output the broker refuses for good (too large, an invalid topic, no authorization) is
replaced by a dead letter saying so, and the batch moves on; only transient errors are retried,
and a batch stuck in them past `CASCADE_STREAM_BATCH_DEADLINE_S` fails the liveness probe.

On SIGTERM the worker stops taking batches, gives those in flight
`CASCADE_STREAM_SHUTDOWN_GRACE_S` to finish, cancels the rest (unacknowledged, so uncommitted
and redelivered to the next owner), commits what was acknowledged, and exits.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

import faust
from faust.types import EventT, ProducerT, StreamT

from cascade.pipeline import CascadeRunner
from cascade.settings import Settings
from cascade.stream import metrics
from cascade.stream.health import WorkerState
from cascade.stream.kafka import bootstrap_servers, refusal_code
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
        producer_max_request_size=settings.stream_max_message_bytes,
        # One request per burst of a batch's outputs: at linger 0 each request carried one or two.
        producer_linger=settings.stream_linger_ms / 1000,
        # The broker takes a record batch as one message, so it must fit max.message.bytes too.
        producer_max_batch_size=min(settings.stream_producer_batch_bytes, settings.stream_max_message_bytes),
        topic_partitions=settings.stream_partitions,
        topic_replication_factor=settings.stream_replication_factor,
        topic_allow_declare=settings.stream_create_topics,
        # A short session makes group joins (and takeover after a crash) take seconds, not a minute.
        broker_session_timeout=settings.stream_session_timeout_s,
        broker_heartbeat_interval=max(settings.stream_session_timeout_s / 6, 0.5),
        broker_commit_interval=1.0,
        # Shutdown waits for in-flight batches itself, for a bounded time (WorkerState.drain):
        # faust's own wait has no limit, so one stuck batch would make SIGTERM hang.
        stream_wait_empty=False,
        web_enabled=False,
        broker_credentials=KafkaSecurity.from_settings(settings).faust_credentials() if url else None,
    )
    _track_state(app, state)
    topics = Topics(settings.topic_prefix)
    for index, last in fused_runs(runner.stage_names, stages):
        processor = StageProcessor(runner, index, topics, settings, last)
        source = app.topic(processor.input_topic, partitions=settings.stream_partitions)
        concurrency = settings.batches_in_flight(processor.stages)
        agent = _stage_agent(processor, settings, concurrency, app.maybe_start_producer, state)
        app.agent(source, name=f"cascade.stage.{processor.stage}")(agent)
    return app


def fused_runs(cascade: Sequence[str], owned: Sequence[str]) -> list[tuple[int, int]]:
    """(first, last) stage indexes of the agents of a worker that owns `owned` stages of `cascade`.

    One agent per owned stage, on that stage's input topic, running it and every owned stage
    right after it in process: items enter the cascade on the content topic, and reach a later
    stage's escalation topic only from a worker that does not own that stage. Consuming every
    owned stage's topic keeps mixed deployments working (another worker owning fewer stages
    may hand items over at any of them); in a deployment of identical workers those later
    topics simply stay empty.
    """
    mine = {cascade.index(name) for name in owned}
    runs = []
    for first in sorted(mine):
        last = first
        while last + 1 in mine:
            last += 1
        runs.append((first, last))
    return runs


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
    start_producer: Callable[[], Awaitable[ProducerT]],
    state: WorkerState,
) -> AgentFun:
    stage = processor.stage
    deadletter_topic = processor.topics.deadletter

    async def produce(messages: Sequence[Message]) -> list[BaseException | None]:
        """Hand every message to the producer, then wait for all the broker's acks: the error of each, or None.

        One ack future per message and no task: a task per message cost the event loop more than the send.
        Through the producer itself, not `Topic.send`: faust's wrapping of each message (pending and future
        messages, sensor callbacks) cost more than the send (docs/bench.md). The output topics exist by now
        (`ensure_topics` at start-up, or made by the operator), so nothing has to declare them.
        """
        try:
            producer = await start_producer()  # once per batch: faust guards each call with a shared future
        except Exception as exc:  # not started: every message fails as a failed ack does, and retries
            return [exc] * len(messages)
        errors: list[BaseException | None] = [None] * len(messages)
        acks: list[tuple[int, Awaitable[Any]]] = []
        for index, message in enumerate(messages):
            try:
                sent = await producer.send(
                    message.topic, message.key, message.value, partition=None, timestamp=None, headers=None
                )
                acks.append((index, sent))
            except Exception as exc:  # refused before it left (e.g. too large): handled as a failed ack is
                errors[index] = exc
        results = await asyncio.gather(*(ack for _, ack in acks), return_exceptions=True)
        for (index, _), result in zip(acks, results, strict=True):
            if isinstance(result, BaseException):
                errors[index] = result
        return errors

    async def deliver(messages: Sequence[Message]) -> None:
        """Produce and wait for the broker's acks; what it refuses for good becomes a dead letter, the rest retries.

        The batch's records stay unacknowledged until every output (or its replacement) is durable.
        """
        pending, delay = list(messages), 0.5
        while pending:
            results = await produce(pending)
            retry: list[Message] = []
            transient: BaseException | None = None
            for message, result in zip(pending, results, strict=True):
                if result is None:
                    metrics.record_delivered(stage, message.outcome)
                    continue
                if isinstance(result, asyncio.CancelledError):
                    raise result
                code = refusal_code(result)
                if code is not None and message.topic != deadletter_topic:
                    log.error("stage %s: the broker refused an output on %s for good: %r", stage, message.topic, result)
                    retry.append(processor.refused(message, code, f"the broker refused its output: {result!r}"))
                else:  # a dead letter refused for good cannot go anywhere else: retry, and fail liveness
                    retry.append(message)
                    transient = result
            if transient is not None:
                metrics.DELIVERY_RETRIES.labels(stage).inc()
                log.warning(
                    "stage %s: producing %d message(s) failed (%r); retrying in %.1f s",
                    stage,
                    len(retry),
                    transient,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_RETRY_DELAY_S)
            pending = retry

    # `concurrency` batches are judged at once; one more may wait for the broker's acks meanwhile, so
    # the stages never idle through a delivery round trip.
    judging = asyncio.Semaphore(concurrency)

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
            async with judging:
                messages = await processor.process(records)
            await deliver(messages)
            for event in events:
                await stream.ack(event)
        finally:
            metrics.IN_FLIGHT.labels(stage).dec()

    async def run_stage(stream: StreamT) -> None:
        slots = asyncio.Semaphore(concurrency + 1)

        async def handle_in_slot(events: Sequence[EventT]) -> None:
            try:
                await handle(stream, events)
            except asyncio.CancelledError:
                raise  # shutdown past its grace: the batch stays unacknowledged, redelivered later
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
                if state.stopping:  # taken but not started: left unacknowledged for the next owner
                    slots.release()
                    continue
                state.track(asyncio.ensure_future(handle_in_slot(list(events))))
        finally:
            # Stopping: batches in flight may finish producing and acking, within the grace period.
            await asyncio.shield(state.drain(settings.stream_shutdown_grace_s))

    run_stage.__name__ = run_stage.__qualname__ = f"run_stage_{stage}"  # faust labels agents by it
    return run_stage
