"""Kubernetes probes and Prometheus scraping for a stage worker, on one HTTP port.

- `GET /healthz` (liveness): 200 while the worker's event loop answers and no batch has been left
  unacknowledged by an unexpected error (that blocks commits: a restart redelivers the batch).
- `GET /readyz` (readiness): 200 once the worker has joined its consumer group and holds an
  assignment (possibly empty, with more replicas than partitions); 503 while starting,
  rebalancing or stopping.
- `GET /metrics`: Prometheus text format.

It starts before the group join (which takes seconds), so liveness answers during startup.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from aiohttp import web
from mode import Service
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest


class WorkerState:
    """What the probes report; updated by the faust app's rebalance callbacks."""

    def __init__(self, stages: Sequence[str]) -> None:
        self.stages = list(stages)
        self.assigned = False
        self.rebalancing = False
        self.stopping = False
        self.crashed: str | None = None
        self.partitions = 0

    @property
    def ready(self) -> bool:
        return self.assigned and not self.rebalancing and not self.stopping and self.crashed is None

    def describe(self) -> dict[str, Any]:
        return {
            "stages": self.stages,
            "ready": self.ready,
            "assigned": self.assigned,
            "rebalancing": self.rebalancing,
            "stopping": self.stopping,
            "crashed": self.crashed,
            "partitions": self.partitions,
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
        return self._json(self.worker_state.crashed is None)

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
