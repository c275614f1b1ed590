"""Human review end to end over the real broker (tansu), a real `cascade review serve` process and a
real headless Chromium (Debian's `chromium` + `chromium-driver`, driven by selenium; nothing downloaded).
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from review_support import XSS_PAYLOAD, ReviewProcess, cascade_verdict, csrf_of
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from typer.testing import CliRunner

from cascade.cli import app
from cascade.contract import HUMAN, Appeal, AppealRuling, DeadLetter, Decision, ReviewDecision, Verdict
from cascade.review.store import ReviewStore
from cascade.settings import Settings
from cascade.stream.broker import EmbeddedBroker
from cascade.stream.client import produce, read_topics
from cascade.stream.topics import Topics

pytestmark = [pytest.mark.broker, pytest.mark.slow]

PASSWORD = "a long password"


@pytest.fixture(scope="module")
def broker() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker() as running:
        yield running


class Deployment:
    """One review deployment on the shared broker: its own topic prefix, consumer group and data dir."""

    def __init__(self, broker: EmbeddedBroker, tmp_path: Path) -> None:
        self.url = broker.url
        self.tmp_path = tmp_path
        self.data_dir = tmp_path / "data"
        prefix = f"r{uuid.uuid4().hex[:8]}."
        self.topics = Topics(prefix)
        self.env = {
            "CASCADE_TOPIC_PREFIX": prefix,
            "CASCADE_REVIEW_GROUP": f"review-{prefix}",
            "CASCADE_STREAM_PARTITIONS": "2",
            "CASCADE_DATA_DIR": str(self.data_dir),
            # tansu delays a group join by half the session timeout, and a restarted consumer waits
            # for its killed predecessor's session to expire: keep both short in tests.
            "CASCADE_STREAM_SESSION_TIMEOUT_S": "2",
        }
        self.processes: list[ReviewProcess] = []

    def start(self) -> ReviewProcess:
        process = ReviewProcess(self.url, self.data_dir, self.env, self.tmp_path / f"review-{len(self.processes)}.log")
        self.processes.append(process.start())
        process.wait_ready(60)
        return process

    def cli(self, *args: str, stdin: str | None = None) -> str:
        result = CliRunner().invoke(app, list(args), input=stdin, env=self.env)
        assert result.exit_code == 0, result.output
        return result.output

    def publish(self, topic: str, records: list[str]) -> None:
        asyncio.run(produce(self.url, topic, [r.encode() for r in records]))

    def store(self) -> ReviewStore:
        return ReviewStore.from_settings(Settings(data_dir=self.data_dir))

    def wait_for(self, what: str, found: Callable[[], bool], timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while not found():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.1)

    def read(self, topics: list[str], wanted: Callable[[str, bytes], bool], timeout_s: float = 30) -> tuple[str, bytes]:
        async def scan() -> tuple[str, bytes]:
            async for topic, _, value in read_topics(self.url, topics):
                if topic and wanted(topic, value):
                    return topic, value
            raise AssertionError("read_topics never ends")

        return asyncio.run(asyncio.wait_for(scan(), timeout_s))

    def stop(self) -> None:
        for process in self.processes:
            process.stop()


@pytest.fixture
def deployment(broker: EmbeddedBroker, tmp_path: Path) -> Iterator[Deployment]:
    running = Deployment(broker, tmp_path)
    yield running
    running.stop()


@pytest.fixture
def chromium() -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    profile = tempfile.mkdtemp(prefix="cascade-chromium-")
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    os.environ.setdefault("SE_OFFLINE", "true")  # selenium must never try to download a driver
    driver = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
    driver.implicitly_wait(5)
    yield driver
    driver.quit()


def item_id_is(item_id: str) -> Callable[[str, bytes], bool]:
    return lambda topic, value: json.loads(value).get("id") == item_id


def test_browser_sign_in_claim_block_then_decision_on_the_topic_and_in_the_export(
    deployment: Deployment, chromium: webdriver.Chrome
) -> None:
    deployment.cli("review", "user", "add", "ann", stdin=PASSWORD + "\n")
    review = deployment.start()
    verdict = cascade_verdict("xss-1", XSS_PAYLOAD, surface="post", rationale=XSS_PAYLOAD)
    deployment.publish(deployment.topics.verdicts(Decision.REVIEW), [verdict.model_dump_json()])
    store = deployment.store()
    deployment.wait_for("the review task", lambda: store.queue()[1] == 1)

    browser = chromium
    browser.get(review.url + "/")
    assert browser.current_url.endswith("/login")
    browser.find_element(By.ID, "name").send_keys("ann")
    browser.find_element(By.ID, "password").send_keys(PASSWORD)
    browser.find_element(By.ID, "sign-in").click()
    assert browser.find_element(By.ID, "reviewer").text == "ann"
    assert browser.find_element(By.ID, "waiting").text == "1"
    browser.find_element(By.CLASS_NAME, "task-link").click()

    # The <script> and the onerror handler in the content stay text: nothing ran.
    assert browser.find_element(By.ID, "content").text == XSS_PAYLOAD
    assert browser.find_element(By.ID, "rationale").text == XSS_PAYLOAD
    assert browser.title != "pwned"
    assert browser.execute_script("return document.querySelectorAll('img[src=x]').length") == 0
    assert browser.execute_script("return document.querySelectorAll('#content script').length") == 0

    browser.find_element(By.TAG_NAME, "body").send_keys("c")  # keyboard shortcut: claim
    checkbox = browser.find_element(By.ID, "category-toxic")
    assert store.task(store.queue()[0][0].id).claimed_by == "ann"
    checkbox.click()
    browser.find_element(By.ID, "block").click()
    assert browser.find_element(By.ID, "waiting").text == "0"
    assert browser.title != "pwned"

    _, value = deployment.read([deployment.topics.decisions], item_id_is("xss-1"))
    decision = ReviewDecision.model_validate_json(value)
    assert (decision.decision, decision.categories, decision.reviewer) == ("block", ["toxic"], "ann")
    assert decision.settles == verdict and decision.policy_version == verdict.policy_version
    _, value = deployment.read([deployment.topics.verdicts(Decision.BLOCK)], item_id_is("xss-1"))
    final = Verdict.model_validate_json(value)
    assert (final.decided_by, final.flagged_categories) == (HUMAN, ["toxic"])

    exported = deployment.tmp_path / "review.jsonl"
    deployment.cli("review", "export", "-o", str(exported))
    rows = [json.loads(line) for line in exported.read_text().splitlines()]
    assert rows == [{"id": "xss-1", "text": XSS_PAYLOAD, "flagged": 1, "labels": {"toxic": 1}, "source": "review"}]
    store.close()


def test_appeal_round_trip_overturned_published_as_allow_and_counted(deployment: Deployment) -> None:
    deployment.cli("review", "user", "add", "bob", stdin=PASSWORD + "\n")
    review = deployment.start()
    blocked = cascade_verdict("ap-1", "you people are the worst", Decision.BLOCK)
    deployment.publish(deployment.topics.verdicts(Decision.BLOCK), [blocked.model_dump_json()])
    store = deployment.store()
    deployment.wait_for("the block verdict", lambda: store.queue()[1] == 0 and _blocked(store, "ap-1"))
    appeals = [
        Appeal(id="ap-1", reason="I was quoting someone", author="user-9").model_dump_json(),
        Appeal(id="never-blocked", reason="?").model_dump_json(),
        "not an appeal",
    ]
    deployment.publish(deployment.topics.appeals, appeals)
    deployment.wait_for("the appeal task", lambda: store.queue()[1] == 1)
    task = store.queue()[0][0]
    assert (task.kind, task.verdict, task.appeal_reason) == ("appeal", blocked, "I was quoting someone")

    with httpx.Client(base_url=review.url, timeout=10) as client:
        signed = client.post(
            "/login", data={"name": "bob", "password": PASSWORD, "csrf_token": csrf_of(client.get("/login").text)}
        )
        assert signed.status_code == 303
        page = client.get(f"/tasks/{task.id}").text
        assert "Appeal" in page and "Original verdict: <b>block</b> by llm" in page
        token = csrf_of(page)  # signing in starts a new session with a new token
        assert client.post(f"/tasks/{task.id}/claim", data={"csrf_token": token}).status_code == 303
        decided = client.post(f"/tasks/{task.id}/decide", data={"csrf_token": token, "decision": "allow"})
        assert decided.status_code == 303
        metrics = _wait_metric(client, "cascade_review_appeals_overturned_total 1.0")

    _, value = deployment.read([deployment.topics.verdicts(Decision.ALLOW)], item_id_is("ap-1"))
    final = Verdict.model_validate_json(value)
    assert (final.decision, final.decided_by) == (Decision.ALLOW, HUMAN)
    _, value = deployment.read([deployment.topics.decisions], item_id_is("ap-1"))
    decision = ReviewDecision.model_validate_json(value)
    assert decision.appeal and decision.appeal_outcome is AppealRuling.OVERTURNED and decision.settles == blocked
    assert "cascade_review_overturn_ratio 1.0" in metrics

    # An audit sample (docs/drift.md): an automatic block copied to moderation.audit, judged wrong.
    audited = cascade_verdict("au-1", "an automatic block", Decision.BLOCK)
    deployment.publish(deployment.topics.audit, [audited.model_dump_json()])
    deployment.wait_for("the audit task", lambda: store.queue()[1] == 1)
    audit_task = store.queue()[0][0]
    assert (audit_task.kind, audit_task.verdict) == ("audit", audited)
    with httpx.Client(base_url=review.url, timeout=10) as client:
        client.post(
            "/login", data={"name": "bob", "password": PASSWORD, "csrf_token": csrf_of(client.get("/login").text)}
        )
        page = client.get(f"/tasks/{audit_task.id}").text
        assert "Audit sample of an automatic verdict" in page
        token = csrf_of(page)
        client.post(f"/tasks/{audit_task.id}/claim", data={"csrf_token": token})
        client.post(f"/tasks/{audit_task.id}/decide", data={"csrf_token": token, "decision": "allow"})
        metrics = _wait_metric(client, 'cascade_audit_block_precision{bound="estimate"} 0.0')
    assert "cascade_audit_blocks 1.0" in metrics
    _, value = deployment.read([deployment.topics.decisions], item_id_is("au-1"))
    assert ReviewDecision.model_validate_json(value).audit
    stats = deployment.cli("review", "stats")
    assert "appeals decided 1, overturned 1 (100.0 %)" in stats
    # The two appeals that cannot become tasks each got one dead letter, with the reason.
    letters = []
    for reason in ("no block verdict", "not an appeal"):
        _, value = deployment.read(
            [deployment.topics.deadletter],
            lambda _t, v, reason=reason: reason in DeadLetter.model_validate_json(v).message,
        )
        letters.append(DeadLetter.model_validate_json(value))
    assert [letter.id for letter in letters] == ["never-blocked", None]
    store.close()


def _blocked(store: ReviewStore, item_id: str) -> bool:
    from cascade.review.models import BlockedVerdict

    with store.engine.connect() as conn:
        return (
            conn.execute(BlockedVerdict.__table__.select().where(BlockedVerdict.item_id == item_id)).first() is not None
        )


def _wait_metric(client: httpx.Client, line: str, timeout_s: float = 15) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        metrics = client.get("/metrics").text
        if line in metrics or time.monotonic() > deadline:
            assert line in metrics
            return metrics
        time.sleep(0.2)


def test_no_review_task_is_lost_when_the_app_is_killed_and_restarted_mid_stream(deployment: Deployment) -> None:
    count = 200
    records = [cascade_verdict(f"k-{n}", f"text {n}").model_dump_json().encode() for n in range(count)]
    topic = deployment.topics.verdicts(Decision.REVIEW)
    review = deployment.start()
    store = deployment.store()

    # A live stream: 50 records/s for 4 s, killed with SIGKILL as soon as the first task is stored.
    async def live_stream() -> None:
        for start in range(0, count, 10):
            await produce(deployment.url, topic, records[start : start + 10])
            await asyncio.sleep(0.2)

    stream = threading.Thread(target=lambda: asyncio.run(live_stream()))
    stream.start()
    deployment.wait_for("the first stored task", lambda: store.queue()[1] > 0, timeout_s=30)
    review.kill()  # no shutdown, no commit of the batch in hand
    assert stream.is_alive(), "the stream should still be flowing when the app dies"
    stream.join()
    deployment.publish(topic, [r.decode() for r in records[:10]])  # and redeliveries
    deployment.start()
    deployment.wait_for("every task", lambda: store.queue(limit=1)[1] >= count, timeout_s=60)
    time.sleep(0.5)  # let any redelivered batch land: it must not add tasks
    tasks, total = store.queue(limit=1000)
    assert total == count
    assert sorted(t.item_id for t in tasks) == sorted(f"k-{n}" for n in range(count))
    store.close()


def test_cascade_run_leaves_its_review_items_in_the_store_and_says_how_to_open_them(tmp_path: Path) -> None:
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps({"id": f"run-{n}", "text": f"some words {n}"}) + "\n" for n in range(5)))
    env = {
        "CASCADE_DATA_DIR": str(tmp_path / "data"),
        "CASCADE_STREAM_PARTITIONS": "1",
        "CASCADE_STREAM_SESSION_TIMEOUT_S": "2",
    }
    # Only the hash stage, with empty banks: it settles nothing, so every item ends in review.
    result = CliRunner().invoke(
        app, ["run", "--stages", "hash", "--publish", str(items), "--until-drained", "--timeout", "120"], env=env
    )
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "human review: 5 new tasks, 5 waiting" in said
    assert "make review" in said and "cascade review user add NAME" in said
    store = ReviewStore.from_settings(Settings(data_dir=tmp_path / "data"))
    tasks, total = store.queue()
    assert total == 5 and {t.text for t in tasks} == {f"some words {n}" for n in range(5)}
    store.close()
