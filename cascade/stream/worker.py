"""A stage worker process: the faust app for some stages, plus the health/metrics server."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, NoReturn

import faust
import typer
from aiokafka.errors import KafkaError

from cascade.assembly import STAGE_ORDER, build_runner, freeze_loaded_heap
from cascade.banktopic import BankTopic, EntryState
from cascade.drift import Reference
from cascade.hashbank import BankEntry
from cascade.pipeline import CascadeRunner
from cascade.repeats import RepeatingRunner
from cascade.settings import Settings, SettingsError
from cascade.stages.hash import HashStage
from cascade.stream import metrics
from cascade.stream.app import create_app
from cascade.stream.health import HealthServer, WorkerState
from cascade.stream.kafka import bootstrap_servers, client_logs_quiet, ensure_topics, unreachable_message
from cascade.stream.security import KafkaSecurity, KafkaSecurityError
from cascade.stream.topics import Topics

log = logging.getLogger(__name__)
EXIT_SHUTDOWN_HUNG = 3


# Past the grace period, what else may still hang at shutdown (closing clients) gets this long.
SHUTDOWN_MARGIN_S = 5.0


class StageWorker(faust.Worker):
    """faust's worker with a bounded shutdown.

    On SIGTERM it reports "stopping" to the readiness probe, stops taking batches, lets those in
    flight finish within the grace period and cancels the rest (unacknowledged, so uncommitted),
    before faust stops the app and commits. A watchdog ends the process if anything still hangs.
    """

    def __init__(self, app: faust.App, *services: Any, state: WorkerState, grace_s: float, **kwargs: Any) -> None:
        super().__init__(app, *services, **kwargs)
        # faust's terminal spinner lowers the root logger to DEBUG so that every message spins it:
        # in a worker that builds a record for each of the Kafka clients' debug calls (~3 % of its CPU).
        self.spinner = None
        self.worker_state = state
        self.grace_s = grace_s

    async def on_stop(self) -> None:
        self.worker_state.stopping = True
        watchdog = threading.Timer(self.grace_s + SHUTDOWN_MARGIN_S, _exit_now, args=(self.grace_s,))
        watchdog.daemon = True
        watchdog.start()
        await self.worker_state.drain(self.grace_s)
        await super().on_stop()


def _exit_now(grace_s: float) -> None:
    log.error("shutdown still not done %.0f s after the grace period of %.0f s: exiting", SHUTDOWN_MARGIN_S, grace_s)
    logging.shutdown()
    os._exit(EXIT_SHUTDOWN_HUNG)


def run_worker(
    settings: Settings,
    broker_url: str,
    runner: CascadeRunner,
    stages: Sequence[str] | None = None,
    health_port: int | None = None,
    loglevel: str = "warning",
) -> None:
    """Run the agents of `stages` (default: every stage of the runner's cascade) until SIGTERM/SIGINT.

    Every worker of a deployment must build the same cascade (stage list and thresholds): a
    stage's position in it decides where its undecided items go next.
    """
    selected = list(stages) if stages else runner.stage_names
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    if settings.stream_create_topics:
        with client_logs_quiet():
            loop.run_until_complete(
                ensure_topics(
                    broker_url,
                    Topics(settings.topic_prefix).all_topics(runner.stage_names),
                    settings.stream_partitions,
                    settings.stream_replication_factor,
                    settings.stream_max_message_bytes,
                    security=KafkaSecurity.from_settings(settings),
                )
            )
    state = WorkerState(selected, settings.stream_batch_deadline_s)
    metrics.watch_guards([stage for stage in runner.stages if stage.name in selected])
    metrics.start_drift(runner.thresholds, settings.drift_window, settings.drift_min_items, settings.drift_max_surfaces)
    if isinstance(runner, RepeatingRunner):
        metrics.watch_repeats(runner.cache)
    app = create_app(settings, runner, selected, state, broker_url)
    _follow_banks(app, settings, broker_url, runner, selected)
    freeze_loaded_heap()

    @app.on_before_shutdown.connect
    async def _release_stages(sender: faust.App, **kwargs: Any) -> None:
        await runner.aclose()

    port = settings.health_port if health_port is None else health_port
    services = [HealthServer(state, port, loop=loop)] if port else []
    log.info("worker for stages %s of cascade %s", ",".join(selected), ",".join(runner.stage_names))
    worker = StageWorker(
        app,
        *services,
        state=state,
        grace_s=settings.stream_shutdown_grace_s,
        loop=loop,
        loglevel=loglevel,
        redirect_stdouts=False,
        quiet=True,
    )
    worker.execute_from_commandline()


def _follow_banks(
    app: faust.App, settings: Settings, broker_url: str, runner: CascadeRunner, selected: Sequence[str]
) -> None:
    """A worker that runs the hash stage replays the shared banks topic into its store, then follows it."""
    hash_stage = next((s for s in runner.stages if isinstance(s, HashStage) and s.name in selected), None)
    if hash_stage is None:
        return
    bank = hash_stage.bank
    topic = BankTopic.on(broker_url, settings)

    async def share_quarantines(entries: list[BankEntry]) -> None:
        await topic.publish([EntryState.of(entry) for entry in entries])

    hash_stage.on_quarantine = share_quarantines

    @app.task
    async def follow_banks() -> None:
        if settings.stream_create_topics:
            await topic.ensure()
        try:
            await topic.follow(bank)
        except RuntimeError as exc:  # no banks topic: this replica keeps serving its local banks
            log.error("banks: %s; bank changes made elsewhere will not reach this worker", exc)


def worker_command(
    broker: Annotated[str | None, typer.Option(help="Kafka bootstrap servers (default: CASCADE_KAFKA_URL).")] = None,
    stages: Annotated[
        str | None, typer.Option(help="Comma-separated stages whose agents this worker runs (default: all).")
    ] = None,
    cascade: Annotated[
        str, typer.Option(help="The whole cascade, in order; the same for every worker of a deployment.")
    ] = ",".join(STAGE_ORDER),
    thresholds: Annotated[Path | None, typer.Option(help="Threshold set (default: the packaged default set).")] = None,
    shadow_thresholds: Annotated[Path | None, typer.Option(help="Shadow threshold set, never acted on.")] = None,
    health_port: Annotated[
        int | None, typer.Option(help="Port of /healthz, /readyz, /metrics (default CASCADE_HEALTH_PORT; 0: off).")
    ] = None,
    loglevel: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "warning",
) -> None:
    """Run stage agents against a Kafka cluster until SIGTERM (graceful: finishes in-flight batches, commits)."""
    # Defined here rather than in cascade.cli so that `python -m cascade.stream` starts without
    # importing every other command (seconds of start-up per worker).
    try:
        settings = Settings()
    except SettingsError as exc:
        _fail(str(exc))
    url = broker or settings.kafka_url
    if not url:
        _fail("no broker: pass --broker HOST:PORT or set CASCADE_KAFKA_URL")
    try:
        bootstrap_servers(url)
    except ValueError as exc:
        _fail(f"{exc}: fix --broker or CASCADE_KAFKA_URL")
    try:
        KafkaSecurity.from_settings(settings)
    except KafkaSecurityError as exc:
        _fail(str(exc))
    names = [s.strip() for s in (stages or "").split(",") if s.strip()]
    order = [s.strip() for s in cascade.split(",") if s.strip()]
    try:
        runner = build_runner(settings, thresholds, shadow_thresholds, order, load=names or None)
        unknown = [name for name in names if name not in runner.stage_names]
        if unknown:
            raise ValueError(f"--stages {','.join(unknown)} are not in the cascade {','.join(runner.stage_names)}")
        Reference.from_thresholds(runner.thresholds)  # a malformed drift reference is the operator's to fix
    except Exception as exc:  # any stage that cannot be built (missing model, bad thresholds): say so, exit
        _fail(f"cannot build the cascade: {exc}")
    try:
        run_worker(settings, url, runner, names, health_port, loglevel)
    except (KafkaError, OSError) as exc:  # raised before faust takes over: the broker is not reachable
        _fail(unreachable_message(url, exc))


def _fail(message: str) -> NoReturn:
    typer.secho(f"error: {message}", fg="red", err=True)
    raise typer.Exit(2)
