"""The model's reply: validation, and per-category probabilities from it.

Scores come from the verdict tokens' logprobs when the server returns them, else from the
categorical answer (see `mapped_score`). `flagged` is the union: never below any category.
"""

from __future__ import annotations

import bisect
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from cascade.data import FLAGGED

Severity = Literal["none", "low", "medium", "high"]
Confidence = Literal["low", "medium", "high"]

# The categorical mapping, used when no logprobs come back: a violation scores by its stated
# severity, a non-violation low, and lower confidence pulls the score toward 0.5 (undecided).
SEVERITY_SCORE: dict[str, float] = {"low": 0.65, "medium": 0.8, "high": 0.95}
NOT_VIOLATING_SCORE = 0.05
CONFIDENCE_WEIGHT: dict[str, float] = {"high": 1.0, "medium": 0.8, "low": 0.5}
_SEVERITY_ORDER = ("none", "low", "medium", "high")
_FENCE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.DOTALL)
_VALUE_PUNCTUATION = ' \t\r\n":{},'


class InvalidOutput(ValueError):
    """The model's reply is not a valid verdict; the message says why, for the repair prompt."""


class CategoryJudgement(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    violates: bool
    severity: Severity

    @model_validator(mode="after")
    def _consistent(self) -> CategoryJudgement:
        if self.violates == (self.severity == "none"):
            raise ValueError('severity must be "none" exactly when violates is false')
        return self


class ModelVerdict(BaseModel):
    # Extra keys are rejected, as the request's schema (additionalProperties: false) says.
    model_config = ConfigDict(strict=True, extra="forbid")

    rationale: str
    categories: dict[str, CategoryJudgement]
    flagged: bool
    confidence: Confidence

    @property
    def max_severity(self) -> str:
        return max((j.severity for j in self.categories.values()), key=_SEVERITY_ORDER.index, default="none")


def parse_verdict(content: str | None, categories: Sequence[str]) -> ModelVerdict:
    """Validate a reply against the output contract; raise `InvalidOutput` with a short reason."""
    if not content or not content.strip():
        raise InvalidOutput("the reply was empty")
    fenced = _FENCE.match(content)
    text = fenced.group(1) if fenced else content
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidOutput(f"the reply is not JSON ({exc.msg} at character {exc.pos})") from None
    if not isinstance(raw, dict):
        raise InvalidOutput(f"the reply is a JSON {type(raw).__name__}, not an object")
    try:
        verdict = ModelVerdict.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'reply'}: {err['msg']}" for err in exc.errors()[:4]
        )
        raise InvalidOutput(f"the reply does not match the schema ({problems})") from None
    missing = [c for c in categories if c not in verdict.categories]
    if missing:
        raise InvalidOutput(f"the reply lacks categories: {', '.join(missing)}")
    return verdict


def mapped_score(violates: bool, severity: str, confidence: str) -> float:
    base = SEVERITY_SCORE.get(severity, SEVERITY_SCORE["low"]) if violates else NOT_VIOLATING_SCORE
    return round(0.5 + (base - 0.5) * CONFIDENCE_WEIGHT[confidence], 4)


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


def _boolean_patterns(categories: Sequence[str]) -> dict[str, re.Pattern[str]]:
    # A bare `"name"` cannot occur inside a JSON string (its quotes are escaped), so these find
    # the real keys whatever the rationale says.
    patterns = {c: re.compile(rf'"{re.escape(c)}"\s*:\s*\{{[^{{}}]*?"violates"\s*:\s*(true|false)') for c in categories}
    patterns[FLAGGED] = re.compile(r'"flagged"\s*:\s*(true|false)')
    return patterns


def verdict_token_probabilities(
    content: str, tokens: Sequence[TokenLogprob], categories: Sequence[str]
) -> dict[str, float]:
    """P(true) of each category's `violates` token and of `flagged`, where the tokens show it.

    Uses the top alternatives at the token where the value starts: the mass on tokens that
    spell the start of `true` against those that spell `false`. Returns {} when the tokens do
    not reproduce the content (then offsets cannot be trusted).
    """
    if not tokens or "".join(t.token for t in tokens) != content:
        return {}
    starts, offset = [], 0
    for t in tokens:
        starts.append(offset)
        offset += len(t.token)
    probabilities: dict[str, float] = {}
    for name, pattern in _boolean_patterns(categories).items():
        match = pattern.search(content)
        if match is None:
            continue
        token = tokens[bisect.bisect_right(starts, match.start(1)) - 1]
        probability = _p_true(token, chosen_true=match.group(1) == "true")
        if probability is not None:
            probabilities[name] = probability
    return probabilities


def _p_true(token: TokenLogprob, chosen_true: bool) -> float | None:
    mass = {True: 0.0, False: 0.0}
    alternatives = token.top or ((token.token, token.logprob),)
    for text, logprob in alternatives:
        word = text.strip(_VALUE_PUNCTUATION).lower()
        if word and "true".startswith(word):
            mass[True] += math.exp(logprob)
        elif word and "false".startswith(word):
            mass[False] += math.exp(logprob)
    if mass[True] + mass[False] <= 0:
        return None
    if mass[True] > 0 and mass[False] > 0:
        return mass[True] / (mass[True] + mass[False])
    seen = min(mass[chosen_true], 1.0)  # only the chosen side is visible: the rest is the other
    return seen if chosen_true else 1.0 - seen


def score_verdict(
    verdict: ModelVerdict, categories: Sequence[str], token_probabilities: dict[str, float]
) -> tuple[dict[str, float], str]:
    """Per-category scores and where they came from: 'logprobs', 'mapped' or 'mixed'."""
    scores: dict[str, float] = {}
    for name in categories:
        judgement = verdict.categories[name]
        scores[name] = token_probabilities.get(
            name, mapped_score(judgement.violates, judgement.severity, verdict.confidence)
        )
    flagged_severity = verdict.max_severity if verdict.max_severity != "none" else "low"
    own = token_probabilities.get(FLAGGED, mapped_score(verdict.flagged, flagged_severity, verdict.confidence))
    scores[FLAGGED] = max([own, *scores.values()])
    located = sum(1 for name in [*categories, FLAGGED] if name in token_probabilities)
    source = "logprobs" if located == len(categories) + 1 else "mapped" if located == 0 else "mixed"
    return {name: round(score, 4) for name, score in scores.items()}, source
