"""The review page over real HTTP (uvicorn in a thread, httpx): sign-in, sessions, CSRF, claims, escaping."""

from __future__ import annotations

import html
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from review_support import XSS_PAYLOAD, cascade_verdict, csrf_of

from cascade.contract import Appeal, Decision
from cascade.review.store import ReviewStore
from cascade.review.web import AppState, create_app
from cascade.settings import Settings
from cascade.stream.broker import free_port

PASSWORD = "a long password"


class Page:
    def __init__(self, settings: Settings) -> None:
        self.store = ReviewStore.from_settings(settings)
        self.port = free_port()
        config = uvicorn.Config(create_app(AppState(self.store, settings)), port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Page:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "the page did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.store.close()

    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, follow_redirects=False, timeout=10, **kwargs)  # type: ignore[arg-type]


def sign_in(client: httpx.Client, name: str = "ann", password: str = PASSWORD) -> httpx.Response:
    token = csrf_of(client.get("/login").text)
    return client.post("/login", data={"name": name, "password": password, "csrf_token": token})


@pytest.fixture
def page(tmp_path: Path) -> Iterator[Page]:
    with Page(Settings(data_dir=tmp_path / "data")) as running:
        running.store.add_account("ann", PASSWORD)
        running.store.add_account("bob", PASSWORD)
        yield running


def first_task(store: ReviewStore) -> int:
    return store.queue()[0][0].id


def test_writes_without_a_session_are_refused(page: Page) -> None:
    page.store.ingest_verdict(cascade_verdict("w1", "text"))
    task_id = first_task(page.store)
    with page.client() as anonymous:
        assert anonymous.get("/").status_code == 303  # to the sign-in page
        assert anonymous.get("/").headers["location"] == "/login"
        for action, data in (("claim", {}), ("decide", {"decision": "allow"}), ("skip", {})):
            response = anonymous.post(f"/tasks/{task_id}/{action}", data={**data, "csrf_token": "x"})
            assert response.status_code == 401, action
    task = page.store.task(task_id)
    assert (task.status, task.claimed_by) == ("open", None)
    assert page.store.unpublished() == []


def test_sign_in_needs_the_right_password_and_a_csrf_token(page: Page) -> None:
    with page.client() as client:
        assert sign_in(client, password="wrong password").status_code == 401
        assert client.post("/login", data={"name": "ann", "password": PASSWORD}).status_code == 403
        assert client.get("/").status_code == 303  # still signed out
        signed = sign_in(client)
        assert signed.status_code == 303 and signed.headers["location"] == "/"
        queue = client.get("/")
        assert queue.status_code == 200 and 'id="reviewer">ann<' in queue.text
        assert "cascade_review" in client.cookies
        assert client.post("/logout", data={"csrf_token": csrf_of(queue.text)}).status_code == 303
        assert client.get("/").status_code == 303


def test_forms_are_protected_against_csrf(page: Page) -> None:
    page.store.ingest_verdict(cascade_verdict("c1", "text"))
    task_id = first_task(page.store)
    with page.client() as client:
        sign_in(client)
        assert client.post(f"/tasks/{task_id}/claim").status_code == 403
        assert client.post(f"/tasks/{task_id}/claim", data={"csrf_token": "forged"}).status_code == 403
        assert page.store.task(task_id).claimed_by is None
        token = csrf_of(client.get(f"/tasks/{task_id}").text)
        assert client.post(f"/tasks/{task_id}/claim", data={"csrf_token": token}).status_code == 303
        assert page.store.task(task_id).claimed_by == "ann"


def test_claim_block_and_the_rival_is_refused(page: Page) -> None:
    page.store.ingest_verdict(cascade_verdict("d1", "text", surface="post"))
    task_id = first_task(page.store)
    with page.client() as ann, page.client() as bob:
        sign_in(ann)
        sign_in(bob, "bob")
        ann_token = csrf_of(ann.get(f"/tasks/{task_id}").text)
        bob_token = csrf_of(bob.get(f"/tasks/{task_id}").text)
        assert ann.post(f"/tasks/{task_id}/claim", data={"csrf_token": ann_token}).status_code == 303
        refused = bob.post(f"/tasks/{task_id}/claim", data={"csrf_token": bob_token})
        assert refused.status_code == 409 and "claimed by another reviewer" in refused.text
        assert "claimed by ann" in bob.get(f"/tasks/{task_id}").text
        page_text = ann.get(f"/tasks/{task_id}").text
        assert 'id="block"' in page_text and 'name="category" value="toxic"' in page_text
        decided = ann.post(
            f"/tasks/{task_id}/decide",
            data={"csrf_token": ann_token, "decision": "block", "category": ["toxic", "spam"]},
        )
        assert decided.status_code == 303
    (record,) = page.store.unpublished()
    assert (record.id, record.decision, record.categories, record.reviewer) == ("d1", "block", ["spam", "toxic"], "ann")


def test_hostile_content_is_escaped_everywhere_it_is_shown(page: Page) -> None:
    verdict = cascade_verdict("<i>id</i>", XSS_PAYLOAD, Decision.BLOCK, rationale=XSS_PAYLOAD)
    page.store.ingest_verdict(verdict)
    page.store.ingest_appeal(Appeal(id="<i>id</i>", reason=XSS_PAYLOAD, author="<b>author</b>"))
    page.store.ingest_verdict(cascade_verdict("r2", XSS_PAYLOAD))
    with page.client() as client:
        sign_in(client)
        bodies = [client.get("/").text] + [client.get(f"/tasks/{t.id}").text for t in page.store.queue()[0]]
    for body in bodies:
        assert "<script>document" not in body and "<img src=x" not in body and "<i>id</i>" not in body
        assert "<b>author</b>" not in body
    appeal_page = bodies[1]
    shown = re.search(r'<pre class="content" id="content">(.*?)</pre>', appeal_page, re.S)
    assert shown and html.unescape(shown.group(1)) == XSS_PAYLOAD  # shown, as text
    assert appeal_page.count(shown.group(1)) == 4  # content, appeal reason, trace note, LLM rationale
    assert "&lt;b&gt;bold?&lt;/b&gt;" in bodies[2]  # a neighbour's text


def test_pages_send_a_strict_content_security_policy(page: Page) -> None:
    with page.client() as client:
        response = client.get("/login")
    policy = response.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'nonce-" in policy
    assert response.headers["x-content-type-options"] == "nosniff"


def test_identity_header_mode(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", review_auth="header", review_identity_header="X-Auth-User")
    with Page(settings) as page:
        page.store.ingest_verdict(cascade_verdict("h1", "text"))
        task_id = first_task(page.store)
        with page.client() as client:
            assert client.get("/").status_code == 401  # no header, no reviewer
            headers = {"X-Auth-User": "<b>carol</b>"}
            queue = client.get("/", headers=headers)
            assert queue.status_code == 200 and "&lt;b&gt;carol&lt;/b&gt;" in queue.text
            token = csrf_of(queue.text)
            assert client.post(f"/tasks/{task_id}/claim", data={"csrf_token": token}).status_code == 401
            assert (
                client.post(f"/tasks/{task_id}/claim", headers=headers, data={"csrf_token": token}).status_code == 303
            )
        assert page.store.task(task_id).claimed_by == "<b>carol</b>"


def test_stats_page_and_metrics(page: Page) -> None:
    page.store.ingest_verdict(cascade_verdict("m1", "a", scores={"toxic": 0.9}))
    page.store.ingest_verdict(cascade_verdict("m2", "b"))
    task_id = first_task(page.store)
    page.store.claim(task_id, "ann")
    page.store.decide(task_id, "ann", Decision.BLOCK, ["toxic"])
    with page.client() as client:
        sign_in(client)
        stats = client.get("/stats").text
        metrics = client.get("/metrics").text
    assert 'id="queue-depth">1<' in stats and "<td>ann</td><td>0</td><td>1</td>" in stats
    assert "bank feedback is off" in stats
    assert 'cascade_review_open_tasks{kind="review"} 1.0' in metrics
    assert "cascade_review_pending_items 1.0" in metrics
    assert 'cascade_review_decisions_total{decision="block",reviewer="ann"} 1.0' in metrics
    assert 'cascade_review_stage_precision{stage="llm"} 1.0' in metrics
    assert "cascade_review_oldest_pending_seconds" in metrics
