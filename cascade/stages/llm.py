"""LLM stage: the last and costliest stage, through an OpenAI-compatible endpoint.

It sees only what the cheaper stages could not settle, and knows no answer format: a backend
(`CASCADE_LLM_BACKEND` = chat | moderation | guard, `cascade.llm.backends`) turns the item into
requests and the reply into per-category scores. Per item: response cache (by exact text and
context, policy version and the route's identity: backend, model, prompt or mapping hash) →
the primary route's budget cap and circuit breaker, else the fallback route's → the backend's
request(s) under the route's concurrency and rate limits (the openai client retries
429/5xx/timeouts with backoff) → scores. A shadow route judges a sample of the same items
beside the primary, never acting. Every refusal or failure is a per-item `error`, so the item
goes to review with a short reason; `score` never raises for one item's failure. API keys live
in `SecretStr`s and are scrubbed from every error message. See docs/llm.md.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import xxhash

from cascade.llm.backends.base import redact
from cascade.llm.resilience import CircuitBreaker, Clock, LRUCache, RollingBudget
from cascade.llm.route import Endpoint, Route
from cascade.llm.shadow import ANSWERS, DETAILS_KEY, SHADOW_ITEMS, compare, sampled
from cascade.policy import Policy, load_policy
from cascade.settings import Settings
from cascade.stages.base import ItemContext, Stage, StageResult

if TYPE_CHECKING:
    from cascade.stages.base import Resources

log = logging.getLogger(__name__)

NOTE_CHARS = 280

CacheKey = tuple[str, str, str]


class ResultCache(Protocol):
    """Where successful answers are kept: an in-memory LRU live, a file during calibration."""

    def get(self, key: CacheKey) -> StageResult | None: ...

    def put(self, key: CacheKey, value: StageResult) -> None: ...


class LLMStage(Stage):
    name = "llm"
    billed = True
    relative_cost = 1.0

    def __init__(
        self,
        settings: Settings,
        policy: Policy,
        primary: Route,
        fallback: Route | None = None,
        shadow: Route | None = None,
    ) -> None:
        self.settings = settings
        self.policy_version = policy.version
        self.primary = primary
        self.fallback = fallback
        self.shadow = shadow
        # Bands are calibrated on the primary's scores: its identity is the stage's version.
        self.version = primary.backend.identity
        self.cache: ResultCache = LRUCache(settings.llm_cache_size)
        self._inflight: dict[CacheKey, asyncio.Future[StageResult]] = {}

    @classmethod
    def from_settings(
        cls, settings: Settings, resources: Resources | None = None, clock: Clock = time.monotonic
    ) -> LLMStage:
        policy = load_policy(settings.policies_dir)
        main = Endpoint.primary(settings)
        routes = {
            role: Route.build(Endpoint.secondary(role, spec, main), settings, policy, clock=clock)
            for role, spec in (("fallback", settings.llm_fallback), ("shadow", settings.llm_shadow))
            if spec is not None
        }
        primary = Route.build(main, settings, policy, clock=clock)
        return cls(settings, policy, primary, routes.get("fallback"), routes.get("shadow"))

    @property
    def breaker(self) -> CircuitBreaker:
        """The primary route's circuit breaker: the stage's, as /metrics reports it."""
        return self.primary.breaker

    @property
    def budget(self) -> RollingBudget:
        """The primary route's budget cap: the stage's, as /metrics reports it."""
        return self.primary.budget

    @property
    def unavailable_reason(self) -> str | None:
        if not self.primary.endpoint.configured and not (self.fallback and self.fallback.endpoint.configured):
            return (
                "no LLM endpoint configured (set OPENAI_BASE_URL for an OpenAI-compatible server, "
                "or OPENAI_API_KEY for api.openai.com)"
            )
        return None

    def cache_key(self, ctx: ItemContext, route: Route) -> CacheKey:
        return (_content_key(ctx), self.policy_version, route.backend.identity)

    async def score(self, batch: Sequence[ItemContext]) -> list[StageResult]:
        return list(await asyncio.gather(*(self._score_item(ctx) for ctx in batch)))

    async def _score_item(self, ctx: ItemContext) -> StageResult:
        try:
            key = self.cache_key(ctx, self.primary)
            cached = self.cache.get(key)
            if cached is not None:
                return _reused(cached, "hit")
            pending = self._inflight.get(key)
            if pending is not None:  # the same text is being adjudicated right now: share that call
                return _reused(await asyncio.shield(pending), "coalesced")
            task = asyncio.ensure_future(self._adjudicate(ctx))
            self._inflight[key] = task
            task.add_done_callback(lambda _: self._inflight.pop(key, None))
            return await task
        except Exception as exc:  # one item's failure must not fail its batch
            log.exception("llm stage failed on the item with text key %s", ctx.text_key)
            return StageResult(error=redact(f"llm stage failed: {type(exc).__name__}: {exc}", self._secret))

    @property
    def _secret(self) -> str | None:
        return self.primary.endpoint.api_key

    async def _adjudicate(self, ctx: ItemContext) -> StageResult:
        route, refused = self.primary, self.primary.refusal()
        details: dict[str, Any] = {"cache": "miss"}
        if refused is not None and self.fallback is not None:
            cached = self.cache.get(self.cache_key(ctx, self.fallback))
            if cached is not None:
                return _reused(cached, "hit")
            fallback_refused = self.fallback.refusal()
            if fallback_refused is None:
                details["primary_refused"] = refused
                route, refused = self.fallback, None
            else:
                refused = f"{refused}; fallback: {fallback_refused}"
        details.update(model=route.endpoint.model, answered_by=route.label)
        if refused is not None:
            return StageResult(error=refused, details=details)
        shadowing = self.shadow is not None and sampled(ctx.content_key, self.settings.llm_shadow_sample)
        if shadowing:
            outcome, shadow_result = await asyncio.gather(route.judge(ctx), self._shadow(ctx))
        else:
            outcome, shadow_result = await route.judge(ctx), None
        ANSWERS.labels(route.endpoint.role).inc()
        details.update(outcome.details)
        if shadow_result is not None:
            shadow_result["agreement"] = compare(None if outcome.error else outcome.scores, shadow_result.get("scores"))
            SHADOW_ITEMS.labels(shadow_result["agreement"]).inc()
            details[DETAILS_KEY] = shadow_result
        if outcome.error is not None:
            log.warning("llm could not judge item %s: %s", ctx.item.id, outcome.error)
            return StageResult(error=outcome.error, cost_usd=outcome.cost_usd, details=details)
        result = StageResult(
            scores=outcome.scores,
            note=_truncate(outcome.rationale or "", NOTE_CHARS) or None,
            cost_usd=outcome.cost_usd,
            details=details,
        )
        self.cache.put(self.cache_key(ctx, route), result)
        return result

    async def _shadow(self, ctx: ItemContext) -> dict[str, Any]:
        """The shadow route's answer for the trace; its failures stay here and never touch the item."""
        assert self.shadow is not None
        entry: dict[str, Any] = {"route": self.shadow.label}
        refused = self.shadow.refusal()
        if refused is not None:
            return entry | {"error": refused}
        outcome = await self.shadow.judge(ctx)
        entry["cost_usd"] = outcome.cost_usd
        if outcome.error is not None:
            return entry | {"error": outcome.error}
        return entry | {"scores": outcome.scores}

    async def aclose(self) -> None:
        for route in (self.primary, self.fallback, self.shadow):
            if route is not None:
                await route.aclose()


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
