"""Running stage workers as child processes: `cascade run`, the broker tests and the benchmark.

Each worker is `python -m cascade.stream ...` (= `cascade worker`), exactly what a Kubernetes
pod runs; readiness is read from its `/readyz` like a probe would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

from cascade.stream.broker import free_port
from cascade.stream.client import Outcomes, Published, read_topics
from cascade.stream.security import PLAINTEXT, KafkaSecurity
from cascade.stream.topics import Topics


class WorkerError(RuntimeError):
    """A worker process exited or did not become ready."""


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
                raise WorkerError(f"worker exited with code {self.returncode}{self._log_hint()}")
            if self.probe():
                return time.monotonic() - started
            time.sleep(0.2)
        raise WorkerError(f"worker not ready after {timeout_s:.0f} s{self._log_hint()}")

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


async def collect(
    url: str,
    topics: Topics,
    published: Sequence[Published] | Callable[[], Sequence[Published]],
    timeout_s: float | None = None,
    on_update: Callable[[Outcomes], None] | None = None,
    alive: Callable[[], bool] = lambda: True,
    until_drained: bool = True,
    security: KafkaSecurity = PLAINTEXT,
) -> Outcomes:
    """Read verdicts and dead letters until every published record has one (or forever).

    `published` may be a callable when publishing is still under way. Raises TimeoutError after
    `timeout_s`, WorkerError when `alive()` turns false.
    """
    outcomes = Outcomes(topics)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    last_update = 0.0
    async for topic, value in read_topics(url, [*topics.all_verdicts, topics.deadletter], security=security):
        if topic:
            outcomes.add(topic, value)
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
