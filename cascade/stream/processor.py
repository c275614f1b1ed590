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

from cascade.contract import DeadLetter, DeadLetterCode, Decision, Verdict
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


def _key(item_id: str | None, fallback: bytes | None) -> bytes | None:
    return item_id.encode("utf-8", "surrogatepass") if item_id else fallback


class StageProcessor:
    """Runs stage `index` of `runner` on batches of records and routes each outcome to its topic."""

    def __init__(self, runner: CascadeRunner, index: int, topics: Topics, settings: Settings) -> None:
        self.runner = runner
        self.index = index
        self.topics = topics
        self.settings = settings
        self.stage = runner.stage_names[index]
        self.is_last = index == len(runner.stages) - 1
        self.input_topic = topics.stage_input(runner.stage_names, index)

    async def process(self, records: Sequence[Record]) -> list[Message]:
        messages: list[Message] = []
        contexts: list[ItemContext] = []
        originals: list[Record] = []
        for record in records:
            decoded = self._decode(record)
            if isinstance(decoded, DeadLetter):
                messages.append(self._dead_letter_message(decoded, record.key))
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
        started = time.perf_counter()
        try:
            outputs = await self.runner.run_stage(self.index, contexts)
        except Exception:
            # The runner already turns stage failures into escalations; reaching here is a bug.
            # Isolate it to the items that trigger it instead of failing the whole batch.
            log.exception("stage %s raised on a batch of %d; retrying item by item", self.stage, len(contexts))
            metrics.FALLBACKS.labels(self.stage).inc()
            messages: list[Message] = []
            for record in originals:
                messages.extend(await self._judge_one(record))
            return messages
        metrics.record_batch(self.stage, contexts, outputs, time.perf_counter() - started)
        return self._routes(outputs)

    async def _judge_one(self, record: Record) -> list[Message]:
        started = time.perf_counter()
        # The failed batch may have appended trace entries before raising: start from the record again.
        fresh = self._decode(record)
        if isinstance(fresh, DeadLetter):
            return [self._dead_letter_message(fresh, record.key)]
        try:
            outputs = await self.runner.run_stage(self.index, [fresh])
        except Exception as exc:
            letter = dead_letter(
                record.value,
                DeadLetterCode.PROCESSING_ERROR,
                f"stage {self.stage} raised: {type(exc).__name__}: {exc}",
                self.settings,
                record.source,
                fresh.item.id,
            )
            return [self._dead_letter_message(letter, record.key)]
        metrics.record_batch(self.stage, [fresh], outputs, time.perf_counter() - started)
        return self._routes(outputs)

    def _routes(self, outputs: Sequence[Verdict | ItemContext]) -> list[Message]:
        """Each output to its topic, plus an audit copy of the sampled automatic verdicts (docs/drift.md)."""
        messages = [self._route(out) for out in outputs]
        for out in outputs:
            if (
                isinstance(out, Verdict)
                and out.decision is not Decision.REVIEW
                and audited(out.id, self.settings.audit_share)
            ):
                metrics.AUDIT_SENT.labels(out.decision.value).inc()
                messages.append(Message(self.topics.audit, _key(out.id, None), out.model_dump_json().encode()))
        return messages

    def _route(self, out: Verdict | ItemContext) -> Message:
        if isinstance(out, Verdict):
            return Message(self.topics.verdicts(out.decision), _key(out.id, None), out.model_dump_json().encode())
        next_stage = self.runner.stage_names[self.index + 1]
        return Message(self.topics.escalate(next_stage), _key(out.item.id, None), out.to_wire())

    def _dead_letter_message(self, letter: DeadLetter, fallback_key: bytes | None) -> Message:
        metrics.record_dead_letter(self.stage, letter)
        return Message(self.topics.deadletter, _key(letter.id, fallback_key), letter.model_dump_json().encode())
