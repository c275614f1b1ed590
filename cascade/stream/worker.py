"""A stage worker process: the faust app for some stages, plus the health/metrics server."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import faust
import typer

from cascade.assembly import STAGE_ORDER, build_runner
from cascade.pipeline import CascadeRunner
from cascade.repeats import RepeatingRunner
from cascade.settings import Settings
from cascade.stream import metrics
from cascade.stream.app import create_app
from cascade.stream.health import HealthServer, WorkerState
from cascade.stream.kafka import ensure_topics
from cascade.stream.topics import Topics

log = logging.getLogger(__name__)


class StageWorker(faust.Worker):
    """faust's worker, reporting "stopping" to the readiness probe as soon as shutdown begins."""

    def __init__(self, app: faust.App, *services: Any, state: WorkerState, **kwargs: Any) -> None:
        super().__init__(app, *services, **kwargs)
        self.worker_state = state

    async def on_stop(self) -> None:
        self.worker_state.stopping = True
        await super().on_stop()


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
        loop.run_until_complete(
            ensure_topics(
                broker_url,
                Topics(settings.topic_prefix).all_topics(runner.stage_names),
                settings.stream_partitions,
                settings.stream_replication_factor,
            )
        )
    state = WorkerState(selected)
    metrics.watch_guards([stage for stage in runner.stages if stage.name in selected])
    if isinstance(runner, RepeatingRunner):
        metrics.watch_repeats(runner.cache)
    app = create_app(settings, runner, selected, state, broker_url)

    @app.on_before_shutdown.connect
    async def _release_stages(sender: faust.App, **kwargs: Any) -> None:
        await runner.aclose()

    port = settings.health_port if health_port is None else health_port
    services = [HealthServer(state, port, loop=loop)] if port else []
    log.info("worker for stages %s of cascade %s", ",".join(selected), ",".join(runner.stage_names))
    worker = StageWorker(app, *services, state=state, loop=loop, loglevel=loglevel, redirect_stdouts=False, quiet=True)
    worker.execute_from_commandline()


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
    settings = Settings()
    url = broker or settings.kafka_url
    if not url:
        typer.secho("error: no broker: pass --broker HOST:PORT or set CASCADE_KAFKA_URL", fg="red", err=True)
        raise typer.Exit(2)
    names = [s.strip() for s in (stages or "").split(",") if s.strip()]
    order = [s.strip() for s in cascade.split(",") if s.strip()]
    try:
        runner = build_runner(settings, thresholds, shadow_thresholds, order, load=names or None)
        unknown = [name for name in names if name not in runner.stage_names]
        if unknown:
            raise ValueError(f"stages {unknown} are not in the cascade {runner.stage_names}")
        metrics.start_drift(
            runner.thresholds, settings.drift_window, settings.drift_min_items, settings.drift_max_surfaces
        )
    except Exception as exc:  # any stage that cannot be built (missing model, bad thresholds): say so, exit
        typer.secho(f"error: cannot build the cascade: {type(exc).__name__}: {exc}", fg="red", err=True)
        raise typer.Exit(2) from exc
    run_worker(settings, url, runner, names, health_port, loglevel)
