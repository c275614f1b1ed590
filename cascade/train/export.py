"""The frozen design's ONNX export: every head converted by skl2onnx and merged into one graph.

Input `embedding` float32 (n, dimensions) → output `scores` float32 (n, heads), the calibrated
probability of each head in the order named by the graph's `heads` metadata. `onnx_scores`
and `sklearn_scores` are the two sides of the parity check `train` runs on every export.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, compose, helper
from skl2onnx import to_onnx
from skl2onnx.common.data_types import FloatTensorType
from sklearn.calibration import CalibratedClassifierCV

INPUT_NAME = "embedding"
OUTPUT_NAME = "scores"
HEADS_METADATA = "heads"
OPSET = 17
PARITY_TOLERANCE = 1e-5


def export_onnx(models: Mapping[str, CalibratedClassifierCV], dimensions: int, model_name: str) -> onnx.ModelProto:
    """One graph for all heads: `embedding` (n, d) → `scores` (n, heads)."""
    nodes: list[onnx.NodeProto] = []
    initializers: list[onnx.TensorProto] = []
    opsets: dict[str, int] = {}
    columns: list[str] = []
    one = helper.make_tensor("col_1", TensorProto.INT64, [1], [1])
    for position, model in enumerate(models.values()):
        single = to_onnx(
            model,
            initial_types=[(INPUT_NAME, FloatTensorType([None, dimensions]))],
            target_opset={"": OPSET, "ai.onnx.ml": 3},
            options={id(model): {"zipmap": False}},
        )
        prefixed = compose.add_prefix(single, f"h{position}_", rename_inputs=False)
        probabilities = next(o.name for o in prefixed.graph.output if o.name.endswith("probabilities"))
        nodes.extend(prefixed.graph.node)
        initializers.extend(prefixed.graph.initializer)
        for opset in prefixed.opset_import:
            opsets[opset.domain] = max(opsets.get(opset.domain, 0), opset.version)
        column = f"h{position}_score"
        # Column 1 of [P(0), P(1)] is the positive class, kept 2-D for the concat.
        nodes.append(helper.make_node("Gather", [probabilities, "col_1"], [column], axis=1))
        columns.append(column)
    nodes.append(helper.make_node("Concat", columns, [OUTPUT_NAME], axis=1))
    graph = helper.make_graph(
        nodes,
        f"cascade_classifier_{model_name}",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [None, dimensions])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [None, len(models)])],
        [*initializers, one],
    )
    merged = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in sorted(opsets.items())])
    merged.ir_version = min(merged.ir_version, 9)
    # Drop what the graph computes but never outputs (skl2onnx's label branches).
    pruned = onnx.utils.Extractor(merged).extract_model([INPUT_NAME], [OUTPUT_NAME])
    pruned.producer_name = "cascade.train"
    helper.set_model_props(pruned, {HEADS_METADATA: json.dumps(list(models)), "model_name": model_name})
    onnx.checker.check_model(pruned, full_check=True)
    return pruned


def onnx_scores(model: onnx.ModelProto | bytes, X: np.ndarray) -> np.ndarray:
    blob = model if isinstance(model, bytes) else model.SerializeToString()
    session = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    return session.run([OUTPUT_NAME], {INPUT_NAME: X.astype(np.float32)})[0]


def sklearn_scores(models: Mapping[str, CalibratedClassifierCV], X: np.ndarray) -> np.ndarray:
    return np.column_stack([m.predict_proba(X)[:, 1] for m in models.values()])


def onnx_latency_ms(model: onnx.ModelProto, dimensions: int, batch: int, repeats: int = 200) -> float:
    """Median wall time per item of the graph alone, one intra-op thread."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    X = np.random.default_rng(0).normal(size=(batch, dimensions)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    session.run([OUTPUT_NAME], {INPUT_NAME: X})
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        session.run([OUTPUT_NAME], {INPUT_NAME: X})
        times.append(time.perf_counter() - started)
    return round(float(np.median(times)) * 1000.0 / batch, 5)
