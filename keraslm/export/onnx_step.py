"""The step function as an ONNX graph built directly from the Keras weights, with fused RNN ops.

tf2onnx turns Keras' LSTM into ONNX's fused `LSTM` op but leaves GRU and SimpleRNN as a generic
`Loop` over the cell, which ONNX Runtime runs step by step. The three cells are exactly ONNX's
`LSTM`, `GRU` (with `linear_before_reset=1`, Keras' `reset_after=True`) and `RNN` operators, so
this module writes the graph itself:

    tokens [B, T] ─Gather(embedding)─Transpose─► [T, B, E] ─► L × {LSTM | GRU | RNN} ─► [T, B, H]
                  ─Transpose─MatMul+Add─► logits [B, T, V]          h{i}_in / c{i}_in ─► *_out

Inputs and outputs carry the step signature's names; batch and time are dynamic. keraslm.export checks
the result against the Keras model and the SavedModel before it publishes anything.
"""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from keraslm.states import input_name, output_name, state_names

OPSET = 17


def _split_gates(matrix, count):
    # Keras stacks gates along the last axis: [in, count·H] → count arrays [in, H].
    return np.split(matrix, count, axis=-1)


def _onnx_weights(cell, kernel, recurrent_kernel, bias):
    """Keras (kernel [I, gH], recurrent [H, gH], bias) → ONNX W [1, gH, I], R [1, gH, H], B [1, 2gH]."""
    if cell == "lstm":
        # Keras orders the gates i, f, c, o; ONNX i, o, f, c.
        def reorder(m):
            i, f, c, o = _split_gates(m, 4)
            return np.concatenate([i, o, f, c], axis=-1)

        kernel, recurrent_kernel, bias = reorder(kernel), reorder(recurrent_kernel), reorder(bias)
        bias = np.concatenate([bias, np.zeros_like(bias)])
    elif cell == "gru":
        bias = np.concatenate([bias[0], bias[1]])  # reset_after: input bias, then recurrent bias
    else:
        bias = np.concatenate([bias, np.zeros_like(bias)])
    return kernel.T[None], recurrent_kernel.T[None], bias[None]


def build_step_graph(twin, model_config):
    """An onnx.ModelProto computing the stateless twin's step function."""
    c = model_config
    nodes, initializers = [], []

    def constant(name, array):
        initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(op, inputs, outputs, **attributes):
        nodes.append(helper.make_node(op, inputs, outputs, **attributes))
        return outputs[0]

    if c.one_hot:
        table = constant("one_hot", np.eye(c.vocabulary_size, dtype=np.float32))
    else:
        table = constant("embedding", twin.get_layer("embedding").get_weights()[0].astype(np.float32))
    x = node("Gather", [table, "tokens"], ["embedded"])  # [B, T, E]
    x = node("Transpose", [x], ["embedded_tbe"], perm=[1, 0, 2])  # [T, B, E]
    zero_axis = constant("axis_0", np.array([0], np.int64))
    one_axis = constant("axis_1", np.array([1], np.int64))

    op = {"lstm": "LSTM", "gru": "GRU"}.get(c.cell, "RNN")
    attributes = {"hidden_size": c.hidden_dim}
    if c.cell == "gru":
        attributes["linear_before_reset"] = 1
    if c.cell in ("rnn_tanh", "rnn_relu"):
        attributes["activations"] = ["Tanh" if c.cell == "rnn_tanh" else "Relu"]
    for i in range(c.num_layers):
        W, R, B = _onnx_weights(c.cell, *twin.get_layer(f"rnn_{i}").get_weights())
        inputs = [
            x,
            constant(f"W{i}", W.astype(np.float32)),
            constant(f"R{i}", R.astype(np.float32)),
            constant(f"B{i}", B.astype(np.float32)),
            "",
        ]  # "" = no sequence_lens
        inputs.append(node("Unsqueeze", [f"h{i}_in", zero_axis], [f"h{i}_initial"]))  # [1, B, H]
        outputs = [f"y{i}", f"h{i}_last"]
        if c.cell == "lstm":
            inputs.append(node("Unsqueeze", [f"c{i}_in", zero_axis], [f"c{i}_initial"]))
            outputs.append(f"c{i}_last")
        node(op, inputs, outputs, name=f"rnn_{i}", **attributes)
        x = node("Squeeze", [f"y{i}", one_axis], [f"y{i}_tbh"])  # [T, 1, B, H] → [T, B, H]
        for kind in ("h", "c") if c.cell == "lstm" else ("h",):
            node("Squeeze", [f"{kind}{i}_last", zero_axis], [f"{kind}{i}_out"])
    x = node("Transpose", [x], ["hidden_bth"], perm=[1, 0, 2])  # [B, T, H]

    if c.tie_weights:
        embedding, bias = twin.get_layer("embedding").get_weights()
        kernel = node("Transpose", [table], ["embedding_t"], perm=[1, 0])
    else:
        kernel, bias = twin.get_layer("logits").get_weights()
        kernel = constant("logits_kernel", kernel.astype(np.float32))
    projected = node("MatMul", [x, kernel], ["projected"])
    node("Add", [projected, constant("logits_bias", bias.astype(np.float32))], ["logits"])

    def tensor(name, elem, shape):
        return helper.make_tensor_value_info(name, elem, shape)

    states = state_names(c)
    graph = helper.make_graph(
        nodes,
        "keraslm_step",
        [tensor("tokens", TensorProto.INT32, ["batch", "time"])]
        + [tensor(input_name(n), TensorProto.FLOAT, ["batch", c.hidden_dim]) for n in states],
        [tensor("logits", TensorProto.FLOAT, ["batch", "time", c.vocabulary_size])]
        + [tensor(output_name(n), TensorProto.FLOAT, ["batch", c.hidden_dim]) for n in states],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="keraslm")
    model.ir_version = 8  # readable by every ONNX Runtime that runs opset 17
    onnx.checker.check_model(model, full_check=True)
    return model
