"""No record can block a partition (issue 13), on the real broker (tansu over TCP) with real workers.

- hostile records through `cascade run --publish`: each gets one verdict or one dead letter, exit 0;
- an output too large for a message becomes a dead letter and the next batch of the same
  partition goes through; metrics count only what the broker acknowledged;
- a batch stuck past its deadline fails /healthz, SIGTERM still exits within the grace period,
  and what was not delivered is redelivered to the next worker;
- `--workers 2` reaches the decisions of `cascade moderate`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from aiokafka.partitioner import DefaultPartitioner
from llm_server import LocalLLMServer, Mode
from scrape import scrape
from test_stream_broker import Deployment, items, write_llm_thresholds

from cascade.contract import DeadLetter, DeadLetterCode, Decision, Verdict
from cascade.settings import Settings
from cascade.stream.broker import EmbeddedBroker
from cascade.stream.client import Consumed, StreamOutputs, read_topics
from cascade.stream.topics import Topics

pytestmark = [pytest.mark.broker, pytest.mark.slow]

CASCADE = str(Path(sys.executable).with_name("cascade"))
LIMITS = Settings()  # the default message limit: 1,000,000 bytes


def hostile_records() -> dict[str, bytes]:
    """The three records of the issue's repro, each past what the old worker could produce."""
    quotes = b'{"id": "poison-quotes", "text": "' + b'\\"' * 300_000 + b'"}'  # 600 KB, 1.2 MB once re-escaped
    invalid_utf8 = b'{"id": "poison-utf8", "text": "' + b"\xff\xfe" * 400_000 + b'"}'  # 800 KB, base64: 1.07 MB
    huge_line = json.dumps({"id": "poison-line", "text": "x" * 1_100_000}).encode()  # over the message limit
    assert 599_000 < len(quotes) < 601_000 and 799_000 < len(invalid_utf8) < 801_000 and len(huge_line) > 1_100_000
    return {"poison-quotes": quotes, "poison-utf8": invalid_utf8, "poison-line": huge_line}


def run_cascade(args: list[str], env: dict[str, str], cwd: Path, timeout_s: float = 240) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("CASCADE_", "OPENAI_"))}
    return subprocess.run(
        [CASCADE, *args], env={**base, **env}, cwd=cwd, capture_output=True, text=True, timeout=timeout_s
    )


def read_all(url: str, topics: list[str], idle_s: float = 2.0) -> list[Consumed]:
    """Every message of `topics`, read once the run is over."""

    async def read() -> list[Consumed]:
        messages: list[Consumed] = []
        quiet_since = time.monotonic()
        async for message in read_topics(url, topics):
            if message.topic:
                assert len(message.value) <= LIMITS.stream_max_message_bytes
                messages.append(message)
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since > idle_s:
                return messages
        raise AssertionError("read_topics never ends")

    return asyncio.run(read())


def read_outcomes(url: str, topics: Topics) -> StreamOutputs:
    outcomes = StreamOutputs(topics)
    for topic, key, value in read_all(url, [*topics.all_verdicts, topics.deadletter]):
        outcomes.add(topic, value, key)
    return outcomes


def stream_env(tmp_path: Path, prefix: str) -> dict[str, str]:
    return {
        "CASCADE_DATA_DIR": str(tmp_path / "data"),
        "CASCADE_TOPIC_PREFIX": prefix,
        "CASCADE_STREAM_GROUP": f"g-{prefix}",
        "CASCADE_STREAM_SESSION_TIMEOUT_S": "3",
        "CASCADE_STREAM_BATCH_WAIT_S": "0.05",
        "NO_COLOR": "1",
    }


def letter_id(letter: DeadLetter) -> str | None:
    """The item id of a dead letter, else the one its raw payload starts with (not UTF-8: nobody could read it)."""
    if letter.id:
        return letter.id
    raw = base64.b64decode(letter.payload) if letter.payload_encoding == "base64" else letter.payload.encode()
    found = re.match(rb'\{"id": "([^"]+)"', raw)
    return found.group(1).decode() if found else None


def assert_one_outcome_each(outcomes: StreamOutputs, ids: set[str], dead: dict[str, DeadLetterCode]) -> None:
    ours = [(letter_id(d), d) for d in outcomes.dead_letters if letter_id(d) in dead]
    letters = dict(ours)
    assert set(outcomes.verdicts) & ids == ids - set(dead)
    assert {i: d.error_code for i, d in letters.items()} == dead
    assert len(ours) == len(dead)  # one each, no duplicate
    assert not set(outcomes.verdicts) & set(dead)
    for letter in letters.values():
        assert letter.payload_truncated and letter.payload_bytes and letter.payload_bytes > len(letter.payload) // 2


def test_hostile_records_through_cascade_run_each_get_one_outcome(broker: EmbeddedBroker, tmp_path: Path) -> None:
    """The acceptance run of issue 13: 20 items + 600 KB of quotes + 800 KB of invalid UTF-8 + a 1.1 MB line."""
    prefix = f"r{uuid.uuid4().hex[:8]}."
    normal = items(20, "ok")
    source = tmp_path / "hostile.jsonl"
    source.write_bytes(b"\n".join([*normal[:10], *hostile_records().values(), *normal[10:]]) + b"\n")

    done = run_cascade(
        ["run", "--broker", broker.url, "--publish", str(source), "--until-drained", "--timeout", "120"],
        stream_env(tmp_path, prefix),
        tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "1 over the limit" in done.stderr and "23 published" in done.stderr

    outcomes = read_outcomes(broker.url, Topics(prefix))
    ids = {f"ok-{i}" for i in range(20)} | set(hostile_records())
    assert_one_outcome_each(
        outcomes,
        ids,
        {
            "poison-quotes": DeadLetterCode.TEXT_TOO_LARGE,
            "poison-utf8": DeadLetterCode.INVALID_UTF8,
            "poison-line": DeadLetterCode.LINE_TOO_LARGE,
        },
    )
    assert all(v.decision in Decision for v in outcomes.verdicts.values())


def test_hash_llm_with_a_megabyte_of_metadata(broker: EmbeddedBroker, llm: LocalLLMServer, tmp_path: Path) -> None:
    """`--stages hash,llm`, one worker: the stages are fused, so an item whose escalation record could not
    fit in a message never needs one and gets the LLM's verdict; a 1 MB metadata string is over the limit."""
    llm.state.default_mode = Mode.OK
    prefix = f"m{uuid.uuid4().hex[:8]}."
    head = b'{"id": "meta-fits", "text": "see you at noon", "metadata": {"blob": "'
    fits_input = head + b"m" * (LIMITS.line_limit - len(head) - 100) + b'"}}'  # just under the record limit
    megabyte = json.dumps({"id": "meta-1mb", "text": "hello", "metadata": {"blob": "m" * 1_000_000}}).encode()
    source = tmp_path / "metadata.jsonl"
    source.write_bytes(b"\n".join([*items(20, "ok"), fits_input, megabyte, *hostile_records().values()]) + b"\n")
    env = {
        **stream_env(tmp_path, prefix),
        "CASCADE_THRESHOLDS": str(write_llm_thresholds(tmp_path / "thresholds.yaml")),
        "OPENAI_BASE_URL": llm.base_url,
        "OPENAI_API_KEY": "test-key",
        "CASCADE_LLM_MAX_RETRIES": "0",
    }

    done = run_cascade(
        ["run", "--broker", broker.url, "--stages", "hash,llm", "--publish", str(source), "--until-drained"],
        env,
        tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]

    outcomes = read_outcomes(broker.url, Topics(prefix))
    ids = {f"ok-{i}" for i in range(20)} | {"meta-fits", "meta-1mb"} | set(hostile_records())
    assert_one_outcome_each(
        outcomes,
        ids,
        {
            "meta-1mb": DeadLetterCode.LINE_TOO_LARGE,
            "poison-quotes": DeadLetterCode.TEXT_TOO_LARGE,
            "poison-utf8": DeadLetterCode.INVALID_UTF8,
            "poison-line": DeadLetterCode.LINE_TOO_LARGE,
        },
    )
    assert outcomes.verdicts["meta-fits"].decision is Decision.ALLOW
    assert all(v.trace[-1].stage == "llm" and v.decided_by == "llm" for v in outcomes.verdicts.values())
    assert read_all(broker.url, [Topics(prefix).escalate("llm")]) == []  # fused: no Kafka hop in one worker


def same_partition_ids(partitions: int) -> tuple[str, str]:
    """Two ids that the producer's default partitioner puts on the same partition."""
    partitioner = DefaultPartitioner()
    all_partitions = list(range(partitions))
    target = partitioner(b"poison-0", all_partitions, all_partitions)
    follower = next(
        f"next-{n}" for n in range(1000) if partitioner(f"next-{n}".encode(), all_partitions, all_partitions) == target
    )
    return "poison-0", follower


def test_a_refused_output_does_not_block_the_next_batch_of_its_partition(deployment: Deployment) -> None:
    """Unfused (a hash worker, an LLM worker): the poison's escalation record cannot cross to the LLM worker."""
    deployment.env["CASCADE_STREAM_BATCH_SIZE"] = "1"  # the poison alone in its batch, the next item in the next
    worker, llm_worker = deployment.worker(["hash"]), deployment.worker(["llm"])
    worker.wait_ready(), llm_worker.wait_ready()
    poison_id, next_id = same_partition_ids(4)
    text = " ".join(["a long post"] * 2500)  # 30 KB: within the text limit
    # Just within the record limit; its escalation record adds the normalised text and cannot fit.
    blob = "m" * (LIMITS.line_limit - len(text) - 200)
    poison = json.dumps({"id": poison_id, "text": text, "metadata": {"blob": blob}})
    assert LIMITS.line_limit - 200 < len(poison) <= LIMITS.line_limit
    published = deployment.publish([poison.encode(), _item(next_id, "see you at noon")])
    (first, second) = published
    assert first.source.rsplit("@", 1)[0] == second.source.rsplit("@", 1)[0]  # same topic and partition

    outcomes = deployment.collect(published, timeout_s=60)
    (letter,) = [d for d in outcomes.dead_letters if d.id == poison_id]
    assert letter.error_code is DeadLetterCode.OUTPUT_TOO_LARGE
    assert outcomes.verdicts[next_id].decision is Decision.ALLOW

    # Metrics count what the broker acknowledged: one dead letter and one refused output from the hash
    # worker, which produced no verdict; the one verdict came from the LLM worker.
    samples = scrape(worker.health_port)
    assert samples[("cascade_dead_letters_total", (("error_code", "output_too_large"), ("stage", "hash")))] == 1
    assert samples[("cascade_refused_outputs_total", (("error_code", "output_too_large"), ("stage", "hash")))] == 1
    assert not any(name == "cascade_verdicts_total" and value for (name, _), value in samples.items())
    llm_samples = scrape(llm_worker.health_port)
    assert llm_samples[("cascade_verdicts_total", (("decided_by", "llm"), ("decision", "allow")))] == 1


def test_a_stuck_batch_fails_liveness_and_sigterm_still_exits_within_grace(
    deployment: Deployment, llm: LocalLLMServer
) -> None:
    deployment.env |= {
        "CASCADE_LLM_TIMEOUT_S": "120",  # the LLM call hangs, as a stuck dependency does
        "CASCADE_STREAM_BATCH_DEADLINE_S": "2",
        "CASCADE_STREAM_SHUTDOWN_GRACE_S": "2",
    }
    worker = deployment.worker()
    worker.wait_ready()
    llm.state.slow_s, llm.state.default_mode = 60.0, Mode.SLOW
    published = deployment.publish(items(3, "stuck"))
    deadline = time.monotonic() + 30
    while worker.probe("/healthz") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not worker.probe("/healthz")  # the orchestrator would restart it
    assert worker.alive

    started = time.monotonic()
    code = worker.stop(timeout_s=20)
    assert time.monotonic() - started < 2 + 5 + 2  # grace, the shutdown margin, process exit
    assert code == 0

    # Nothing was delivered, so nothing was committed: the next worker gets the items again.
    llm.state.slow_s, llm.state.default_mode = 1.0, Mode.OK
    deployment.worker().wait_ready()
    outcomes = deployment.collect(published, timeout_s=60)
    assert set(outcomes.verdicts) == {f"stuck-{i}" for i in range(3)}


def _item(item_id: str, text: str) -> bytes:
    return json.dumps({"id": item_id, "text": text}).encode()


SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


@pytest.mark.skipif(not any(SHARED_DATA.glob("*.jsonl")), reason="needs the labelled data in ../shared/data")
def test_two_workers_reach_the_decisions_of_moderate(broker: EmbeddedBroker, tmp_path: Path) -> None:
    """`cascade run --workers 2` with the embedded exemplar store: only the first worker runs retrieval
    (the store opens in one process), so no item skips it, and every decision is the one-shot cascade's."""
    prefix = f"w{uuid.uuid4().hex[:8]}."
    env = stream_env(tmp_path, prefix)
    source = tmp_path / "items.jsonl"
    prepared = [
        ["sample", *map(str, sorted(SHARED_DATA.glob("*.jsonl"))), "--split", "test", "-n", "200", "-o", str(source)],
        ["bank", "seed"],  # policy seed exemplars: retrieval has something to vote with
    ]
    for args in prepared:
        done = run_cascade(args, env, tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]

    done = run_cascade(
        ["run", "--broker", broker.url, "--workers", "2", "--publish", str(source), "--until-drained"], env, tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    streamed = read_outcomes(broker.url, Topics(prefix)).verdicts
    verdicts_file = tmp_path / "moderated.jsonl"
    done = run_cascade(["moderate", str(source), "-o", str(verdicts_file)], env, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    moderated = {v.id: v for v in map(Verdict.model_validate_json, verdicts_file.read_text().splitlines())}

    assert len(moderated) == 200 and set(streamed) == set(moderated)
    reached_retrieval = [v for v in streamed.values() if any(t.stage == "retrieval" for t in v.trace)]
    assert reached_retrieval and all(
        t.error is None for v in reached_retrieval for t in v.trace if t.stage == "retrieval"
    )
    assert {i: (v.decision, v.decided_by) for i, v in streamed.items()} == {
        i: (v.decision, v.decided_by) for i, v in moderated.items()
    }


def test_fused_and_unfused_workers_reach_identical_decisions(
    deployment: Deployment, broker: EmbeddedBroker, llm: LocalLLMServer, tmp_path: Path
) -> None:
    """Issue 16: one worker owning both stages runs them in process (no escalation message), and decides
    exactly what two workers joined by the escalation topic decide."""
    lines = items(40, "f")
    fused_worker = deployment.worker()
    fused_worker.wait_ready()
    fused = deployment.collect(deployment.publish(lines))
    fused_worker.stop()
    hops_fused = len(read_all(deployment.url, [deployment.topics.escalate("llm")]))

    (tmp_path / "unfused").mkdir()
    unfused = Deployment(broker, llm, tmp_path / "unfused")
    try:
        for stages in (["hash"], ["llm"]):
            unfused.worker(stages).wait_ready()
        split = unfused.collect(unfused.publish(lines))
    finally:
        unfused.kill()
    hops_unfused = len(read_all(unfused.url, [unfused.topics.escalate("llm")]))

    assert set(fused.verdicts) == set(split.verdicts) == {f"f-{i}" for i in range(40)}
    assert {i: (v.decision, v.decided_by, v.categories) for i, v in fused.verdicts.items()} == {
        i: (v.decision, v.decided_by, v.categories) for i, v in split.verdicts.items()
    }
    assert all([t.stage for t in v.trace] == ["hash", "llm"] for v in fused.verdicts.values())
    assert (hops_fused, hops_unfused) == (0, 40)
