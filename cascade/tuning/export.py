"""Export the tuned encoder: one ONNX graph, token ids → (unit embedding, head scores), fp32 and int8.

Both graphs are checked against torch on real texts of every length (padding included) before
they are written: fp32 must match to `FP32_TOLERANCE`; int8 is reported (cosine of the
embeddings, largest score difference) and must stay within `INT8_MIN_COSINE` /
`INT8_MAX_SCORE_DIFF`. The head scores are the heads' sigmoid probabilities.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from cascade.onnx_export import export_encoder, quantize_int8
from cascade.tuning.fit import CHECKPOINT, TunedEncoder, encode, load_encoder, make_tokenizer, pad

EMBEDDING_OUTPUT = "sentence_embedding"
SCORES_OUTPUT = "scores"
PRECISIONS = ("int8", "fp32")
FP32_TOLERANCE = 1e-4
INT8_MIN_COSINE = 0.95
INT8_MAX_SCORE_DIFF = 0.15


def encoder_file(precision: str) -> str:
    return f"encoder.{precision}.onnx"


class ExportError(ValueError):
    """An exported graph disagrees with torch; the message says by how much."""


class _Serving(torch.nn.Module):
    """The graph's outputs: the unit embedding and the heads' probabilities."""

    def __init__(self, model: TunedEncoder) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding, logits = self.model(input_ids, attention_mask)
        return embedding, torch.sigmoid(logits)


def load_checkpoint(run_dir: Path, model_dir: Path) -> tuple[TunedEncoder, dict[str, Any]]:
    """The best state of a `fit` run, in an eager-attention model (the export ORT can fuse)."""
    checkpoint = torch.load(run_dir / CHECKPOINT, map_location="cpu", weights_only=True)
    model = load_encoder(model_dir, len(checkpoint["heads"]), eager=True)
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval(), checkpoint


@dataclass
class Parity:
    precision: str
    embedding_max_abs_diff: float
    embedding_min_cosine: float
    embedding_mean_cosine: float
    scores_max_abs_diff: float


def onnx_outputs(path: Path, token_ids: Sequence[Sequence[int]], batch: int = 16) -> tuple[np.ndarray, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    embeddings, scores = [], []
    for start in range(0, len(token_ids), batch):
        ids, mask = pad(token_ids[start : start + batch])
        e, s = session.run(
            [EMBEDDING_OUTPUT, SCORES_OUTPUT], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
        )
        embeddings.append(e)
        scores.append(s)
    return np.vstack(embeddings), np.vstack(scores)


@torch.no_grad()
def torch_outputs(
    model: TunedEncoder, token_ids: Sequence[Sequence[int]], batch: int = 16
) -> tuple[np.ndarray, np.ndarray]:
    serving = _Serving(model).eval()
    embeddings, scores = [], []
    for start in range(0, len(token_ids), batch):
        e, s = serving(*pad(token_ids[start : start + batch]))
        embeddings.append(e.numpy())
        scores.append(s.numpy())
    return np.vstack(embeddings), np.vstack(scores)


def parity(precision: str, reference: tuple[np.ndarray, np.ndarray], ours: tuple[np.ndarray, np.ndarray]) -> Parity:
    cosine = (reference[0] * ours[0]).sum(axis=1)
    return Parity(
        precision=precision,
        embedding_max_abs_diff=float(np.abs(reference[0] - ours[0]).max()),
        embedding_min_cosine=float(cosine.min()),
        embedding_mean_cosine=float(cosine.mean()),
        scores_max_abs_diff=float(np.abs(reference[1] - ours[1]).max()),
    )


def export(
    model: TunedEncoder, model_dir: Path, out: Path, max_tokens: int, parity_texts: Sequence[str]
) -> dict[str, Any]:
    """Write encoder.fp32.onnx, encoder.int8.onnx and tokenizer.json into `out`; returns the card's `encoder`."""
    out.mkdir(parents=True, exist_ok=True)
    fp32, int8 = out / encoder_file("fp32"), out / encoder_file("int8")
    config = model.bert.config
    export_encoder(
        _Serving(model), fp32, (EMBEDDING_OUTPUT, SCORES_OUTPUT), config.num_attention_heads, config.hidden_size
    )
    quantize_int8(fp32, int8)
    shutil.copyfile(model_dir / "tokenizer.json", out / "tokenizer.json")
    token_ids = encode(make_tokenizer(model_dir, max_tokens), parity_texts)
    reference = torch_outputs(model, token_ids)
    checks = {p: parity(p, reference, onnx_outputs(out / encoder_file(p), token_ids)) for p in PRECISIONS}
    if max(checks["fp32"].embedding_max_abs_diff, checks["fp32"].scores_max_abs_diff) > FP32_TOLERANCE:
        raise ExportError(f"fp32 graph differs from torch: {checks['fp32']}")
    if (
        checks["int8"].embedding_min_cosine < INT8_MIN_COSINE
        or checks["int8"].scores_max_abs_diff > INT8_MAX_SCORE_DIFF
    ):
        raise ExportError(f"int8 graph strays from torch: {checks['int8']}")
    return {
        "files": {p: encoder_file(p) for p in PRECISIONS},
        "sha256": {p: hashlib.sha256((out / encoder_file(p)).read_bytes()).hexdigest() for p in PRECISIONS},
        "bytes": {p: (out / encoder_file(p)).stat().st_size for p in PRECISIONS},
        "tokenizer": "tokenizer.json",
        "max_tokens": max_tokens,
        "dimensions": int(config.hidden_size),
        "outputs": [EMBEDDING_OUTPUT, SCORES_OUTPUT],
        "parity": {p: vars(c) for p, c in checks.items()},
        "parity_texts": len(parity_texts),
    }
