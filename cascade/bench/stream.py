"""End-to-end throughput through the embedded Kafka-protocol broker (tansu) and one stage worker.

Uses the stream layer's own pieces (`cascade.stream`): the embedded broker, a worker process
exactly as `cascade run` starts it (every stage in one worker, the same stage list and
thresholds as the in-process row), the publisher and the verdict reader. A round publishes
the bench texts under fresh ids; its throughput is items / (last verdict's `processed_at` −
publish start), so reading the verdicts back does not count against the stream.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

from cascade.bench.config import BenchConfig
from cascade.bench.measure import Row, cascade_breakdown, measured, not_available
from cascade.contract import ContentItem, Verdict
from cascade.settings import Settings
from cascade.stream.topics import Topics

STREAM_ROW = "stream_broker"
WARM_UP_ITEMS = 8
READY_TIMEOUT_S = 120.0


def worker_env(settings: Settings, batch_size: int) -> dict[str, str]:
    """The bench's settings for a worker process, which reads its settings from the environment."""
    return {
        "CASCADE_DATA_DIR": str(Path(settings.data_dir).resolve()),
        "CASCADE_MODEL_DIR": str(Path(settings.model_dir).resolve()),
        "CASCADE_POLICIES_DIR": str(Path(settings.policies_dir).resolve()),
        "CASCADE_EMBEDDING_THREADS": str(settings.embedding_threads),
        "CASCADE_EMBEDDING_INT8": str(settings.embedding_int8).lower(),
        "CASCADE_EMBEDDING_CACHE_SIZE": str(settings.embedding_cache_size),
        "CASCADE_FLOOD_MIN_ITEMS": str(settings.flood_min_items),
        "CASCADE_STREAM_BATCH_SIZE": str(batch_size),
    }


def _lines(items: Sequence[ContentItem], tag: str) -> list[bytes]:
    return [
        json.dumps({"id": f"{tag}-{i}", "text": item.text}, ensure_ascii=False).encode() for i, item in enumerate(items)
    ]


async def _round(
    url: str, topics: Topics, items: Sequence[ContentItem], tag: str, alive: Callable[[], bool], timeout_s: float
) -> tuple[float, list[Verdict]]:
    from cascade.stream.client import publish
    from cascade.stream.local import collect

    started = datetime.now(UTC)
    published = await publish(url, topics, _lines(items, tag))
    outcomes = await collect(url, topics, published, timeout_s=timeout_s, alive=alive)
    ours = [outcomes.verdicts[p.item_id] for p in published if p.item_id in outcomes.verdicts]
    if len(ours) != len(items):
        raise RuntimeError(f"{len(items) - len(ours)} of {len(items)} items came back as dead letters")
    elapsed = (max(v.processed_at for v in ours) - started).total_seconds()
    return len(items) / elapsed, ours


def measure_stream(
    config: BenchConfig,
    settings: Settings,
    items: Sequence[ContentItem],
    thresholds_path: Path,
    stage_names: Sequence[str],
    log: Callable[[str], None],
) -> Row:
    label = f"cascade through the embedded broker (1 worker: {', '.join(stage_names)})"
    try:
        from cascade.stream.local import LocalDeployment
    except ImportError as exc:
        return not_available(label, f"stream layer not importable: {exc}")
    logs = settings.data_path("bench", "stream")
    deployment = LocalDeployment(
        settings,
        stage_names,
        logs,
        topics=Topics(),
        thresholds=thresholds_path,
        env=worker_env(settings, config.batch_size),
    )
    try:
        deployment.start().worker()
        log("stream: waiting for the worker to join its consumer group")
        ready_s = deployment.wait_ready(READY_TIMEOUT_S)
        timeout_s = max(60.0, len(items) / 2.0)

        def round_(items: Sequence[ContentItem], tag: str) -> tuple[float, list[Verdict]]:
            return asyncio.run(
                _round(deployment.url, deployment.topics, items, tag, lambda: deployment.alive, timeout_s)
            )

        round_(items[:WARM_UP_ITEMS], "bench-warm")
        rounds = [round_(items, f"bench-r{n}") for n in range(config.stream_rounds)]
    except Exception as exc:  # report, don't crash the rest of the bench
        return not_available(label, f"{type(exc).__name__}: {exc} (logs in {logs})")
    finally:
        deployment.stop()
    return measured(
        label,
        "items/s",
        [rate for rate, _ in rounds],
        worker_ready_s=ready_s,
        batch_size=config.batch_size,
        stages=list(stage_names),
        llm="excluded (never called by the bench)",
        **cascade_breakdown(rounds[-1][1], stage_names),
    )
