"""A local deployment: a broker plus stage workers as child processes, for `cascade run`, the
benchmarks and the broker tests (`LocalDeployment`).

Each worker is `python -m cascade.stream ...` (= `cascade worker`), exactly what a Kubernetes
pod runs; readiness is read from its `/readyz` like a probe would.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Collection, Sequence
from pathlib import Path

from cascade.settings import Settings
from cascade.stream.broker import EmbeddedBroker, free_port
from cascade.stream.client import Offsets, Published, StreamOutputs, read_topics
from cascade.stream.kafka import ensure_topics
from cascade.stream.security import PLAINTEXT, KafkaSecurity
from cascade.stream.topics import Topics

LOG_TAIL_LINES = 12


class WorkerError(RuntimeError):
    """A worker process exited or did not become ready; carries the end of its log."""

    def __init__(self, message: str, returncode: int | None = None, log_tail: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.returncode = returncode
        self.log_tail = list(log_tail)


def worker_stages(cascade: Sequence[str], workers: int, single_process: Collection[str]) -> list[list[str]]:
    """The stages each of `workers` processes runs: all of them, except that only the first runs the
    stages whose store one process alone can open (the others hand those items over by Kafka).

    Raises ValueError when the later workers would have nothing to run.
    """
    shared = [name for name in cascade if name not in single_process]
    if workers > 1 and not shared:
        raise ValueError(
            f"--workers {workers}: every stage of {','.join(cascade)} keeps a store only one process can open;"
            " run one worker, or set CASCADE_QDRANT_URL to share the exemplar store through a Qdrant server"
        )
    return [list(cascade)] + [shared] * (workers - 1)


class WorkerProcess:
    def __init__(
        self,
        broker_url: str,
        stages: Sequence[str] | None = None,
        cascade: Sequence[str] | None = None,
        thresholds: Path | None = None,
        log_path: Path | None = None,
        env: dict[str, str] | None = None,
        loglevel: str = "warning",
    ) -> None:
        self.health_port = free_port()
        self.log_path = log_path
        self.env = {**os.environ, **(env or {})}
        self.command = [sys.executable, "-m", "cascade.stream", "--broker", broker_url]
        self.command += ["--health-port", str(self.health_port), "--loglevel", loglevel]
        if stages:
            self.command += ["--stages", ",".join(stages)]
        if cascade:
            self.command += ["--cascade", ",".join(cascade)]
        if thresholds is not None:
            self.command += ["--thresholds", str(thresholds)]
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> WorkerProcess:
        if self.log_path is None:
            output = subprocess.DEVNULL
            self.process = subprocess.Popen(self.command, env=self.env, stdout=output, stderr=output)
        else:
            with self.log_path.open("ab") as log:
                self.process = subprocess.Popen(
                    self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
                )
        return self

    def probe(self, path: str = "/readyz") -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}{path}", timeout=1) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout_s: float = 90.0) -> float:
        """Seconds until `/readyz` said 200; raises if the process exits or the time runs out."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if not self.alive:
                raise self.error(f"worker exited with code {self.returncode}")
            if self.probe():
                return time.monotonic() - started
            time.sleep(0.2)
        raise self.error(f"worker not ready after {timeout_s:.0f} s")

    def error(self, what: str) -> WorkerError:
        """A WorkerError saying `what`, with the last lines of the worker's log."""
        tail: list[str] = []
        if self.log_path is not None and self.log_path.is_file():
            with self.log_path.open("rb") as log:
                log.seek(max(0, log.seek(0, os.SEEK_END) - 64 * 1024))
                lines = log.read().decode("utf-8", "replace").splitlines()
            tail = [line for line in lines if line.strip()][-LOG_TAIL_LINES:]
        hint = f" (log: {self.log_path}; its last lines below)" if tail else self._log_hint()
        return WorkerError(f"{what}{hint}", self.returncode, tail)

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM (graceful: finish in-flight batches, commit), SIGKILL after `timeout_s`."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL: no shutdown at all, as in a node failure."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def _log_hint(self) -> str:
        return f" (log: {self.log_path})" if self.log_path else ""


class LocalDeployment:
    """A broker and the workers of one cascade on this machine; use as a context manager or `start()` / `stop()`.

    The broker is the embedded one (tansu, in memory) unless `broker_url` names a running one.
    `start()` creates every topic of the cascade (partitions, replication and message limit from
    `settings`), so readers may start before the workers; `worker()` adds a worker process.
    Workers read their settings from the environment: this process's, updated with `env`.
    """

    def __init__(
        self,
        settings: Settings,
        cascade: Sequence[str],
        log_dir: Path,
        broker_url: str | None = None,
        topics: Topics | None = None,
        thresholds: Path | None = None,
        env: dict[str, str] | None = None,
        loglevel: str = "warning",
        security: KafkaSecurity = PLAINTEXT,
    ) -> None:
        self.settings = settings
        self.cascade = list(cascade)
        self.log_dir = log_dir
        self.url = broker_url or ""
        self.topics = topics or Topics(settings.topic_prefix)
        self.thresholds = thresholds
        self.env = dict(env or {})
        self.loglevel = loglevel
        self.security = security
        self.workers: list[WorkerProcess] = []
        self.embedded: EmbeddedBroker | None = None

    def start(self) -> LocalDeployment:
        """Start the embedded broker (without a broker URL) and create the topics; raises what the broker raises."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if not self.url:
            self.embedded = EmbeddedBroker(log_path=self.log_dir / "broker.log").start()
            self.url = self.embedded.url
        asyncio.run(
            ensure_topics(
                self.url,
                self.topics.all_topics(self.cascade),
                self.settings.stream_partitions,
                self.settings.stream_replication_factor,
                self.settings.stream_max_message_bytes,
                security=self.security,
            )
        )
        return self

    def worker(self, stages: Sequence[str] | None = None, env: dict[str, str] | None = None) -> WorkerProcess:
        """Start a worker running `stages` (default: all) of the cascade; its log is `log_dir/worker-N.log`.

        `env` adds to the deployment's environment for this worker only (e.g. its own data dir).
        """
        process = WorkerProcess(
            self.url,
            stages,
            self.cascade,
            self.thresholds,
            log_path=self.log_dir / f"worker-{len(self.workers)}.log",
            env={**self.env, **(env or {})},
            loglevel=self.loglevel,
        )
        self.workers.append(process.start())
        return process

    def wait_ready(self, timeout_s: float = 90.0) -> float:
        """Seconds until the slowest worker was ready; raises WorkerError as `WorkerProcess.wait_ready` does."""
        return max((process.wait_ready(timeout_s) for process in self.workers), default=0.0)

    @property
    def alive(self) -> bool:
        return all(process.alive for process in self.workers)

    def stop(self) -> None:
        """SIGTERM every worker (graceful), then stop the embedded broker."""
        for process in self.workers:
            process.stop()
        self._stop_broker()

    def kill(self) -> None:
        """SIGKILL every worker, then stop the embedded broker."""
        for process in self.workers:
            process.kill()
        self._stop_broker()

    def _stop_broker(self) -> None:
        if self.embedded is not None:
            self.embedded.stop()

    def __enter__(self) -> LocalDeployment:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


async def collect(
    url: str,
    topics: Topics,
    published: Sequence[Published] | Callable[[], Sequence[Published]],
    timeout_s: float | None = None,
    on_update: Callable[[StreamOutputs], None] | None = None,
    alive: Callable[[], bool] = lambda: True,
    until_drained: bool = True,
    security: KafkaSecurity = PLAINTEXT,
    start: Offsets | None = None,
) -> StreamOutputs:
    """Read verdicts and dead letters (from the beginning, or from the `start` offsets) until every
    published record has one (or forever).

    `published` may be a callable when publishing is still under way. Raises TimeoutError after
    `timeout_s`, WorkerError when `alive()` turns false.
    """
    outcomes = StreamOutputs(topics)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    last_update = 0.0
    outputs = [*topics.all_verdicts, topics.deadletter]
    async for topic, key, value in read_topics(url, outputs, security=security, start=start):
        if topic:
            outcomes.add(topic, value, key)
        now = time.monotonic()
        if on_update is not None and (not topic or now - last_update > 0.25):
            on_update(outcomes)
            last_update = now
        if topic:
            continue
        # An idle poll: a good moment for the checks that cost a scan.
        records = published() if callable(published) else published
        if until_drained and records and not outcomes.missing(records):
            return outcomes
        if not alive():
            raise WorkerError("a worker exited while items were pending")
        if deadline is not None and now > deadline:
            raise TimeoutError(f"{len(outcomes.missing(records))} of {len(records)} records still have no outcome")
    raise AssertionError("read_topics never ends")
