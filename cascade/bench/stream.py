"""The cascade through the embedded Kafka-protocol broker (tansu): throughput, latency under load, scale-out.

Uses the stream layer's own pieces (`cascade.stream`): `LocalDeployment` (the embedded broker
and worker processes exactly as `cascade run` starts them: every stage in one worker, the same
stage list and thresholds as the in-process row), the publisher and the verdict reader.

- Throughput (a backlog): the workers are paused (SIGSTOP) while the bench texts are published
  under fresh ids, then resumed to drain them; the rate is items / (last verdict's
  `processed_at` − the resume). The publisher, which in production runs elsewhere, then does
  not take the workers' cores; the verdict reader still shares them, but counts messages by key
  and parses them only once every item has one.
- Live: the same, with the workers running while the texts are published as fast as they go;
  its median is the maximum the latency rows take shares of.
- Latency under load: the same worker, fed at a fixed offered rate (a share of the live
  maximum); per item, `processed_at` of its verdict − the moment its record was sent,
  as percentiles over all items and by deciding stage.
- Scale-out: workers limited to one intra-op thread and pinned to one core each (as a
  Kubernetes CPU limit of 1 confines a replica: unpinned, a "single-thread" worker's event loop
  takes part of the second core, so one worker alone already uses more than its share), one
  alone and then two in one consumer group on the same partitions; the efficiency is
  (two / one) / 2. The broker is not pinned. Both are measured on a backlog, as the throughput is.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cascade.bench.config import BenchConfig
from cascade.bench.measure import Row, cascade_breakdown, measured, not_available
from cascade.contract import ContentItem, Verdict
from cascade.embedding import serves_int8
from cascade.settings import Settings
from cascade.stream.topics import Topics

if TYPE_CHECKING:
    from cascade.stream.local import LocalDeployment, WorkerProcess

WARM_UP_ITEMS = 8
READY_TIMEOUT_S = 120.0
# Per-worker state that a second worker on the same machine must not share: the embedded
# exemplar store admits one process, and faust keeps its own files under `stream`.
_OWN_COPY = ("exemplars",)
_NOT_SHARED = ("stream", "bench")

Log = Callable[[str], None]


def worker_env(settings: Settings, batch_size: int, threads: int | None = None) -> dict[str, str]:
    """The bench's settings for a worker process, which reads its settings from the environment."""
    return {
        "CASCADE_DATA_DIR": str(Path(settings.data_dir).resolve()),
        "CASCADE_MODEL_DIR": str(Path(settings.model_dir).resolve()),
        "CASCADE_POLICIES_DIR": str(Path(settings.policies_dir).resolve()),
        "CASCADE_EMBEDDING_THREADS": str(settings.embedding_threads if threads is None else threads),
        "CASCADE_EMBEDDING_INT8": str(serves_int8(settings)).lower(),
        "CASCADE_EMBEDDING_SPIN": str(settings.embedding_spin).lower(),
        "CASCADE_EMBEDDING_CACHE_SIZE": str(settings.embedding_cache_size),
        "CASCADE_REPEAT_CACHE_SIZE": str(settings.repeat_cache_size),
        "CASCADE_FLOOD_MIN_ITEMS": str(settings.flood_min_items),
        "CASCADE_STREAM_BATCH_SIZE": str(batch_size),
    }


def _lines(items: Sequence[ContentItem], tag: str) -> list[bytes]:
    # The whole item (its surface picks the band set), so the broker does the in-process cascade's work.
    return [
        json.dumps(item.model_dump(mode="json", exclude_none=True) | {"id": f"{tag}-{i}"}, ensure_ascii=False).encode()
        for i, item in enumerate(items)
    ]


@dataclass(frozen=True)
class BrokerJob:
    """What every broker measurement runs: the bench's texts through these stages under these bands."""

    config: BenchConfig
    settings: Settings
    items: Sequence[ContentItem]
    thresholds_path: Path
    stage_names: Sequence[str]
    log: Log


@dataclass
class Round:
    rate: float  # items/s, publish start (a backlog: the workers' resume) to the last verdict
    verdicts: list[Verdict]
    latency_ms: list[float]  # per item, in the order of `verdicts`; empty for a backlog (nothing waited live)


def worker_data_dir(data_dir: Path, into: Path) -> Path:
    """A data directory for one more worker on this machine: its own copy of what one process
    may hold (the embedded exemplar store) and of the files, links to the read-only rest."""
    if into.exists():
        shutil.rmtree(into)
    into.mkdir(parents=True)
    for entry in Path(data_dir).resolve().iterdir():
        if entry.name in _NOT_SHARED:
            continue
        if entry.name in _OWN_COPY and entry.is_dir():
            shutil.copytree(entry, into / entry.name)
        elif entry.is_dir():
            (into / entry.name).symlink_to(entry, target_is_directory=True)
        else:
            shutil.copy2(entry, into / entry.name)
    return into


def _round(deployment: LocalDeployment, items: Sequence[ContentItem], tag: str, rate: float | None = None) -> Round:
    """Items published while the workers run: as fast as they go, or at `rate` items/s."""
    return asyncio.run(_publish_and_collect(deployment, items, tag, rate, backlog=False))


def _backlog_round(deployment: LocalDeployment, items: Sequence[ContentItem], tag: str) -> Round:
    """Items published while the workers are paused, then drained by them."""
    return asyncio.run(_publish_and_collect(deployment, items, tag, None, backlog=True))


@contextlib.contextmanager
def _paused(workers: Sequence[WorkerProcess]) -> Iterator[None]:
    # A pause of a second or so stays well inside the consumer session timeout: no rebalance.
    running = [w.process.pid for w in workers if w.process is not None and w.alive]
    for pid in running:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in running:
            os.kill(pid, signal.SIGCONT)


async def _publish_and_collect(
    deployment: LocalDeployment, items: Sequence[ContentItem], tag: str, rate: float | None, backlog: bool
) -> Round:
    from cascade.stream.client import end_offsets, publish
    from cascade.stream.local import collect

    # Read from where the outputs end now: re-reading every earlier round's verdicts would take CPU
    # from the workers under test (the reader shares their cores), more in each later round.
    outputs = [*deployment.topics.all_verdicts, deployment.topics.deadletter]
    start = await end_offsets(deployment.url, outputs)
    if backlog:
        with _paused(deployment.workers):
            published = await publish(deployment.url, deployment.topics, _lines(items, tag))
        started = datetime.now(UTC)
    else:
        started = datetime.now(UTC)
        published = await publish(deployment.url, deployment.topics, _lines(items, tag), rate=rate)
    timeout_s = max(60.0, len(items) / 2.0)
    outcomes = await collect(
        deployment.url, deployment.topics, published, timeout_s=timeout_s, alive=lambda: deployment.alive, start=start
    )
    ours = [(p, outcomes.verdicts[p.item_id]) for p in published if p.item_id in outcomes.verdicts]
    if len(ours) != len(items):
        raise RuntimeError(f"{len(items) - len(ours)} of {len(items)} items came back as dead letters")
    verdicts = [v for _, v in ours]
    elapsed = (max(v.processed_at for v in verdicts) - started).total_seconds()
    latency = [] if backlog else [(v.processed_at - p.sent_at).total_seconds() * 1000 for p, v in ours]
    return Round(len(items) / elapsed, verdicts, latency)


def _deployment(job: BrokerJob, logs: Path, threads: int | None = None) -> LocalDeployment:
    from cascade.stream.local import LocalDeployment

    env = worker_env(job.settings, job.config.batch_size, threads)
    return LocalDeployment(
        job.settings, job.stage_names, logs, topics=Topics(), thresholds=job.thresholds_path, env=env
    )


def _percentiles(values: Sequence[float]) -> dict[str, float]:
    p50, p95, p99 = np.percentile(np.asarray(values, dtype=float), [50, 95, 99])
    return {"n": len(values), "p50_ms": float(p50), "p95_ms": float(p95), "p99_ms": float(p99)}


def latency_row(fraction: float, max_rate: float, measured_round: Round) -> Row:
    by_stage: dict[str, list[float]] = defaultdict(list)
    for verdict, ms in zip(measured_round.verdicts, measured_round.latency_ms, strict=True):
        by_stage[verdict.decided_by].append(ms)
    return {
        "label": f"publish to verdict at {fraction:.0%} of the measured maximum",
        "available": True,
        "offered_share": fraction,
        "offered_rate": fraction * max_rate,
        "achieved_rate": measured_round.rate,
        "all": _percentiles(measured_round.latency_ms),
        "by_stage": {stage: _percentiles(values) for stage, values in sorted(by_stage.items())},
    }


def measure_stream(job: BrokerJob) -> tuple[dict[str, Row], dict[str, Row]]:
    """The broker throughput rows (a backlog drained; published live) and the latency rows at
    `config.load_shares` of the live median."""
    config, items, stage_names, log = job.config, job.items, job.stage_names, job.log
    labels = {
        "stream_broker": f"cascade through the embedded broker, a backlog (1 worker: {', '.join(stage_names)})",
        "stream_broker_live": "the same, published while the worker runs (publisher on its cores)",
    }
    logs = job.settings.data_path("bench", "stream")
    latency: dict[str, Row] = {}
    try:
        deployment = _deployment(job, logs)
    except ImportError as exc:
        return {key: not_available(label, f"stream layer not importable: {exc}") for key, label in labels.items()}, {}
    try:
        deployment.start().worker()
        log("stream: waiting for the worker to join its consumer group")
        ready_s = deployment.wait_ready(READY_TIMEOUT_S)
        _round(deployment, items[:WARM_UP_ITEMS], "bench-warm")
        backlog: list[Round] = []
        live: list[Round] = []
        for n in range(config.stream_rounds):  # interleaved: both kinds see the same drift in load
            backlog.append(_backlog_round(deployment, items, f"bench-b{n}"))
            live.append(_round(deployment, items, f"bench-r{n}"))
        max_rate = float(np.median([r.rate for r in live]))
        for share in config.load_shares:
            log(f"stream: latency at {share:.0%} of {max_rate:.1f} items/s")
            key = f"latency_{round(share * 100)}"
            try:
                offered = _round(deployment, items, f"bench-load{key}", share * max_rate)
                latency[key] = latency_row(share, max_rate, offered)
            except Exception as exc:
                latency[key] = not_available(f"latency at {share:.0%} of the maximum", f"{type(exc).__name__}: {exc}")
    except Exception as exc:  # report, don't crash the rest of the bench
        reason = f"{type(exc).__name__}: {exc} (logs in {logs})"
        return {key: not_available(label, reason) for key, label in labels.items()}, latency
    finally:
        deployment.stop()
    common = {
        "worker_ready_s": ready_s,
        "batch_size": config.batch_size,
        "batches_in_flight": job.settings.batches_in_flight(stage_names),
        "stages": list(stage_names),
        "llm": "excluded (never called by the bench)",
    }
    rows = {}
    for key, kind in (("stream_broker", backlog), ("stream_broker_live", live)):
        breakdown = cascade_breakdown(kind[-1].verdicts, stage_names)
        rows[key] = measured(labels[key], "items/s", [r.rate for r in kind], **common, **breakdown)
    return rows, latency


def pin(worker: WorkerProcess, core: int) -> bool:
    """Confine every thread of `worker` to `core`; False where the OS cannot (no sched_setaffinity)."""
    if not hasattr(os, "sched_setaffinity") or worker.process is None:
        return False
    pid = worker.process.pid
    tasks = Path(f"/proc/{pid}/task")
    for tid in [int(t.name) for t in tasks.iterdir()] if tasks.is_dir() else [pid]:
        try:
            os.sched_setaffinity(tid, {core})
        except ProcessLookupError:  # a thread that ended meanwhile
            continue
    return True


def measure_scale_out(job: BrokerJob) -> dict[str, Row]:
    """One single-thread worker pinned to a core, then two in one group on the same partitions, a core each."""
    config, settings, items, log = job.config, job.settings, job.items, job.log
    partitions = f"{settings.stream_partitions} partitions"
    labels = {
        "scale_one_worker": f"broker, 1 worker x 1 thread x 1 core, {partitions}",
        "scale_two_workers": f"broker, 2 workers x 1 thread x 1 core, one group, {partitions}",
    }
    logs = settings.data_path("bench", "scale-out")
    try:
        deployment = _deployment(job, logs, threads=1)
    except ImportError as exc:
        return {key: not_available(label, f"stream layer not importable: {exc}") for key, label in labels.items()}
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    try:
        first = deployment.start().worker()
        log("scale-out: one single-thread worker")
        deployment.wait_ready(READY_TIMEOUT_S)
        # Pinned once ready: every thread the worker will run (encoder, event loop, Kafka) exists by then.
        pinned = len(cores) >= 2 and pin(first, cores[0])
        _round(deployment, items[:WARM_UP_ITEMS], "scale-warm1")
        one = [_backlog_round(deployment, items, f"scale-one-r{n}").rate for n in range(config.stream_rounds)]
        log("scale-out: a second single-thread worker joins the group")
        own = worker_data_dir(settings.data_dir, logs / "worker-2-data")
        second = deployment.worker(env={"CASCADE_DATA_DIR": str(own)})
        deployment.wait_ready(READY_TIMEOUT_S)  # the join rebalances the group: every worker ready again
        pinned = pinned and pin(second, cores[1])
        _round(deployment, items[:WARM_UP_ITEMS], "scale-warm2")
        two = [_backlog_round(deployment, items, f"scale-two-r{n}").rate for n in range(config.stream_rounds)]
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc} (logs in {logs})"
        return {key: not_available(label, reason) for key, label in labels.items()}
    finally:
        deployment.stop()
    common = {
        "threads_per_worker": 1,
        "pinned_to_one_core": pinned,
        "partitions": settings.stream_partitions,
        "batch_size": config.batch_size,
        "batches_in_flight": settings.batches_in_flight(job.stage_names),
    }
    return {
        "scale_one_worker": measured(labels["scale_one_worker"], "items/s", one, workers=1, **common),
        "scale_two_workers": measured(labels["scale_two_workers"], "items/s", two, workers=2, **common),
    }
