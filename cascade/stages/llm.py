"""LLM stage: policy-as-prompt adjudication through an OpenAI-compatible endpoint.

The last and costliest stage: it sees only what the cheaper stages could not settle. Per item:
response cache (by exact text and context, policy version, model and prompt hash) → budget cap →
circuit breaker → bounded concurrency → token-bucket rate limit → request (the openai client
retries 429/5xx/timeouts with exponential backoff and jitter, `llm_max_retries` times, each try
bounded by `llm_timeout_s`) → validated, scored verdict. Every refusal or failure is a
per-item `error`, so the pipeline sends the item to review with the reason; `score` never
raises for one item's failure. The API key lives in a `SecretStr` and is scrubbed from every
error message. See docs/llm.md.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import xxhash
from openai import AsyncOpenAI

from cascade.llm.adjudicator import Adjudication, Adjudicator, redact
from cascade.llm.pricing import price_table
from cascade.llm.prompt import PromptBuilder
from cascade.llm.resilience import CircuitBreaker, Clock, LRUCache, RollingBudget, TokenBucket
from cascade.policy import load_policy
from cascade.settings import Settings
from cascade.stages.base import ItemContext, Stage, StageResult

if TYPE_CHECKING:
    from cascade.stages.base import Resources

log = logging.getLogger(__name__)

_STAGE_REVISION = "1"
NOTE_CHARS = 280
# Local servers ignore the key but the client insists on one.
_PLACEHOLDER_KEY = "no-key-configured"

CacheKey = tuple[str, str, str, str]


class LLMStage(Stage):
    name = "llm"
    billed = True

    def __init__(self, settings: Settings, prompt: PromptBuilder, clock: Clock = time.monotonic) -> None:
        self.settings = settings
        self.prompt = prompt
        self.model = settings.llm_model
        self.version = f"{_STAGE_REVISION}+{self.model}+prompt-{prompt.prompt_hash}"
        secret = settings.llm_api_key.get_secret_value() if settings.llm_api_key is not None else None
        self._secret = secret
        price = price_table(settings.llm_prices).get(self.model)
        if price is None and self.configured:
            log.warning(
                "no price for llm model %s: its cost counts as $0, only llm_budget_items caps it "
                "(add it to llm_prices)",
                self.model,
            )
        self.adjudicator = Adjudicator(
            prompt, self.model, price, settings.llm_logprobs, settings.llm_max_output_tokens, secret
        )
        self.breaker = CircuitBreaker(settings.llm_breaker_failures, settings.llm_breaker_cooldown_s, clock)
        self.budget = RollingBudget(
            settings.llm_budget_window_s, settings.llm_budget_items, settings.llm_budget_usd, clock
        )
        self.bucket = TokenBucket(settings.llm_rate_per_s, settings.llm_rate_burst, clock)
        self.cache: LRUCache[CacheKey, StageResult] = LRUCache(settings.llm_cache_size)
        self._inflight: dict[CacheKey, asyncio.Future[StageResult]] = {}
        # The HTTP client and the semaphore belong to one event loop; rebuilt if the loop changes.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: AsyncOpenAI | None = None
        self._slots: asyncio.Semaphore | None = None

    @classmethod
    def from_settings(cls, settings: Settings, resources: Resources) -> LLMStage:
        policy = load_policy(settings.policies_dir)
        prompt = PromptBuilder.from_policy_dir(
            settings.policies_dir, policy, settings.llm_few_shot_k, settings.llm_max_text_chars
        )
        return cls(settings, prompt)

    @property
    def configured(self) -> bool:
        return self.settings.llm_base_url is not None or self.settings.llm_api_key is not None

    @property
    def unavailable_reason(self) -> str | None:
        if not self.configured:
            return (
                "no LLM endpoint configured (set OPENAI_BASE_URL for an OpenAI-compatible server, "
                "or OPENAI_API_KEY for api.openai.com)"
            )
        return None

    def _connection(self) -> tuple[AsyncOpenAI, asyncio.Semaphore]:
        loop = asyncio.get_running_loop()
        if self._client is None or self._slots is None or self._loop is not loop:
            self._client = AsyncOpenAI(
                api_key=self._secret or _PLACEHOLDER_KEY,
                base_url=self.settings.llm_base_url,
                timeout=self.settings.llm_timeout_s,
                max_retries=self.settings.llm_max_retries,
            )
            self._slots = asyncio.Semaphore(self.settings.llm_concurrency)
            self._loop = loop
        return self._client, self._slots

    async def score(self, batch: Sequence[ItemContext]) -> list[StageResult]:
        return list(await asyncio.gather(*(self._score_item(ctx) for ctx in batch)))

    async def _score_item(self, ctx: ItemContext) -> StageResult:
        try:
            key: CacheKey = (_content_key(ctx), self.prompt.policy_version, self.model, self.prompt.prompt_hash)
            cached = self.cache.get(key)
            if cached is not None:
                return _reused(cached, "hit")
            pending = self._inflight.get(key)
            if pending is not None:  # the same text is being adjudicated right now: share that call
                return _reused(await asyncio.shield(pending), "coalesced")
            task = asyncio.ensure_future(self._adjudicate(ctx, key))
            self._inflight[key] = task
            task.add_done_callback(lambda _: self._inflight.pop(key, None))
            return await task
        except Exception as exc:  # one item's failure must not fail its batch
            log.exception("llm stage failed on the item with text key %s", ctx.text_key)
            return StageResult(error=redact(f"llm stage failed: {type(exc).__name__}: {exc}", self._secret))

    async def _adjudicate(self, ctx: ItemContext, key: CacheKey) -> StageResult:
        examples = self.prompt.examples(ctx)
        details: dict[str, object] = {
            "model": self.model,
            "prompt_hash": self.prompt.prompt_hash,
            "cache": "miss",
            "few_shot_ids": [e.id for e in examples],
        }
        refusal = self.budget.refusal() or self.breaker.refusal()
        if refusal is not None:
            return StageResult(error=refusal, details=details)
        self.budget.record_call()
        outcome: Adjudication | None = None
        try:
            client, slots = self._connection()
            async with slots:
                await self.bucket.acquire()
                outcome = await self.adjudicator.adjudicate(client, self.prompt.messages(ctx, examples))
        finally:
            # Anything but a reply (a bug, a cancellation) counts as a failure, so a half-open
            # breaker never waits forever for a probe that will not report.
            if outcome is None or outcome.endpoint_failed:
                self.breaker.record_failure()
            else:
                self.breaker.record_success()
        self.budget.record_cost(outcome.cost_usd)
        details.update(outcome.details)
        if outcome.error is not None:
            log.warning("llm could not judge item %s: %s", ctx.item.id, outcome.error)
            return StageResult(error=outcome.error, cost_usd=outcome.cost_usd, details=details)
        result = StageResult(
            scores=outcome.scores,
            note=_truncate(outcome.rationale or "", NOTE_CHARS) or None,
            cost_usd=outcome.cost_usd,
            details=details,
        )
        self.cache.put(key, result)
        return result

    async def aclose(self) -> None:
        client, self._client, self._slots = self._client, None, None
        if client is not None and self._loop is asyncio.get_running_loop():
            await client.close()
        self._loop = None


def _content_key(ctx: ItemContext) -> str:
    """What the model judges: the text, and the context it replies to (which can change its meaning)."""
    if not ctx.item.context:
        return ctx.content_key
    return f"{ctx.content_key}:{xxhash.xxh3_128_hexdigest(ctx.item.context.encode('utf-8'))}"


def _reused(result: StageResult, how: str) -> StageResult:
    """A stored result served again: no new cost, marked as reused."""
    return dataclasses.replace(
        result, scores=dict(result.scores), cost_usd=0.0, details={**result.details, "cache": how}
    )


def _truncate(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
