"""The `chat` backend: policy-as-prompt through chat completions, a validated JSON verdict.

Structured output is requested as a strict `json_schema`. A server that refuses it (found from
the status *and* the message, see `rejects_structured_output`) gets the same request with the
next weaker mode: `json_object` carrying the schema (llama-cpp-python constrains its grammar
with it), then plain `json_object`. The mode that works is remembered for the process. An
invalid reply gets one repair request; a second invalid reply is an error (the item goes to
review), never a guess.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import openai
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletion

from cascade.llm.backends.base import (
    Adjudication,
    Backend,
    Connection,
    describe_error,
    redact,
    rejects_structured_output,
)
from cascade.llm.pricing import Price
from cascade.llm.prompt import SEVERITIES, PromptBuilder
from cascade.llm.verdict import (
    InvalidOutput,
    ModelVerdict,
    TokenLogprob,
    parse_verdict,
    score_verdict,
    verdict_token_probabilities,
)
from cascade.stages.base import ItemContext

log = logging.getLogger(__name__)

_STAGE_REVISION = "1"
EXPECTED_COMPLETION_TOKENS = 200
RATIONALE_MAX_CHARS = 300  # the prompt asks for at most 40 words


class ResponseFormat(StrEnum):
    JSON_SCHEMA = "json_schema"
    JSON_OBJECT_SCHEMA = "json_object+schema"
    JSON_OBJECT = "json_object"


# Strongest first; a refusal moves one step down.
FORMAT_LADDER = (ResponseFormat.JSON_SCHEMA, ResponseFormat.JSON_OBJECT_SCHEMA, ResponseFormat.JSON_OBJECT)


def grammar_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """The reply schema for servers that compile it into a grammar (llama.cpp's `json_object` + schema).

    Such a grammar can say more than strict `json_schema` allows (OpenAI refuses `maxLength` and
    `const`): the rationale is bounded, so a small model cannot ramble past max_output_tokens, and
    each category's `severity` is "none" exactly when `violates` is false, so the model cannot
    write the inconsistent pair that validation would reject (a repair request each time).
    """
    bounded = copy.deepcopy(schema)
    bounded["properties"]["rationale"]["maxLength"] = RATIONALE_MAX_CHARS
    judgement = {
        "anyOf": [
            _judgement_shape({"const": False}, {"const": "none"}),
            _judgement_shape({"const": True}, {"enum": [s for s in SEVERITIES if s != "none"]}),
        ]
    }
    categories = bounded["properties"]["categories"]
    categories["properties"] = dict.fromkeys(categories["properties"], judgement)
    return bounded


def _judgement_shape(violates: dict[str, Any], severity: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"violates": violates, "severity": severity},
        "required": ["violates", "severity"],
        "additionalProperties": False,
    }


@dataclass
class _Reply:
    content: str | None
    tokens: list[TokenLogprob]
    refusal: str | None


class ChatBackend(Backend):
    kind = "chat"

    def __init__(
        self,
        prompt: PromptBuilder,
        model: str,
        price: Price | None,
        logprobs: bool,
        max_output_tokens: int,
        secret: str | None,
    ) -> None:
        super().__init__(model, price, secret, prompt.categories)
        self.prompt = prompt
        self.logprobs = logprobs
        self.max_output_tokens = max_output_tokens
        self.response_format = ResponseFormat.JSON_SCHEMA
        self._grammar_schema = grammar_schema(prompt.schema)

    @property
    def identity(self) -> str:
        return f"{_STAGE_REVISION}+{self.model}+prompt-{self.prompt.prompt_hash}"

    def estimate_usd(self, ctx: ItemContext) -> float:
        chars = sum(len(m["content"]) for m in self.prompt.messages(ctx, self.prompt.examples(ctx)))
        return self.estimated_cost(chars, EXPECTED_COMPLETION_TOKENS)

    async def _judge(self, conn: Connection, ctx: ItemContext, outcome: Adjudication) -> None:
        examples = self.prompt.examples(ctx)
        outcome.details["few_shot_ids"] = [e.id for e in examples]
        messages = self.prompt.messages(ctx, examples)
        reply = await self._complete(conn, messages, outcome)
        try:
            verdict = self._parse(reply)
        except InvalidOutput as first:
            log.info("llm reply invalid (%s); asking once for a repair", first)
            repair = self.prompt.repair_messages(messages, reply.content or "", str(first))
            reply = await self._complete(conn, repair, outcome)
            try:
                verdict = self._parse(reply)
            except InvalidOutput as second:
                raise InvalidOutput(f"{second} (after one repair)") from None
        self._score(verdict, reply, outcome)

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

    async def _complete(self, conn: Connection, messages: list[dict[str, str]], outcome: Adjudication) -> _Reply:
        while True:
            sent: list[ResponseFormat] = []
            try:
                completion = await self._create(conn, messages, outcome, sent)
            except openai.APIStatusError as rejected:
                requested = sent[-1] if sent else self.response_format
                weaker = FORMAT_LADDER.index(requested) + 1
                if weaker == len(FORMAT_LADDER) or not rejects_structured_output(rejected):
                    raise
                if self.response_format is requested:  # concurrent requests may have stepped down already
                    self.response_format = FORMAT_LADDER[weaker]
                    log.warning(
                        "llm server refused response_format %s (%s); using %s from now on",
                        requested.value,
                        redact(describe_error(rejected), self._secret),
                        self.response_format.value,
                    )
                continue
            return self._reply(completion, outcome)

    def _response_format(self, fmt: ResponseFormat) -> dict[str, Any]:
        if fmt is ResponseFormat.JSON_SCHEMA:
            return {
                "type": "json_schema",
                "json_schema": {"name": "moderation_verdict", "strict": True, "schema": self.prompt.schema},
            }
        if fmt is ResponseFormat.JSON_OBJECT_SCHEMA:
            return {"type": "json_object", "schema": self._grammar_schema}
        return {"type": "json_object"}

    async def _create(
        self, conn: Connection, messages: list[dict[str, str]], outcome: Adjudication, sent: list[ResponseFormat]
    ) -> ChatCompletion:
        """One request in the mode known best *when it leaves* (after waiting for a slot), noted in `sent`."""

        def request(extra: dict[str, Any]) -> Callable[[AsyncOpenAI], Awaitable[ChatCompletion]]:
            def call(client: AsyncOpenAI) -> Awaitable[ChatCompletion]:
                fmt = self.response_format
                sent.append(fmt)
                outcome.details["response_format"] = fmt.value
                # A server that refused json_schema is not OpenAI's: it may know only `max_tokens`
                # (llama-cpp-python ignores `max_completion_tokens`, which OpenAI's newer models require).
                limit = "max_completion_tokens" if fmt is ResponseFormat.JSON_SCHEMA else "max_tokens"
                return client.chat.completions.create(
                    model=self.model,
                    messages=messages,  # type: ignore[arg-type]
                    response_format=self._response_format(fmt),  # type: ignore[arg-type]
                    temperature=0,
                    **{limit: self.max_output_tokens},
                    **extra,
                )

            return call

        return await self.send_asking_logprobs(conn, outcome, request)

    def _reply(self, completion: ChatCompletion, outcome: Adjudication) -> _Reply:
        self.record_usage(outcome, completion.usage, completion.model)
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
