"""Throughput, all rows on the same texts in one run: hash stage, embeddings, the in-process cascade.

Rounds are interleaved (`measure.interleave`), so load from other work on a shared machine
hits every row alike, and ratios are taken between medians of the same run. The stream
rows (`cascade.bench.stream`) need the exemplar store, which one process may hold at a
time, so the in-process cascade is measured before and after them (A B A).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from cascade.bench.config import BenchConfig
from cascade.bench.embedders import rate, torch_embedder
from cascade.bench.measure import Row, cascade_breakdown, interleave, items_per_s, measured, not_available, ratio
from cascade.bench.stages import BenchStages, open_stages
from cascade.bench.stream import measure_stream
from cascade.contract import ContentItem, Verdict
from cascade.embedding import Embedder, EncoderUnavailable
from cascade.pipeline import CascadeRunner, new_context
from cascade.settings import Settings
from cascade.stages.base import Stage
from cascade.stages.hash import HashStage
from cascade.thresholds import ThresholdSet

Log = Callable[[str], None]
ITEMS_PER_S = "items/s"
SENTENCES_PER_S = "sentences/s"
ROW_LABELS = {
    "hash_stage": "hash stage (normalise + exact/near bank lookups)",
    "embedding_onnx_b64": "embedding, ONNX serving path, batch 64",
    "embedding_onnx_b1": "embedding, ONNX serving path, batch 1",
    "embedding_torch_b64": "embedding, sentence-transformers torch, batch 64 (same model batches as ONNX)",
    "embedding_torch_b1": "embedding, sentence-transformers torch, batch 1",
}


async def run_cascade(cascade: CascadeRunner, items: Sequence[ContentItem], batch_size: int) -> list[Verdict]:
    verdicts: list[Verdict] = []
    for start in range(0, len(items), batch_size):
        verdicts += await cascade.run([new_context(item) for item in items[start : start + batch_size]])
    return verdicts


def _cascade_round(
    runner: asyncio.Runner, cascade: CascadeRunner, items: Sequence[ContentItem], batch_size: int, last: list
) -> Callable[[], float]:
    def one() -> float:
        def work() -> None:
            last[:] = runner.run(run_cascade(cascade, items, batch_size))

        return items_per_s(len(items), work)

    return one


def _hash_round(runner: asyncio.Runner, stage: Stage, items: Sequence[ContentItem]) -> Callable[[], float]:
    # Contexts are built inside the timing: normalisation is part of what the hash stage costs.
    return lambda: items_per_s(len(items), lambda: runner.run(stage.score([new_context(i) for i in items])))


def _embedding_runs(
    config: BenchConfig, settings: Settings, texts: list[str], rows: dict[str, Row], log: Log
) -> dict[str, Callable[[], float]]:
    singles = texts[: config.single_items]
    try:
        paths: dict[str, Callable[[Sequence[str]], object]] = {"onnx": Embedder.from_settings(settings).embed}
    except EncoderUnavailable as exc:
        for name in ("embedding_onnx_b64", "embedding_onnx_b1", "embedding_torch_b64", "embedding_torch_b1"):
            rows[name] = not_available(ROW_LABELS[name], str(exc))
        return {}
    if config.torch:
        log("loading sentence-transformers (torch) for the comparison")
        try:
            paths["torch"] = torch_embedder(settings.embedding_threads or os.cpu_count() or 1)
        except Exception as exc:  # torch is the `train` extra: a serving install may lack it
            for name in ("embedding_torch_b64", "embedding_torch_b1"):
                rows[name] = not_available(ROW_LABELS[name], f"torch could not load: {type(exc).__name__}: {exc}")
    else:
        for name in ("embedding_torch_b64", "embedding_torch_b1"):
            rows[name] = not_available(ROW_LABELS[name], "disabled (--no-torch)")
    runs: dict[str, Callable[[], float]] = {}
    for path, embed in paths.items():
        # Warm-up over every text once: both runtimes prepare kernels per input shape on first use,
        # and the rounds must time steady state, not which path met a shape first.
        rate(embed, texts, 64)
        rate(embed, singles, 1)
        runs[f"embedding_{path}_b64"] = lambda embed=embed: rate(embed, texts, 64)
        runs[f"embedding_{path}_b1"] = lambda embed=embed: rate(embed, singles, 1)
    return runs


UNITS = {"hash_stage": ITEMS_PER_S, "cascade_inprocess": ITEMS_PER_S}
RATIOS = {
    "onnx_vs_torch_b64": ("ONNX / torch embedding, batch 64", "embedding_onnx_b64", "embedding_torch_b64"),
    "onnx_vs_torch_b1": ("ONNX / torch embedding, batch 1", "embedding_onnx_b1", "embedding_torch_b1"),
    "cascade_vs_embedding": (
        "in-process cascade / raw ONNX embedding (batch 64)",
        "cascade_inprocess",
        "embedding_onnx_b64",
    ),
    "stream_vs_inprocess": ("broker end-to-end / in-process cascade", "stream_broker", "cascade_inprocess"),
}


def measure_throughput(
    config: BenchConfig,
    settings: Settings,
    items: Sequence[ContentItem],
    thresholds: ThresholdSet,
    thresholds_path: Path,
    policy_version: str,
    log: Log,
) -> dict[str, object]:
    texts = [item.text for item in items]
    rows: dict[str, Row] = {}
    extras: dict[str, dict[str, object]] = {}
    last: list[Verdict] = []
    with asyncio.Runner() as runner:
        opened = runner.run(open_stages(settings))
        try:
            runs: dict[str, Callable[[], float]] = {}
            hash_stage = next((s for s in opened.stages if s.name == "hash"), None)
            if hash_stage is None:
                reason = opened.missing.get("hash", "not configured")
                rows["hash_stage"] = not_available(ROW_LABELS["hash_stage"], reason)
            else:
                runs["hash_stage"] = _hash_round(runner, hash_stage, items)
                if isinstance(hash_stage, HashStage):
                    extras["hash_stage"] = {"bank_entries": len(hash_stage.bank)}
            runs |= _embedding_runs(config, settings, texts, rows, log)
            cascade_label = _cascade_label(opened)
            if opened.stages:
                cascade = CascadeRunner(opened.stages, thresholds, policy_version)
                runs["cascade_inprocess"] = _cascade_round(runner, cascade, items, config.batch_size, last)
                runner.run(run_cascade(cascade, items[: config.batch_size], config.batch_size))  # warm-up
            else:
                rows["cascade_inprocess"] = not_available(cascade_label, _no_stages(opened))
            log(f"throughput: {len(runs)} rows x {config.rounds} interleaved rounds on {len(items)} texts")
            samples = interleave(runs, config.rounds)
        finally:
            runner.run(opened.aclose())
    if not config.stream:
        rows["stream_broker"] = not_available("cascade through the embedded broker", "disabled (--no-stream)")
    elif not opened.stages:
        rows["stream_broker"] = not_available("cascade through the embedded broker", _no_stages(opened))
    else:
        rows["stream_broker"] = measure_stream(config, settings, items, thresholds_path, opened.names, log)
        if rows["stream_broker"]["available"]:
            log("throughput: in-process cascade again after the stream rounds (A B A)")
            samples["cascade_inprocess"] += _inprocess_again(config, settings, items, thresholds, policy_version, last)
    for name, values in samples.items():
        if name == "cascade_inprocess":
            extra = {
                "stages": opened.names,
                "llm": "excluded (never called by the bench)",
                "batch_size": config.batch_size,
                **cascade_breakdown(last, opened.names),
            }
            rows[name] = measured(cascade_label, ITEMS_PER_S, values, **extra)
        else:
            rows[name] = measured(ROW_LABELS[name], UNITS.get(name, SENTENCES_PER_S), values, **extras.get(name, {}))
    # The broker rounds run apart from the interleaved ones (A B A), so they have no per-round pairs.
    ratios = {
        key: ratio(label, rows, num, den, paired=key != "stream_vs_inprocess")
        for key, (label, num, den) in RATIOS.items()
    }
    return {
        "input": {
            "items": len(items),
            "mean_chars": sum(map(len, texts)) / max(len(texts), 1),
            "batch_1_items": min(config.single_items, len(items)),
            "rounds": config.rounds,
            "stream_rounds": config.stream_rounds if config.stream else 0,
        },
        "stages_missing": opened.missing,
        "rows": rows,
        "ratios": ratios,
    }


def _cascade_label(opened: BenchStages) -> str:
    return f"cascade in-process (CascadeRunner.run: {', '.join(opened.names) or 'no stage'}; LLM excluded)"


def _no_stages(opened: BenchStages) -> str:
    return "no cheap stage is available: " + "; ".join(f"{k}: {v}" for k, v in opened.missing.items())


def _inprocess_again(
    config: BenchConfig,
    settings: Settings,
    items: Sequence[ContentItem],
    thresholds: ThresholdSet,
    policy_version: str,
    last: list[Verdict],
) -> list[float]:
    with asyncio.Runner() as runner:
        opened = runner.run(open_stages(settings))
        try:
            cascade = CascadeRunner(opened.stages, thresholds, policy_version)
            runner.run(run_cascade(cascade, items[: config.batch_size], config.batch_size))  # warm-up
            round_ = _cascade_round(runner, cascade, items, config.batch_size, last)
            return [round_() for _ in range(config.stream_rounds)]
        finally:
            runner.run(opened.aclose())
