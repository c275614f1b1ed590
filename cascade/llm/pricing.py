"""Cost accounting: token usage x a price table (USD per 1M tokens), configurable per model."""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field


class Price(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    input: float = Field(ge=0, description="USD per 1M prompt tokens.")
    output: float = Field(ge=0, description="USD per 1M completion tokens.")
    cached_input: float | None = Field(default=None, ge=0, description="USD per 1M cached prompt tokens.")


# OpenAI list prices for dated snapshots (standard tier). Prices change: override or extend
# them with `llm_prices` in the config rather than trusting this table blindly.
DEFAULT_PRICES: dict[str, Price] = {
    "gpt-4.1-2025-04-14": Price(input=2.00, cached_input=0.50, output=8.00),
    "gpt-4.1-mini-2025-04-14": Price(input=0.40, cached_input=0.10, output=1.60),
    "gpt-4.1-nano-2025-04-14": Price(input=0.10, cached_input=0.025, output=0.40),
    "gpt-4o-2024-08-06": Price(input=2.50, cached_input=1.25, output=10.00),
    "gpt-4o-mini-2024-07-18": Price(input=0.15, cached_input=0.075, output=0.60),
}


def price_table(overrides: Mapping[str, Mapping[str, float]]) -> dict[str, Price]:
    return {**DEFAULT_PRICES, **{model: Price.model_validate(dict(p)) for model, p in overrides.items()}}


def cost_usd(price: Price | None, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> float:
    """Dollars for one response; 0 for a model without a price (see the warning at stage start)."""
    if price is None:
        return 0.0
    cached = min(cached_tokens, prompt_tokens) if price.cached_input is not None else 0
    cached_rate = price.cached_input if price.cached_input is not None else price.input
    dollars = (prompt_tokens - cached) * price.input + cached * cached_rate + completion_tokens * price.output
    return dollars / 1_000_000
