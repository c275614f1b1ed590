"""The stream layer against a real Kafka-protocol broker (tansu) and real worker processes.

Each test runs `cascade worker` processes (`python -m cascade.stream`) over TCP against one
embedded broker, on its own topic prefix and consumer group, with the LLM stage pointed at the
local OpenAI-compatible server of tests/llm_server.py. The cascade is `hash,llm`: with empty
banks the hash stage settles nothing, so every item crosses the escalation topic to the LLM.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml
from llm_server import LocalLLMServer, Mode
from prometheus_client.parser import text_string_to_metric_families

from cascade.assembly import build_runner
from cascade.contract import DeadLetterCode, Decision
from cascade.intake import parse_record
from cascade.pipeline import new_context
from cascade.policy import load_policy
from cascade.settings import Settings
from cascade.stream.broker import EmbeddedBroker
from cascade.stream.client import Published, StreamOutputs, end_offsets, publish, read_topics
from cascade.stream.kafka import ensure_topics
from cascade.stream.local import LocalDeployment, collect
from cascade.stream.topics import Topics

pytestmark = [pytest.mark.broker, pytest.mark.slow]

CASCADE = ["hash", "llm"]
MODEL = "local-moderator-2026-01-01"
TEXTS = [
    "I will kill you tomorrow",
    "you are such an idiot",
    "what a lovely day for a walk",
    "click here, you have won a free prize",
    "see you at the meeting at noon",
]
BAD_PAYLOADS = [b"not json at all", b'{"id": "no-text"}', b"\xff\xfe\x00", b"[1, 2, 3]"]


def write_llm_thresholds(path: Path) -> Path:
    """Bands for the LLM on every category it scores, so its answers settle items."""
    categories = [c for c in load_policy().categories if c != "flagged"]
    bands = {c: {"allow_below": 0.5, "block_at": 0.5} for c in categories}
    path.write_text(yaml.safe_dump({"version": "stream-test", "stages": {"llm": bands}}))
    return path


class Deployment(LocalDeployment):
    """One isolated deployment on the shared broker: its own topic prefix, group and data dir."""

    def __init__(self, broker: EmbeddedBroker, llm: LocalLLMServer, tmp_path: Path) -> None:
        prefix = f"t{uuid.uuid4().hex[:8]}."
        env = {
            "CASCADE_DATA_DIR": str(tmp_path / "data"),
            "CASCADE_TOPIC_PREFIX": prefix,
            "CASCADE_STREAM_GROUP": f"g-{prefix}",
            "CASCADE_STREAM_BATCH_WAIT_S": "0.05",
            "CASCADE_STREAM_SESSION_TIMEOUT_S": "3",
            "OPENAI_BASE_URL": llm.base_url,
            "OPENAI_API_KEY": "test-key",
            "CASCADE_LLM_MODEL": MODEL,
            "CASCADE_LLM_TIMEOUT_S": "2",
            "CASCADE_LLM_MAX_RETRIES": "0",
            # tests/llm_server.py listens with http.server's backlog of 5: more in flight gets refused.
            "CASCADE_LLM_CONCURRENCY": "4",
            "CASCADE_LLM_RATE_PER_S": "10000",
            "CASCADE_LLM_RATE_BURST": "10000",
            "CASCADE_LLM_BREAKER_COOLDOWN_S": "1",
            "CASCADE_LLM_PRICES": json.dumps({MODEL: {"input": 1.0, "output": 2.0}}),
        }
        super().__init__(
            Settings(topic_prefix=prefix, stream_partitions=4, stream_replication_factor=1),
            CASCADE,
            tmp_path,
            broker.url,
            thresholds=write_llm_thresholds(tmp_path / "thresholds.yaml"),
            env=env,
            loglevel="info",
        )
        self.start()

    def inprocess_settings(self) -> Settings:
        """The deployment's settings for a cascade run in this process, on its own data dir."""
        return Settings(
            data_dir=self.log_dir / "data-inprocess",
            thresholds=self.thresholds,
            llm_base_url=self.env["OPENAI_BASE_URL"],
            llm_api_key="test-key",
            llm_model=MODEL,
            llm_max_retries=0,
            llm_rate_per_s=10000.0,
            llm_rate_burst=10000,
        )

    def publish(self, lines: list[bytes], rate: float | None = None) -> list[Published]:
        return asyncio.run(publish(self.url, self.topics, lines, rate))

    def collect(self, published: list[Published], timeout_s: float = 60.0) -> StreamOutputs:
        return asyncio.run(collect(self.url, self.topics, published, timeout_s=timeout_s))


def items(n: int, tag: str) -> list[bytes]:
    return [json.dumps({"id": f"{tag}-{i}", "text": f"{TEXTS[i % len(TEXTS)]} #{i}"}).encode() for i in range(n)]


def test_every_item_gets_one_verdict_across_stage_processes(deployment: Deployment) -> None:
    """N items in → exactly N distinct ids on the verdict topics, decisions equal to the in-process cascade."""
    first, second = deployment.worker(["hash"]), deployment.worker(["llm"])
    first.wait_ready(), second.wait_ready()
    good = items(60, "ok")
    published = deployment.publish(good + BAD_PAYLOADS)
    outcomes = deployment.collect(published)

    expected_ids = {f"ok-{i}" for i in range(60)}
    assert set(outcomes.verdicts) == expected_ids
    assert outcomes.duplicates == 0  # no failure happened, so nothing was redelivered
    assert sorted(d.error_code for d in outcomes.dead_letters) == sorted(
        [
            DeadLetterCode.MALFORMED_JSON,
            DeadLetterCode.MISSING_FIELD,
            DeadLetterCode.INVALID_UTF8,
            DeadLetterCode.NOT_AN_OBJECT,
        ]
    )
    assert all(d.source and d.source.startswith(deployment.topics.content) for d in outcomes.dead_letters)

    # The stream is a thin adapter: the same cascade in process reaches the same decisions.
    runner = build_runner(deployment.inprocess_settings(), stage_names=CASCADE)
    contexts = [new_context(parse_record(line, deployment.inprocess_settings())) for line in good]  # type: ignore[arg-type]
    in_process = {v.id: v for v in asyncio.run(runner.run(contexts))}
    asyncio.run(runner.aclose())
    for item_id, verdict in outcomes.verdicts.items():
        assert [t.stage for t in verdict.trace] == CASCADE  # crossed the escalation topic to the LLM
        assert verdict.trace[-1].error is None, verdict.trace[-1].error
        assert (verdict.decision, verdict.decided_by) == (in_process[item_id].decision, in_process[item_id].decided_by)
    decisions = {v.decision for v in outcomes.verdicts.values()}
    assert {Decision.ALLOW, Decision.BLOCK} <= decisions  # the content decided, not a default
    assert first.probe("/healthz") and second.probe("/healthz")


def test_sigkill_mid_stream_loses_nothing(deployment: Deployment) -> None:
    """A worker killed without any shutdown and restarted: every id still gets a verdict."""
    worker = deployment.worker()
    worker.wait_ready()

    async def publish_while_killing() -> list[Published]:
        publishing = asyncio.create_task(publish(deployment.url, deployment.topics, items(120, "k"), rate=60))
        verdicts_seen = [0]

        def seen(outcomes: StreamOutputs) -> None:
            verdicts_seen[0] = len(outcomes.verdicts)

        reader = asyncio.create_task(
            collect(deployment.url, deployment.topics, [], on_update=seen, until_drained=False)
        )
        while verdicts_seen[0] < 10:  # the worker is under way...
            await asyncio.sleep(0.05)
        await asyncio.to_thread(worker.kill)
        assert verdicts_seen[0] < 120  # ...and was killed before it was done: mid-stream
        reader.cancel()
        return await publishing

    published = asyncio.run(publish_while_killing())
    assert worker.returncode == -9
    restarted = deployment.worker()
    restarted.wait_ready()
    outcomes = deployment.collect(published)
    assert set(outcomes.verdicts) == {f"k-{i}" for i in range(120)}
    assert not outcomes.dead_letters


def test_sigterm_finishes_in_flight_work_and_commits(deployment: Deployment) -> None:
    """Graceful stop: exit code 0, and a restart does not redo what the first worker finished."""
    worker = deployment.worker()
    worker.wait_ready()

    async def publish_then_stop() -> list[Published]:
        publishing = asyncio.create_task(publish(deployment.url, deployment.topics, items(120, "s"), rate=120))
        await asyncio.sleep(0.5)
        assert await asyncio.to_thread(worker.stop, 15) == 0
        return await publishing

    started = time.monotonic()
    published = asyncio.run(publish_then_stop())
    assert time.monotonic() - started < 15
    deployment.worker().wait_ready()
    outcomes = deployment.collect(published)
    assert set(outcomes.verdicts) == {f"s-{i}" for i in range(120)}
    assert outcomes.duplicates == 0  # everything acknowledged before the stop was committed


def test_failing_llm_sends_items_to_review_workers_stay_up_and_metrics_count(
    deployment: Deployment, llm: LocalLLMServer
) -> None:
    worker = deployment.worker()
    worker.wait_ready()
    llm.state.default_mode = Mode.SERVER_ERROR
    failed = deployment.collect(deployment.publish([*items(30, "f"), b"garbage"]))
    assert len(failed.verdicts) == 30
    for verdict in failed.verdicts.values():
        assert verdict.decision is Decision.REVIEW
        assert verdict.trace[-1].stage == "llm" and verdict.trace[-1].error
    assert worker.alive and worker.probe("/healthz") and worker.probe("/readyz")

    # The same worker recovers once the endpoint does (the breaker cooldown is 1 s here).
    llm.state.default_mode = Mode.OK
    time.sleep(1.2)
    recovered = deployment.collect(deployment.publish(items(10, "r")))
    assert {v.id for v in recovered.verdicts.values() if v.id.startswith("r-")} == {f"r-{i}" for i in range(10)}
    assert any(v.decision is not Decision.REVIEW for v in recovered.verdicts.values() if v.id.startswith("r-"))

    # What the worker did, as Prometheus sees it.
    with urllib.request.urlopen(f"http://127.0.0.1:{worker.health_port}/metrics", timeout=2) as response:
        text = response.read().decode()
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }

    def value(name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    assert value("cascade_stage_items_total", stage="hash", result="escalate") == 40
    assert value("cascade_stage_errors_total", stage="llm") >= 30
    assert sum(v for (name, _), v in samples.items() if name == "cascade_verdicts_total") == 40
    assert value("cascade_verdicts_total", decision="review", decided_by="pipeline") >= 30
    assert value("cascade_dead_letters_total", stage="hash", error_code="malformed_json") == 1
    assert value("cascade_stage_batch_seconds_count", stage="llm") >= 2
    assert value("cascade_stage_cost_usd_total", stage="llm") > 0  # the recovered calls were priced


def test_a_worker_reissues_repeated_texts_without_the_llm(deployment: Deployment, llm: LocalLLMServer) -> None:
    """Copies of judged texts (case and spacing changed) get the earlier verdicts from the worker's repeat cache."""
    worker = deployment.worker()
    worker.wait_ready()
    texts = [f"{text} #{i}" for i, text in enumerate(TEXTS)]
    originals = [json.dumps({"id": f"a-{i}", "text": text}).encode() for i, text in enumerate(texts)]
    first = deployment.collect(deployment.publish(originals))
    calls = len(llm.state.requests)
    copies = [json.dumps({"id": f"b-{i}", "text": "  ".join(t.upper().split())}).encode() for i, t in enumerate(texts)]
    second = deployment.collect(deployment.publish(copies))

    assert not second.dead_letters
    assert len(llm.state.requests) == calls  # the LLM's own cache keys the exact text: these would miss it
    for index in range(len(texts)):
        earlier, copy = first.verdicts[f"a-{index}"], second.verdicts[f"b-{index}"]
        assert copy.trace[-1].details["repeat_of"] == earlier.id
        assert (copy.decision, copy.decided_by, copy.categories) == (
            earlier.decision,
            earlier.decided_by,
            earlier.categories,
        )
    with urllib.request.urlopen(f"http://127.0.0.1:{worker.health_port}/metrics", timeout=2) as response:
        families = {f.name: f for f in text_string_to_metric_families(response.read().decode())}
    hits = [s.value for s in families["cascade_repeat_cache_lookups"].samples if s.labels.get("result") == "hit"]
    assert hits == [len(texts)]
    assert families["cascade_repeat_cache_hit_ratio"].samples[0].value == 0.5


def test_reading_from_end_offsets_sees_only_what_comes_next(broker: EmbeddedBroker) -> None:
    topics = Topics(f"t{uuid.uuid4().hex[:8]}.")

    async def scenario() -> list[bytes]:
        await ensure_topics(broker.url, [topics.content], partitions=3, replication_factor=1)
        await publish(broker.url, topics, items(3, "before"))
        start = await end_offsets(broker.url, [topics.content])
        await publish(broker.url, topics, items(2, "after"))
        seen: list[bytes] = []
        async for topic, _, value in read_topics(broker.url, [topics.content], start=start):
            if not topic:  # idle: everything there is has been read
                return seen
            seen.append(value)
        raise AssertionError("read_topics never ends")

    seen = asyncio.run(scenario())
    assert sorted(json.loads(v)["id"] for v in seen) == ["after-0", "after-1"]
