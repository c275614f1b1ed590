"""The LLM stage's backends (`CASCADE_LLM_BACKEND`): one small module per dialect, one interface."""

from __future__ import annotations

from cascade.llm.backends.base import Adjudication, Backend, Connection
from cascade.llm.pricing import price_table
from cascade.llm.prompt import PromptBuilder
from cascade.policy import Policy
from cascade.settings import GuardFormat, LLMBackendName, Settings

__all__ = ["Adjudication", "Backend", "Connection", "build_backend"]


def build_backend(
    settings: Settings,
    policy: Policy,
    kind: LLMBackendName,
    model: str,
    secret: str | None,
    guard_format: GuardFormat,
    prompt: PromptBuilder | None = None,
) -> Backend:
    """The backend of one route; `prompt` is built here when the chat backend needs it and none is given."""
    from cascade.llm.backends.base import load_backend_mapping

    categories = [c for c in policy.categories if c != "flagged"]
    price = price_table(settings.llm_prices).get(model)
    if kind == "chat":
        from cascade.llm.backends.chat import ChatBackend

        if prompt is None:
            prompt = PromptBuilder.from_settings(settings, policy)
        return ChatBackend(prompt, model, price, settings.llm_logprobs, settings.llm_max_output_tokens, secret)
    if kind == "moderation":
        from cascade.llm.backends.moderation import ModerationBackend

        mapping = load_backend_mapping(settings.policies_dir, "moderation", categories)
        return ModerationBackend(model, secret, mapping, settings.llm_max_text_chars)
    from cascade.llm.backends.guard import GuardBackend

    mapping = load_backend_mapping(settings.policies_dir, guard_format, categories)
    return GuardBackend(guard_format, model, price, secret, mapping, settings.llm_logprobs, settings.llm_max_text_chars)
