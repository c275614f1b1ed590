"""The stream adapter without a broker: topic names, record routing, probes, the faust agent."""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import faust
import pytest
import yaml
from aiokafka.errors import (
    InvalidTopicError,
    KafkaConnectionError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    NotLeaderForPartitionError,
    TopicAuthorizationFailedError,
)
from faust.exceptions import ProducerSendError
from prometheus_client import REGISTRY
from pydantic import ValidationError

from cascade.assembly import build_runner
from cascade.contract import DeadLetter, DeadLetterCode, Decision, Verdict
from cascade.pipeline import CascadeRunner
from cascade.settings import Settings
from cascade.stages.base import ItemContext
from cascade.stream.app import create_app, fused_runs
from cascade.stream.broker import free_port
from cascade.stream.client import Published, StreamOutputs
from cascade.stream.health import HealthServer, WorkerState
from cascade.stream.kafka import bootstrap_servers, refusal_code
from cascade.stream.local import worker_stages
from cascade.stream.processor import Record, StageProcessor
from cascade.stream.topics import Topics
from cascade.stream.worker import StageWorker

CASCADE = ["hash", "llm"]


@pytest.fixture(autouse=True)
def _no_ambient_llm_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OPENAI_BASE_URL", "OPENAI_API_KEY", "CASCADE_LLM_BASE_URL", "CASCADE_LLM_API_KEY", "CASCADE_CONFIG"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path)


@pytest.fixture
def runner(settings: Settings) -> Iterator[CascadeRunner]:
    # No LLM endpoint: the LLM stage is unavailable, so everything it sees goes to review.
    built = build_runner(settings, stage_names=CASCADE)
    assert built.stage_names == CASCADE
    yield built
    asyncio.run(built.aclose())


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_topic_names_in_one_place() -> None:
    topics = Topics("staging.")
    assert topics.content == "staging.moderation.content"
    assert topics.escalate("llm") == "staging.moderation.escalate.llm"
    assert topics.verdicts(Decision.BLOCK) == "staging.moderation.verdicts.block"
    assert topics.verdicts("review") == "staging.moderation.verdicts.review"
    assert topics.deadletter == "staging.moderation.deadletter"
    cascade = ["hash", "retrieval", "llm"]
    assert [topics.stage_input(cascade, i) for i in range(3)] == [
        "staging.moderation.content",
        "staging.moderation.escalate.retrieval",
        "staging.moderation.escalate.llm",
    ]
    assert Topics().all_topics(cascade) == [
        "moderation.content",
        "moderation.escalate.retrieval",
        "moderation.escalate.llm",
        "moderation.verdicts.allow",
        "moderation.verdicts.block",
        "moderation.verdicts.review",
        "moderation.deadletter",
        "moderation.audit",
    ]


def test_bootstrap_servers_accept_the_usual_spellings() -> None:
    assert bootstrap_servers("kafka://a:9092,kafka://b:9092") == ["a:9092", "b:9092"]
    assert bootstrap_servers("a:9092;b:9093") == ["a:9092", "b:9093"]
    assert bootstrap_servers(" kafka-0.kafka:9092 ") == ["kafka-0.kafka:9092"]
    with pytest.raises(ValueError):
        bootstrap_servers(" , ")
    for bad in ("127.0.0.1:abc", ":9092", "host:0", "host:70000"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            bootstrap_servers(bad)


async def test_records_flow_from_content_through_escalation_to_verdict(
    runner: CascadeRunner, settings: Settings
) -> None:
    topics = Topics("t.")
    first, last = (StageProcessor(runner, i, topics, settings) for i in range(2))
    assert (first.input_topic, last.input_topic) == ("t.moderation.content", "t.moderation.escalate.llm")
    escalations_before = metric("cascade_stage_items_total", stage="hash", result="escalate")
    dead_before = metric("cascade_dead_letters_total", stage="hash", error_code="malformed_json")

    good = json.dumps({"id": "a-1", "text": "hello there"}).encode()
    out = await first.process(
        [Record(b"a-1", good, "t.moderation.content[0]@7"), Record(None, b"{oops", "t.moderation.content[1]@3")]
    )
    by_topic = {m.topic: m for m in out}
    assert len(out) == 2
    escalated, dead = by_topic["t.moderation.escalate.llm"], by_topic["t.moderation.deadletter"]
    assert (escalated.topic, escalated.key) == ("t.moderation.escalate.llm", b"a-1")
    context = ItemContext.from_wire(escalated.value)
    assert context.item.id == "a-1" and context.source == "t.moderation.content[0]@7"
    assert [t.stage for t in context.trace] == ["hash"]
    letter = DeadLetter.model_validate_json(dead.value)
    assert (dead.topic, dead.key) == ("t.moderation.deadletter", None)
    assert letter.error_code is DeadLetterCode.MALFORMED_JSON and letter.source == "t.moderation.content[1]@3"
    assert metric("cascade_stage_items_total", stage="hash", result="escalate") == escalations_before + 1
    # Outputs count once the broker acknowledged them (the agent calls record_delivered), not before.
    assert metric("cascade_dead_letters_total", stage="hash", error_code="malformed_json") == dead_before
    assert dead.outcome == letter and escalated.outcome is None

    (final,) = await last.process([Record(escalated.key, escalated.value, "t.moderation.escalate.llm[2]@0")])
    verdict = Verdict.model_validate_json(final.value)
    assert (final.topic, final.key) == ("t.moderation.verdicts.review", b"a-1")
    assert verdict.id == "a-1" and verdict.decided_by == "pipeline"
    assert [t.stage for t in verdict.trace] == CASCADE and verdict.trace[-1].error  # the LLM was unavailable


async def test_a_corrupt_escalation_record_is_dead_lettered_not_fatal(
    runner: CascadeRunner, settings: Settings
) -> None:
    last = StageProcessor(runner, 1, Topics(), settings)
    (out,) = await last.process([Record(b"x-9", b"\xffnot a context", "moderation.escalate.llm[0]@5")])
    letter = DeadLetter.model_validate_json(out.value)
    assert out.topic == "moderation.deadletter" and out.key == b"x-9"
    assert letter.error_code is DeadLetterCode.PROCESSING_ERROR and letter.id == "x-9"
    assert letter.payload_encoding == "base64"  # the bytes are kept, whatever they are


async def test_redelivery_yields_the_same_verdict_key_and_decision(runner: CascadeRunner, settings: Settings) -> None:
    """At-least-once: processing the same record twice routes it identically (consumers dedupe by key)."""
    first = StageProcessor(runner, 0, Topics(), settings)
    record = Record(b"d-1", json.dumps({"id": "d-1", "text": "same again"}).encode(), "moderation.content[0]@1")
    once, twice = await first.process([record]), await first.process([record])
    assert [(m.topic, m.key) for m in once] == [(m.topic, m.key) for m in twice]
    assert ItemContext.from_wire(once[0].value).item == ItemContext.from_wire(twice[0].value).item


async def test_probes_follow_the_worker_state() -> None:
    state = WorkerState(["hash"])
    server = HealthServer(state, free_port(), host="127.0.0.1")
    await server.start()

    def get(path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=2) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    try:
        assert (await asyncio.to_thread(get, "/healthz"))[0] == 200
        status, body = await asyncio.to_thread(get, "/readyz")
        assert status == 503 and json.loads(body)["stages"] == ["hash"]  # not in the group yet
        state.assigned = True
        assert (await asyncio.to_thread(get, "/readyz"))[0] == 200
        state.rebalancing = True
        assert (await asyncio.to_thread(get, "/readyz"))[0] == 503
        state.rebalancing, state.stopping = False, True
        assert (await asyncio.to_thread(get, "/readyz"))[0] == 503
        state.stopping = False
        # A batch in flight past the deadline fails liveness (and readiness) until it ends.
        state.batch_deadline_s = 0.2
        release = asyncio.Event()
        stuck = asyncio.ensure_future(release.wait())
        state.track(stuck)  # type: ignore[arg-type]
        assert (await asyncio.to_thread(get, "/healthz"))[0] == 200
        await asyncio.sleep(0.3)
        status, body = await asyncio.to_thread(get, "/healthz")
        assert status == 503 and json.loads(body)["batches_in_flight"] == 1
        release.set()
        await stuck
        assert (await asyncio.to_thread(get, "/healthz"))[0] == 200
        status, text = await asyncio.to_thread(get, "/metrics")
        assert status == 200 and "cascade_stage_batch_seconds" in text
    finally:
        await server.stop()


async def test_drain_cancels_batches_past_the_grace_period() -> None:
    state = WorkerState(["llm"])
    quick = asyncio.ensure_future(asyncio.sleep(0.05))
    stuck = asyncio.ensure_future(asyncio.sleep(3600))
    state.track(quick)  # type: ignore[arg-type]
    state.track(stuck)  # type: ignore[arg-type]
    started = asyncio.get_running_loop().time()
    assert await state.drain(0.3) == 1
    assert asyncio.get_running_loop().time() - started < 1.0
    assert quick.done() and not quick.cancelled() and stuck.cancelled()
    assert state.describe()["batches_in_flight"] == 0


async def test_an_output_too_large_for_a_message_becomes_a_dead_letter_that_fits(
    runner: CascadeRunner, tmp_path: Path
) -> None:
    """A valid item whose escalation record would exceed the message limit ends as `output_too_large`."""
    settings = Settings(data_dir=tmp_path, stream_max_message_bytes=64 * 1024)
    first = StageProcessor(runner, 0, Topics(), settings)
    # Within the record limit as input; the escalation record adds the normalised text to it.
    text = " ".join(["words of a long post"] * 800)  # 16 KB
    line = json.dumps({"id": "big-1", "text": text, "metadata": {"blob": "m" * 40_000}})
    assert len(line.encode()) < settings.line_limit
    (out,) = await first.process([Record(b"big-1", line.encode(), "moderation.content[0]@1")])
    letter = DeadLetter.model_validate_json(out.value)
    assert out.topic == "moderation.deadletter" and out.key == b"big-1"
    assert letter.error_code is DeadLetterCode.OUTPUT_TOO_LARGE and letter.id == "big-1"
    assert len(out.value) <= settings.max_value_bytes
    assert letter.payload_bytes == len(line.encode())


def test_permanent_broker_refusals_are_told_from_transient_errors() -> None:
    assert refusal_code(MessageSizeTooLargeError()) is DeadLetterCode.OUTPUT_TOO_LARGE
    assert refusal_code(TopicAuthorizationFailedError()) is DeadLetterCode.OUTPUT_REFUSED
    assert refusal_code(InvalidTopicError()) is DeadLetterCode.OUTPUT_REFUSED
    for transient in (KafkaConnectionError(), NotLeaderForPartitionError(), KafkaTimeoutError(), OSError()):
        assert refusal_code(transient) is None
    # faust's producer re-raises what the client refuses before sending as its own error, from the client's.
    for cause, code in ((MessageSizeTooLargeError(), DeadLetterCode.OUTPUT_TOO_LARGE), (KafkaTimeoutError(), None)):
        try:
            raise ProducerSendError(f"Error while sending: {cause!r}") from cause
        except ProducerSendError as wrapped:
            assert refusal_code(wrapped) is code


def test_workers_share_every_stage_but_a_single_process_store() -> None:
    cascade = ["hash", "retrieval", "classifier", "llm"]
    assert worker_stages(cascade, 1, {"retrieval"}) == [cascade]
    assert worker_stages(cascade, 3, {"retrieval"}) == [cascade] + [["hash", "classifier", "llm"]] * 2
    assert worker_stages(cascade, 2, set()) == [cascade, cascade]
    with pytest.raises(ValueError, match="CASCADE_QDRANT_URL"):
        worker_stages(["retrieval"], 2, {"retrieval"})


async def test_a_worker_owning_consecutive_stages_runs_them_in_process(
    runner: CascadeRunner, settings: Settings
) -> None:
    """Fused: hash then llm on one batch, no escalation message; the trace is the unfused one."""
    fused = StageProcessor(runner, 0, Topics(), settings, last=1)
    assert fused.stages == CASCADE and fused.input_topic == "moderation.content"
    records = [
        Record(f"u-{i}".encode(), json.dumps({"id": f"u-{i}", "text": f"hi {i}"}).encode(), "c[0]@1") for i in range(3)
    ]
    out = await fused.process([*records, Record(None, b"{oops", "c[0]@4")])
    assert sorted(m.topic for m in out) == ["moderation.deadletter"] + ["moderation.verdicts.review"] * 3
    verdicts = [
        Verdict.model_validate_json(m.value)
        for m in out
        if m.outcome is not None and m.topic != "moderation.deadletter"
    ]
    assert all([t.stage for t in v.trace] == CASCADE for v in verdicts)

    hop = StageProcessor(runner, 0, Topics(), settings)
    (escalated,) = await hop.process(records[:1])
    (final,) = await StageProcessor(runner, 1, Topics(), settings).process(
        [Record(escalated.key, escalated.value, "e[0]@0")]
    )
    unfused = Verdict.model_validate_json(final.value)
    fused_first = next(v for v in verdicts if v.id == "u-0")
    assert (unfused.decision, unfused.decided_by, unfused.reason) == (
        fused_first.decision,
        fused_first.decided_by,
        fused_first.reason,
    )


@pytest.mark.parametrize(("max_message", "batch"), [(1_000_000, 256 * 1024), (64 * 1024, 64 * 1024)])
def test_the_workers_producer_lingers_and_keeps_its_batches_within_one_broker_message(
    runner: CascadeRunner, tmp_path: Path, max_message: int, batch: int
) -> None:
    settings = Settings(data_dir=tmp_path, stream_max_message_bytes=max_message)
    app = create_app(settings, runner, ["hash"], WorkerState(["hash"]), broker_url="localhost:9092")
    producer = app.producer  # what the aiokafka producer is built with
    assert (producer.linger_ms, producer.max_batch_size, producer.max_request_size) == (5, batch, max_message)


def test_fused_runs_follow_ownership() -> None:
    cascade = ["hash", "retrieval", "classifier", "llm"]
    assert fused_runs(cascade, cascade) == [(0, 3), (1, 3), (2, 3), (3, 3)]
    assert fused_runs(cascade, ["hash", "retrieval", "classifier"]) == [(0, 2), (1, 2), (2, 2)]  # cheap-stage workers
    assert fused_runs(cascade, ["llm"]) == [(3, 3)]
    assert fused_runs(cascade, ["classifier", "hash", "llm"]) == [(0, 0), (2, 3), (3, 3)]


def test_the_kubernetes_topics_take_the_messages_the_producers_may_send() -> None:
    manifests = Path(__file__).resolve().parent.parent / "k8s" / "base" / "topics.yaml"
    app_topics = set(Topics().all_topics(["hash", "retrieval", "classifier", "llm"]))
    limits = {
        doc["spec"]["topicName"]: doc["spec"]["config"].get("max.message.bytes")
        for doc in yaml.safe_load_all(manifests.read_text())
        if doc["spec"]["topicName"] in app_topics
    }
    assert set(limits) == app_topics
    assert set(limits.values()) == {str(Settings().stream_max_message_bytes)}


def test_a_stage_worker_builds_no_records_for_the_clients_debug_calls() -> None:
    app = faust.App("debug-level", broker="memory://", store="memory://", web_enabled=False)
    worker = StageWorker(
        app, state=WorkerState(["hash"], 10.0), grace_s=1.0, loglevel="warning", redirect_stdouts=False, quiet=True
    )
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        worker._setup_logging()
        assert not logging.getLogger("aiokafka.producer.producer").isEnabledFor(logging.DEBUG)
        assert not logging.getLogger("faust.topics").isEnabledFor(logging.DEBUG)
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def _verdict_message(item_id: str, decision: Decision, reason: str) -> bytes:
    verdict = Verdict(
        id=item_id,
        decision=decision,
        categories={},
        decided_by="hash",
        reason=reason,
        trace=[],
        policy_version="p",
        thresholds_version="t",
    )
    return verdict.model_dump_json().encode()


def test_stream_outputs_count_verdicts_by_key_and_parse_them_when_read() -> None:
    """The first verdict of each id wins; counts and decisions come from keys and topics, before any parsing."""
    topics = Topics("t.")
    outcomes = StreamOutputs(topics)
    outcomes.add(topics.verdicts(Decision.BLOCK), _verdict_message("a", Decision.BLOCK, "first"), b"a")
    outcomes.add(topics.verdicts(Decision.BLOCK), _verdict_message("a", Decision.BLOCK, "redelivered"), b"a")
    outcomes.add(topics.verdicts(Decision.ALLOW), _verdict_message("b", Decision.ALLOW, "keyless"), None)
    outcomes.add(topics.verdicts(Decision.REVIEW), b"not a verdict: read only when asked for", b"c")
    letter = DeadLetter(
        id="d", error_code=DeadLetterCode.MALFORMED_JSON, message="bad", payload="{", payload_encoding="utf-8"
    )
    outcomes.add(topics.deadletter, letter.model_dump_json().encode(), b"d")

    assert outcomes.decided == 3 and outcomes.duplicates == 1
    assert outcomes.decisions == {Decision.BLOCK: 1, Decision.ALLOW: 1, Decision.REVIEW: 1}
    published = [Published(key.encode(), f"in[0]@{n}", datetime.now(UTC)) for n, key in enumerate("abcde")]
    assert [p.item_id for p in outcomes.missing(published)] == ["e"]
    with pytest.raises(ValidationError):
        outcomes.verdicts  # noqa: B018 - the unparseable message is parsed here, on first read

    outcomes = StreamOutputs(topics)
    outcomes.add(topics.verdicts(Decision.BLOCK), _verdict_message("a", Decision.BLOCK, "first"), b"a")
    outcomes.add(topics.verdicts(Decision.ALLOW), _verdict_message("b", Decision.ALLOW, "keyless"), None)
    outcomes.add(topics.verdicts(Decision.BLOCK), _verdict_message("a", Decision.BLOCK, "redelivered"), b"a")
    assert {i: v.reason for i, v in outcomes.verdicts.items()} == {"a": "first", "b": "keyless"}
    assert list(outcomes.restricted_to(published[:1]).verdicts) == ["a"]
