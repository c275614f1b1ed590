"""The review store on SQLite and on a real PostgreSQL server: the same tests on both."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from postgres_server import PostgresServer, running_postgres
from review_support import cascade_verdict
from typer.testing import CliRunner

from cascade.cli import app
from cascade.contract import HUMAN, Appeal, AppealRuling, Decision
from cascade.data import read_labelled
from cascade.hashbank import EntryInput, HashBank, Polarity, entry_from_record
from cascade.review.feedback import BankFeedback, bank_entry_id, labelled_rows
from cascade.review.metrics import audit_precision
from cascade.review.store import Audit, Filters, ReviewError, ReviewStore, human_verdict
from cascade.settings import Settings
from cascade.vectorindex import open_vector_index

pytest_plugins = ["model_cache"]  # fixtures: settings (a data dir with the exported embedding model)

T0 = datetime(2026, 11, 30, 8, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    with running_postgres() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ReviewStore]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'review.db'}"
    else:
        url = request.getfixturevalue("postgres").new_database()
    opened = ReviewStore(url, lease_s=60)
    yield opened
    opened.close()


def test_a_redelivered_verdict_never_makes_a_second_task(store: ReviewStore) -> None:
    verdict = cascade_verdict("item-1", "hello")
    assert store.ingest_verdict(verdict, T0) is True
    assert store.ingest_verdict(verdict, T0 + timedelta(seconds=5)) is False
    tasks, total = store.queue()
    assert total == 1
    task = store.task(tasks[0].id)
    # The task keeps the whole verdict: trace, scores, neighbours, rationale.
    assert task.verdict == verdict
    assert task.verdict.evidence == verdict.evidence
    assert task.text == "hello"


def test_a_batch_is_stored_whole_with_its_refusals_named(store: ReviewStore) -> None:
    review, blocked = cascade_verdict("b-1", "one"), cascade_verdict("b-2", "two", Decision.BLOCK)
    batch = [review, review, blocked, Appeal(id="unknown", reason="?"), Appeal(id="b-2", reason="joke")]
    outcomes = store.ingest(batch)
    assert outcomes[:3] == [None, None, None] and outcomes[4] is None
    assert isinstance(outcomes[3], ReviewError) and "unknown" in str(outcomes[3])
    tasks, total = store.queue()
    assert total == 2 and [(t.item_id, t.kind) for t in tasks] == [("b-2", "appeal"), ("b-1", "review")]
    # Records no cascade would make (over-long id, names wider than the columns) never block a batch.
    foreign = cascade_verdict("x", "text").model_copy(update={"id": "x" * 600})
    wide = cascade_verdict("wide", "text", scores={"c" * 100: 0.9})
    long_block = cascade_verdict("y", "text", Decision.BLOCK).model_copy(update={"id": "y" * 600})
    refused, stored, refused_block = store.ingest([foreign, wide, long_block])
    assert isinstance(refused, ReviewError) and isinstance(refused_block, ReviewError) and stored is None
    assert store.queue(Filters(category="c" * 64))[1] == 1


def test_allow_verdicts_make_no_task_and_migrations_are_idempotent(store: ReviewStore) -> None:
    assert store.ingest_verdict(cascade_verdict("ok", "fine", Decision.ALLOW)) is False
    assert store.queue()[1] == 0
    ReviewStore(store.url).close()  # a second process migrating the same schema changes nothing
    assert store.queue()[1] == 0


def test_queue_is_sorted_by_priority_then_age_and_filters(store: ReviewStore) -> None:
    store.ingest_verdict(cascade_verdict("low", "a", scores={"spam": 0.3}, surface="sms"), T0)
    store.ingest_verdict(cascade_verdict("high-new", "b", scores={"toxic": 0.9}, surface="post"), T0 + timedelta(1))
    store.ingest_verdict(cascade_verdict("high-old", "c", scores={"toxic": 0.9}, surface="post"), T0)
    tasks, total = store.queue()
    assert [t.item_id for t in tasks] == ["high-old", "high-new", "low"]
    assert total == 3
    assert [t.item_id for t in store.queue(Filters(category="spam"))[0]] == ["low"]
    assert store.queue(Filters(surface="post"))[1] == 2
    assert store.queue(Filters(stage="llm"))[1] == 3
    assert store.queue(Filters(stage="hash"))[1] == 0
    assert store.facets() == {"category": ["spam", "toxic"], "surface": ["post", "sms"], "stage": ["llm"]}


def test_claims_lease_and_expire(store: ReviewStore) -> None:
    store.ingest_verdict(cascade_verdict("x", "text"), T0)
    task_id = store.queue()[0][0].id
    assert store.claim(task_id, "ann", T0)
    assert not store.claim(task_id, "bob", T0 + timedelta(seconds=59))  # ann's lease is live
    assert store.claim(task_id, "ann", T0 + timedelta(seconds=30))  # renewing one's own claim
    with pytest.raises(ReviewError, match="not claimed by bob"):
        store.decide(task_id, "bob", Decision.ALLOW, now=T0 + timedelta(seconds=31))
    assert store.claim(task_id, "bob", T0 + timedelta(seconds=91))  # ann's lease ran out
    with pytest.raises(ReviewError, match="not claimed by ann"):
        store.decide(task_id, "ann", Decision.ALLOW, now=T0 + timedelta(seconds=92))
    record = store.decide(task_id, "bob", Decision.ALLOW, now=T0 + timedelta(seconds=92))
    assert record.reviewer == "bob"
    assert not store.claim(task_id, "carl", T0 + timedelta(hours=1))  # decided tasks cannot be claimed


def test_two_concurrent_claims_exactly_one_wins(store: ReviewStore) -> None:
    for n in range(20):
        store.ingest_verdict(cascade_verdict(f"race-{n}", "text"), T0)
    rival = ReviewStore(store.url, lease_s=60)  # another process on the same database
    try:
        for task in store.queue()[0]:
            barrier = threading.Barrier(2)
            wins: dict[str, bool] = {}

            def claim(
                name: str, on: ReviewStore, task_id: int, barrier: threading.Barrier, wins: dict[str, bool]
            ) -> None:
                barrier.wait()
                wins[name] = on.claim(task_id, name)

            threads = [
                threading.Thread(target=claim, args=(n, s, task.id, barrier, wins))
                for n, s in (("ann", store), ("bob", rival))
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert sorted(wins.values()) == [False, True], wins
            winner = next(n for n, won in wins.items() if won)
            assert store.task(task.id).claimed_by == winner
    finally:
        rival.close()


def test_a_block_needs_a_category_and_the_decision_carries_what_it_settles(store: ReviewStore) -> None:
    verdict = cascade_verdict("b1", "bad words")
    store.ingest_verdict(verdict, T0)
    task_id = store.queue()[0][0].id
    store.claim(task_id, "ann", T0)
    with pytest.raises(ReviewError, match="at least one category"):
        store.decide(task_id, "ann", Decision.BLOCK, [], now=T0)
    record = store.decide(task_id, "ann", Decision.BLOCK, ["toxic"], now=T0 + timedelta(seconds=1))
    assert (record.id, record.decision, record.categories, record.reviewer) == ("b1", "block", ["toxic"], "ann")
    assert record.settles == verdict
    assert record.policy_version == "policy-test"
    assert record.decided_at == T0 + timedelta(seconds=1)
    final = human_verdict(record)
    assert (final.decided_by, final.decision, final.flagged_categories) == (HUMAN, Decision.BLOCK, ["toxic"])
    assert final.trace[-1].stage == HUMAN and final.trace[:-1] == verdict.trace
    assert [r.decision_id for r in store.unpublished()] == [record.decision_id]
    store.mark_published([record.decision_id])
    assert store.unpublished() == []
    assert store.queue()[1] == 0


def test_appeal_of_a_block_is_prioritised_then_overturned_and_counted(store: ReviewStore) -> None:
    store.ingest_verdict(cascade_verdict("r1", "unsure", scores={"toxic": 0.99}), T0)
    blocked = cascade_verdict("blk", "blocked text", Decision.BLOCK, scores={"toxic": 0.7})
    store.ingest_verdict(blocked, T0)
    with pytest.raises(ReviewError, match="no block verdict"):
        store.ingest_appeal(Appeal(id="never-blocked", reason="why"))
    appeal = Appeal(id="blk", reason="it was a joke", author="u-7")
    assert store.ingest_appeal(appeal, T0 + timedelta(seconds=1))
    assert not store.ingest_appeal(appeal, T0 + timedelta(seconds=2))  # redelivered
    tasks, _ = store.queue()
    assert [(t.item_id, t.kind) for t in tasks] == [("blk", "appeal"), ("r1", "review")]  # above any review task
    task = tasks[0]
    assert (task.verdict, task.appeal_reason, task.appeal_author, task.text) == (
        blocked,
        "it was a joke",
        "u-7",
        "blocked text",
    )
    store.claim(task.id, "ann")
    record = store.decide(task.id, "ann", Decision.ALLOW)
    assert record.appeal and record.appeal_outcome is AppealRuling.OVERTURNED
    assert human_verdict(record).decision is Decision.ALLOW
    stats = store.stats()
    assert (stats.appeals_decided, stats.overturned, stats.overturn_rate) == (1, 1, 1.0)
    # Allowed now: a new appeal has nothing to appeal against, even when the human block that the
    # appeal overturned arrives late from the verdict topic.
    late_block = blocked.model_copy(update={"processed_at": record.decided_at - timedelta(seconds=1)})
    assert store.ingest_verdict(late_block) is False
    with pytest.raises(ReviewError):
        store.ingest_appeal(Appeal(id="blk", reason="again"))


def test_audit_samples_become_audit_tasks_and_measure_block_precision(store: ReviewStore) -> None:
    blocks = [cascade_verdict(f"au-{n}", f"audited {n}", Decision.BLOCK) for n in range(3)]
    allowed = cascade_verdict("au-ok", "fine", Decision.ALLOW)
    assert store.ingest([Audit(v) for v in [*blocks, allowed]]) == [None] * 4
    refused = store.ingest([Audit(cascade_verdict("au-r", "x"))])[0]
    assert isinstance(refused, ReviewError)  # review verdicts are not audit samples
    tasks, total = store.queue()
    assert total == 4 and {t.kind for t in tasks} == {"audit"}
    assert {t.stage for t in tasks} == {"llm"} and tasks[0].verdict.item is not None
    humans = {"au-0": Decision.BLOCK, "au-1": Decision.BLOCK, "au-2": Decision.ALLOW, "au-ok": Decision.ALLOW}
    for task in tasks:
        store.claim(task.id, "ann")
        record = store.decide(task.id, "ann", humans[task.item_id], ["toxic"])
        assert record.audit and not record.appeal
    pairs = store.audit_pairs(10)
    assert sorted(pairs) == sorted(
        [(Decision.BLOCK, Decision.BLOCK)] * 2 + [(Decision.BLOCK, Decision.ALLOW), (Decision.ALLOW, Decision.ALLOW)]
    )
    precision = audit_precision(store, 10)
    assert (precision.audited_blocks, precision.estimate) == (3, pytest.approx(2 / 3))
    assert len(store.audit_pairs(2)) == 2  # the latest decided audits only


def test_stats_count_queue_reviewers_and_per_stage_precision(store: ReviewStore) -> None:
    now = T0 + timedelta(minutes=10)
    store.ingest_verdict(cascade_verdict("s1", "a", scores={"toxic": 0.8}), T0)
    store.ingest_verdict(cascade_verdict("s2", "b", scores={"toxic": 0.7}), T0 + timedelta(minutes=1))
    store.ingest_verdict(cascade_verdict("s3", "c", scores={"toxic": 0.2}), T0 + timedelta(minutes=2))
    ids = {t.item_id: t.id for t in store.queue()[0]}
    for item, reviewer, decision in (("s1", "ann", Decision.BLOCK), ("s2", "bob", Decision.ALLOW)):
        store.claim(ids[item], reviewer, now)
        store.decide(ids[item], reviewer, decision, ["toxic"], now=now)
    store.claim(ids["s3"], "ann", now)
    stats = store.stats(now)
    assert stats.queue_depth == 1 and stats.claimed == 1
    assert stats.oldest_open_age_s == pytest.approx(8 * 60)
    assert stats.decisions_by_reviewer == {"ann": {"block": 1}, "bob": {"allow": 1}}
    by_stage = {s.stage: s for s in stats.stages}
    # Both decided items scored >= 0.5 at retrieval and llm: one blocked, one allowed by reviewers.
    assert set(by_stage) == {"retrieval", "llm"}
    assert (by_stage["llm"].decided, by_stage["llm"].precision, by_stage["llm"].agreement) == (2, 0.5, 0.5)


def test_accounts_store_only_a_salted_hash(store: ReviewStore) -> None:
    assert store.add_account("ann", "correct horse")
    assert not store.add_account("ann", "battery staple")  # a reset
    assert store.authenticate("ann", "battery staple")
    assert not store.authenticate("ann", "correct horse")
    assert not store.authenticate("nobody", "battery staple")
    with pytest.raises(ReviewError, match="at least 8"):
        store.add_account("bob", "short")
    assert [name for name, _ in store.accounts()] == ["ann"]
    with store.engine.connect() as conn:
        stored = conn.exec_driver_sql("SELECT password_hash FROM review_accounts").scalar_one()
    assert "battery" not in stored and stored.startswith("scrypt$")


def test_export_is_the_labelled_format_that_bank_import_takes(store: ReviewStore, tmp_path: Path) -> None:
    for n in range(2):
        store.ingest_verdict(cascade_verdict(f"e{n}", f"text {n}"), T0)
    for task in store.queue()[0]:
        store.claim(task.id, "ann")
        store.decide(task.id, "ann", Decision.BLOCK if task.item_id == "e0" else Decision.ALLOW, ["toxic"])
    rows = list(labelled_rows(store, ["flagged", "toxic", "spam"]))
    assert rows == [
        {"id": "e0", "text": "text 0", "flagged": 1, "labels": {"toxic": 1}, "source": "review"},
        {"id": "e1", "text": "text 1", "flagged": 0, "labels": {"spam": 0, "toxic": 0}, "source": "review"},
    ]
    assert list(labelled_rows(store, ["toxic"], since=datetime.now(UTC) + timedelta(hours=1))) == []
    path = tmp_path / "review.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [(r.id, r.flagged, r.labels) for r in read_labelled(path)] == [
        ("e0", 1, {"toxic": 1}),
        ("e1", 0, {"spam": 0, "toxic": 0}),
    ]
    assert [entry_from_record(r).polarity for r in rows] == [Polarity.BAD, Polarity.GOOD]


def test_bank_feedback_is_off_by_default_and_audited_when_on(tmp_path: Path) -> None:
    assert Settings().review_bank_feedback is False
    settings = Settings(data_dir=tmp_path / "data", review_bank_feedback=True)
    store = ReviewStore.from_settings(settings)
    bank = HashBank.open(settings.data_dir)
    bank.upsert([EntryInput("seed-1", "buy cheap pills now", Polarity.BAD, ("spam",))], "test")
    bank.close()
    store.ingest_verdict(cascade_verdict("fb-bad", "you absolute troll"), T0)
    store.ingest_verdict(cascade_verdict("fb-plain", "see you at noon"), T0)
    store.ingest_verdict(cascade_verdict("fb-blocked", "buy cheap pills now!", Decision.BLOCK), T0)
    store.ingest_appeal(Appeal(id="fb-blocked", reason="my pharmacy"))
    decided = {}
    for task in store.queue()[0]:
        store.claim(task.id, "ann")
        decision = Decision.BLOCK if task.item_id == "fb-bad" else Decision.ALLOW
        decided[task.item_id] = store.decide(task.id, "ann", decision, ["harassment"])
    feedback = BankFeedback(store, settings, exemplars=False)
    assert feedback.apply_pending() == 3
    assert feedback.apply_pending() == 0  # each decision feeds the banks once
    bank = HashBank.open(settings.data_dir)
    try:
        bad, good = bank.get(bank_entry_id("fb-bad")), bank.get(bank_entry_id("fb-blocked"))
        assert bad is not None and bad.polarity is Polarity.BAD and bad.categories == ("harassment",)
        assert good is not None and good.polarity is Polarity.GOOD  # overturned block → known-good
        assert bank.get(bank_entry_id("fb-plain")) is None  # an ordinary allow teaches nothing
    finally:
        bank.close()
    audit = sorted((a.item_id, a.reviewer, a.bank, a.decision_id) for a in store.bank_audit())
    assert audit == [
        ("fb-bad", "ann", "hash", decided["fb-bad"].decision_id),
        ("fb-blocked", "ann", "hash", decided["fb-blocked"].decision_id),
    ]
    assert all(a.at is not None and "entry review-" in a.action for a in store.bank_audit())
    store.close()


def test_exemplar_feedback_embeds_the_decided_item_and_is_audited(settings: Settings) -> None:
    settings = settings.model_copy(update={"review_bank_feedback": True})
    store = ReviewStore.from_settings(settings)
    store.ingest_verdict(cascade_verdict("ex-bad", "you are a worthless troll"))
    task_id = store.queue()[0][0].id
    store.claim(task_id, "ann")
    record = store.decide(task_id, "ann", Decision.BLOCK, ["harassment"])
    assert BankFeedback(store, settings).apply_pending() == 1
    index = open_vector_index(settings)
    try:
        assert index.count() == 1 and index.count(where={"flagged": 1}) == 1
    finally:
        index.close()
    audit = sorted((a.bank, a.action, a.decision_id) for a in store.bank_audit())
    assert audit == [
        ("exemplars", "upserted violating exemplar review-ex-bad", record.decision_id),
        ("hash", "added bad entry review-ex-bad", record.decision_id),
    ]
    store.close()


def test_cli_users_export_and_stats(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CASCADE_DATA_DIR", str(tmp_path / "data"))
    runner = CliRunner()
    added = runner.invoke(app, ["review", "user", "add", "ann"], input="a long password\n")
    assert added.exit_code == 0, added.output
    assert "a long password" not in added.output
    assert runner.invoke(app, ["review", "user", "list"]).output.startswith("ann\t")
    short = runner.invoke(app, ["review", "user", "add", "bob"], input="short\n")
    assert short.exit_code == 2 and "at least 8" in short.output
    store = ReviewStore.from_settings(Settings())
    store.ingest_verdict(cascade_verdict("c1", "cli text"))
    task_id = store.queue()[0][0].id
    store.claim(task_id, "ann")
    store.decide(task_id, "ann", Decision.BLOCK, ["toxic"])
    store.close()
    out = tmp_path / "out.jsonl"
    exported = runner.invoke(app, ["review", "export", "-o", str(out)])
    assert exported.exit_code == 0, exported.output
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["c1"]
    bad_since = runner.invoke(app, ["review", "export", "-o", str(out), "--since", "yesterday"])
    assert bad_since.exit_code == 2 and "ISO 8601" in bad_since.output and "Traceback" not in bad_since.output
    missing_dir = runner.invoke(app, ["review", "export", "-o", str(tmp_path / "nope" / "x.jsonl")])
    assert missing_dir.exit_code == 2 and "no directory" in missing_dir.output
    stats = runner.invoke(app, ["review", "stats"])
    assert stats.exit_code == 0 and "queue depth 0" in stats.output and "ann" in stats.output
    imported = runner.invoke(app, ["bank", "import", str(out), "--kind", "hash"])
    assert imported.exit_code == 0, imported.output


def test_a_bad_database_url_is_one_clear_line_without_the_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CASCADE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("CASCADE_REVIEW_DB_URL", "postgresql+psycopg://ann:s3cret-pw@127.0.0.1:1/nowhere")
    result = CliRunner().invoke(app, ["review", "stats"])
    assert result.exit_code == 2
    assert "CASCADE_REVIEW_DB_URL" in result.output and "s3cret-pw" not in result.output
    assert "Traceback" not in result.output


def test_serve_operator_errors_are_one_line_and_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CASCADE_DATA_DIR", str(tmp_path / "data"))
    runner = CliRunner()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        in_use = runner.invoke(app, ["review", "serve", "--port", port, "--broker", "127.0.0.1:1"])
    assert in_use.exit_code == 2 and f"cannot listen on 127.0.0.1:{port}" in in_use.output
    no_broker = runner.invoke(app, ["review", "serve", "--port", "0", "--broker", "127.0.0.1:1"])
    assert no_broker.exit_code == 2 and "cannot use the broker at 127.0.0.1:1" in no_broker.output
    assert "Traceback" not in no_broker.output
    monkeypatch.setenv("CASCADE_REVIEW_AUTH", "kerberos")
    bad_setting = runner.invoke(app, ["review", "stats"])
    assert bad_setting.exit_code == 2 and "CASCADE_REVIEW_AUTH" in bad_setting.output
