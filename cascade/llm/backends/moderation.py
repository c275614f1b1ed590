"""The `moderation` backend: OpenAI's `/v1/moderations` endpoint (omni-moderation), batched.

Items that reach the backend in the same event-loop turn (one stage batch) go out as one
request with a list `input`, up to `BATCH_SIZE` texts. The endpoint's category scores are
probabilities; `backends.yaml` (section `moderation`) maps them onto policy categories: a
category scores the highest of its mapped endpoint scores, `flagged` the highest of all. A
reply that does not hold one well-formed result per input is an error for every item of the
request. The endpoint is free of charge, so its cost is 0.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from cascade.data import FLAGGED
from cascade.llm.backends.base import Adjudication, Backend, Connection
from cascade.llm.verdict import InvalidOutput
from cascade.stages.base import ItemContext

BATCH_SIZE = 32

_Scores = dict[str, float]
_Answer = asyncio.Future[tuple[_Scores, str, int]]  # scores, the model that served them, the request's size


class ModerationBackend(Backend):
    kind = "moderation"
    requests_per_item = 1 / BATCH_SIZE

    def __init__(
        self,
        model: str,
        secret: str | None,
        mapping: Mapping[str, Sequence[str]],
        max_text_chars: int,
    ) -> None:
        super().__init__(model, None, secret, sorted({c for targets in mapping.values() for c in targets or []}))
        self.mapping = {name: tuple(targets or ()) for name, targets in mapping.items()}
        self.max_text_chars = max_text_chars
        digest = hashlib.sha256(json.dumps(self.mapping, sort_keys=True).encode()).hexdigest()[:12]
        self._identity = f"moderation+{model}+map-{digest}"
        self._pending: list[tuple[str, _Answer]] = []
        self._flushes: set[asyncio.Task[None]] = set()  # held so the loop cannot drop a running flush

    @property
    def identity(self) -> str:
        return self._identity

    def estimate_usd(self, ctx: ItemContext) -> float:
        return 0.0

    async def _judge(self, conn: Connection, ctx: ItemContext, outcome: Adjudication) -> None:
        outcome.details["requests"] += 1  # this item's share of one batched request
        endpoint_scores, served_by, batch = await self._batched(conn, ctx.item.text[: self.max_text_chars])
        outcome.details.update(served_by=served_by, batch_size=batch, score_source="endpoint")
        scores = {FLAGGED: max(endpoint_scores.values())}
        for name, value in endpoint_scores.items():
            for category in self.mapping.get(name, ()):
                scores[category] = max(scores.get(category, 0.0), value)
        outcome.scores = {name: round(value, 4) for name, value in scores.items()}
        top = sorted(endpoint_scores.items(), key=lambda kv: kv[1], reverse=True)[:3]
        outcome.rationale = "moderation endpoint: " + ", ".join(f"{name} {value:.2f}" for name, value in top)

    async def _batched(self, conn: Connection, text: str) -> tuple[_Scores, str, int]:
        loop = asyncio.get_running_loop()
        future: _Answer = loop.create_future()
        self._pending.append((text, future))
        if len(self._pending) == 1:  # the first of this turn schedules the flush after the others joined
            loop.call_soon(self._start_flush, conn)
        return await future

    def _start_flush(self, conn: Connection) -> None:
        task = asyncio.ensure_future(self._flush(conn))
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    async def _flush(self, conn: Connection) -> None:
        pending, self._pending = self._pending, []
        await asyncio.gather(
            *(self._request(conn, pending[i : i + BATCH_SIZE]) for i in range(0, len(pending), BATCH_SIZE))
        )

    async def _request(self, conn: Connection, chunk: list[tuple[str, _Answer]]) -> None:
        try:
            response = await conn.send(
                lambda client: client.moderations.create(model=self.model, input=[text for text, _ in chunk])
            )
            results = response.results
            if len(results) != len(chunk):
                raise InvalidOutput(f"the endpoint returned {len(results)} results for {len(chunk)} inputs")
            parsed = [_endpoint_scores(result.model_dump(by_alias=True, warnings=False)) for result in results]
            for (_, future), scores in zip(chunk, parsed, strict=True):
                if not future.done():
                    future.set_result((scores, response.model, len(chunk)))
        except BaseException as exc:  # every item of the request shares the failure; judge() describes it
            for _, future in chunk:
                if future.done():
                    continue
                if isinstance(exc, Exception):
                    future.set_exception(exc)
                else:
                    future.cancel()
            if not isinstance(exc, Exception):
                raise


def _endpoint_scores(result: Mapping[str, Any]) -> _Scores:
    raw = result.get("category_scores")
    if not isinstance(raw, Mapping):
        raise InvalidOutput("a moderation result lacks category_scores")
    scores: _Scores = {}
    for name, value in raw.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not (0.0 <= value <= 1.0):
            raise InvalidOutput(f"category score {name!r} is not a probability: {value!r}")
        if math.isnan(value):
            raise InvalidOutput(f"category score {name!r} is NaN")
        scores[str(name)] = float(value)
    if not scores:
        raise InvalidOutput("a moderation result has no category scores")
    return scores
