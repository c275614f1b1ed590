"""Hash banks shared by every replica through the compacted banks topic, on the real broker.

Two hash workers, each with its own data directory (as two pods with their own `emptyDir`), and
an operator with a third one. `cascade bank add` with a broker configured goes through the topic:
the running worker follows it, the worker started afterwards replays it at start, and both then
block the item. A removal travels the same way, and so do a bulk `cascade bank import`, the
review service's bank feedback and a quarantine one worker's flood guard imposes.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from aiokafka.partitioner import DefaultPartitioner
from review_support import cascade_verdict

from cascade.banktopic import BankTopic, EntryState
from cascade.contract import Decision
from cascade.hashbank import BankEntry, HashBank
from cascade.review.feedback import BankFeedback, bank_entry_id
from cascade.review.store import ReviewStore
from cascade.settings import Settings
from cascade.stream.broker import EmbeddedBroker
from cascade.stream.client import publish
from cascade.stream.kafka import ensure_topics
from cascade.stream.local import WorkerProcess, collect
from cascade.stream.topics import Topics

pytestmark = [pytest.mark.broker, pytest.mark.slow]

CLI = str(Path(sys.executable).parent / "cascade")
CASCADE = ["hash"]
# A CLI run starts a Python process that imports every command: minutes on a loaded 2-core machine.
CLI_TIMEOUT_S = 300
BAD = "WINNER!! You have won a free cruise, text CLAIM to 80082 now"


def wait_for(condition: Callable[[], bool], timeout_s: float = 30.0) -> float:
    """Seconds until `condition()` held; fails the test after `timeout_s`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if condition():
            return time.monotonic() - started
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout_s:.0f} s")


def entry_in(data_dir: Path, entry_id: str) -> BankEntry | None:
    bank = HashBank.open(data_dir)
    try:
        return bank.get(entry_id)
    finally:
        bank.close()


def has_entry(data_dir: Path, entry_id: str) -> bool:
    return entry_in(data_dir, entry_id) is not None


def replicas(
    broker: EmbeddedBroker, tmp_path: Path, env: dict[str, str] | None = None
) -> tuple[Topics, dict[str, WorkerProcess], dict[str, str]]:
    """Topics of a fresh deployment, two hash workers "a" and "b" (not started) with their own data
    directories, and an operator's environment with a third one and the broker configured."""
    prefix = f"banks{uuid.uuid4().hex[:6]}."
    topics = Topics(prefix)
    env = {"CASCADE_TOPIC_PREFIX": prefix, "CASCADE_STREAM_GROUP": f"g{uuid.uuid4().hex[:6]}", **(env or {})}
    asyncio.run(ensure_topics(broker.url, topics.all_topics(CASCADE), 2, 1))
    workers = {
        name: WorkerProcess(
            broker.url,
            cascade=CASCADE,
            env={**env, "CASCADE_DATA_DIR": str(tmp_path / name)},
            log_path=tmp_path / f"{name}.log",
        )
        for name in ("a", "b")
    }
    operator = {**os.environ, **env, "CASCADE_KAFKA_URL": broker.url, "CASCADE_DATA_DIR": str(tmp_path / "op")}
    return topics, workers, operator


def test_a_bank_change_reaches_every_replica(tmp_path: Path) -> None:
    with EmbeddedBroker() as broker:
        topics, workers, operator = replicas(broker, tmp_path)
        try:
            workers["a"].start().wait_ready(120)
            added = subprocess.run(
                [CLI, "bank", "add", BAD, "--bad", "-c", "spam"],
                env=operator,
                capture_output=True,
                text=True,
                timeout=CLI_TIMEOUT_S,
            )
            assert added.returncode == 0, added.stderr
            entry_id = added.stdout.split()[1]  # "added: <id> (bad)"
            workers["b"].start().wait_ready(120)  # started after the add: replays the topic
            for name in workers:
                seconds = wait_for(lambda name=name: has_entry(tmp_path / name, entry_id))
                print(f"worker {name} holds {entry_id} {seconds:.1f} s after it was ready")
            items = [json.dumps({"id": f"i{n}", "text": BAD.upper() + " " * n}).encode() for n in range(8)]
            published = asyncio.run(publish(broker.url, topics, items))
            outcomes = asyncio.run(collect(broker.url, topics, published, timeout_s=60))
            # Keys spread the items over both partitions, hence over both workers.
            assert {v.decision.value for v in outcomes.verdicts.values()} == {"block"}
            assert {v.decided_by for v in outcomes.verdicts.values()} == {"hash"}

            removed = subprocess.run(
                [CLI, "bank", "remove", entry_id], env=operator, capture_output=True, text=True, timeout=CLI_TIMEOUT_S
            )
            assert removed.returncode == 0, removed.stderr
            for name in workers:
                wait_for(lambda name=name: not has_entry(tmp_path / name, entry_id))
        finally:
            for worker in workers.values():
                worker.stop()


def test_entry_states_replay_idempotently(tmp_path: Path) -> None:
    bank = HashBank.open(tmp_path)
    until = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    state = EntryState(
        "e1", BAD, "bad", ("spam",), "test", "op", quarantined=True, quarantine_reason="flood", quarantined_until=until
    )
    for _ in range(2):  # a replayed topic delivers states again: same bank
        EntryState.from_wire(state.to_wire()).apply(bank)
    entry = bank.get("e1")
    assert entry is not None and entry.quarantined and entry.categories == ("spam",)
    EntryState.from_wire(EntryState.of(entry, removed=True).to_wire()).apply(bank)
    assert bank.get("e1") is None
    bank.close()


FLOODED = "Limited offer: reply YES for your free prize draw entry"
# A tiny flood guard: an unconfirmed entry matching more than half of the last 4+ items is quarantined.
FLOOD_ENV = {
    "CASCADE_FLOOD_MIN_ITEMS": "4",
    "CASCADE_FLOOD_SHARE": "0.5",
    "CASCADE_FLOOD_WINDOW": "10",
    "CASCADE_REPEAT_CACHE_SIZE": "0",  # every copy reaches the hash stage (no re-issued verdicts)
}


def ids_on_partition(partition: int, count: int, partitions: int = 2) -> list[str]:
    """Item ids whose messages the producer's default partitioner (murmur2 of the key) puts on `partition`."""
    partitioner = DefaultPartitioner()
    ids = (f"flood-{n}" for n in itertools.count())
    return list(
        itertools.islice(
            (i for i in ids if partitioner(i.encode(), list(range(partitions)), list(range(partitions))) == partition),
            count,
        )
    )


def test_imports_feedback_and_quarantines_reach_every_replica(tmp_path: Path) -> None:
    with EmbeddedBroker() as broker:
        topics, workers, operator = replicas(broker, tmp_path, FLOOD_ENV)
        try:
            for worker in workers.values():
                worker.start()
            for worker in workers.values():
                worker.wait_ready(120)

            # A bulk import, unconfirmed (so the flood guard may quarantine its entries).
            entries = tmp_path / "entries.jsonl"
            rows = [
                {"id": "imp-flood", "text": FLOODED, "polarity": "bad", "categories": ["spam"]},
                {"id": "imp-other", "text": "call now to claim your lottery winnings", "polarity": "bad"},
            ]
            entries.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
            imported = subprocess.run(
                [CLI, "bank", "import", str(entries), "--kind", "hash"],
                env=operator,
                capture_output=True,
                text=True,
                timeout=CLI_TIMEOUT_S,
            )
            assert imported.returncode == 0, imported.stderr
            for name in workers:
                for row in rows:
                    wait_for(lambda name=name, row=row: has_entry(tmp_path / name, row["id"]))

            # A reviewer's block, fed to the banks by the review service's feedback.
            settings = Settings(data_dir=tmp_path / "review", topic_prefix=operator["CASCADE_TOPIC_PREFIX"])
            store = ReviewStore.from_settings(settings.model_copy(update={"review_bank_feedback": True}))
            try:
                store.ingest_verdict(cascade_verdict("rev-1", "you absolute troll, nobody wants you here"))
                task = store.queue()[0][0]
                store.claim(task.id, "ann")
                store.decide(task.id, "ann", Decision.BLOCK, ["harassment"])
                feedback = BankFeedback(store, settings, exemplars=False, topic=BankTopic.on(broker.url, settings))
                assert feedback.apply_pending() == 1
            finally:
                store.close()
            for name in workers:
                wait_for(lambda name=name: has_entry(tmp_path / name, bank_entry_id("rev-1")))

            # A flood of copies, all on one partition: only the worker that owns it sees them and
            # quarantines the entry; the other learns it from the topic.
            flood_ids = ids_on_partition(0, 6)
            items = [json.dumps({"id": i, "text": FLOODED}).encode() for i in flood_ids]
            published = asyncio.run(publish(broker.url, topics, items))
            outcomes = asyncio.run(collect(broker.url, topics, published, timeout_s=60))
            assert set(outcomes.verdicts) == set(flood_ids)
            newly = [v for v in outcomes.verdicts.values() if v.trace[0].details.get("newly_quarantined")]
            assert len(newly) == 1, "one worker quarantined the entry, once"
            for name in workers:
                seconds = wait_for(lambda name=name: (e := entry_in(tmp_path / name, "imp-flood")) and e.quarantined)
                print(f"worker {name} holds the quarantine {seconds:.1f} s after the flood")
        finally:
            for worker in workers.values():
                worker.stop()
