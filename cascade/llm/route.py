"""One LLM endpoint as the stage uses it: a backend plus its own client, breaker, budget and limits.

The stage has a primary route, optionally a fallback (answers when the primary's breaker is open
or its budget spent) and a shadow (runs beside the primary on a sample, never acting). Each has
its own guards, so an outage or a spent budget of one does not stop the others.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from openai import AsyncOpenAI

from cascade.llm.backends import Adjudication, Backend, Connection, build_backend
from cascade.llm.prompt import PromptBuilder
from cascade.llm.resilience import CircuitBreaker, Clock, RollingBudget, TokenBucket
from cascade.policy import Policy
from cascade.settings import GuardFormat, LLMBackendName, LLMRoute, Settings
from cascade.stages.base import ItemContext

log = logging.getLogger(__name__)

# Local servers ignore the key but the client insists on one.
_PLACEHOLDER_KEY = "no-key-configured"


@dataclass(frozen=True)
class Endpoint:
    """Where and how one route talks: backend kind, model, URL, key, guard format."""

    role: str
    backend: LLMBackendName
    model: str
    base_url: str | None
    api_key: str | None
    guard_format: GuardFormat

    @property
    def configured(self) -> bool:
        return self.base_url is not None or self.api_key is not None

    @classmethod
    def primary(cls, settings: Settings) -> Endpoint:
        key = settings.llm_api_key.get_secret_value() if settings.llm_api_key is not None else None
        return cls(
            "primary", settings.llm_backend, settings.llm_model, settings.llm_base_url, key, settings.llm_guard_format
        )

    @classmethod
    def secondary(cls, role: str, route: LLMRoute, primary: Endpoint) -> Endpoint:
        """A fallback or shadow route: the URL, key and guard format it leaves unset are the primary's."""
        key = route.api_key.get_secret_value() if route.api_key is not None else primary.api_key
        return cls(
            role,
            route.backend,
            route.model,
            route.base_url or primary.base_url,
            key,
            route.guard_format or primary.guard_format,
        )


class Route:
    def __init__(self, endpoint: Endpoint, backend: Backend, settings: Settings, clock: Clock = time.monotonic) -> None:
        self.endpoint = endpoint
        self.backend = backend
        self.settings = settings
        self.breaker = CircuitBreaker(settings.llm_breaker_failures, settings.llm_breaker_cooldown_s, clock)
        self.budget = RollingBudget(
            settings.llm_budget_window_s, settings.llm_budget_items, settings.llm_budget_usd, clock
        )
        self.bucket = TokenBucket(settings.llm_rate_per_s, settings.llm_rate_burst, clock)
        # The HTTP client and the semaphore belong to one event loop; rebuilt if the loop changes.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connection: Connection | None = None

    @classmethod
    def build(
        cls,
        endpoint: Endpoint,
        settings: Settings,
        policy: Policy,
        prompt: PromptBuilder | None = None,
        clock: Clock = time.monotonic,
    ) -> Route:
        backend = build_backend(
            settings, policy, endpoint.backend, endpoint.model, endpoint.api_key, endpoint.guard_format, prompt
        )
        if backend.price is None and endpoint.backend != "moderation" and endpoint.configured:
            log.warning(
                "no price for llm model %s: its cost counts as $0, only llm_budget_items caps it "
                "(add it to llm_prices)",
                endpoint.model,
            )
        return cls(endpoint, backend, settings, clock)

    @property
    def label(self) -> str:
        """How the trace names this route: role, backend and model."""
        return f"{self.endpoint.role}:{self.backend.kind}:{self.endpoint.model}"

    def refusal(self) -> str | None:
        """None if a call may go out now (taking the breaker's probe slot when half-open), else why not."""
        if not self.endpoint.configured:
            return f"{self.endpoint.role} llm route has no endpoint configured"
        return self.budget.refusal() or self.breaker.refusal()

    def _connect(self) -> Connection:
        loop = asyncio.get_running_loop()
        if self._connection is None or self._loop is not loop:
            client = AsyncOpenAI(
                api_key=self.endpoint.api_key or _PLACEHOLDER_KEY,
                base_url=self.endpoint.base_url,
                timeout=self.settings.llm_timeout_s,
                max_retries=self.settings.llm_max_retries,
            )
            self._connection = Connection(client, asyncio.Semaphore(self.settings.llm_concurrency), self.bucket)
            self._loop = loop
        return self._connection

    async def judge(self, ctx: ItemContext) -> Adjudication:
        """One adjudication, after `refusal()` returned None; records the call, its cost and its health."""
        self.budget.record_call()
        outcome: Adjudication | None = None
        try:
            outcome = await self.backend.judge(self._connect(), ctx)
        finally:
            # Anything but a reply (a bug, a cancellation) counts as a failure, so a half-open
            # breaker never waits forever for a probe that will not report.
            if outcome is None or outcome.endpoint_failed:
                self.breaker.record_failure()
            else:
                self.breaker.record_success()
        self.budget.record_cost(outcome.cost_usd)
        return outcome

    async def aclose(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None and self._loop is asyncio.get_running_loop():
            await connection.client.close()
        self._loop = None
