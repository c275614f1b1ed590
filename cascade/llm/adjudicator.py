"""One adjudication: the chat completion request(s) for one item, validated and scored.

Structured output is requested as a strict `json_schema`. A server that rejects it (HTTP 400,
or 500 as llama-cpp-python answers) gets the same request in JSON mode; when that works the
choice is remembered for the process. An invalid reply gets one repair request; a second
invalid reply is an error, so the item goes to review. Transport and status errors (after the
client's own retries with backoff) come back as errors too: nothing here raises.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import openai
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletion

from cascade.llm.pricing import Price, cost_usd
from cascade.llm.prompt import PromptBuilder
from cascade.llm.verdict import (
    InvalidOutput,
    ModelVerdict,
    TokenLogprob,
    parse_verdict,
    score_verdict,
    verdict_token_probabilities,
)

log = logging.getLogger(__name__)

TOP_LOGPROBS = 5
_KEY_LIKE = re.compile(r"\bsk-[A-Za-z0-9_\-*]{6,}")


class ResponseFormat(StrEnum):
    JSON_SCHEMA = "json_schema"
    JSON_OBJECT = "json_object"


def redact(text: str, secret: str | None) -> str:
    """Remove the API key, and anything shaped like one, from text bound for logs or verdicts.

    Servers echo keys back in auth errors (OpenAI prints a masked key prefix and suffix).
    """
    if secret:
        text = text.replace(secret, "[redacted]")
    return _KEY_LIKE.sub("[redacted]", text)


@dataclass
class Adjudication:
    """The outcome of one item's requests; `error` set means no usable verdict."""

    scores: dict[str, float] = field(default_factory=dict)
    rationale: str | None = None
    error: str | None = None
    endpoint_failed: bool = False
    cost_usd: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Reply:
    content: str | None
    tokens: list[TokenLogprob]
    refusal: str | None


class Adjudicator:
    def __init__(
        self,
        prompt: PromptBuilder,
        model: str,
        price: Price | None,
        logprobs: bool,
        max_output_tokens: int,
        secret: str | None,
    ) -> None:
        self.prompt = prompt
        self.model = model
        self.price = price
        self.logprobs = logprobs
        self.max_output_tokens = max_output_tokens
        self.response_format = ResponseFormat.JSON_SCHEMA
        self._secret = secret

    async def adjudicate(self, client: AsyncOpenAI, messages: list[dict[str, str]]) -> Adjudication:
        outcome = Adjudication(details={"requests": 0, "prompt_tokens": 0, "completion_tokens": 0})
        try:
            reply = await self._complete(client, messages, outcome)
            try:
                verdict = self._parse(reply)
            except InvalidOutput as first:
                log.info("llm reply invalid (%s); asking once for a repair", first)
                repair = self.prompt.repair_messages(messages, reply.content or "", str(first))
                reply = await self._complete(client, repair, outcome)
                verdict = self._parse(reply)
        except InvalidOutput as second:
            outcome.error = f"invalid model output after one repair: {second}"
            return outcome
        except json.JSONDecodeError as exc:  # raised by the client for a 2xx body that is not JSON
            outcome.error = f"llm endpoint sent a response that is not JSON ({exc.msg})"
            outcome.endpoint_failed = True
            return outcome
        except openai.OpenAIError as exc:
            outcome.error = redact(_describe(exc), self._secret)
            # A rejected request (400/422) is about this item; anything else is about the endpoint.
            outcome.endpoint_failed = not isinstance(exc, openai.BadRequestError | openai.UnprocessableEntityError)
            return outcome
        self._score(verdict, reply, outcome)
        return outcome

    def _parse(self, reply: _Reply) -> ModelVerdict:
        if not reply.content and reply.refusal:
            raise InvalidOutput(f"the model refused: {reply.refusal[:200]}")
        return parse_verdict(reply.content, self.prompt.categories)

    def _score(self, verdict: ModelVerdict, reply: _Reply, outcome: Adjudication) -> None:
        categories = self.prompt.categories
        probabilities = verdict_token_probabilities(reply.content or "", reply.tokens, categories)
        outcome.scores, source = score_verdict(verdict, categories, probabilities)
        outcome.rationale = verdict.rationale
        outcome.details.update(
            score_source=source,
            confidence=verdict.confidence,
            severity={c: j.severity for c, j in verdict.categories.items() if c in categories and j.violates},
        )

    async def _complete(self, client: AsyncOpenAI, messages: list[dict[str, str]], outcome: Adjudication) -> _Reply:
        requested = self.response_format
        try:
            completion = await self._create(client, messages, requested, outcome)
        except (openai.BadRequestError, openai.InternalServerError) as rejected:
            if requested is not ResponseFormat.JSON_SCHEMA:
                raise
            try:
                completion = await self._create(client, messages, ResponseFormat.JSON_OBJECT, outcome)
            except openai.OpenAIError:
                raise rejected from None
            if self.response_format is ResponseFormat.JSON_SCHEMA:
                log.warning(
                    "llm server rejected response_format json_schema (%s); using json_object from now on",
                    redact(_describe(rejected), self._secret),
                )
                self.response_format = ResponseFormat.JSON_OBJECT
        return self._reply(completion, outcome)

    async def _create(
        self, client: AsyncOpenAI, messages: list[dict[str, str]], fmt: ResponseFormat, outcome: Adjudication
    ) -> ChatCompletion:
        response_format: dict[str, Any]
        if fmt is ResponseFormat.JSON_SCHEMA:
            response_format = {
                "type": "json_schema",
                "json_schema": {"name": "moderation_verdict", "strict": True, "schema": self.prompt.schema},
            }
        else:
            response_format = {"type": "json_object"}
        extra: dict[str, Any] = {"logprobs": True, "top_logprobs": TOP_LOGPROBS} if self.logprobs else {}
        outcome.details["requests"] += 1
        outcome.details["response_format"] = fmt.value
        return await client.chat.completions.create(
            model=self.model,
            messages=messages,
            response_format=response_format,
            temperature=0,
            max_completion_tokens=self.max_output_tokens,
            **extra,
        )

    def _reply(self, completion: ChatCompletion, outcome: Adjudication) -> _Reply:
        usage = completion.usage
        if usage is not None:
            details = usage.prompt_tokens_details
            cached = (details.cached_tokens or 0) if details is not None else 0
            outcome.details["prompt_tokens"] += usage.prompt_tokens
            outcome.details["completion_tokens"] += usage.completion_tokens
            outcome.cost_usd += cost_usd(self.price, usage.prompt_tokens, usage.completion_tokens, cached)
        outcome.details["served_by"] = completion.model
        if not completion.choices:
            return _Reply(None, [], None)
        choice = completion.choices[0]
        tokens = []
        if choice.logprobs is not None and choice.logprobs.content:
            tokens = [
                TokenLogprob(t.token, t.logprob, tuple((a.token, a.logprob) for a in t.top_logprobs or ()))
                for t in choice.logprobs.content
            ]
        return _Reply(choice.message.content, tokens, choice.message.refusal)


def _describe(exc: openai.OpenAIError) -> str:
    if isinstance(exc, openai.APITimeoutError):
        return "llm request timed out (after the client's retries)"
    if isinstance(exc, openai.APIConnectionError):
        return f"llm endpoint unreachable: {exc}"
    if isinstance(exc, openai.APIStatusError):
        return f"llm endpoint answered HTTP {exc.status_code}: {str(exc)[:300]}"
    return f"llm client error: {type(exc).__name__}: {str(exc)[:300]}"
