"""End-to-end items/s through Kafka vs the in-process cascade, on the same input, in one run.

In process: `CascadeRunner.run` over batches (what `cascade moderate` does). Through Kafka:
publish every line to the input topic of a running deployment (embedded tansu broker unless
--broker, worker processes already in their group) and stop the clock when every item has a
verdict or a dead letter. Both paths build the same cascade from the same settings; the ratio
is the cost of the stream layer (serialisation, broker round trips, escalation hops, batching
waits). Worker start-up and group join are excluded; they are reported separately.

    .venv/bin/cascade sample ../shared/data/*.jsonl --split test -n 2000 -o .cascade/sample.jsonl
    .venv/bin/python bench/stream_vs_inprocess.py .cascade/sample.jsonl --llm-server
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from contextlib import ExitStack
from pathlib import Path

from cascade.assembly import STAGE_ORDER, build_runner
from cascade.contract import DeadLetter, Verdict
from cascade.intake import parse_record
from cascade.jsonl import raw_records
from cascade.pipeline import new_context
from cascade.settings import Settings
from cascade.stream.client import StreamOutputs, publish
from cascade.stream.local import LocalDeployment, collect

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def profile(verdicts: Iterable[Verdict]) -> str:
    """Decisions and stage errors: both paths must have done the same work for the ratio to mean anything."""
    verdicts = list(verdicts)
    decisions = Counter(f"{v.decision.value}/{v.decided_by}" for v in verdicts)
    errors = sum(1 for v in verdicts if any(t.error for t in v.trace))
    return f"{dict(sorted(decisions.items()))}, {errors} with a stage error"


async def in_process(
    settings: Settings, stages: list[str], lines: list[bytes], batch_size: int
) -> tuple[float, list[str], str]:
    runner = build_runner(settings, stage_names=stages)
    verdicts: list[Verdict] = []
    started = time.perf_counter()
    for start in range(0, len(lines), batch_size):
        parsed = [
            parse_record(line, settings, f"bench:{start + i}") for i, line in enumerate(lines[start:][:batch_size])
        ]
        contexts = [new_context(p) for p in parsed if not isinstance(p, DeadLetter)]
        if contexts:
            verdicts.extend(await runner.run(contexts))
    elapsed = time.perf_counter() - started
    await runner.aclose()
    return len(lines) / elapsed, runner.stage_names, profile(verdicts)


def through_kafka(
    url: str | None, settings: Settings, stages: list[str], lines: list[bytes], workers: int
) -> tuple[float, float, str]:
    logs = Path(tempfile.mkdtemp(prefix="cascade-bench-"))
    with LocalDeployment(settings, stages, logs, url) as deployment:
        for _ in range(workers):
            deployment.worker()
        ready_s = deployment.wait_ready()
        started = time.perf_counter()

        async def run() -> StreamOutputs:
            published = await publish(deployment.url, deployment.topics, lines)
            return await collect(deployment.url, deployment.topics, published, timeout_s=900)

        outcomes = asyncio.run(run())
        return len(lines) / (time.perf_counter() - started), ready_s, profile(outcomes.verdicts.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", type=Path, help="ContentItem JSONL (e.g. from `cascade sample`)")
    parser.add_argument("--limit", type=int, default=2000)
    parser.add_argument("--stages", default=",".join(STAGE_ORDER))
    parser.add_argument("--workers", type=int, default=1, help="worker processes, each running every stage")
    parser.add_argument("--broker", help="an existing cluster (default: embedded tansu)")
    parser.add_argument("--llm-server", action="store_true", help="point the LLM stage at tests/llm_server.py")
    args = parser.parse_args()

    with args.input.open("rb") as fh:
        lines = [record for _, record in itertools.islice(raw_records(fh), args.limit)]
    stages = [s for s in args.stages.split(",") if s]
    with ExitStack() as stack:
        if args.llm_server:
            from llm_server import serve

            server = stack.enter_context(serve())
            # Environment, so the worker processes see it too.
            os.environ.update(
                OPENAI_BASE_URL=server.base_url,
                OPENAI_API_KEY="bench",
                CASCADE_LLM_MODEL="local-moderator-2026-01-01",
                CASCADE_LLM_RATE_PER_S="100000",
                CASCADE_LLM_RATE_BURST="100000",
            )
        os.environ.setdefault("CASCADE_TOPIC_PREFIX", f"bench{os.getpid()}.")
        settings = Settings()
        # Stages' caches (e.g. LLM responses by text) would flatter whichever path runs second:
        # each path builds its own runner, in its own process or from scratch.
        stream_rate, ready_s, stream_profile = through_kafka(args.broker, settings, stages, lines, args.workers)
        inprocess_rate, cascade, inprocess_profile = asyncio.run(
            in_process(settings, stages, lines, settings.stream_batch_size)
        )
    print(f"items: {len(lines)}  cascade: {','.join(cascade)}")
    print(f"in-process (CascadeRunner.run, batch {settings.stream_batch_size}): {inprocess_rate:,.0f} items/s")
    print(f"  {inprocess_profile}")
    print(f"through Kafka ({args.workers} worker(s), ready in {ready_s:.1f} s): {stream_rate:,.0f} items/s")
    print(f"  {stream_profile}")
    print(f"ratio stream / in-process: {stream_rate / inprocess_rate:.2f}")


if __name__ == "__main__":
    main()
