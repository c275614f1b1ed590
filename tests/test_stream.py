"""The stream adapter without a broker: topic names, record routing, probes, the faust agent."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from cascade.assembly import build_runner
from cascade.contract import DeadLetter, DeadLetterCode, Decision, Verdict
from cascade.pipeline import CascadeRunner
from cascade.settings import Settings
from cascade.stages.base import ItemContext
from cascade.stream.broker import free_port
from cascade.stream.health import HealthServer, WorkerState
from cascade.stream.kafka import bootstrap_servers
from cascade.stream.processor import Record, StageProcessor
from cascade.stream.topics import Topics

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
    assert metric("cascade_dead_letters_total", stage="hash", error_code="malformed_json") == dead_before + 1

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
        status, text = await asyncio.to_thread(get, "/metrics")
        assert status == 200 and "cascade_stage_batch_seconds" in text
    finally:
        await server.stop()
