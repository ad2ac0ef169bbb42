"""The names of a model's carried state, and how its tensors are called.

A layer i carries "h{i}" (LSTM also "c{i}"), as keraslm.cells' `states` says. The stateless twin,
the SavedModel signatures, model.onnx and keraslm.json all call the tensor fed in "{name}_in" and
the one returned "{name}_out"; the returned one is fed back as the next call's input.
"""

from keraslm.cells import CELLS


def layer_state_names(cell, layer):
    """The names of layer `layer`'s state: ["h0", "c0"] for an LSTM's first layer."""
    return [f"{kind}{layer}" for kind in CELLS[cell].states]


def state_names(model_config):
    """The names of every layer's state, bottom layer first."""
    return [name for i in range(model_config.num_layers) for name in layer_state_names(model_config.cell, i)]


def input_name(state):
    """The input that feeds a state in: "h0" -> "h0_in"."""
    return f"{state}_in"


def output_name(state):
    """The output that returns a state: "h0" -> "h0_out"."""
    return f"{state}_out"


def in_name(output):
    """The input a state output feeds on the next call: "h0_out" -> "h0_in"."""
    return input_name(output.removesuffix("_out"))
