"""The `guard` backend: safety classifiers served behind chat completions (vLLM, Ollama, llama.cpp).

Two answer formats (`llm_guard_format`):

- `llama_guard` (Llama Guard 3/4): the item goes as the conversation (the server applies the
  model's template), the answer is `safe`, or `unsafe` and a line of hazard codes `S1,S10`.
  P(unsafe) comes from the first answer token's logprobs (`safe` vs `unsafe` mass) when the
  server returns them, else from the categorical answer (0.95 / 0.05). Cited codes map to
  policy categories through `backends.yaml`; those categories score P(unsafe), the other
  reachable ones min(P(unsafe), 1 − P(unsafe)) (the model did not cite them), `flagged` P(unsafe).
- `shieldgemma`: one request per principle in `backends.yaml`, answer `Yes` or `No`; P(Yes)
  (from logprobs, else categorical) scores the principle's categories; `flagged` is the highest.

Anything else in the answer is an error (the item goes to review), never a guess. gpt-oss-safeguard
takes a written policy: use the `chat` backend with it (docs/llm.md).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from openai.types.chat import ChatCompletion

from cascade.data import FLAGGED
from cascade.llm.backends.base import Adjudication, Backend, Connection
from cascade.llm.pricing import Price
from cascade.llm.verdict import NOT_VIOLATING_SCORE, SEVERITY_SCORE, InvalidOutput
from cascade.settings import GuardFormat
from cascade.stages.base import ItemContext

MAX_ANSWER_TOKENS = {"llama_guard": 20, "shieldgemma": 4}
CATEGORICAL = {True: SEVERITY_SCORE["high"], False: NOT_VIOLATING_SCORE}
_CODE = re.compile(r"S\d{1,2}")
_WORD = re.compile(r"[a-z]+")
# ShieldGemma's prompt (model card). `<` and `>` in content are replaced so it cannot close a turn.
_SHIELDGEMMA_PROMPT = """\
You are a policy expert trying to help determine whether a user prompt is in violation of the defined safety policies.

<start_of_turn>
Human Question: {text}
<end_of_turn>

Our safety principle is defined in the below:

* {principle}

Does the human question violate the above principle? Your answer must start with 'Yes' or 'No'. \
And then walk through step by step to be sure we answer correctly."""


def answer_probability(tokens: Sequence[Any], positive: str, negative: str) -> float | None:
    """P(positive) from the first non-blank answer token's top logprobs, or None if not readable.

    Alternatives are matched by their lower-cased letters: `unsafe` vs `safe`, `yes` vs `no`.
    """
    for token in tokens:
        if not token.token.strip():
            continue
        mass = {positive: 0.0, negative: 0.0}
        alternatives = [(a.token, a.logprob) for a in token.top_logprobs or ()] or [(token.token, token.logprob)]
        for text, logprob in alternatives:
            word = "".join(_WORD.findall(text.lower()))
            if word in mass:
                mass[word] += math.exp(logprob)
        total = mass[positive] + mass[negative]
        if total <= 0:
            return None
        if mass[positive] > 0 and mass[negative] > 0:
            return mass[positive] / total
        chosen = "".join(_WORD.findall(token.token.lower()))
        seen = min(mass[chosen], 1.0) if chosen in mass else None
        if seen is None:
            return None
        return seen if chosen == positive else 1.0 - seen
    return None


def parse_llama_guard(content: str | None) -> tuple[bool, list[str]]:
    """`safe` → (False, []); `unsafe\\nS1,S10` → (True, ["S1", "S10"]); anything else is invalid."""
    lines = [line.strip() for line in (content or "").strip().splitlines() if line.strip()]
    if not lines:
        raise InvalidOutput("the guard's reply was empty")
    head = lines[0].lower()
    if head == "safe" and len(lines) == 1:
        return False, []
    if head != "unsafe" or len(lines) > 2:
        raise InvalidOutput(f"the guard's reply is not 'safe' or 'unsafe' + codes: {content[:80]!r}")
    codes = [c.strip() for c in lines[1].split(",")] if len(lines) == 2 else []
    bad = [c for c in codes if not _CODE.fullmatch(c)]
    if bad:
        raise InvalidOutput(f"the guard's reply holds unknown hazard codes: {', '.join(bad)[:80]}")
    return True, codes


def parse_yes_no(content: str | None) -> bool:
    words = _WORD.findall((content or "").strip().lower()[:12])
    if not words or words[0] not in ("yes", "no"):
        raise InvalidOutput(f"the guard's reply does not start with Yes or No: {(content or '')[:80]!r}")
    return words[0] == "yes"


class GuardBackend(Backend):
    kind = "guard"

    def __init__(
        self,
        guard_format: GuardFormat,
        model: str,
        price: Price | None,
        secret: str | None,
        mapping: Mapping[str, Any],
        logprobs: bool,
        max_text_chars: int,
    ) -> None:
        self.format = guard_format
        if guard_format == "shieldgemma":
            self.principles = {name: (str(v["principle"]), tuple(v["categories"])) for name, v in mapping.items()}
            reachable = {c for _, targets in self.principles.values() for c in targets}
        else:
            self.hazards = {code: tuple(targets or ()) for code, targets in mapping.items()}
            reachable = {c for targets in self.hazards.values() for c in targets}
        super().__init__(model, price, secret, sorted(reachable))
        self.requests_per_item = float(len(self.principles)) if guard_format == "shieldgemma" else 1.0
        self.logprobs = logprobs
        self.max_text_chars = max_text_chars
        digest = hashlib.sha256(json.dumps(mapping, sort_keys=True).encode()).hexdigest()[:12]
        self._identity = f"guard-{guard_format}+{model}+map-{digest}"

    @property
    def identity(self) -> str:
        return self._identity

    def estimate_usd(self, ctx: ItemContext) -> float:
        chars = len(ctx.item.text[: self.max_text_chars]) + len(ctx.item.context or "")
        if self.format == "shieldgemma":
            return sum(
                self.estimated_cost(chars + len(_SHIELDGEMMA_PROMPT) + len(p), MAX_ANSWER_TOKENS["shieldgemma"])
                for p, _ in self.principles.values()
            )
        return self.estimated_cost(chars + 2000, MAX_ANSWER_TOKENS["llama_guard"])  # the template's taxonomy

    async def _judge(self, conn: Connection, ctx: ItemContext, outcome: Adjudication) -> None:
        if self.format == "shieldgemma":
            await self._shieldgemma(conn, ctx, outcome)
        else:
            await self._llama_guard(conn, ctx, outcome)

    async def _ask(self, conn: Connection, messages: list[dict[str, str]], outcome: Adjudication) -> ChatCompletion:
        completion: ChatCompletion = await self.send_asking_logprobs(
            conn,
            outcome,
            lambda extra: (
                lambda client: client.chat.completions.create(
                    model=self.model,
                    messages=messages,  # type: ignore[arg-type]
                    temperature=0,
                    max_tokens=MAX_ANSWER_TOKENS[self.format],  # llama-cpp-python ignores max_completion_tokens
                    **extra,
                )
            ),
        )
        self.record_usage(outcome, completion.usage, completion.model)
        if not completion.choices:
            raise InvalidOutput("the reply has no choices")
        return completion

    async def _llama_guard(self, conn: Connection, ctx: ItemContext, outcome: Adjudication) -> None:
        text = ctx.item.text[: self.max_text_chars]
        # With a context, the item is the reply in a two-turn conversation: the template judges the last turn.
        messages = [{"role": "user", "content": text}]
        if ctx.item.context:
            messages = [
                {"role": "user", "content": ctx.item.context[: self.max_text_chars // 2]},
                {"role": "assistant", "content": text},
            ]
        completion = await self._ask(conn, messages, outcome)
        choice = completion.choices[0]
        unsafe, codes = parse_llama_guard(choice.message.content)
        tokens = choice.logprobs.content if choice.logprobs is not None and choice.logprobs.content else []
        measured = answer_probability(tokens, "unsafe", "safe")
        p_unsafe = CATEGORICAL[unsafe] if measured is None else measured
        cited = {c for code in codes for c in self.hazards.get(code, ())}
        uncited = min(p_unsafe, 1.0 - p_unsafe)
        scores = {c: (p_unsafe if c in cited or not unsafe else uncited) for c in self.categories}
        scores[FLAGGED] = p_unsafe
        outcome.scores = {name: round(value, 4) for name, value in scores.items()}
        outcome.rationale = f"llama guard: unsafe {','.join(codes)}" if unsafe else "llama guard: safe"
        outcome.details.update(
            score_source="mapped" if measured is None else "logprobs",
            hazard_codes=codes,
            unmapped_codes=[c for c in codes if c not in self.hazards],
        )

    async def _shieldgemma(self, conn: Connection, ctx: ItemContext, outcome: Adjudication) -> None:
        text = ctx.item.text[: self.max_text_chars].replace("<", "‹").replace(">", "›")
        names = list(self.principles)
        completions = await asyncio.gather(
            *(
                self._ask(
                    conn,
                    [{"role": "user", "content": _SHIELDGEMMA_PROMPT.format(text=text, principle=principle)}],
                    outcome,
                )
                for principle, _ in self.principles.values()
            )
        )
        scores: dict[str, float] = {}
        by_principle: dict[str, float] = {}
        sources = set()
        for name, completion in zip(names, completions, strict=True):
            choice = completion.choices[0]
            violates = parse_yes_no(choice.message.content)
            tokens = choice.logprobs.content if choice.logprobs is not None and choice.logprobs.content else []
            measured = answer_probability(tokens, "yes", "no")
            sources.add("mapped" if measured is None else "logprobs")
            p_yes = CATEGORICAL[violates] if measured is None else measured
            by_principle[name] = p_yes
            for category in self.principles[name][1]:
                scores[category] = max(scores.get(category, 0.0), p_yes)
        scores[FLAGGED] = max(by_principle.values())
        outcome.scores = {name: round(value, 4) for name, value in scores.items()}
        outcome.rationale = "shieldgemma: " + ", ".join(f"{n} {p:.2f}" for n, p in by_principle.items())
        outcome.details.update(score_source=sources.pop() if len(sources) == 1 else "mixed", principles=by_principle)
