"""Throughput, all rows on the same texts in one run: hash stage, embeddings, the in-process cascade.

The repeat rows run the cascade with a fresh repeat cache (`cascade.repeats`) per round on the
same texts, and on the same stream where `repeat_share` of the items repeat an earlier text;
the uncached cascade judges the repeat stream once more to check that the verdicts are identical.

Rounds are interleaved (`measure.interleave`), so load from other work on a shared machine
hits every row alike, and ratios are taken between medians of the same run. The stream
rows (`cascade.bench.stream`) need the exemplar store, which one process may hold at a
time, so the in-process cascade is measured before and after them (A B A).
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path

from cascade.assembly import built_stage_versions
from cascade.bench.config import BenchConfig
from cascade.bench.embedders import rate, torch_embedder
from cascade.bench.measure import Row, cascade_breakdown, interleave, items_per_s, measured, not_available, ratio
from cascade.bench.stages import BenchStages, open_stages
from cascade.bench.stream import BrokerJob, measure_scale_out, measure_stream
from cascade.contract import ContentItem, Verdict
from cascade.embedding import Embedder, EncoderUnavailable
from cascade.pipeline import CascadeRunner, judge_batches, new_context
from cascade.repeats import RepeatCache, RepeatingRunner, is_repeat
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
    "cascade_no_repeats": "cascade in-process, repeat cache on, the bench texts",
    "cascade_repeats": "cascade in-process, repeat cache on, same length, {share:.0%} repeats of earlier texts",
}


async def run_cascade(
    cascade: CascadeRunner, items: Sequence[ContentItem], batch_size: int, in_flight: int
) -> list[Verdict]:
    """As `cascade moderate` and a stream worker judge: batches of `batch_size`, `in_flight` of them at once."""
    starts = range(0, len(items), batch_size)
    batches = ([new_context(item) for item in items[start : start + batch_size]] for start in starts)
    return [verdict async for verdicts in judge_batches(cascade, batches, in_flight) for verdict in verdicts]


def _cascade_round(
    runner: asyncio.Runner,
    cascade: Callable[[], CascadeRunner],
    items: Sequence[ContentItem],
    batch_size: int,
    in_flight: int,
    last: list,
) -> Callable[[], float]:
    """One timed round of the runner `cascade()` gives (built before the clock starts) over `items`."""

    def one() -> float:
        judge = cascade()

        def work() -> None:
            last[:] = runner.run(run_cascade(judge, items, batch_size, in_flight))

        return items_per_s(len(items), work)

    return one


def repeat_stream(items: Sequence[ContentItem], share: float, seed: int) -> list[ContentItem]:
    """`items`, with `share` of them (never the first) replaced by a repeat of an earlier item: its text on
    its surface, under the item's own id. (A text repeated on another surface is judged by another band
    set, so it is not a repeat; copying the text alone made ~40 % of the "repeats" such cross-surface ones.)"""
    rng = random.Random(seed)
    stream: list[ContentItem] = []
    for index, item in enumerate(items):
        if stream and rng.random() < share:
            earlier = stream[rng.randrange(index)]
            item = item.model_copy(update={"text": earlier.text, "surface": earlier.surface})
        stream.append(item)
    return stream


def _fresh_repeating(
    stages: Sequence[Stage], thresholds: ThresholdSet, policy_version: str, settings: Settings, size: int
) -> Callable[[], CascadeRunner]:
    # A fresh cache each round: a cache warm from the previous round would time only hits.
    return lambda: RepeatingRunner(
        stages,
        thresholds,
        policy_version,
        None,
        RepeatCache(max(size, 1), ttl_s=3600),
        settings.data_dir,
        lambda: built_stage_versions(stages),
    )


def _same_decisions(cached: Sequence[Verdict], uncached: Sequence[Verdict]) -> bool:
    def decision(v: Verdict) -> tuple:
        return (v.id, v.decision, v.decided_by, v.flagged_categories)

    return [decision(v) for v in cached] == [decision(v) for v in uncached]


def _largest_score_change(cached: Sequence[Verdict], uncached: Sequence[Verdict]) -> float:
    """Largest |score| difference between the runs: batches of other make-up pad differently, which moves
    fp32 encoder outputs in the last digits even where every decision is the same."""
    return max(
        (
            abs(a.categories.get(name, 0.0) - b.categories.get(name, 0.0))
            for a, b in zip(cached, uncached, strict=True)
            for name in a.categories.keys() | b.categories.keys()
        ),
        default=0.0,
    )


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


UNITS = {
    "hash_stage": ITEMS_PER_S,
    "cascade_inprocess": ITEMS_PER_S,
    "cascade_no_repeats": ITEMS_PER_S,
    "cascade_repeats": ITEMS_PER_S,
}
RATIOS = {
    "onnx_vs_torch_b64": ("ONNX / torch embedding, batch 64", "embedding_onnx_b64", "embedding_torch_b64"),
    "onnx_vs_torch_b1": ("ONNX / torch embedding, batch 1", "embedding_onnx_b1", "embedding_torch_b1"),
    "cascade_vs_embedding": (
        "in-process cascade / raw ONNX embedding (batch 64)",
        "cascade_inprocess",
        "embedding_onnx_b64",
    ),
    "stream_vs_inprocess": ("broker end-to-end / in-process cascade", "stream_broker", "cascade_inprocess"),
    "repeats_vs_no_repeats": (
        "stream with repeats / same stream without, repeat cache on",
        "cascade_repeats",
        "cascade_no_repeats",
    ),
    "two_vs_one_worker": (
        "2 single-thread workers / 1, one group (efficiency = half of it)",
        "scale_two_workers",
        "scale_one_worker",
    ),
}
UNPAIRED = {"stream_vs_inprocess", "two_vs_one_worker"}  # measured apart from the interleaved rounds


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
    last_repeats: list[Verdict] = []
    repeated = repeat_stream(items, config.repeat_share, config.seed)
    with asyncio.Runner() as runner:
        opened = runner.run(open_stages(settings))
        try:
            runs: dict[str, Callable[[], float]] = {}
            hash_stage = next((s for s in opened.stages if s.name == HashStage.name), None)
            if hash_stage is None:
                reason = opened.missing.get(HashStage.name, "not configured")
                rows["hash_stage"] = not_available(ROW_LABELS["hash_stage"], reason)
            else:
                runs["hash_stage"] = _hash_round(runner, hash_stage, items)
                if isinstance(hash_stage, HashStage):
                    extras["hash_stage"] = {"bank_entries": len(hash_stage.bank)}
            runs |= _embedding_runs(config, settings, texts, rows, log)
            cascade_label = _cascade_label(opened)
            in_flight = settings.batches_in_flight(opened.names)
            if opened.stages:
                cascade = CascadeRunner(opened.stages, thresholds, policy_version)
                runs["cascade_inprocess"] = _cascade_round(
                    runner, lambda: cascade, items, config.batch_size, in_flight, last
                )
                runner.run(run_cascade(cascade, items[: config.batch_size], config.batch_size, in_flight))  # warm-up
                for name, stream in (("cascade_no_repeats", items), ("cascade_repeats", repeated)):
                    fresh = _fresh_repeating(opened.stages, thresholds, policy_version, settings, len(stream))
                    kept = last_repeats if name == "cascade_repeats" else []
                    runs[name] = _cascade_round(runner, fresh, stream, config.batch_size, in_flight, kept)
            else:
                rows["cascade_inprocess"] = not_available(cascade_label, _no_stages(opened))
            log(f"throughput: {len(runs)} rows x {config.rounds} interleaved rounds on {len(items)} texts")
            samples = interleave(runs, config.rounds)
            if last_repeats:
                uncached = runner.run(run_cascade(cascade, repeated, config.batch_size, in_flight))
                extras["cascade_repeats"] = {
                    "repeat_share": config.repeat_share,
                    "repeated_items": sum(
                        (a.text, a.surface) != (b.text, b.surface) for a, b in zip(items, repeated, strict=True)
                    ),
                    "reissued": sum(map(is_repeat, last_repeats)),
                    "verdicts_identical_to_uncached": _same_decisions(last_repeats, uncached),
                    "largest_score_change": _largest_score_change(last_repeats, uncached),
                }
        finally:
            runner.run(opened.aclose())
    latency: dict[str, Row] = {}
    if not config.stream or not opened.stages:
        why = "disabled (--no-stream)" if not config.stream else _no_stages(opened)
        for name in ("stream_broker", "stream_broker_live"):
            rows[name] = not_available(f"cascade through the embedded broker ({name})", why)
        for name in ("scale_one_worker", "scale_two_workers"):
            rows[name] = not_available(f"broker scale-out ({name})", why)
    else:
        job = BrokerJob(config, settings, items, thresholds_path, opened.names, log)
        stream_rows, latency = measure_stream(job)
        rows |= stream_rows
        if config.scale_out:
            rows |= measure_scale_out(job)
        else:
            for name in ("scale_one_worker", "scale_two_workers"):
                rows[name] = not_available(f"broker scale-out ({name})", "disabled (--no-scale-out)")
        if rows["stream_broker"]["available"]:
            log("throughput: in-process cascade again after the stream rounds (A B A)")
            samples["cascade_inprocess"] += _inprocess_again(config, settings, items, thresholds, policy_version, last)
    for name, values in samples.items():
        if name == "cascade_inprocess":
            extra = {
                "stages": opened.names,
                "llm": "excluded (never called by the bench)",
                "batch_size": config.batch_size,
                "batches_in_flight": in_flight,
                **cascade_breakdown(last, opened.names),
            }
            rows[name] = measured(cascade_label, ITEMS_PER_S, values, **extra)
        else:
            label = ROW_LABELS[name].format(share=config.repeat_share)
            rows[name] = measured(label, UNITS.get(name, SENTENCES_PER_S), values, **extras.get(name, {}))
    # The broker rounds run apart from the interleaved ones (A B A), so they have no per-round pairs.
    ratios = {
        key: ratio(label, rows, num, den, paired=key not in UNPAIRED) for key, (label, num, den) in RATIOS.items()
    }
    if ratios["two_vs_one_worker"]["available"]:
        ratios["two_vs_one_worker"]["efficiency"] = ratios["two_vs_one_worker"]["value"] / 2
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
        "latency": latency,
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
            in_flight = settings.batches_in_flight(opened.names)
            runner.run(run_cascade(cascade, items[: config.batch_size], config.batch_size, in_flight))  # warm-up
            round_ = _cascade_round(runner, lambda: cascade, items, config.batch_size, in_flight, last)
            return [round_() for _ in range(config.stream_rounds)]
        finally:
            runner.run(opened.aclose())
