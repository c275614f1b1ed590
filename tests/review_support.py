"""Verdicts as the cascade makes them, for the review tests (store, page, stream)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from cascade.contract import BandOutcome, ContentItem, Decision, StageAction, TraceEntry, Verdict
from cascade.stream.local import WorkerProcess

XSS_PAYLOAD = "<script>document.title='pwned'</script><img src=x onerror=\"document.title='pwned'\"> & \"quotes\""


def cascade_verdict(
    item_id: str,
    text: str,
    decision: Decision = Decision.REVIEW,
    scores: dict[str, float] | None = None,
    surface: str | None = None,
    rationale: str | None = "the model was unsure",
) -> Verdict:
    """A verdict after hash → retrieval → classifier → llm, with neighbours and an LLM rationale."""
    scores = scores if scores is not None else {"toxic": 0.55, "flagged": 0.6}
    block = decision is Decision.BLOCK
    trace = [
        TraceEntry(stage="hash", stage_version="h1", result=StageAction.ESCALATE, latency_ms=0.1),
        TraceEntry(
            stage="retrieval",
            stage_version="r1",
            scores=scores,
            outcomes=dict.fromkeys(scores, BandOutcome.UNRESOLVED),
            result=StageAction.ESCALATE,
            latency_ms=9.0,
        ),
        TraceEntry(
            stage="llm",
            stage_version="l1",
            scores=scores,
            outcomes=dict.fromkeys(scores, BandOutcome.BLOCK if block else BandOutcome.UNRESOLVED),
            result=StageAction(decision.value),
            latency_ms=300.0,
            note=rationale,
        ),
    ]
    neighbours = [
        {
            "id": "ex-1",
            "text": "a close exemplar <b>bold?</b>",
            "flagged": 1,
            "labels": {"toxic": 1},
            "similarity": 0.81,
        }
    ]
    return Verdict(
        id=item_id,
        decision=decision,
        categories=scores,
        flagged_categories=[c for c in scores if c != "flagged"] if block else [],
        decided_by="pipeline" if decision is Decision.REVIEW else "llm",
        reason="needs human review: unresolved" if decision is Decision.REVIEW else f"{decision.value} by llm",
        trace=trace,
        policy_version="policy-test",
        thresholds_version="thresholds-test",
        item=ContentItem(id=item_id, text=text, surface=surface),
        evidence={"neighbours": neighbours} if not block else None,
    )


class ReviewProcess(WorkerProcess):
    """`cascade review serve` as a child process, exactly as an operator (or a pod) runs it; ready on /readyz."""

    def __init__(self, broker_url: str, data_dir: Path, env: dict[str, str], log_path: Path) -> None:
        super().__init__(broker_url, log_path=log_path, env={**env, "CASCADE_DATA_DIR": str(data_dir)})
        self.command = [sys.executable, "-c", "from cascade.cli import main; main()", "review", "serve"]
        self.command += ["--host", "127.0.0.1", "--port", str(self.health_port), "--broker", broker_url]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.health_port}"


def csrf_of(body: str) -> str:
    """The CSRF token of the first form on a page."""
    match = re.search(r'name="csrf_token" value="([^"]+)"', body)
    assert match, "no CSRF field on the page"
    return match.group(1)
