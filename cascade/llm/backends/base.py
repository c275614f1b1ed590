"""The interface every LLM backend implements, and what they share.

A backend knows one dialect (a chat prompt with a JSON verdict, the moderation endpoint, a
guard model's answer format): it turns one item into request(s) and the reply into policy
category scores. Everything around it (cache, budget, circuit breaker, fallback, shadow) is
the stage's and the route's business, so a backend never sees them. `judge` never raises:
every failure comes back as `Adjudication.error`, a short summary fit for a verdict reason.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import openai
import yaml
from openai import AsyncOpenAI
from openai.types import CompletionUsage

from cascade.llm.pricing import Price, cost_usd
from cascade.llm.resilience import TokenBucket
from cascade.llm.verdict import InvalidOutput
from cascade.stages.base import ItemContext

T = TypeVar("T")

log = logging.getLogger(__name__)

BACKENDS_FILE = "backends.yaml"
TOP_LOGPROBS = 5
ERROR_CHARS = 200
_KEY_LIKE = re.compile(r"\bsk-[A-Za-z0-9_\-*]{6,}")
# Words a server uses when it refuses the requested structured-output mode (llama-cpp-python:
# HTTP 500 "Input should be 'text' or 'json_object'"; others 400 "response_format ... not supported").
_NOISE = ("For further information",)
_FORMAT_WORDS = ("response_format", "json_schema", "json_object", "structured output", "guided_json", "grammar")


def redact(text: str, secret: str | None) -> str:
    """Remove the API key, and anything shaped like one, from text bound for logs or verdicts.

    Servers echo keys back in auth errors (OpenAI prints a masked key prefix and suffix).
    """
    if secret:
        text = text.replace(secret, "[redacted]")
    return _KEY_LIKE.sub("[redacted]", text)


def server_message(exc: openai.APIStatusError) -> str:
    """The server's own error message, in one short line: never its traceback or a whole body."""
    body: Any = exc.body
    if isinstance(body, Mapping):
        inner = body.get("error", body)
        body = inner.get("message") or inner.get("detail") if isinstance(inner, Mapping) else inner
    text = body if isinstance(body, str) else json.dumps(body) if body is not None else exc.message
    head, _, trace = text.partition("Traceback (most recent call last)")
    lines = _without_frames(head)
    if not lines and trace:  # only a traceback: its last line names the exception
        lines = _without_frames(trace)[-1:]
    summary = "; ".join(lines) or f"HTTP {exc.status_code} without a message"
    return summary if len(summary) <= ERROR_CHARS else summary[: ERROR_CHARS - 1] + "…"


def _without_frames(text: str) -> list[str]:
    """The non-blank lines of a message, without traceback frames (`File ...` and its source line)."""
    kept: list[str] = []
    in_frame = False
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("File "):
            in_frame = True
        elif in_frame:
            in_frame = False  # the frame's source line
        elif line and not line.startswith(_NOISE):
            kept.append(line)
    return kept


def describe_error(exc: openai.OpenAIError) -> str:
    if isinstance(exc, openai.APITimeoutError):
        return "llm request timed out (after the client's retries)"
    if isinstance(exc, openai.APIConnectionError):
        return f"llm endpoint unreachable: {str(exc)[:ERROR_CHARS]}"
    if isinstance(exc, openai.APIStatusError):
        return f"llm endpoint answered HTTP {exc.status_code}: {server_message(exc)}"
    return f"llm client error: {type(exc).__name__}: {str(exc)[:ERROR_CHARS]}"


def rejects_structured_output(exc: openai.OpenAIError) -> bool:
    """Did the server refuse the requested `response_format` (rather than fail for another reason)?

    Decided from the status *and* the message: llama-cpp-python answers an unsupported
    `json_schema` with HTTP 500 and a validation message, others with 400 or 422; a plain 500
    ("internal error") is an outage, not a missing feature.
    """
    if not isinstance(exc, openai.APIStatusError) or exc.status_code not in (400, 422, 500, 501):
        return False
    message = server_message(exc).lower()
    return any(word in message for word in _FORMAT_WORDS)


def rejects_logprobs(exc: openai.OpenAIError) -> bool:
    """Did the server refuse to return logprobs? (llama-cpp-python without `logits_all`: HTTP 500
    "logprobs is not supported for models created with logits_all=False"; others 400.)"""
    if not isinstance(exc, openai.APIStatusError) or exc.status_code not in (400, 422, 500, 501):
        return False
    return "logprobs" in server_message(exc).lower()


@dataclass
class Adjudication:
    """The outcome of one item's requests; `error` set means no usable verdict."""

    scores: dict[str, float] = field(default_factory=dict)
    rationale: str | None = None
    error: str | None = None
    endpoint_failed: bool = False
    cost_usd: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)


class Connection:
    """One endpoint's client with its concurrency slots and rate limit (all bound to one event loop)."""

    def __init__(self, client: AsyncOpenAI, slots: asyncio.Semaphore, bucket: TokenBucket) -> None:
        self.client = client
        self.slots = slots
        self.bucket = bucket

    async def send(self, request: Callable[[AsyncOpenAI], Awaitable[T]]) -> T:
        async with self.slots:
            await self.bucket.acquire()
            return await request(self.client)


def load_backend_mapping(policy_dir: Path, section: str, categories: Sequence[str]) -> dict[str, Any]:
    """One section of `backends.yaml`, checked against the policy's categories."""
    path = Path(policy_dir) / BACKENDS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the {section} backend maps its answers through it")
    doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    mapping = doc.get(section)
    if not isinstance(mapping, dict) or not mapping:
        raise ValueError(f"{path}: no `{section}` section")
    known = set(categories)
    for key, value in mapping.items():
        targets = value.get("categories") if isinstance(value, dict) else value
        unknown = sorted(set(targets or []) - known)
        if unknown:
            raise ValueError(f"{path}: {section}.{key} maps to categories not in the policy: {', '.join(unknown)}")
    return mapping


class Backend(ABC):
    """One dialect of the LLM stage. `identity` changes whenever its answers could change."""

    kind: str

    def __init__(self, model: str, price: Price | None, secret: str | None, categories: Sequence[str]) -> None:
        self.model = model
        self.price = price
        self._secret = secret
        self.categories = tuple(categories)

    @property
    @abstractmethod
    def identity(self) -> str: ...

    @abstractmethod
    async def _judge(self, conn: Connection, ctx: ItemContext, outcome: Adjudication) -> None:
        """Fill `outcome.scores` (and rationale, details); raise `InvalidOutput` or the client's errors."""

    @abstractmethod
    def estimate_usd(self, ctx: ItemContext) -> float:
        """Expected dollars for one item (before any call), for the calibration's cost preview."""

    requests_per_item: float = 1.0
    logprobs: bool = False  # ask for token logprobs; turned off for good when the server refuses them

    async def judge(self, conn: Connection, ctx: ItemContext) -> Adjudication:
        outcome = Adjudication(
            details={"backend": self.kind, "requests": 0, "prompt_tokens": 0, "completion_tokens": 0}
        )
        try:
            await self._judge(conn, ctx, outcome)
        except InvalidOutput as exc:
            outcome.scores = {}
            outcome.error = f"invalid model output: {exc}"
        except json.JSONDecodeError as exc:  # raised by the client for a 2xx body that is not JSON
            outcome.error = f"llm endpoint sent a response that is not JSON ({exc.msg})"
            outcome.endpoint_failed = True
        except openai.OpenAIError as exc:
            outcome.error = redact(describe_error(exc), self._secret)
            # A rejected request (400/422) is about this item; anything else is about the endpoint.
            outcome.endpoint_failed = not isinstance(exc, openai.BadRequestError | openai.UnprocessableEntityError)
        if outcome.error is not None:
            outcome.scores = {}
        return outcome

    async def send(self, conn: Connection, outcome: Adjudication, request: Callable[[AsyncOpenAI], Awaitable[T]]) -> T:
        """One HTTP request, counted and timed in the item's details whether or not it succeeds.

        `request_ms` is the time the item's requests took once they had a slot (client retries
        included): the model's latency, without the wait behind other items.
        """
        outcome.details["requests"] += 1

        async def timed(client: AsyncOpenAI) -> T:
            started = time.perf_counter()
            try:
                return await request(client)
            finally:
                outcome.details["request_ms"] = round(
                    outcome.details.get("request_ms", 0.0) + (time.perf_counter() - started) * 1000, 1
                )

        return await conn.send(timed)

    async def send_asking_logprobs(
        self,
        conn: Connection,
        outcome: Adjudication,
        request: Callable[[dict[str, Any]], Callable[[AsyncOpenAI], Awaitable[T]]],
    ) -> T:
        """`send`, with `logprobs` in the request while the server takes them.

        A refusal (found from the status and the message, see `rejects_logprobs`) is learnt once:
        the request goes again without them, and so do all later ones (scores are then mapped).
        """
        asked: list[bool] = []  # whether each attempt asked for logprobs, decided when it leaves (after its slot)

        def call(client: AsyncOpenAI) -> Awaitable[T]:
            asked.append(self.logprobs)
            extra: dict[str, Any] = {"logprobs": True, "top_logprobs": TOP_LOGPROBS} if self.logprobs else {}
            return request(extra)(client)

        while True:
            try:
                return await self.send(conn, outcome, call)
            except openai.APIStatusError as exc:
                if not (asked and asked[-1]) or not rejects_logprobs(exc):
                    raise
                if self.logprobs:  # concurrent requests may have learnt it already
                    self.logprobs = False
                    log.warning(
                        "llm server refused logprobs (%s); asking without them from now on",
                        redact(describe_error(exc), self._secret),
                    )

    def record_usage(self, outcome: Adjudication, usage: CompletionUsage | None, served_by: str) -> None:
        outcome.details["served_by"] = served_by
        if usage is None:
            return
        details = usage.prompt_tokens_details
        cached = (details.cached_tokens or 0) if details is not None else 0
        outcome.details["prompt_tokens"] += usage.prompt_tokens
        outcome.details["completion_tokens"] += usage.completion_tokens
        outcome.cost_usd += cost_usd(self.price, usage.prompt_tokens, usage.completion_tokens, cached)

    def estimated_cost(self, prompt_chars: int, completion_tokens: int) -> float:
        """Dollars for one request of this size (about 4 characters per token)."""
        return cost_usd(self.price, prompt_chars // 4 + 1, completion_tokens)
