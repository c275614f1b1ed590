"""Every Kafka topic name the stream layer uses, in one place.

`{prefix}moderation.content` is the input (ContentItem JSON, key = item id). Between two
consecutive stages runs `{prefix}moderation.escalate.<stage>`, named after the stage it feeds.
Verdicts go to `{prefix}moderation.verdicts.<allow|block|review>`, unusable input to
`{prefix}moderation.deadletter`. A sampled share of automatic verdicts is copied to
`{prefix}moderation.audit` for human review (docs/drift.md); the review app reads it and
`moderation.appeals`, and writes `moderation.decisions`. Keys are item ids on every topic. The prefix is prepended
verbatim (e.g. `staging.`), so one cluster can host several deployments.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cascade.contract import Decision

CONTENT = "moderation.content"
ESCALATE = "moderation.escalate."
VERDICTS = "moderation.verdicts."
DEADLETTER = "moderation.deadletter"
AUDIT = "moderation.audit"
DECISIONS = "moderation.decisions"  # human review decisions (cascade.review)
APPEALS = "moderation.appeals"  # appeals against blocks, read by the review app


@dataclass(frozen=True)
class Topics:
    prefix: str = ""

    @property
    def content(self) -> str:
        return f"{self.prefix}{CONTENT}"

    @property
    def deadletter(self) -> str:
        return f"{self.prefix}{DEADLETTER}"

    @property
    def audit(self) -> str:
        """Copies of automatic verdicts sampled for review as audits (not verdicts: consumers of verdicts skip it)."""
        return f"{self.prefix}{AUDIT}"

    @property
    def decisions(self) -> str:
        return f"{self.prefix}{DECISIONS}"

    @property
    def appeals(self) -> str:
        return f"{self.prefix}{APPEALS}"

    def escalate(self, stage: str) -> str:
        """The input topic of `stage` when it is not the first stage of the cascade."""
        return f"{self.prefix}{ESCALATE}{stage}"

    def verdicts(self, decision: Decision | str) -> str:
        return f"{self.prefix}{VERDICTS}{Decision(decision).value}"

    @property
    def all_verdicts(self) -> list[str]:
        return [self.verdicts(d) for d in Decision]

    def stage_input(self, cascade: Sequence[str], index: int) -> str:
        """Where stage `index` of `cascade` reads: the content topic for the first, else its escalation topic."""
        return self.content if index == 0 else self.escalate(cascade[index])

    def all_topics(self, cascade: Sequence[str]) -> list[str]:
        """Every topic a deployment running `cascade` (stage names in order) needs."""
        return [
            self.content,
            *(self.escalate(stage) for stage in cascade[1:]),
            *self.all_verdicts,
            self.deadletter,
            self.audit,
        ]
