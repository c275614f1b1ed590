"""The one interface every stage implements, and the per-item context they share."""

from __future__ import annotations

import base64
import json
import unicodedata
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np
import xxhash

from cascade.contract import ContentItem, Decision, TraceEntry
from cascade.settings import Settings

if TYPE_CHECKING:
    from cascade.embedding import Embedder


# The `ItemContext.evidence` entry of the retrieval stage's neighbours: the LLM's few-shot examples.
NEIGHBOURS_KEY = "neighbours"


@dataclass
class ItemContext:
    """One item on its way through the cascade.

    Stages share work through it: `normalized` and `text_key` (the hash bank's matching key)
    are computed once at intake, `embedding` once by whichever stage first needs it,
    `head_scores` are the tuned encoder's head scores from that same pass (the classifier
    stage's scores; None with a frozen encoder), `evidence` carries what a later stage may
    use (e.g. retrieval neighbours as few-shot examples for the LLM). It crosses Kafka
    between stage workers, so everything in it must survive `to_wire`/`from_wire`.
    """

    item: ContentItem
    normalized: str
    text_key: str
    embedding: np.ndarray | None = None
    head_scores: dict[str, float] | None = None
    evidence: dict[str, Any] = field(default_factory=dict)
    trace: list[TraceEntry] = field(default_factory=list)
    source: str | None = None

    @cached_property
    def content_key(self) -> str:
        """Key of the text up to case, Unicode form and spacing, for caches of model outputs.

        Not `text_key`: that normalisation is a lossy matching key ("good" and "god" share
        one), right for finding evasive copies in a bank, wrong for reusing a judgement.
        """
        folded = " ".join(unicodedata.normalize("NFKC", self.item.text).casefold().split())
        return xxhash.xxh3_128_hexdigest(folded.encode("utf-8"))

    def to_wire(self) -> bytes:
        doc: dict[str, Any] = {
            "item": self.item.model_dump(mode="json", exclude_none=True),
            "normalized": self.normalized,
            "text_key": self.text_key,
            "evidence": self.evidence,
            "trace": [t.model_dump(mode="json") for t in self.trace],
            "source": self.source,
        }
        if self.embedding is not None:
            doc["embedding"] = base64.b64encode(np.asarray(self.embedding, dtype="<f4").tobytes()).decode("ascii")
        if self.head_scores is not None:
            doc["head_scores"] = self.head_scores
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_wire(cls, data: bytes) -> ItemContext:
        doc = json.loads(data)
        embedding = doc.get("embedding")
        return cls(
            item=ContentItem.model_validate(doc["item"]),
            normalized=doc["normalized"],
            text_key=doc["text_key"],
            embedding=None if embedding is None else np.frombuffer(base64.b64decode(embedding), dtype="<f4").copy(),
            head_scores=doc.get("head_scores"),
            evidence=doc.get("evidence", {}),
            trace=[TraceEntry.model_validate(t) for t in doc.get("trace", [])],
            source=doc.get("source"),
        )


@dataclass(frozen=True)
class Match:
    """A definitive decision that bypasses the bands (e.g. a known-bad hash)."""

    decision: Decision
    categories: tuple[str, ...]
    reason: str


@dataclass
class StageResult:
    """What a stage says about one item.

    `scores` are per-category in [0, 1] and go through the stage's bands. `match`, when set,
    decides the item outright. `error` means the stage could not judge this item: the item
    escalates (or goes to review after the last stage), never gets cleared by default.
    `evidence`, when set, builds entries of `ItemContext.evidence` for later stages and the
    review verdict; the pipeline calls it only for an item the stage's bands leave unsettled,
    so what only an escalated item uses is not built for the majority a stage decides.
    """

    scores: dict[str, float] = field(default_factory=dict)
    match: Match | None = None
    error: str | None = None
    note: str | None = None
    cost_usd: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)
    evidence: Callable[[], dict[str, Any]] | None = None


class Resources:
    """Heavy objects that several stages share within one process (one embedder, loaded lazily).

    Next to the interface, not in `cascade.assembly`: every stage takes it, and the assembly
    imports every stage, so it living there made an import cycle.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._embedder: Embedder | None = None

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            from cascade.embedding import Embedder

            self._embedder = Embedder.from_settings(self.settings)
        return self._embedder


class StageUnavailable(RuntimeError):
    """A stage cannot be built in this installation or configuration; the message says why and what to do.

    The cascade still runs: the stage is replaced by one that reports this reason, so its items
    escalate to the next stage (or go to review) instead of being decided without it.
    """


class Stage(ABC):
    """A cascade stage. Subclasses set `name` and `version` and implement `score`.

    `score` takes a batch and returns one result per item, in order. It may raise: the
    pipeline turns an exception into an error result for every item of the batch.
    """

    name: str
    version: str
    # Each call costs money (a paid API): evaluation runs and the bench never call such a stage.
    # The billed stage is the cascade's costly adjudicator: "LLM calls" count the items reaching it.
    billed: bool = False
    # Assumed cost of one item through the stage, relative to one call of the billed stage (1.0):
    # evaluation's cost model (`cascade.assembly.relative_costs`). Every registered stage sets it.
    relative_cost: float

    @classmethod
    def from_settings(cls, settings: Settings, resources: Resources) -> Stage:
        """Build the stage as the cascade does (`cascade.assembly.build_stages`); StageUnavailable if it cannot be.

        Every registered stage implements it; stand-ins built otherwise (deferred, unavailable) do not.
        """
        raise NotImplementedError(f"{cls.__name__} is not built from settings")

    @property
    def unavailable_reason(self) -> str | None:
        """Why the stage cannot run at all right now (e.g. no endpoint configured), else None."""
        return None

    @abstractmethod
    async def score(self, batch: Sequence[ItemContext]) -> list[StageResult]: ...

    async def aclose(self) -> None:  # noqa: B027 - optional hook, most stages hold nothing to release
        """Release connections and files."""
