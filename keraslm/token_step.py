"""One token through the trained recurrent layers, for the in-graph `generate` loop.

At batch 1 a step is a handful of matrix-vector products, each reading a whole weight matrix, and
TensorFlow runs one MatMul on one core. Keras' cells multiply by each matrix whole
([1, H]·[H, gH]), so one core did the work while the other waited. Here each weight matrix is cut
into column blocks once, before the loop, and every block is its own MatMul: TensorFlow's executor
runs independent ops side by side, so a step's products use every core.

    x·W + h·R  =  concat(x·W₁ + h·R₁, …, x·W_k + h·R_k)      W = [W₁ … W_k], R = [R₁ … R_k]

The equations are Keras' cells, in float32 as the step signature runs them: keraslm.recurrence's
(gate order and activations from keraslm.cells), over products cut in blocks. tests/test_export.py
checks generate's greedy continuation against the step model for every cell.
"""

import tensorflow as tf

from keraslm.cells import CELLS
from keraslm.recurrence import ACTIVATIONS, activated_gates, gru_update, lstm_update
from keraslm.states import input_name, layer_state_names

# Column blocks per weight matrix: blocks let a batch-1 step's matmuls run on every core. On two
# cores 2 and 4 blocks were equally fast at batch 1 and 4 was faster at batch 32; more cores on a
# serving machine can use 4 too (benchmarks/RESULTS.md, "Figures from code comments").
BLOCKS = 4


class TokenStep:
    """The recurrent layers of a stateless twin as one-token functions with split weights.

    Args:
        recurrent_layers: the twin's recurrent Keras layers, bottom first (`ModelLayers.recurrent`),
            which hold the weights.
        model_config: its ModelConfig.

    Example:
        step = TokenStep(ModelLayers.of(model_config, twin).recurrent, model_config)
        weights = step.weights()          # once, outside the loop
        x, states = step(x, states, weights)   # x [B, E] → [B, H]; states {"h0_in": [B, H], …}
    """

    def __init__(self, recurrent_layers, model_config):
        self.cell_name = model_config.cell
        self.cell = CELLS[model_config.cell]
        self.layers = [layer.cell for layer in recurrent_layers]

    def weights(self):
        """Per layer: (kernel blocks, recurrent-kernel blocks, bias) as float32 tensors."""
        weights = []
        for cell in self.layers:
            kernel, recurrent_kernel, bias = (
                tf.cast(w, tf.float32) for w in (cell.kernel, cell.recurrent_kernel, cell.bias)
            )
            sizes = _block_sizes(kernel.shape[-1])
            weights.append((tf.split(kernel, sizes, axis=1), tf.split(recurrent_kernel, sizes, axis=1), bias))
        return weights

    def __call__(self, x, states, weights):
        """(output [B, H], new states) for inputs x [B, E] and states {"h{i}_in": [B, H], …}."""
        new_states = {}
        step = _STEPS[self.cell.keras_layer]
        for i, layer_weights in enumerate(weights):
            names = [input_name(state) for state in layer_state_names(self.cell_name, i)]
            carried = step(self.cell, x, [states[name] for name in names], *layer_weights)
            new_states.update(zip(names, carried, strict=True))
            x = carried[0]  # h, the layer's output
        return x, new_states


def _block_sizes(columns):
    """BLOCKS column counts adding up to `columns`, as equal as they can be (any hidden size)."""
    blocks = min(BLOCKS, columns)
    return [columns // blocks + (1 if i < columns % blocks else 0) for i in range(blocks)]


def _product(x, blocks):
    """x·[B₁ … B_k] as one [B, ΣN] tensor; each block a MatMul of its own."""
    return tf.concat([tf.matmul(x, block) for block in blocks], axis=-1)


def _lstm(cell, x, states, kernel, recurrent_kernel, bias):
    """(h, c) after one step of an LSTM layer."""
    h, c = states
    z = tf.concat([tf.matmul(x, w) + tf.matmul(h, r) for w, r in zip(kernel, recurrent_kernel, strict=True)], -1)
    h, c, _ = lstm_update(cell, activated_gates(cell, z + bias), c)
    return h, c


def _gru(cell, x, states, kernel, recurrent_kernel, bias):
    """(h,) after one step of a reset_after GRU layer (bias [2, 3H]: input, recurrent)."""
    (h,) = states
    h, _ = gru_update(cell, _product(x, kernel) + bias[0], _product(h, recurrent_kernel) + bias[1], h)
    return (h,)


def _simple_rnn(cell, x, states, kernel, recurrent_kernel, bias):
    """(h,) after one step of a SimpleRNN layer."""
    (h,) = states
    return (ACTIVATIONS[cell.activation](_product(x, kernel) + _product(h, recurrent_kernel) + bias),)


# Each Keras layer's step; each returns the layer's new states in keraslm.cells' `states` order.
_STEPS = {"LSTM": _lstm, "GRU": _gru, "SimpleRNN": _simple_rnn}
