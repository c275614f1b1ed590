"""The reviewers' web page: FastAPI with server-rendered Jinja2 templates, no JavaScript build step.

Security, briefly: nothing is written without a signed-in reviewer (a signed session cookie after
a password sign-in, or an identity header set by a fronting proxy); every form carries a per-session
CSRF token; templates autoescape every field (content is hostile), and a strict
Content-Security-Policy allows only the page's own nonce-tagged inline script.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Form, Request, Response
from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse
from fastapi.templating import Jinja2Templates
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.middleware.sessions import SessionMiddleware

from cascade.contract import Decision
from cascade.policy import load_policy
from cascade.review.metrics import audit_precision, exposition
from cascade.review.store import Filters, ReviewError, ReviewStore, TaskView, utc_now
from cascade.settings import Settings
from cascade.thresholds import ThresholdError, ThresholdSet

TEMPLATES = Path(__file__).parent / "templates"
CSRF_FIELD = "csrf_token"


class NotSignedIn(Exception):
    pass


class BadCsrf(Exception):
    pass


@dataclass
class AppState:
    """What the running service shares with the page."""

    store: ReviewStore
    settings: Settings
    ready: asyncio.Event | None = None  # set once the consumer holds its assignment


def session_secret(settings: Settings) -> str:
    """The cookie-signing key: configured, or random and kept in the data dir so sessions survive restarts."""
    if settings.review_secret_key is not None:
        return settings.review_secret_key.get_secret_value()
    path = settings.data_path("review", "session.key")
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(secrets.token_urlsafe(48), encoding="utf-8")
    return path.read_text(encoding="utf-8").strip()


def create_app(state: AppState) -> FastAPI:
    settings, store = state.settings, state.store
    policy = load_policy(settings.policies_dir)
    categories = sorted(c for c in policy.categories if c != "flagged")
    try:
        thresholds: ThresholdSet | None = ThresholdSet.load(settings.thresholds)
    except (ThresholdError, OSError):
        thresholds = None  # bands are then shown as outcomes only
    templates = Jinja2Templates(directory=str(TEMPLATES))  # autoescape is on for .html
    templates.env.globals["age"] = age

    app = FastAPI(title="cascade review", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(
        SessionMiddleware,
        secret_key=session_secret(settings),
        session_cookie="cascade_review",
        max_age=int(settings.review_session_hours * 3600),
        same_site="strict",
        https_only=settings.review_cookie_secure,
    )

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        request.state.nonce = secrets.token_urlsafe(16)
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = (
            f"default-src 'none'; script-src 'nonce-{request.state.nonce}'; style-src 'unsafe-inline'; "
            "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
        )
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        return response

    @app.exception_handler(NotSignedIn)
    async def not_signed_in(request: Request, exc: NotSignedIn) -> Response:
        if request.method == "GET" and settings.review_auth == "password":
            return RedirectResponse("/login", status_code=303)
        return PlainTextResponse("sign in first", status_code=401)

    @app.exception_handler(BadCsrf)
    async def bad_csrf(request: Request, exc: BadCsrf) -> Response:
        return PlainTextResponse("missing or wrong CSRF token: reload the page and try again", status_code=403)

    def reviewer_of(request: Request) -> str:
        if settings.review_auth == "header":
            name = request.headers.get(settings.review_identity_header, "").strip()
        else:
            name = str(request.session.get("reviewer", ""))
        if not name:
            raise NotSignedIn()
        return name[:128]

    def csrf_token(request: Request) -> str:
        token = request.session.get("csrf")
        if not isinstance(token, str):
            token = secrets.token_urlsafe(32)
            request.session["csrf"] = token
        return token

    def check_csrf(request: Request, submitted: str) -> None:
        expected = request.session.get("csrf")
        if not isinstance(expected, str) or not secrets.compare_digest(expected, submitted):
            raise BadCsrf()

    def render(request: Request, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
        context.setdefault("reviewer", None)
        return templates.TemplateResponse(
            request,
            name,
            {"csrf": csrf_token(request), "nonce": request.state.nonce, "auth": settings.review_auth, **context},
            status_code=status_code,
        )

    @app.get("/healthz")
    def healthz() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/readyz")
    def readyz() -> Response:
        ready = state.ready is None or state.ready.is_set()
        return PlainTextResponse("ready" if ready else "consumer not assigned yet", status_code=200 if ready else 503)

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(exposition(store, settings.audit_window), media_type=CONTENT_TYPE_LATEST)

    @app.get("/login", response_class=HTMLResponse)
    def login_page(request: Request) -> Response:
        if settings.review_auth == "header":
            return RedirectResponse("/", status_code=303)
        return render(request, "login.html")

    @app.post("/login")
    def login(
        request: Request, name: str = Form(""), password: str = Form(""), csrf_token_: str = Form("", alias=CSRF_FIELD)
    ) -> Response:
        check_csrf(request, csrf_token_)
        if settings.review_auth != "password" or not store.authenticate(name, password):
            return render(request, "login.html", status_code=401, error="wrong name or password")
        request.session.clear()  # a fresh session (and CSRF token) on sign-in
        request.session["reviewer"] = name
        return RedirectResponse("/", status_code=303)

    @app.post("/logout")
    def logout(request: Request, csrf_token_: str = Form("", alias=CSRF_FIELD)) -> Response:
        check_csrf(request, csrf_token_)
        request.session.clear()
        return RedirectResponse("/login" if settings.review_auth == "password" else "/", status_code=303)

    @app.get("/", response_class=HTMLResponse)
    def queue(request: Request, category: str = "", surface: str = "", stage: str = "") -> Response:
        reviewer = reviewer_of(request)
        filters = Filters(category or None, surface or None, stage or None)
        tasks, total = store.queue(filters)
        return render(
            request,
            "queue.html",
            reviewer=reviewer,
            tasks=tasks,
            total=total,
            filters=filters,
            facets=store.facets(),
            now=utc_now(),
        )

    @app.get("/tasks/{task_id}", response_class=HTMLResponse)
    def task_page(request: Request, task_id: int) -> Response:
        reviewer = reviewer_of(request)
        try:
            task = store.task(task_id)
        except ReviewError as exc:
            return render(request, "message.html", status_code=404, reviewer=reviewer, message=str(exc))
        return render(
            request,
            "task.html",
            reviewer=reviewer,
            task=task,
            rows=trace_rows(task, thresholds),
            categories=categories,
            mine=task.claimed_by == reviewer
            and task.claim_expires_at is not None
            and task.claim_expires_at > utc_now(),
            taken=task.claimed_by_other(reviewer, utc_now()),
        )

    @app.post("/tasks/{task_id}/claim")
    def claim(request: Request, task_id: int, csrf_token_: str = Form("", alias=CSRF_FIELD)) -> Response:
        reviewer = reviewer_of(request)
        check_csrf(request, csrf_token_)
        if not store.claim(task_id, reviewer):
            return render(
                request,
                "message.html",
                status_code=409,
                reviewer=reviewer,
                message=f"task {task_id} is claimed by another reviewer or already decided",
            )
        return RedirectResponse(f"/tasks/{task_id}", status_code=303)

    @app.post("/tasks/{task_id}/decide")
    async def decide(request: Request, task_id: int) -> Response:
        reviewer = reviewer_of(request)
        form = await request.form()
        check_csrf(request, str(form.get(CSRF_FIELD, "")))
        chosen = [str(c) for c in form.getlist("category") if str(c) in categories]
        try:
            decision = Decision(str(form.get("decision", "")))
            record = await asyncio.to_thread(store.decide, task_id, reviewer, decision, chosen)
        except (ValueError, ReviewError) as exc:
            return render(request, "message.html", status_code=409, reviewer=reviewer, message=str(exc))
        return RedirectResponse(f"/?decided={record.id}", status_code=303)

    @app.post("/tasks/{task_id}/skip")
    def skip(request: Request, task_id: int, csrf_token_: str = Form("", alias=CSRF_FIELD)) -> Response:
        reviewer = reviewer_of(request)
        check_csrf(request, csrf_token_)
        store.release(task_id, reviewer)
        return RedirectResponse("/", status_code=303)

    @app.get("/stats", response_class=HTMLResponse)
    def stats_page(request: Request) -> Response:
        reviewer = reviewer_of(request)
        audit = audit_precision(store, settings.audit_window)
        return render(
            request,
            "stats.html",
            reviewer=reviewer,
            stats=store.stats(),
            audit=audit,
            bank_changes=store.bank_audit(20),
            feedback=settings.review_bank_feedback,
        )

    return app


@dataclass(frozen=True)
class TraceRow:
    stage: str
    version: str
    result: str
    scores: list[tuple[str, float, str, str]]  # category, score, band outcome, band text
    note: str | None
    error: str | None
    latency_ms: float


def trace_rows(task: TaskView, thresholds: ThresholdSet | None) -> list[TraceRow]:
    """The trace as the task page's table: each score beside its band (when the verdict's bands are loaded)."""
    same_bands = thresholds is not None and thresholds.version == task.verdict.thresholds_version
    rows = []
    for entry in task.verdict.trace:
        bands = thresholds.bands(entry.stage) if same_bands and thresholds is not None else {}
        scores = []
        for category, score in sorted(entry.scores.items(), key=lambda kv: -kv[1]):
            band = bands.get(category)
            text = ""
            if band is not None:
                text = f"allow < {_fmt(band.allow_below)}, block ≥ {_fmt(band.block_at)}"
            outcome = entry.outcomes.get(category)
            scores.append((category, score, outcome.value if outcome else "", text))
        rows.append(
            TraceRow(
                entry.stage, entry.stage_version, entry.result.value, scores, entry.note, entry.error, entry.latency_ms
            )
        )
    return rows


def _fmt(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f}"


def age(now: datetime, then: datetime) -> str:
    seconds = max(0, int((now - then).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
