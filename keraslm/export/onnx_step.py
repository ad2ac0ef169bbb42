"""The step function as an ONNX graph built directly from the Keras weights, with fused RNN ops.

tf2onnx turns Keras' LSTM into ONNX's fused `LSTM` op but leaves GRU and SimpleRNN as a generic
`Loop` over the cell, which ONNX Runtime runs step by step. The three cells are exactly ONNX's
`LSTM`, `GRU` (with `linear_before_reset=1`, Keras' `reset_after=True`) and `RNN` operators, so
this module writes the graph itself, with the operator, gate order and activations keraslm.cells
gives for the cell:

    tokens [B, T] ─Gather(embedding)─Transpose─► [T, B, E] ─► L × {LSTM | GRU | RNN} ─► [T, B, H]
                  ─Transpose─MatMul+Add─► logits [B, T, V]          h{i}_in / c{i}_in ─► *_out

Inputs and outputs carry the step signature's names; batch and time are dynamic. keraslm.export checks
the result against the Keras model and the SavedModel before it publishes anything.
"""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from keraslm.cells import CELLS
from keraslm.model import EMBEDDING_LAYER, PROJECTION_LAYER, recurrent_layer_name
from keraslm.states import input_name, layer_state_names, output_name, state_names

OPSET = 17
# What ONNX's LSTM, GRU and RNN operators apply when their `activations` attribute is left out.
ONNX_DEFAULT_ACTIVATIONS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"], "RNN": ["Tanh"]}


class _Graph:
    """The nodes and initializers of a graph being written."""

    def __init__(self):
        self.nodes, self.initializers = [], []

    def constant(self, name, array):
        """An initializer holding `array`; returns its name."""
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op, inputs, outputs, **attributes):
        """A node; returns the name of its first output."""
        self.nodes.append(helper.make_node(op, inputs, outputs, **attributes))
        return outputs[0]


def _onnx_weights(cell, kernel, recurrent_kernel, bias):
    """Keras (kernel [I, gH], recurrent [H, gH], bias) → ONNX W [1, gH, I], R [1, gH, H], B [1, 2gH].

    ONNX takes the gate blocks in its own order (`onnx_order`) and always an input and a recurrent
    bias; a Keras cell with one bias row gets a zero recurrent bias.
    """

    def reorder(matrix):  # Keras stacks the gates along the last axis: [in, g·H]
        blocks = np.split(matrix, len(cell.gates), axis=-1)
        return np.concatenate([blocks[k] for k in cell.onnx_order], axis=-1)

    rows = np.reshape(bias, (cell.bias_rows, -1))
    if cell.bias_rows == 1:
        rows = np.concatenate([rows, np.zeros_like(rows)])
    bias = np.concatenate([reorder(row) for row in rows])
    return reorder(kernel).T[None], reorder(recurrent_kernel).T[None], bias[None]


def _onnx_attributes(cell, hidden_dim):
    """The attributes of `cell`'s ONNX operator."""
    attributes = {"hidden_size": hidden_dim}
    if cell.reset_after:
        attributes["linear_before_reset"] = 1
    if cell.onnx_activations != ONNX_DEFAULT_ACTIVATIONS[cell.onnx_op]:
        attributes["activations"] = cell.onnx_activations
    return attributes


def _embedded(graph, twin, model_config):
    """tokens [B, T] → (embedded [T, B, E], the embedding table's name)."""
    c = model_config
    if c.one_hot:
        table = graph.constant("one_hot", np.eye(c.vocabulary_size, dtype=np.float32))
    else:
        table = graph.constant("embedding", twin.get_layer(EMBEDDING_LAYER).get_weights()[0].astype(np.float32))
    x = graph.node("Gather", [table, "tokens"], ["embedded"])  # [B, T, E]
    return graph.node("Transpose", [x], ["embedded_tbe"], perm=[1, 0, 2]), table


def _recurrent_layer(graph, x, twin, model_config, i, axes):
    """Layer i over x [T, B, ·] → [T, B, H]; its state comes in by `{state}_in`, leaves by `{state}_out`.
    `axes` names the constants [0] and [1]."""
    cell = CELLS[model_config.cell]
    zero_axis, one_axis = axes
    weights = _onnx_weights(cell, *twin.get_layer(recurrent_layer_name(i)).get_weights())
    names = (f"W{i}", f"R{i}", f"B{i}")
    inputs = [x, *(graph.constant(name, w.astype(np.float32)) for name, w in zip(names, weights, strict=True))]
    inputs.append("")  # no sequence_lens
    states = layer_state_names(model_config.cell, i)  # ONNX takes and returns them in Keras' order: h, c
    for state in states:  # [B, H] → [1, B, H]
        inputs.append(graph.node("Unsqueeze", [input_name(state), zero_axis], [f"{state}_initial"]))
    outputs = [f"y{i}", *(f"{state}_last" for state in states)]
    graph.node(
        cell.onnx_op, inputs, outputs, name=recurrent_layer_name(i), **_onnx_attributes(cell, model_config.hidden_dim)
    )
    for state in states:
        graph.node("Squeeze", [f"{state}_last", zero_axis], [output_name(state)])
    return graph.node("Squeeze", [f"y{i}", one_axis], [f"y{i}_tbh"])  # [T, 1, B, H] → [T, B, H]


def _logits(graph, x, twin, model_config, table):
    """Hidden states [T, B, H] → logits [B, T, V]: the Dense layer, or the embedding transposed."""
    x = graph.node("Transpose", [x], ["hidden_bth"], perm=[1, 0, 2])  # [B, T, H]
    if model_config.tie_weights:
        _, bias = twin.get_layer(EMBEDDING_LAYER).get_weights()
        kernel = graph.node("Transpose", [table], ["embedding_t"], perm=[1, 0])
    else:
        kernel, bias = twin.get_layer(PROJECTION_LAYER).get_weights()
        kernel = graph.constant("logits_kernel", kernel.astype(np.float32))
    projected = graph.node("MatMul", [x, kernel], ["projected"])
    return graph.node("Add", [projected, graph.constant("logits_bias", bias.astype(np.float32))], ["logits"])


def build_step_graph(twin, model_config):
    """An onnx.ModelProto computing the stateless twin's step function."""
    c = model_config
    graph = _Graph()
    x, table = _embedded(graph, twin, c)
    axes = [graph.constant(f"axis_{k}", np.array([k], np.int64)) for k in (0, 1)]
    for i in range(c.num_layers):
        x = _recurrent_layer(graph, x, twin, c, i, axes)
    _logits(graph, x, twin, c, table)

    def tensor(name, elem, shape):
        return helper.make_tensor_value_info(name, elem, shape)

    states = state_names(c)
    onnx_graph = helper.make_graph(
        graph.nodes,
        "keraslm_step",
        [tensor("tokens", TensorProto.INT32, ["batch", "time"])]
        + [tensor(input_name(n), TensorProto.FLOAT, ["batch", c.hidden_dim]) for n in states],
        [tensor("logits", TensorProto.FLOAT, ["batch", "time", c.vocabulary_size])]
        + [tensor(output_name(n), TensorProto.FLOAT, ["batch", c.hidden_dim]) for n in states],
        graph.initializers,
    )
    model = helper.make_model(onnx_graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="keraslm")
    model.ir_version = 8  # readable by every ONNX Runtime that runs opset 17
    onnx.checker.check_model(model, full_check=True)
    return model
