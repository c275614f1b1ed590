"""`cascade review serve|user|export|stats`: a thin adapter over `cascade.review` (docs/review.md)."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from aiokafka.errors import KafkaError
from rich.console import Console
from rich.table import Table
from sqlalchemy.exc import SQLAlchemyError

from cascade.cli.app import app, fail
from cascade.drift import AuditPrecision
from cascade.policy import load_policy
from cascade.review.feedback import labelled_rows
from cascade.review.metrics import audit_precision
from cascade.review.service import port_free, serve
from cascade.review.store import ReviewError, ReviewStore, Stats
from cascade.settings import Settings, SettingsError
from cascade.stream.broker import BrokerError, EmbeddedBroker

review_app = typer.Typer(help="Human review: the queue, the page, decisions, appeals, feedback.", no_args_is_help=True)
user_app = typer.Typer(help="Reviewer accounts (for CASCADE_REVIEW_AUTH=password).", no_args_is_help=True)
app.add_typer(review_app, name="review")
review_app.add_typer(user_app, name="user")


def load_settings() -> Settings:
    try:
        return Settings()
    except SettingsError as exc:  # main() would catch it too; this keeps `app` itself exiting 2
        raise fail(str(exc)) from None


def open_store(settings: Settings) -> ReviewStore:
    try:
        return ReviewStore.from_settings(settings)
    except (SQLAlchemyError, ImportError) as exc:
        # Never the URL itself: it may hold a password.
        raise fail(
            f"cannot open the review store ({type(exc).__name__}); check CASCADE_REVIEW_DB_URL "
            "(e.g. postgresql+psycopg://user:pass@host/db) or unset it for SQLite in CASCADE_DATA_DIR"
        ) from None


@review_app.command("serve")
def serve_command(
    host: Annotated[str | None, typer.Option(help="Listen address (default: CASCADE_REVIEW_HOST, 127.0.0.1).")] = None,
    port: Annotated[
        int | None, typer.Option(min=0, max=65535, help="Port (default: CASCADE_REVIEW_PORT, 8090).")
    ] = None,
    broker: Annotated[
        str | None,
        typer.Option("--broker", help="Kafka bootstrap servers (default: CASCADE_KAFKA_URL, else embedded)."),
    ] = None,
) -> None:
    """Consume review verdicts and appeals into the store, publish decisions, and serve the page."""
    settings = load_settings()
    host = host or settings.review_host
    port = settings.review_port if port is None else port
    if not port_free(host, port):
        raise fail(f"cannot listen on {host}:{port} (in use or not a local address): pass --host/--port")
    store = open_store(settings)
    err = Console(stderr=True)
    embedded: EmbeddedBroker | None = None
    try:
        url = broker or settings.kafka_url
        if not url:
            embedded = EmbeddedBroker(log_path=settings.data_path("review-broker.log")).start()
            url = embedded.url
            err.print(f"embedded broker (tansu, in memory) on {url}")
        waiting = store.stats().queue_depth

        def announce() -> None:
            err.print(f"review page on http://{host}:{port}/ ({waiting} tasks waiting; Ctrl-C stops)", soft_wrap=True)

        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve(store, settings, url, host, port, announce))
    except (KafkaError, OSError, ValueError) as exc:
        raise fail(f"cannot use the broker at {url}: {exc}; pass --broker HOST:PORT or set CASCADE_KAFKA_URL") from None
    except BrokerError as exc:
        raise fail(str(exc)) from None
    finally:
        store.close()
        if embedded is not None:
            embedded.stop()


@user_app.command("add")
def user_add(name: Annotated[str, typer.Argument(help="Account name (the reviewer shown on decisions).")]) -> None:
    """Create an account, or reset its password; the password is read from stdin."""
    password = getpass.getpass("password: ") if sys.stdin.isatty() else sys.stdin.readline().rstrip("\r\n")
    store = open_store(load_settings())
    try:
        created = store.add_account(name, password)
    except ReviewError as exc:
        raise fail(str(exc)) from None
    finally:
        store.close()
    typer.echo(f"{'added' if created else 'password reset for'} {name}")


@user_app.command("list")
def user_list() -> None:
    """List the accounts."""
    store = open_store(load_settings())
    try:
        for name, created_at in store.accounts():
            typer.echo(f"{name}\t{created_at.isoformat(timespec='seconds')}")
    finally:
        store.close()


def _since(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise fail(f"--since {value!r} is not an ISO 8601 time (e.g. 2026-11-30 or 2026-11-30T08:00:00Z)") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@review_app.command("export")
def export(
    out: Annotated[
        Path, typer.Option("-o", "--out", help="Labelled JSONL to write (shared/data format, source review).")
    ],
    since: Annotated[str | None, typer.Option(help="Only decisions at or after this ISO 8601 time.")] = None,
) -> None:
    """Write the decisions as labelled rows, the latest per item (for calibrate, train, bank import)."""
    settings = load_settings()
    after = _since(since)
    if not out.parent.is_dir():
        raise fail(f"no directory {out.parent} for the output file: create it or pass another -o")
    store = open_store(settings)
    try:
        categories = load_policy(settings.policies_dir).names
        count = 0
        with out.open("w", encoding="utf-8") as fh:
            for row in labelled_rows(store, categories, after):
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
                count += 1
    finally:
        store.close()
    Console(stderr=True).print(f"wrote {count} labelled rows to {out}")


@review_app.command("stats")
def stats_command() -> None:
    """Print the queue figures: depth, oldest task, decisions per reviewer, appeals, per-stage agreement."""
    settings = load_settings()
    store = open_store(settings)
    try:
        render_stats(store.stats(), audit_precision(store, settings.audit_window), Console())
    finally:
        store.close()


def render_stats(stats: Stats, audit: AuditPrecision, console: Console) -> None:
    oldest = "none" if stats.oldest_open_age_s is None else f"{stats.oldest_open_age_s:.0f} s"
    console.print(
        f"queue depth {stats.queue_depth} (appeals {stats.open_tasks.get('appeal', 0)}, claimed {stats.claimed}); "
        f"oldest task {oldest}; unpublished decisions {stats.unpublished}"
    )
    rate = "" if stats.overturn_rate is None else f" ({100 * stats.overturn_rate:.1f} %)"
    console.print(f"appeals decided {stats.appeals_decided}, overturned {stats.overturned}{rate}")
    if audit.estimate is not None and audit.interval is not None:
        low, high = audit.interval
        console.print(
            f"audit precision of automatic blocks {100 * audit.estimate:.1f} % [{100 * low:.1f}, {100 * high:.1f}]"
            f" over {audit.audited_blocks} audited blocks"
        )
    reviewers = Table("reviewer", "allow", "block", title="decisions per reviewer")
    for name, counts in sorted(stats.decisions_by_reviewer.items()):
        reviewers.add_row(name, str(counts.get("allow", 0)), str(counts.get("block", 0)))
    console.print(reviewers)
    stages = Table("stage", "decided", "agreement", "precision", title="reviewers against each stage's scores")
    for s in stats.stages:
        stages.add_row(
            s.stage,
            str(s.decided),
            "" if s.agreement is None else f"{100 * s.agreement:.1f} %",
            "" if s.precision is None else f"{100 * s.precision:.1f} % of {s.leaned_violating}",
        )
    console.print(stages)
