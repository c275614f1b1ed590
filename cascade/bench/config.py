"""What `cascade bench` measures and how much of it: sizes for `--quick` and for the full run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cascade.settings import Settings

SECTIONS = ("throughput", "quality", "scaling")


@dataclass(frozen=True)
class BenchConfig:
    data: tuple[Path, ...]
    thresholds: Path | None = None
    sections: tuple[str, ...] = SECTIONS
    quick: bool = False
    rounds: int = 5  # interleaved repetitions of every throughput measurement
    throughput_items: int = 512  # same texts for every throughput row
    single_items: int = 60  # texts for the batch-1 rows
    batch_size: int = 64  # in-process cascade and stream worker batch
    torch: bool = True  # sentence-transformers comparison (loads torch)
    stream: bool = True  # end-to-end through the embedded broker
    stream_rounds: int = 3
    load_shares: tuple[float, ...] = (0.5, 0.9)  # offered rates for latency, as shares of the measured maximum
    scale_out: bool = True  # one vs two single-thread workers through the broker
    repeat_share: float = 0.3  # items of the repeat stream that repeat an earlier text
    quality_items: int | None = None  # per split; None = the whole test and calibration splits
    refresh_scores: bool = False  # re-score even when the score cache matches (e.g. the bank changed)
    scaling_rows: int | None = None  # real rows embedded for the bank; None = all
    bank_sizes: tuple[int, ...] = (1_000, 10_000, 100_000)
    knn_queries: int = 200
    batch_sizes: tuple[int, ...] = (1, 4, 16, 32, 64)
    seed: int = 20261127

    @classmethod
    def preset(cls, data: tuple[Path, ...], quick: bool, **overrides: object) -> BenchConfig:
        if not quick:
            return cls(data=data, **overrides)  # type: ignore[arg-type]
        sizes: dict[str, object] = {
            "quick": True,
            "rounds": 2,
            "throughput_items": 96,
            "single_items": 8,
            "stream_rounds": 1,
            "quality_items": 200,
            "scaling_rows": 2_500,
            "bank_sizes": (500, 2_500),
            "knn_queries": 40,
            "batch_sizes": (1, 64),
        }
        return cls(data=data, **{**sizes, **overrides})  # type: ignore[arg-type]


def bench_settings(settings: Settings) -> Settings:
    """The settings under test, with two changes that keep the measurement honest and harmless.

    No embedding or repeat cache: repeated rounds over the same texts would otherwise time
    cache hits (the repeat-stream rows build their own fresh cache per round).
    No flood-guard quarantine: rounds repeat texts, and the bench must not write to the banks.
    """
    return settings.model_copy(update={"embedding_cache_size": 0, "repeat_cache_size": 0, "flood_min_items": 10**9})
