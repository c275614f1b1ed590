"""One stage of the cascade over a batch of Kafka records: the whole of the stream adapter's logic.

Records in, messages out, no Kafka client here (the faust agent in `cascade.stream.app` moves
the bytes). The first stage reads raw `ContentItem` JSON and validates it with
`cascade.intake.parse_record`; later stages read `ItemContext.to_wire()` from their escalation
topic. `CascadeRunner.run_stage` does the judging, exactly as `cascade moderate` does.

Total by design: every record yields at least one output message (a verdict, an escalation or a
dead letter), whatever the payload and whatever raises.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from cascade.contract import MAX_ID_CHARS, DeadLetter, DeadLetterCode, Decision, Verdict
from cascade.drift import audited
from cascade.intake import dead_letter, parse_record
from cascade.pipeline import CascadeRunner, new_context
from cascade.settings import Settings
from cascade.stages.base import ItemContext
from cascade.stream import metrics
from cascade.stream.topics import Topics

log = logging.getLogger(__name__)


def record_source(topic: str, partition: int, offset: int) -> str:
    """How a consumed record is named in dead letters and item contexts."""
    return f"{topic}[{partition}]@{offset}"


@dataclass(frozen=True)
class Record:
    """One consumed message."""

    key: bytes | None
    value: bytes
    source: str  # "topic[partition]@offset", copied into dead letters and contexts


@dataclass(frozen=True)
class Message:
    """One message to produce."""

    topic: str
    key: bytes | None
    value: bytes
    outcome: Verdict | DeadLetter | None = None  # counted in metrics once acknowledged (None: an escalation)
    origin: Record | None = None  # the record it answers: the payload of a dead letter if the broker refuses it


def _key(item_id: str | None, fallback: bytes | None) -> bytes | None:
    return item_id.encode("utf-8", "surrogatepass") if item_id else fallback


class StageProcessor:
    """Runs stages `index`..`last` of `runner` (default: stage `index` alone) on batches of records
    read from stage `index`'s input topic, and routes each outcome to its topic.

    Consecutive stages that one worker owns are fused: an item one of them escalates goes on to
    the next in process, in the same batch, with no Kafka hop; only what the last of them
    escalates crosses to the next stage's escalation topic, whose owner may be another worker.
    """

    def __init__(
        self, runner: CascadeRunner, index: int, topics: Topics, settings: Settings, last: int | None = None
    ) -> None:
        self.runner = runner
        self.index = index
        self.last = index if last is None else last
        if not index <= self.last < len(runner.stages):
            raise ValueError(f"stages {index}..{self.last} are not a run of the cascade {runner.stage_names}")
        self.topics = topics
        self.settings = settings
        self.stage = runner.stage_names[index]  # the entry stage names the agent and labels its metrics
        self.stages = runner.stage_names[index : self.last + 1]
        self.input_topic = topics.stage_input(runner.stage_names, index)

    async def process(self, records: Sequence[Record]) -> list[Message]:
        messages: list[Message] = []
        contexts: list[ItemContext] = []
        originals: list[Record] = []
        for record in records:
            decoded = self._decode(record)
            if isinstance(decoded, DeadLetter):
                messages.append(self._dead_letter_message(decoded, record))
            else:
                contexts.append(decoded)
                originals.append(record)
        if contexts:
            messages.extend(await self._judge(contexts, originals))
        return messages

    def _decode(self, record: Record) -> ItemContext | DeadLetter:
        if self.index == 0:
            parsed = parse_record(record.value, self.settings, record.source)
            return parsed if isinstance(parsed, DeadLetter) else new_context(parsed, record.source)
        try:
            return ItemContext.from_wire(record.value)
        except Exception as exc:  # a foreign or corrupt record on an internal topic: keep it, don't crash
            return dead_letter(
                record.value,
                DeadLetterCode.PROCESSING_ERROR,
                f"not an escalation record for stage {self.stage}: {type(exc).__name__}: {exc}",
                self.settings,
                record.source,
                record.key.decode("utf-8", "replace") if record.key else None,
            )

    async def _judge(self, contexts: list[ItemContext], originals: list[Record]) -> list[Message]:
        try:
            return await self._run_stages(contexts, originals)
        except Exception:
            # The runner already turns stage failures into escalations; reaching here is a bug.
            # Isolate it to the items that trigger it instead of failing the whole batch.
            log.exception("stages %s raised on a batch of %d; retrying item by item", self.stages, len(contexts))
            metrics.FALLBACKS.labels(self.stage).inc()
            messages: list[Message] = []
            for record in originals:
                messages.extend(await self._judge_one(record))
            return messages

    async def _run_stages(self, contexts: list[ItemContext], originals: list[Record]) -> list[Message]:
        """The batch through stages index..last in process: verdicts as they come, escalations after the last."""
        messages: list[Message] = []
        pending = list(zip(contexts, originals, strict=True))
        for index in range(self.index, self.last + 1):
            if not pending:
                break
            started = time.perf_counter()
            inputs = [ctx for ctx, _ in pending]
            outputs = await self.runner.run_stage(index, inputs)
            metrics.record_batch(self.runner.stage_names[index], inputs, outputs, time.perf_counter() - started)
            escalated = []
            for (_, record), out in zip(pending, outputs, strict=True):
                if isinstance(out, Verdict):
                    messages.extend(self._verdict_messages(out, record))
                else:
                    escalated.append((out, record))
            pending = escalated
        messages.extend(self._route(ctx, record) for ctx, record in pending)
        return messages

    def _verdict_messages(self, verdict: Verdict, record: Record) -> list[Message]:
        """The verdict, plus an audit copy when it is a sampled automatic decision (docs/drift.md)."""
        message = self._route(verdict, record)
        messages = [message]
        if (
            message.outcome is verdict
            and verdict.decision is not Decision.REVIEW
            and audited(verdict.id, self.settings.audit_share)
        ):
            metrics.AUDIT_SENT.labels(verdict.decision.value).inc()
            messages.append(Message(self.topics.audit, message.key, message.value, None, record))
        return messages

    async def _judge_one(self, record: Record) -> list[Message]:
        # The failed batch may have appended trace entries before raising: start from the record again.
        fresh = self._decode(record)
        if isinstance(fresh, DeadLetter):
            return [self._dead_letter_message(fresh, record)]
        try:
            return await self._run_stages([fresh], [record])
        except Exception as exc:
            letter = dead_letter(
                record.value,
                DeadLetterCode.PROCESSING_ERROR,
                f"stages {','.join(self.stages)} raised: {type(exc).__name__}: {exc}",
                self.settings,
                record.source,
                fresh.item.id,
            )
            return [self._dead_letter_message(letter, record)]

    def _route(self, out: Verdict | ItemContext, record: Record) -> Message:
        if isinstance(out, Verdict):
            message = Message(
                self.topics.verdicts(out.decision), _key(out.id, None), out.model_dump_json().encode(), out, record
            )
        else:
            next_stage = self.runner.stage_names[self.last + 1]
            message = Message(self.topics.escalate(next_stage), _key(out.item.id, None), out.to_wire(), None, record)
        if len(message.value) > self.settings.max_value_bytes:
            # Producing it would fail for good and block the partition: the item ends here instead.
            what = "verdict" if isinstance(out, Verdict) else f"escalation record for stage {next_stage}"
            return self.refused(
                message,
                DeadLetterCode.OUTPUT_TOO_LARGE,
                f"its {what} is {len(message.value)} bytes; the largest message value is"
                f" {self.settings.max_value_bytes} (CASCADE_STREAM_MAX_MESSAGE_BYTES)",
            )
        return message

    def refused(self, message: Message, code: DeadLetterCode, reason: str) -> Message:
        """The dead letter that replaces an output the broker cannot take; its payload is the record answered."""
        origin = message.origin
        letter = dead_letter(
            origin.value if origin is not None else message.value,
            code,
            f"stage {self.stage}: {reason}",
            self.settings,
            origin.source if origin is not None else None,
            message.key.decode("utf-8", "replace") if message.key else None,
        )
        metrics.REFUSED_OUTPUTS.labels(self.stage, code.value).inc()
        return self._dead_letter_message(letter, origin)

    def _dead_letter_message(self, letter: DeadLetter, record: Record | None) -> Message:
        # An input key can be anything a producer chose; only an id-sized one is reused.
        fallback = record.key if record is not None and len(record.key or b"") <= 4 * MAX_ID_CHARS else None
        return Message(
            self.topics.deadletter, _key(letter.id, fallback), letter.model_dump_json().encode(), letter, record
        )
