"""`cascade worker`, `cascade run`, `cascade publish`, `cascade tail`: the Kafka side of the cascade."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from aiokafka.errors import KafkaError
from rich.console import Console
from rich.markup import escape

from cascade.assembly import STAGE_ORDER, build_runner, single_process_stages
from cascade.cli.app import app, fail
from cascade.cli.moderate import ModerationSummary
from cascade.contract import Decision, Verdict
from cascade.jsonl import raw_records
from cascade.settings import Settings
from cascade.stream.broker import BrokerError
from cascade.stream.client import NoTopicsError, Published, StreamOutputs, publish, read_topics
from cascade.stream.kafka import bootstrap_servers, client_logs_quiet, unreachable_message
from cascade.stream.local import LocalDeployment, WorkerError, collect, worker_stages
from cascade.stream.security import KafkaSecurity, KafkaSecurityError
from cascade.stream.topics import Topics
from cascade.stream.worker import worker_command

BrokerOption = Annotated[
    str | None, typer.Option("--broker", help="Kafka bootstrap servers (default: CASCADE_KAFKA_URL).")
]


def _names(csv: str | None) -> list[str]:
    return [s.strip() for s in (csv or "").split(",") if s.strip()]


def _broker(option: str | None, settings: Settings) -> str:
    url = option or settings.kafka_url
    if not url:
        raise fail("no broker: pass --broker HOST:PORT or set CASCADE_KAFKA_URL")
    try:
        bootstrap_servers(url)
    except ValueError as exc:
        raise fail(f"{exc}: fix --broker or CASCADE_KAFKA_URL") from None
    return url


def _unreachable(url: str, exc: BaseException) -> typer.Exit:
    return fail(unreachable_message(url, exc))


def _security(settings: Settings) -> KafkaSecurity:
    try:
        return KafkaSecurity.from_settings(settings)
    except KafkaSecurityError as exc:
        raise fail(str(exc)) from exc


def _lines(path: Path, limit: int | None) -> Iterator[bytes]:
    with path.open("rb") as fh:
        for _, record in itertools.islice(raw_records(fh), limit):
            yield record


app.command("worker")(worker_command)


@app.command("publish")
def publish_command(
    input: Annotated[Path, typer.Argument(help="JSONL of ContentItem records, one message each (key: its id).")],
    broker: BrokerOption = None,
    rate: Annotated[
        float | None, typer.Option(min=0.1, help="Messages per second (default: as fast as possible).")
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Publish only the first N records.")] = None,
) -> None:
    """Publish a JSONL file to the input topic. Lines are sent as they are: bad ones dead-letter downstream."""
    settings = Settings()
    if not input.is_file():
        raise fail(f"input file not found: {input}")
    url = _broker(broker, settings)
    security = _security(settings)
    started = time.perf_counter()
    topics = Topics(settings.topic_prefix)
    try:
        with client_logs_quiet():
            published = asyncio.run(
                publish(
                    url, topics, _lines(input, limit), rate, settings=settings, origin=str(input), security=security
                )
            )
    except (KafkaError, OSError) as exc:
        raise _unreachable(url, exc) from None
    elapsed = time.perf_counter() - started
    _report_published(Console(stderr=True), published, url, elapsed)


def _report_published(err: Console, published: list[Published], url: str, elapsed: float) -> None:
    skipped = [p for p in published if p.skipped]
    for record in skipped:
        err.print(f"[yellow]skipped[/] record {escape(record.source)}: over the message limit, dead-lettered instead")
    err.print(
        f"published {len(published) - len(skipped)} records to {url} in {elapsed:.1f} s;"
        f" {len(skipped)} over the limit (dead-lettered as line_too_large)"
    )


@app.command()
def tail(
    broker: BrokerOption = None,
    decision: Annotated[list[Decision] | None, typer.Option(help="Only these decisions (repeatable).")] = None,
    dead_letters: Annotated[bool, typer.Option("--dead-letters", help="Print dead letters instead.")] = False,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep waiting for new verdicts.")] = False,
    idle: Annotated[float, typer.Option(help="Without --follow: stop after this many seconds without news.")] = 2.0,
    limit: Annotated[int | None, typer.Option(min=1, help="Stop after N records.")] = None,
) -> None:
    """Print verdicts (the Verdict contract, one JSON per line) from the start of the verdict topics."""
    settings = Settings()
    topics = Topics(settings.topic_prefix)
    names = [topics.deadletter] if dead_letters else [topics.verdicts(d) for d in (decision or list(Decision))]
    url = _broker(broker, settings)
    security = _security(settings)

    async def run() -> None:
        printed, quiet_since = 0, time.monotonic()
        async for topic, _, value in read_topics(url, names, security=security):
            if not topic:
                if not follow and time.monotonic() - quiet_since > idle:
                    return
                continue
            quiet_since = time.monotonic()
            sys.stdout.write(value.decode("utf-8", "replace") + "\n")
            sys.stdout.flush()
            printed += 1
            if limit is not None and printed >= limit:
                return

    with contextlib.suppress(KeyboardInterrupt, BrokenPipeError):
        try:
            with client_logs_quiet():
                asyncio.run(run())
        except NoTopicsError as exc:
            raise fail(f"{exc}: start a worker first (it creates them), or check CASCADE_TOPIC_PREFIX") from None
        except (KafkaError, OSError) as exc:
            raise _unreachable(url, exc) from None


@app.command()
def run(
    broker: BrokerOption = None,
    stages: Annotated[str, typer.Option(help="The cascade to run, comma-separated, in order.")] = ",".join(STAGE_ORDER),
    publish_file: Annotated[
        Path | None, typer.Option("--publish", help="JSONL to publish once the workers are ready.")
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Publish only the first N records.")] = None,
    rate: Annotated[float | None, typer.Option(min=0.1, help="Publishing rate, messages per second.")] = None,
    until_drained: Annotated[
        bool, typer.Option("--until-drained", help="Exit once every published record has a verdict or dead letter.")
    ] = False,
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            help="Worker processes. Each runs every stage, except a stage whose store one process only can open"
            " (retrieval's embedded exemplar store): the first worker alone runs it.",
        ),
    ] = 1,
    thresholds: Annotated[Path | None, typer.Option(help="Threshold set (default: the packaged default set).")] = None,
    timeout: Annotated[float, typer.Option(help="With --until-drained: give up after this many seconds.")] = 900.0,
    loglevel: Annotated[str, typer.Option(help="Workers' log level (their logs: DATA_DIR/stream/).")] = "info",
) -> None:
    """Run the streaming cascade: embedded broker (unless one is configured), workers, optional sample stream."""
    settings = Settings()
    if publish_file is not None and not publish_file.is_file():
        raise fail(f"input file not found: {publish_file}")
    if until_drained and publish_file is None:
        raise fail("--until-drained needs --publish FILE")
    cascade = _names(stages)
    try:
        plan = worker_stages(cascade, workers, single_process_stages(settings))
        # What every worker will load, checked once here (the stages themselves are built by the workers).
        build_runner(settings, thresholds, stage_names=cascade, load=())
    except ValueError as exc:  # ThresholdError is one
        raise fail(str(exc)) from None
    url = _broker(broker, settings) if broker is not None or settings.kafka_url else None
    security = _security(settings)
    if not url and security.protocol != "PLAINTEXT":
        raise fail("the embedded broker speaks plaintext only: pass --broker, or unset CASCADE_KAFKA_SECURITY_PROTOCOL")
    err = Console(stderr=True)
    logs = settings.data_path("stream")
    deployment = LocalDeployment(
        settings, cascade, logs, url, thresholds=thresholds, loglevel=loglevel, security=security
    )
    exit_code = 0
    # SIGTERM (e.g. from a supervisor) must still stop the workers and the broker below.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        try:
            with client_logs_quiet():
                deployment.start()
        except (KafkaError, OSError) as exc:
            raise _unreachable(deployment.url, exc) from None
        if deployment.embedded is not None:
            err.print(f"embedded broker (tansu, in memory) on {deployment.url}")
        for worker_stage_names in plan:
            deployment.worker(worker_stage_names)
        with err.status("starting workers (joining the consumer group)"):
            ready_s = deployment.wait_ready()
        err.print(f"{workers} worker(s) ready in {ready_s:.1f} s; logs in {logs}")
        exit_code = asyncio.run(
            _publish_and_watch(err, deployment, publish_file, limit, rate, until_drained, timeout, settings)
        )
    except BrokerError as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}")
        exit_code = 1
    except WorkerError as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}")
        for line in exc.log_tail:
            err.print(f"  {escape(line)}", highlight=False)
        # A worker that refused its configuration (exit 2) is the operator's to fix, like ours.
        exit_code = 2 if exc.returncode == 2 else 1
    except KeyboardInterrupt:
        err.print("interrupted: stopping workers")
    finally:
        deployment.stop()
    raise typer.Exit(exit_code)


async def _publish_and_watch(
    err: Console,
    deployment: LocalDeployment,
    publish_file: Path | None,
    limit: int | None,
    rate: float | None,
    until_drained: bool,
    timeout: float,
    settings: Settings,
) -> int:
    url, topics = deployment.url, deployment.topics
    published: list[Published] = []
    started = time.perf_counter()

    async def produce() -> None:
        if publish_file is not None:
            published.extend(
                await publish(
                    url,
                    topics,
                    _lines(publish_file, limit),
                    rate,
                    settings=settings,
                    origin=str(publish_file),
                    security=deployment.security,
                )
            )
            _report_published(err, published, url, time.perf_counter() - started)

    def progress(outcomes: StreamOutputs) -> None:
        done = outcomes.decided + len(outcomes.dead_letters)
        elapsed = time.perf_counter() - started
        counts = " ".join(f"{d.value} {outcomes.decisions[d]}" for d in Decision)
        line = (
            f"verdicts {outcomes.decided} ({counts}) dead letters {len(outcomes.dead_letters)}"
            f" of {len(published) or '?'} published | {_rate(done / elapsed)} items/s"
        )
        if err.is_terminal:
            err.print(line.ljust(100), end="\r", highlight=False)

    producer = asyncio.create_task(produce())

    def published_so_far() -> list[Published]:
        if not producer.done():
            return []
        producer.result()  # raises if publishing failed
        return published

    try:
        outcomes = await collect(
            url,
            topics,
            published_so_far,
            timeout_s=timeout if until_drained else None,
            on_update=progress,
            alive=lambda: deployment.alive,
            until_drained=until_drained,
            security=deployment.security,
        )
    except TimeoutError as exc:
        err.print(f"\n[red]timed out:[/] {exc}")
        return 1
    except WorkerError:
        dead = next((p for p in deployment.workers if not p.alive), None)
        if dead is None:
            raise
        raise dead.error(f"worker exited with code {dead.returncode} while items were pending") from None
    finally:
        if not producer.done():
            producer.cancel()
    await producer  # surface publishing errors
    elapsed = time.perf_counter() - started
    err.print(" " * 100, end="\r")
    if publish_file is not None:
        outcomes = outcomes.restricted_to(published)
    summary = ModerationSummary("cascade run")
    summary.started = started  # its clock: from the first publish, not from now
    for verdict in outcomes.verdicts.values():
        summary.add_verdict(verdict)
    for letter in outcomes.dead_letters:
        summary.add_dead_letter(letter)
    summary.render(err, deployment.cascade)
    err.print(
        f"{len(published)} published, {len(outcomes.verdicts)} verdicts ({outcomes.duplicates} redelivered duplicates),"
        f" {len(outcomes.dead_letters)} dead letters in {elapsed:.1f} s: {_rate(len(published) / elapsed)} items/s"
    )
    _hand_to_review(err, list(outcomes.verdicts.values()))
    return 0


def _hand_to_review(err: Console, verdicts: list[Verdict]) -> None:
    """Leave the run's review items (and its blocks, for appeals) in the review store, and say how to open it.

    The embedded broker forgets everything when the run ends, so the page (`make review`) reads the store.
    """
    from cascade.review.store import ReviewStore

    settings = Settings()
    if not any(v.decision is Decision.REVIEW for v in verdicts):
        return
    store = ReviewStore.from_settings(settings)
    try:
        before = store.stats().queue_depth
        store.ingest([v for v in verdicts if v.decision is not Decision.ALLOW])  # one transaction
        waiting = store.stats().queue_depth
    finally:
        store.close()
    added = waiting - before
    err.print(
        f"human review: {added} new tasks, {waiting} waiting. Open them with `make review` (or `cascade review serve`)"
        f" at http://{settings.review_host}:{settings.review_port}/ ; add an account first with"
        " `cascade review user add NAME` (password on stdin).",
        soft_wrap=True,  # the URL and the commands stay copyable
    )


def _rate(per_second: float) -> str:
    """Items/s with two significant digits below 10 (a run through a CPU-served LLM makes 0.23)."""
    return f"{per_second:.0f}" if per_second >= 10 else f"{per_second:.2g}"
