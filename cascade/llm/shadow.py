"""The shadow model: a second backend judging a sample of LLM-bound items, never acting.

Its answer is kept in the trace (`details.shadow_model`) beside the primary's, and the two are
compared on the models' own verdict: `flagged` at or above 0.5, or not. The agreement rate is
the launch gate before switching models or prompts: `cascade evaluate --live` reports it from
the verdicts, the workers count it on `/metrics` (`cascade_llm_shadow_total{agreement}`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from prometheus_client import Counter

from cascade.contract import Verdict
from cascade.data import FLAGGED

DETAILS_KEY = "shadow_model"
FLAG_AT = 0.5

SHADOW_ITEMS = Counter(
    "cascade_llm_shadow_total",
    "LLM-bound items the shadow model also judged, by agreement with the primary (agree, disagree, error).",
    ["agreement"],
)
ANSWERS = Counter("cascade_llm_answers_total", "LLM adjudications, by the route that answered.", ["route"])


def sampled(content_key: str, share: float) -> bool:
    """Whether this content is in the shadow sample: a pure function of the text, so reruns agree."""
    return share > 0 and int(content_key[:8], 16) < share * 0x1_0000_0000


def flags(scores: Mapping[str, float]) -> bool | None:
    score = scores.get(FLAGGED)
    return None if score is None else score >= FLAG_AT


def compare(primary: Mapping[str, float] | None, shadow: Mapping[str, float] | None) -> str:
    """`agree`, `disagree`, or `error` when either side has no verdict."""
    ours, theirs = flags(primary or {}), flags(shadow or {})
    if ours is None or theirs is None:
        return "error"
    return "agree" if ours == theirs else "disagree"


def shadow_agreement(verdicts: Sequence[Verdict]) -> dict[str, Any] | None:
    """Agreement of the shadow model with the primary over the verdicts' LLM trace entries; None if none."""
    counts = {"agree": 0, "disagree": 0, "error": 0}
    disagreements = {"primary_only_flagged": 0, "shadow_only_flagged": 0}
    shadow_label = None
    for verdict in verdicts:
        for entry in verdict.trace:
            shadow = entry.details.get(DETAILS_KEY)  # only the adjudicating stage writes it
            if not isinstance(shadow, dict) or entry.details.get("cache") != "miss":
                continue
            shadow_label = shadow.get("route", shadow_label)
            counts[shadow.get("agreement", "error")] += 1
            if shadow.get("agreement") == "disagree":
                key = "primary_only_flagged" if flags(entry.scores) else "shadow_only_flagged"
                disagreements[key] += 1
    judged = counts["agree"] + counts["disagree"]
    if judged + counts["error"] == 0:
        return None
    return {
        "shadow": shadow_label,
        "shadowed": judged + counts["error"],
        **counts,
        **disagreements,
        "agreement_rate": counts["agree"] / judged if judged else None,
    }
