"""Kubernetes probes and Prometheus scraping for a stage worker, on one HTTP port.

- `GET /healthz` (liveness): 200 while the worker's event loop answers, no batch has been left
  unacknowledged by an unexpected error, and no batch has been in flight longer than
  `CASCADE_STREAM_BATCH_DEADLINE_S` (either blocks its partitions: a restart redelivers the batch).
- `GET /readyz` (readiness): 200 once the worker has joined its consumer group and holds an
  assignment (possibly empty, with more replicas than partitions); 503 while starting,
  rebalancing or stopping.
- `GET /metrics`: Prometheus text format.

It starts before the group join (which takes seconds), so liveness answers during startup.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from typing import Any

from aiohttp import web
from mode import Service
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

log = logging.getLogger(__name__)


class WorkerState:
    """What the probes report, and the batches in flight; updated by the agents and rebalance callbacks."""

    def __init__(self, stages: Sequence[str], batch_deadline_s: float = float("inf")) -> None:
        self.stages = list(stages)
        self.batch_deadline_s = batch_deadline_s
        self.assigned = False
        self.rebalancing = False
        self.stopping = False
        self.crashed: str | None = None
        self.partitions = 0
        self._batches: dict[asyncio.Task[None], float] = {}  # batch task → when it started (monotonic)

    def track(self, task: asyncio.Task[None]) -> None:
        """Register a batch in flight until it finishes."""
        self._batches[task] = time.monotonic()
        task.add_done_callback(self._batches.pop)

    @property
    def oldest_batch_s(self) -> float:
        return time.monotonic() - min(self._batches.values()) if self._batches else 0.0

    @property
    def live(self) -> bool:
        return self.crashed is None and self.oldest_batch_s <= self.batch_deadline_s

    @property
    def ready(self) -> bool:
        return self.assigned and not self.rebalancing and not self.stopping and self.live

    async def drain(self, grace_s: float) -> int:
        """Let the batches in flight finish for up to `grace_s`, then cancel the rest; returns how many were cancelled.

        A cancelled batch was never acknowledged, so its offsets are not committed and the next
        owner of its partitions processes it again.
        """
        batches = list(self._batches)
        if not batches:
            return 0
        _, late = await asyncio.wait(batches, timeout=grace_s)
        for task in late:
            task.cancel()
        if late:
            log.warning("%d batch(es) still in flight after %.0f s: cancelled, left uncommitted", len(late), grace_s)
            await asyncio.wait(late)
        return len(late)

    def describe(self) -> dict[str, Any]:
        return {
            "stages": self.stages,
            "live": self.live,
            "ready": self.ready,
            "assigned": self.assigned,
            "rebalancing": self.rebalancing,
            "stopping": self.stopping,
            "crashed": self.crashed,
            "partitions": self.partitions,
            "batches_in_flight": len(self._batches),
            "oldest_batch_s": round(self.oldest_batch_s, 1),
        }


class HealthServer(Service):
    """An aiohttp server run as a mode service next to the faust app, in the worker's loop."""

    def __init__(self, state: WorkerState, port: int, host: str = "0.0.0.0", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.worker_state = state
        self.port = port
        self.host = host
        self._runner: web.AppRunner | None = None

    def _json(self, ok: bool) -> web.Response:
        return web.Response(
            status=200 if ok else 503, text=json.dumps(self.worker_state.describe()), content_type="application/json"
        )

    async def _healthz(self, request: web.Request) -> web.Response:
        return self._json(self.worker_state.live)

    async def _readyz(self, request: web.Request) -> web.Response:
        return self._json(self.worker_state.ready)

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def on_start(self) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()
        self.log.info("health and metrics on http://%s:%d/", self.host, self.port)

    async def on_stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
