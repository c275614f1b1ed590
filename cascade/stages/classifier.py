"""Classifier stage: the per-category scores of the model written by `cascade train`.

Two designs, told apart by the model directory's `card.json`:

- tuned (the default model): the encoder graph itself outputs the head scores beside the
  embedding (`cascade.embedding`), so the scores come from the item's one encoder pass
  (`ItemContext.head_scores`), whichever stage ran it first;
- frozen: `model.onnx` (input `embedding` float32 (n, 384), output `scores` float32 (n, heads))
  on the frozen MiniLM embedding, reused when an earlier stage already put it in the context.

Everything is checked when the stage is built, so a missing, corrupt or mismatched model
stops start-up with a message naming the file instead of failing on the first item.
Serving needs onnxruntime, onnx, tokenizers and numpy only.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort

from cascade.embedding import DIMENSIONS, Embedder, ModelError, tuned_card
from cascade.stages.base import ItemContext, Stage, StageResult

if TYPE_CHECKING:
    from cascade.settings import Settings
    from cascade.stages.base import Resources

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
CARD_FILE = "card.json"
INPUT_NAME = "embedding"
OUTPUT_NAME = "scores"


class ClassifierModel:
    """A loaded, validated model directory: an onnxruntime session and its card."""

    def __init__(self, model_dir: Path, threads: int = 1) -> None:
        model_path, card_path = model_dir / MODEL_FILE, model_dir / CARD_FILE
        for path in (model_path, card_path):
            if not path.is_file():
                raise ModelError(f"classifier model file missing: {path} (train one with `cascade train`)")
        try:
            self.card: dict[str, Any] = json.loads(card_path.read_text(encoding="utf-8"))
            self.heads: list[str] = [str(h) for h in self.card["heads"]]
            self.name, self.version = str(self.card["name"]), str(self.card["version"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"classifier card {card_path} is unreadable: {exc}") from exc
        if not re.fullmatch(r"[0-9a-f]{12,64}", self.version):
            raise ModelError(f"classifier card {card_path}: version {self.version!r} is not a sha256 prefix")
        blob = model_path.read_bytes()
        # The card's version is the model's digest: a swapped or damaged file cannot pass for it.
        if hashlib.sha256(blob).hexdigest()[: len(self.version)] != self.version:
            raise ModelError(f"{model_path} does not match its card {card_path} (version {self.version})")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        try:
            self._session = ort.InferenceSession(blob, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped errors for any bad graph
            raise ModelError(f"{model_path} is not a loadable ONNX model: {exc}") from exc
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        if [i.name for i in inputs] != [INPUT_NAME] or OUTPUT_NAME not in [o.name for o in outputs]:
            raise ModelError(f"{model_path}: expected input {INPUT_NAME!r} and output {OUTPUT_NAME!r}")
        self.dimensions = inputs[0].shape[1]
        if not isinstance(self.dimensions, int):
            raise ModelError(f"{model_path}: input {INPUT_NAME!r} has no fixed width ({inputs[0].shape})")
        probe = self.predict(np.zeros((1, self.dimensions), dtype=np.float32))
        if probe.shape != (1, len(self.heads)):
            raise ModelError(
                f"{model_path}: output shape {probe.shape[1:]} does not match the card's {len(self.heads)} heads"
            )

    def predict(self, embeddings: np.ndarray) -> np.ndarray:
        (scores,) = self._session.run([OUTPUT_NAME], {INPUT_NAME: embeddings})
        return np.clip(scores, 0.0, 1.0)


class ClassifierStage(Stage):
    name = "classifier"
    relative_cost = 0.001  # ONNX heads on the shared embedding

    def __init__(self, model: ClassifierModel | None, embedder: Embedder) -> None:
        """`model`: heads on the frozen embedding; None when the embedder's own heads score (tuned)."""
        self._model = model
        self._embedder = embedder
        if model is None:
            if not embedder.heads:
                raise ModelError(f"the encoder {embedder.identity} has no heads to score with")
            self.heads = list(embedder.heads)
            self.version = embedder.identity
            return
        self.heads = model.heads
        self.version = f"{model.name}@{model.version}"
        trained_on = model.card.get("input", {}).get("embedder")
        if trained_on is not None and trained_on != embedder.identity:
            log.warning(
                "classifier %s was trained on %s embeddings but serves %s ones; rescore and recalibrate",
                self.version,
                trained_on,
                embedder.identity,
            )

    @classmethod
    def from_settings(cls, settings: Settings, resources: Resources) -> ClassifierStage:
        model_dir = Path(settings.model_dir)
        if tuned_card(model_dir) is not None:
            return cls(None, resources.embedder)
        model = ClassifierModel(model_dir)
        if model.dimensions != DIMENSIONS:
            raise ModelError(
                f"{model_dir / MODEL_FILE} takes {model.dimensions}-d input, the embedder gives {DIMENSIONS}"
            )
        return cls(model, resources.embedder)

    async def score(self, batch: Sequence[ItemContext]) -> list[StageResult]:
        return await asyncio.to_thread(self._score_sync, batch)

    def _score_sync(self, batch: Sequence[ItemContext]) -> list[StageResult]:
        self._embedder.embed_contexts(batch)
        if self._model is None:
            return [StageResult(scores=dict(ctx.head_scores or {})) for ctx in batch]
        embeddings = np.vstack([ctx.embedding for ctx in batch]).astype(np.float32, copy=False)
        scores = self._model.predict(embeddings)
        return [StageResult(scores={head: float(s) for head, s in zip(self.heads, row, strict=True)}) for row in scores]
