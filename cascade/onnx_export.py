"""Export a torch sentence encoder to ONNX for onnxruntime, and its int8 variant (needs torch).

One recipe for the frozen MiniLM (`cascade.embedding`) and the task-tuned encoder
(`cascade.tuning.export`): `torch.onnx.export` of a module built with eager attention, then
ORT's BERT optimizer (it fuses the attention blocks; the default SDPA export fuses none),
then, for int8, dynamic per-channel quantisation of the matrix products only (quantising
the embedding lookup too costs real quality: docs/retrieval.md).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

INPUT_NAMES = ("input_ids", "attention_mask")
OPSET = 17


def export_encoder(module: Any, target: Path, output_names: Sequence[str], num_heads: int, hidden_size: int) -> None:
    """`module(input_ids, attention_mask)` → `output_names`, dynamic in batch and tokens, optimised."""
    import torch
    from onnxruntime.transformers.optimizer import optimize_model

    raw = target.with_name(f".{target.stem}.{os.getpid()}.raw.onnx")
    example = (torch.ones(2, 8, dtype=torch.int64), torch.ones(2, 8, dtype=torch.int64))
    axes = {"batch": 0, "tokens": 1}
    dynamic = {name: {i: a for a, i in axes.items()} for name in INPUT_NAMES}
    dynamic.update({name: {0: "batch"} for name in output_names})
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about shape-dependent Python branches in transformers' mask code;
        # the parity and padding tests check that the graph is right for every batch shape.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            example,
            str(raw),
            input_names=list(INPUT_NAMES),
            output_names=list(output_names),
            dynamic_axes=dynamic,
            opset_version=OPSET,
            dynamo=False,
        )
    optimized = optimize_model(str(raw), model_type="bert", num_heads=num_heads, hidden_size=hidden_size)
    atomic_save(lambda path: optimized.save_model_to_file(str(path)), target)
    raw.unlink()


def quantize_int8(fp32: Path, target: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    atomic_save(
        lambda path: quantize_dynamic(
            str(fp32),
            str(path),
            op_types_to_quantize=["MatMul", "Attention"],
            per_channel=True,
            weight_type=QuantType.QInt8,
            extra_options={"DefaultTensorType": 1},
        ),
        target,
    )


def atomic_save(write: Callable[[Path], object], target: Path) -> None:
    """Write to a temporary name, then rename: concurrent processes never read half a model."""
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    write(partial)
    partial.replace(target)
