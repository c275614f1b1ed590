"""The data contract: what enters the cascade and what leaves it.

`ContentItem` is validated at the edge (see `cascade.intake`); `Verdict` and `DeadLetter`
are what consumers read. JSON Schemas under `schemas/` are generated from these models
(`cascade schemas --write`) and a test keeps them current.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = "1"
MAX_ID_CHARS = 512
# A surface name: where content appeared (chat_prompt, post, sms, ...). Threshold files key band sets by it.
SURFACE_PATTERN = r"^[a-z][a-z0-9_]{0,31}$"
DEFAULT_BAND_SET = "default"


def utc_now() -> datetime:
    return datetime.now(UTC)


class Decision(StrEnum):
    ALLOW = "allow"
    BLOCK = "block"
    REVIEW = "review"


class BandOutcome(StrEnum):
    """What one stage's band said about one category."""

    CLEARED = "cleared"
    BLOCK = "block"
    UNRESOLVED = "unresolved"


class StageAction(StrEnum):
    """What one stage did with one item overall."""

    ALLOW = "allow"
    BLOCK = "block"
    ESCALATE = "escalate"
    REVIEW = "review"


class ContentItem(BaseModel):
    """One piece of user content to moderate.

    Size limits are enforced by `cascade.intake`, which knows the configured settings.
    Unknown fields are forbidden here; with `CASCADE_REJECT_UNKNOWN_FIELDS=false` intake
    drops them before validation instead of dead-lettering the item.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(
        min_length=1, max_length=MAX_ID_CHARS, description="Platform id of the item; verdicts are keyed by it."
    )
    text: str = Field(min_length=1, description="The content to moderate (UTF-8).")
    lang: str | None = Field(default=None, max_length=35, description="BCP-47 language tag, if known.")
    author_id: str | None = Field(default=None, max_length=512)
    context: str | None = Field(default=None, description="Surrounding content (e.g. the post replied to).")
    surface: str | None = Field(
        default=None,
        pattern=SURFACE_PATTERN,
        description="Where the content appeared (e.g. chat_prompt, post, comment, dm, sms); selects per-surface bands.",
    )
    metadata: dict[str, Any] | None = Field(default=None, description="Free-form JSON object, passed through.")
    created_at: datetime | None = None


class TraceEntry(BaseModel):
    """What one stage did with one item."""

    model_config = ConfigDict(extra="forbid")

    stage: str
    stage_version: str
    scores: dict[str, float] = Field(default_factory=dict, description="Per-category score in [0, 1].")
    outcomes: dict[str, BandOutcome] = Field(default_factory=dict, description="Band outcome per category.")
    result: StageAction = Field(description="What this stage did with the item.")
    matched: bool = Field(default=False, description="Decided by a definitive match (e.g. a bank entry), not by bands.")
    error: str | None = Field(default=None, description="Why the stage could not judge the item; it escalated.")
    latency_ms: float = Field(ge=0, description="Wall time of the stage's batch, shared by its items.")
    cost_usd: float = Field(default=0.0, ge=0)
    note: str | None = Field(default=None, description="Human-readable evidence for the outcome.")
    details: dict[str, Any] = Field(default_factory=dict, description="Stage-specific evidence (matches, neighbours).")


class ShadowDecision(BaseModel):
    model_config = ConfigDict(extra="forbid")

    thresholds_version: str
    decision: Decision
    decided_by: str


class Verdict(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: Literal["1"] = SCHEMA_VERSION
    id: str
    decision: Decision
    categories: dict[str, float] = Field(description="Latest score per category over the stages reached.")
    flagged_categories: list[str] = Field(default_factory=list)
    decided_by: str = Field(description="Stage that settled the item, or 'pipeline' when none could.")
    reason: str
    trace: list[TraceEntry]
    policy_version: str
    thresholds_version: str
    band_set: str = Field(
        default=DEFAULT_BAND_SET,
        description="Band set of the threshold file that decided: the item's surface, or 'default' when the file "
        "has no bands for that surface.",
    )
    score: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="Calibrated probability that the item violates the policy: the largest calibrated category "
        "probability of the stage that decided (or the last that scored); comparable across stages. Null when no "
        "stage scored it.",
    )
    processed_at: datetime = Field(default_factory=utc_now)
    shadow: ShadowDecision | None = Field(default=None, description="Decision under shadow thresholds; never acted on.")
    item: ContentItem | None = Field(
        default=None, description="The item judged: what human review, appeals and audits show."
    )
    evidence: dict[str, Any] | None = Field(
        default=None, description="Evidence gathered on the way (retrieval neighbours), on review verdicts only."
    )


HUMAN = "human"  # `decided_by` of a verdict a reviewer made (cascade.review)


class AppealRuling(StrEnum):
    UPHELD = "upheld"
    OVERTURNED = "overturned"


class ReviewDecision(BaseModel):
    """A reviewer's decision on one item, published on `moderation.decisions` keyed by item id.

    The same outcome also goes to `moderation.verdicts.allow|block` as a Verdict with
    `decided_by: "human"`, which supersedes the cascade's `review` (or appealed `block`) verdict.
    """

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal["1"] = SCHEMA_VERSION
    decision_id: str = Field(description="Unique per decision; consumers dedupe redeliveries by it.")
    id: str = Field(description="The item id (also the message key).")
    decision: Literal["allow", "block"]
    categories: list[str] = Field(default_factory=list, description="Policy categories violated (block only).")
    reviewer: str
    decided_at: datetime
    policy_version: str
    appeal: bool = Field(default=False, description="True when this decides an appeal.")
    appeal_outcome: AppealRuling | None = Field(default=None, description="Upheld or overturned, for appeals.")
    audit: bool = Field(default=False, description="True when this decides an audit sample (moderation.audit).")
    settles: Verdict = Field(description="The cascade (or earlier human) verdict this decision settles.")


class Appeal(BaseModel):
    """An appeal against a block, read from `moderation.appeals` (key: item id)."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal["1"] = SCHEMA_VERSION
    id: str = Field(min_length=1, max_length=512, description="The id of the blocked item.")
    reason: str = Field(min_length=1, max_length=4000)
    author: str | None = Field(default=None, max_length=512, description="Who appeals (e.g. the item's author).")
    appealed_at: datetime = Field(default_factory=utc_now)


class DeadLetterCode(StrEnum):
    LINE_TOO_LARGE = "line_too_large"
    INVALID_UTF8 = "invalid_utf8"
    MALFORMED_JSON = "malformed_json"
    NOT_AN_OBJECT = "not_an_object"
    MISSING_FIELD = "missing_field"
    WRONG_TYPE = "wrong_type"
    EMPTY_TEXT = "empty_text"
    TEXT_TOO_LARGE = "text_too_large"
    UNKNOWN_FIELD = "unknown_field"
    INVALID_TEXT = "invalid_text"
    INVALID_VALUE = "invalid_value"
    PROCESSING_ERROR = "processing_error"
    # An item whose output (verdict or escalation record) the broker cannot take: too large, or
    # refused for another permanent reason (invalid topic, authorization).
    OUTPUT_TOO_LARGE = "output_too_large"
    OUTPUT_REFUSED = "output_refused"


class DeadLetter(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: Literal["1"] = SCHEMA_VERSION
    error_code: DeadLetterCode
    message: str
    payload: str = Field(description="The raw payload: UTF-8 text, or base64 when it was not valid UTF-8.")
    payload_encoding: Literal["utf-8", "base64"]
    payload_truncated: bool = Field(default=False, description="True when only a prefix of a huge payload is kept.")
    payload_bytes: int | None = Field(
        default=None, ge=0, description="Size of the original payload in bytes, before any truncation."
    )
    id: str | None = Field(default=None, description="The item id, when one could be read.")
    source: str | None = Field(
        default=None, description="Where it came from, e.g. 'file.jsonl:17' or 'topic[p]@offset'."
    )
    received_at: datetime = Field(default_factory=utc_now)


CONTRACT_MODELS: dict[str, type[BaseModel]] = {
    "content_item": ContentItem,
    "verdict": Verdict,
    "dead_letter": DeadLetter,
    "review_decision": ReviewDecision,
    "appeal": Appeal,
}


def json_schemas() -> dict[str, str]:
    """File name → JSON Schema text for every contract model (what `schemas/` holds)."""
    import json

    return {
        f"{name}.schema.json": json.dumps(model.model_json_schema(mode="serialization"), indent=2, sort_keys=True)
        + "\n"
        for name, model in CONTRACT_MODELS.items()
    }
