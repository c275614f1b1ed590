"""The drift monitor and the audit sample in a real worker process, over the real broker (tansu).

The reference comes from the same cascade (hash → LLM against tests/llm_server.py) scoring the
same kind of items in process, as `cascade calibrate` computes it; the worker then exports its
windows on /metrics, copies automatic verdicts to the audit topic, and `cascade drift --broker`
reads the verdict topics back.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from scrape import scrape
from test_stream_broker import CASCADE, Deployment
from typer.testing import CliRunner

from cascade.assembly import build_stages
from cascade.cli import app
from cascade.contract import ContentItem, Decision, Verdict
from cascade.drift import ALL_SURFACES, PSI_ALERT, Reference
from cascade.scoring import collect_scores
from cascade.stream.client import read_topics
from cascade.thresholds import ThresholdSet

pytestmark = [pytest.mark.broker, pytest.mark.slow]

WORDS = ["kill", "idiot", "lovely", "prize", "meeting", "walk", "noon", "free", "tomorrow", "day"]


def texts(n: int, tag: str) -> list[str]:
    # Varied texts, so that the local LLM's answers (keyword rules) and hence its scores vary.
    return [f"{tag} {WORDS[i % 10]} {WORDS[(i * 3 + 1) % 10]} {WORDS[(i * 7 + 2) % 10]} #{i}" for i in range(n)]


def _with_reference(target: Deployment) -> ThresholdSet:
    """The deployment's threshold file plus the reference `cascade calibrate` would write for it."""
    settings = target.inprocess_settings()
    thresholds = ThresholdSet.load(target.thresholds)
    thresholds.provenance["targets"] = {"block_precision": 0.9, "max_allow_miss": 0.05, "max_llm_rate": 1.0}
    stages = build_stages(settings, CASCADE)
    items = [ContentItem(id=f"ref-{i}", text=t) for i, t in enumerate(texts(120, "ref"))]

    async def score() -> Reference:
        try:
            return Reference.of(await collect_scores(stages, items), thresholds)
        finally:
            for stage in stages:
                await stage.aclose()

    thresholds.provenance["reference"] = asyncio.run(score()).to_doc()
    thresholds.dump(target.thresholds)
    return thresholds


def _read_all(url: str, topics: list[str]) -> list[bytes]:
    async def read() -> list[bytes]:
        values: list[bytes] = []
        quiet = time.monotonic()
        async for topic, _, value in read_topics(url, topics):
            if topic:
                values.append(value)
                quiet = time.monotonic()
            elif time.monotonic() - quiet > 2:
                return values
        return values

    return asyncio.run(read())


def test_worker_exports_drift_and_audits_and_cascade_drift_reads_the_topics(deployment: Deployment) -> None:
    thresholds = _with_reference(deployment)
    reference = Reference.from_thresholds(thresholds)
    assert reference is not None and "flagged" in reference.stages["llm"].scores
    deployment.env |= {"CASCADE_AUDIT_SHARE": "1", "CASCADE_DRIFT_WINDOW": "50", "CASCADE_DRIFT_MIN_ITEMS": "20"}
    worker = deployment.worker()
    worker.wait_ready()
    lines = [
        json.dumps({"id": f"live-{i}", "text": t, **({"surface": "post"} if i % 2 else {})}).encode()
        for i, t in enumerate(texts(80, "live"))
    ]
    outcomes = deployment.collect(deployment.publish(lines))
    assert len(outcomes.verdicts) == 80

    samples = scrape(worker.health_port)

    def value(name: str, **labels: str) -> float | None:
        return samples.get((name, tuple(sorted(labels.items()))))

    assert value("cascade_drift_window_items", stage="llm", surface=ALL_SURFACES) == 50  # the window slid
    assert value("cascade_drift_window_items", stage="llm", surface="post") == 40
    psi = value("cascade_drift_psi", stage="llm", category="flagged", surface=ALL_SURFACES)
    assert psi is not None and psi < PSI_ALERT  # the same kind of items as the reference
    assert value("cascade_reference_rate", rate="llm") == pytest.approx(reference.llm_rate)
    assert value("cascade_llm_breaker_open", stage="llm") == 0
    assert value("cascade_llm_budget_used_ratio", stage="llm", cap="items") > 0
    surface_verdicts = sum(v for (name, _), v in samples.items() if name == "cascade_surface_verdicts_total")
    assert surface_verdicts == 40

    # Every automatic verdict (share 1) also went to the audit topic; no review verdict did.
    automatic = {i for i, v in outcomes.verdicts.items() if v.decision is not Decision.REVIEW}
    assert automatic, "the local LLM should settle some items"
    audits = [Verdict.model_validate_json(v) for v in _read_all(deployment.url, [deployment.topics.audit])]
    assert {a.id for a in audits} == automatic
    sent = sum(v for (name, _), v in samples.items() if name == "cascade_audit_sent_total")
    assert sent == len(audits)

    # `cascade drift` over the verdict topics: nothing moved; a time range with nothing in it is an error.
    env = {"CASCADE_TOPIC_PREFIX": deployment.topics.prefix, "CASCADE_DATA_DIR": deployment.env["CASCADE_DATA_DIR"]}
    report = deployment.log_dir / "drift.json"
    args = ["drift", "--broker", deployment.url, "--thresholds", str(deployment.thresholds)]
    result = CliRunner().invoke(app, [*args, "--min-items", "20", "--json", str(report)], env=env)
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["items"] == 80 and "No stage or category moved" in result.output
    later = CliRunner().invoke(app, [*args, "--since", "2999-01-01T00:00:00Z"], env=env)
    assert later.exit_code == 2 and "no verdicts" in later.output
