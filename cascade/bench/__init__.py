"""`cascade bench`: performance, quality and cost figures, side by side, measured in one run.

Sections (docs/bench.md explains every figure):

1. throughput (`throughput.py`): hash stage, embeddings (sentence-transformers torch vs the
   ONNX serving path, batch 1 and 64), the in-process cascade and the cascade through the
   embedded broker, on the same texts, in interleaved rounds; ratios between them.
2. quality (`quality.py`): on the test split, the cascade vs its stages alone vs the
   `alt-profanity-check` peer vs a modelled all-LLM baseline: AUPRC, F1, escalation, cost.
3. scaling (`scaling.py`): kNN latency and memory against bank size; embedding against batch size.

A piece that is missing (an untrained classifier, an empty bank, no broker binary) becomes a
row `available: false` with the reason; the bench never invents a number for it.
"""

from __future__ import annotations

import asyncio
import os
import platform
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from cascade.assembly import STAGE_ORDER
from cascade.bench.config import BenchConfig, bench_settings
from cascade.bench.quality import Curves, measure_quality, sample
from cascade.bench.scaling import measure_batch_sizes, measure_knn
from cascade.bench.stages import open_stages
from cascade.bench.throughput import measure_throughput
from cascade.data import Split, file_digest, load_labelled, split_of
from cascade.embedding import serves_int8
from cascade.policy import load_policy
from cascade.scoring import admit
from cascade.settings import PROJECT_ROOT, Settings
from cascade.thresholds import ThresholdSet

Log = Callable[[str], None]


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(PROJECT_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except OSError:
        return None
    return out.stdout.strip() or None


def run_bench(config: BenchConfig, settings: Settings, log: Log = lambda _: None) -> tuple[dict, Curves | None]:
    """Every asked section; the result is JSON-ready. Also the quality section's PR curves, if any."""
    settings = bench_settings(settings)
    source = config.thresholds or settings.thresholds
    # A snapshot: the stream worker must read the very bands the in-process runs use, even if
    # the file is recalibrated while the bench runs.
    snapshot = settings.data_path("bench", f"thresholds-{os.getpid()}.yaml")
    snapshot.parent.mkdir(exist_ok=True)
    snapshot.write_bytes(Path(source).read_bytes())
    try:
        return _run_sections(config, settings, source, snapshot, log)
    finally:
        snapshot.unlink(missing_ok=True)


def _run_sections(
    config: BenchConfig, settings: Settings, source: Path, snapshot: Path, log: Log
) -> tuple[dict, Curves | None]:
    started = time.perf_counter()
    policy = load_policy(settings.policies_dir)
    thresholds = ThresholdSet.load(snapshot)
    thresholds.check_names(STAGE_ORDER, policy.names)
    rows = load_labelled(config.data)
    digests = [file_digest(p) for p in config.data]
    meta: dict[str, object] = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": config.quick,
        "sections": list(config.sections),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "git_commit": _git_commit(),
        "data": digests,
        "thresholds": {"path": str(source), "version": thresholds.version},
        "embedding": {"int8": serves_int8(settings), "threads": settings.embedding_threads or os.cpu_count()},
        "note": "absolute figures drift on a shared machine: compare ratios measured in the same run",
    }
    result: dict = {"meta": meta}
    curves = None
    test_rows = [r for r in rows if split_of(r.id) is Split.TEST]
    _, items, _ = admit(sample(test_rows, config.throughput_items, config.seed), settings)
    if "throughput" in config.sections:
        result["throughput"] = measure_throughput(config, settings, items, thresholds, snapshot, policy.version, log)
    if "quality" in config.sections:

        async def quality() -> tuple[dict, Curves | None]:
            opened = await open_stages(settings)
            try:
                return await measure_quality(config, settings, opened, rows, digests, thresholds, log)
            finally:
                await opened.aclose()

        result["quality"], curves = asyncio.run(quality())
    if "scaling" in config.sections:
        result["scaling"] = {
            "knn": measure_knn(config, settings, rows, log),
            "embedding_batch": measure_batch_sizes(config, settings, [i.text for i in items], log),
        }
    meta["elapsed_s"] = time.perf_counter() - started
    return result, curves


__all__ = ["BenchConfig", "run_bench"]
