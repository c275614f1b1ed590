"""Run an encoder graph once per text inside one model run: an ONNX `Loop` over a padded batch.

An int8 graph's dynamic quantisation scales each activation tensor by its own range, so a text's
vector depends on whatever shares its pass: the serving path gives every text a pass of its own.
Called once per text from Python, each pass takes the GIL twice (feeding it, collecting it), and in a
stream worker, where the Kafka client and the other stages run Python beside the encoder, its threads
spent about two thirds of their time waiting for it (docs/bench.md). The wrapper built here takes the
same padded `input_ids` / `attention_mask` as the graph, and its loop body slices out text `i`, cut to
its own length, and runs the original nodes on it alone: outputs equal to one run per text, value for
value, for one GIL round trip per model run.

Built in memory when the encoder loads; the shipped file (and so the card's digest and the encoder
identity the banks record) is unchanged.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

_PREFIX = "pertext__"


def _name(suffix: str) -> str:
    return _PREFIX + suffix


def _constant(name: str, value: object) -> onnx.NodeProto:
    return helper.make_node(
        "Constant", [], [name], value=numpy_helper.from_array(np.asarray(value, dtype=np.int64), name)
    )


def one_text_per_iteration(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` (inputs token ids and attention mask, both (batch, tokens); outputs (batch, ...)) wrapped
    so that each row runs alone, cut to the length its mask gives."""
    graph = model.graph
    ids, mask = (value.name for value in graph.input)
    clash = [n for node in graph.node for n in node.output if n.startswith(_PREFIX)]
    if clash:
        raise ValueError(f"graph already uses names with the prefix {_PREFIX!r}: {clash[:3]}")
    row_outputs = {output.name: _name("row_" + output.name) for output in graph.output}
    inputs = {ids: _name("ids"), mask: _name("mask")}
    body_nodes = [
        # Subgraph names may not shadow the outer graph's: the body has constants of its own.
        _constant(_name("zero"), [0]),
        _constant(_name("one"), [1]),
        _constant(_name("tokens_axis"), [1]),
        helper.make_node("Unsqueeze", [_name("i"), _name("zero")], [_name("from")]),
        helper.make_node("Add", [_name("from"), _name("one")], [_name("to")]),
        helper.make_node("Gather", [_name("lengths"), _name("from")], [_name("length")]),
    ]
    for source, target in inputs.items():
        row = _name("row_" + source)
        body_nodes += [
            helper.make_node("Slice", [source, _name("from"), _name("to"), _name("zero")], [row]),
            helper.make_node("Slice", [row, _name("zero"), _name("length"), _name("tokens_axis")], [target]),
        ]
    body_nodes.append(helper.make_node("Identity", [_name("go_in")], [_name("go_out")]))
    for node in graph.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.input[:] = [inputs.get(name, name) for name in node.input]
        copy.output[:] = [row_outputs.get(name, name) for name in node.output]
        body_nodes.append(copy)
    body = helper.make_graph(
        body_nodes,
        "one_text",
        [
            helper.make_tensor_value_info(_name("i"), TensorProto.INT64, []),
            helper.make_tensor_value_info(_name("go_in"), TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info(_name("go_out"), TensorProto.BOOL, [])]
        + [
            helper.make_tensor_value_info(row_outputs[o.name], o.type.tensor_type.elem_type, None) for o in graph.output
        ],
    )
    stacked = {output.name: _name("stacked_" + output.name) for output in graph.output}
    nodes = [
        helper.make_node("ReduceSum", [mask, _name("axis1")], [_name("lengths")], keepdims=0),
        helper.make_node("Shape", [ids], [_name("shape")]),
        helper.make_node("Gather", [_name("shape"), _name("first")], [_name("rows")]),
        helper.make_node("Loop", [_name("rows"), _name("true")], list(stacked.values()), body=body),
        # Each iteration's output keeps its batch axis of 1: the loop stacks them as (rows, 1, ...).
        *(helper.make_node("Squeeze", [stacked[o.name], _name("axis1")], [o.name]) for o in graph.output),
    ]
    initializers = [
        *graph.initializer,
        numpy_helper.from_array(np.array([1], dtype=np.int64), _name("axis1")),
        numpy_helper.from_array(np.array(0, dtype=np.int64), _name("first")),
        numpy_helper.from_array(np.array(True), _name("true")),
    ]
    outer = helper.make_graph(nodes, graph.name + "_per_text", list(graph.input), list(graph.output), initializers)
    wrapped = helper.make_model(outer, opset_imports=list(model.opset_import))
    wrapped.ir_version = model.ir_version
    return wrapped


def per_text_graph(model_path: Path) -> bytes:
    """The serialised wrapper of the graph in `model_path`, for an onnxruntime session."""
    return one_text_per_iteration(onnx.load(str(model_path))).SerializeToString()
