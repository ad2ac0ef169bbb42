"""The recurrent cells' layout, defined once: gates, activations, bias rows, carried state, ONNX's order.

Four places compute the same cells: Keras' layers (training, the stateless twin), keraslm.recurrence
(the training window on a CPU), keraslm.token_step (generate's one-token step) and
keraslm.export.onnx_step (model.onnx). Each keeps its own fast arithmetic, written over gates by
name; where a gate's columns sit in the weights, which activation it takes, how many bias rows
there are and what the cell carries, they all read here.

Keras lays out a layer's weights as kernel [I, g·H], recurrent_kernel [H, g·H] and bias [g·H]
(a reset_after GRU: [2, g·H], the input bias then the recurrent bias): g = len(gates) blocks of H
columns each, in `gates` order.

TensorFlow-free: keraslm.states, and through it the inference side, import it.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Cell:
    """One recurrent cell as Keras builds it.

    Args:
        keras_layer: the keras.layers class, and so which equations the gates feed (each fast path
            has one kernel per class).
        gates: the gates, by the names the equations use, in Keras' column order.
        candidate: the gate holding the candidate state (the others are sigmoid-like gates).
        activation: the candidate's activation (LSTM: also the cell state's on its way to h).
        recurrent_activation: the other gates' activation; None for a cell with no other gate.
        states: what the cell carries from step to step, in the order Keras' layers return it.
        onnx_op: the ONNX operator computing the cell.
        onnx_gates: the gates in ONNX's column order.
        reset_after: GRU: the reset gate multiplies h·R + b_R (as cuDNN and torch.nn.GRU do), so the
            input and recurrent biases are kept apart in two bias rows.

    Example:
        cell = CELLS["gru"]
        cell.kernel_columns(512)   # 1536
        cell.onnx_order            # (0, 1, 2): Keras' blocks in ONNX's order
    """

    keras_layer: str
    gates: tuple
    candidate: str
    activation: str
    recurrent_activation: str | None
    states: tuple
    onnx_op: str
    onnx_gates: tuple
    reset_after: bool = False

    @property
    def bias_rows(self):
        """Rows of Keras' bias: 2 (input, recurrent) for a reset_after GRU, else 1."""
        return 2 if self.reset_after else 1

    def gate_activation(self, gate):
        """The activation of gate `gate` ("sigmoid", "tanh" or "relu")."""
        return self.activation if gate == self.candidate else self.recurrent_activation

    def kernel_columns(self, units):
        """The columns of the kernel, the recurrent kernel and each bias row: g·H."""
        return len(self.gates) * units

    def bias_shape(self, units):
        """The shape of Keras' bias weight."""
        columns = self.kernel_columns(units)
        return (self.bias_rows, columns) if self.reset_after else (columns,)

    def num_parameters(self, inputs, units):
        """Weights of one layer of `units` fed `inputs` features: kernel, recurrent kernel, bias."""
        return self.kernel_columns(units) * (inputs + units + self.bias_rows)

    @property
    def onnx_order(self):
        """ONNX's gate blocks as indices of Keras' (LSTM: Keras i, f, c, o; ONNX i, o, f, c)."""
        return tuple(self.gates.index(gate) for gate in self.onnx_gates)

    @property
    def onnx_activations(self):
        """ONNX's `activations` attribute: the gates' (f), the candidate's (g), LSTM's output (h)."""
        gates = [self.recurrent_activation] if self.recurrent_activation else []
        output = [self.activation] if self.keras_layer == "LSTM" else []
        return [name.capitalize() for name in (*gates, self.activation, *output)]


def _simple_rnn(activation):
    """SimpleRNN: h' = activation(x·W + h·R + b), one block; PyTorch's RNN_TANH / RNN_RELU."""
    return Cell("SimpleRNN", ("h",), "h", activation, None, ("h",), "RNN", ("h",))


# Every cell keraslm builds, by its --cell name.
CELLS = {
    "lstm": Cell("LSTM", ("i", "f", "c", "o"), "c", "tanh", "sigmoid", ("h", "c"), "LSTM", ("i", "o", "f", "c")),
    "gru": Cell("GRU", ("z", "r", "h"), "h", "tanh", "sigmoid", ("h",), "GRU", ("z", "r", "h"), reset_after=True),
    "rnn_tanh": _simple_rnn("tanh"),
    "rnn_relu": _simple_rnn("relu"),
}
