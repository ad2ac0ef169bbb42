"""One step of each Keras cell equals the textbook equations in NumPy, using the layer's weights."""

import numpy as np
import pytest

from keraslm import cells
from keraslm.config import CELLS, ModelConfig
from keraslm.model import build_step_model, build_training_model, recurrent_layers


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def one_step(cell, **kwargs):
    """Run the twin one token from a random state; return (layer weights, x, h, (c), outputs)."""
    config = ModelConfig(vocabulary_size=7, cell=cell, num_layers=1, embedding_dim=4, hidden_dim=3, **kwargs)
    twin = build_step_model(config)
    rng = np.random.default_rng(1)
    for w in twin.weights:  # non-trivial biases and kernels
        w.assign(rng.normal(0, 0.5, w.shape).astype(np.float32))
    tokens = np.array([[5], [2]], np.int32)
    state = {
        f"{n}_in": rng.normal(0, 1, (2, 3)).astype(np.float32) for n in (["h0", "c0"] if cell == "lstm" else ["h0"])
    }
    outputs = {k: np.asarray(v) for k, v in twin({"tokens": tokens, **state}).items()}
    x = twin.get_layer("embedding").embeddings.numpy()[tokens[:, 0]]
    weights = [w.numpy() for w in twin.get_layer("rnn_0").weights]
    return weights, x, state, outputs, twin


def test_lstm_step():
    (W, U, b), x, state, out, _ = one_step("lstm")
    h, c = state["h0_in"], state["c0_in"]
    z = x @ W + h @ U + b
    i, f, g, o = np.split(z, 4, axis=-1)  # Keras' gate order: input, forget, cell, output
    c_new = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
    h_new = sigmoid(o) * np.tanh(c_new)
    np.testing.assert_allclose(out["c0_out"], c_new, atol=1e-5)
    np.testing.assert_allclose(out["h0_out"], h_new, atol=1e-5)


def test_gru_step():
    # reset_after=True (the cuDNN-compatible GRU, as torch.nn.GRU): the reset gate multiplies
    # the recurrent term after its bias. Gate order: update z, reset r, candidate n.
    (W, U, b), x, state, out, _ = one_step("gru")
    h = state["h0_in"]
    b_input, b_recurrent = b
    xz, xr, xn = np.split(x @ W + b_input, 3, axis=-1)
    hz, hr, hn = np.split(h @ U + b_recurrent, 3, axis=-1)
    z = sigmoid(xz + hz)
    r = sigmoid(xr + hr)
    n = np.tanh(xn + r * hn)
    h_new = z * h + (1 - z) * n
    np.testing.assert_allclose(out["h0_out"], h_new, atol=1e-5)


def test_simple_rnn_tanh_and_relu_steps():
    for cell, activation in (("rnn_tanh", np.tanh), ("rnn_relu", lambda v: np.maximum(v, 0))):
        (W, U, b), x, state, out, _ = one_step(cell)
        h_new = activation(x @ W + state["h0_in"] @ U + b)
        np.testing.assert_allclose(out["h0_out"], h_new, atol=1e-5)


def test_logits_are_the_projection_of_the_last_hidden_state():
    _, _, _, out, twin = one_step("rnn_tanh")
    kernel, bias = (w.numpy() for w in twin.get_layer("logits").weights)
    np.testing.assert_allclose(out["logits"][:, 0], out["h0_out"] @ kernel + bias, atol=1e-5)


def test_every_cell_has_a_layout():
    assert set(cells.CELLS) == set(CELLS)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("stateful", [False, True])
def test_cell_layout_is_the_keras_layers(cell, stateful):
    """keraslm.cells' layout of each cell is that of the Keras layer the model builders make: its class,
    weight shapes (gates × units columns, bias rows), activations, reset_after and carried state.
    (The gate order is checked by the step equations above, ONNX's by the export's parity checks.)"""
    import keras

    spec = cells.CELLS[cell]
    config = ModelConfig(vocabulary_size=7, cell=cell, num_layers=1, embedding_dim=4, hidden_dim=3)
    model = build_training_model(config, batch_size=2) if stateful else build_step_model(config)
    layer = model.get_layer("rnn_0")
    assert isinstance(layer, getattr(keras.layers, spec.keras_layer))
    keras_cell = layer.cell
    assert tuple(keras_cell.kernel.shape) == (4, spec.kernel_columns(3)) == (4, len(spec.gates) * 3)
    assert tuple(keras_cell.recurrent_kernel.shape) == (3, spec.kernel_columns(3))
    assert tuple(keras_cell.bias.shape) == spec.bias_shape(3)
    assert keras_cell.activation is keras.activations.get(spec.activation)
    if spec.recurrent_activation is not None:
        assert keras_cell.recurrent_activation is keras.activations.get(spec.recurrent_activation)
    assert getattr(keras_cell, "reset_after", False) == spec.reset_after
    assert len(keras.tree.flatten(keras_cell.state_size)) == len(spec.states)
    assert spec.num_parameters(4, 3) == layer.count_params()
    assert sorted(spec.onnx_gates) == sorted(spec.gates) and spec.candidate in spec.gates


def window_kernel(cell, x, state, weights):
    """A function running keraslm.recurrence's kernel for `cell`."""
    from keraslm import recurrence

    if cell == "lstm":
        return lambda: recurrence.lstm_sequence(x, *state, *weights)
    if cell == "gru":
        return lambda: recurrence.gru_sequence(x, *state, *weights)
    return lambda: recurrence.rnn_sequence(x, *state, *weights, activation=cell.split("_")[1])


def outputs_and_gradients(run, x, state, weights, upstream):
    """run()'s outputs and the gradients of Σ outputs·upstream in x, the state and the weights."""
    import tensorflow as tf

    with tf.GradientTape() as tape:
        tape.watch([x, *state, *(w for w in weights if isinstance(w, tf.Tensor))])  # variables are watched anyway
        outputs = run()
        loss = sum(tf.reduce_sum(tf.cast(o, tf.float32) * u) for o, u in zip(outputs, upstream, strict=True))
    return outputs, tape.gradient(loss, [x, *state, *weights])


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh", "rnn_relu"])
def test_window_kernels_equal_keras_loop_and_its_gradients(cell):
    """keraslm.recurrence (the training models' recurrent layers on a CPU): outputs, final state and
    the gradient of every input and weight equal TensorFlow's differentiation of Keras' own loop."""
    import keras
    import tensorflow as tf

    rng = np.random.default_rng(2)
    batch, steps, width, units = 4, 9, 5, 6
    if cell == "lstm":
        layer = keras.layers.LSTM(units, return_sequences=True, return_state=True, use_cudnn=False)
    elif cell == "gru":
        layer = keras.layers.GRU(units, return_sequences=True, return_state=True, use_cudnn=False)
    else:
        activation = cell.split("_")[1]
        layer = keras.layers.SimpleRNN(units, activation=activation, return_sequences=True, return_state=True)
    kinds = 2 if cell == "lstm" else 1
    x = tf.constant(rng.normal(size=(batch, steps, width)).astype(np.float32))
    state = [tf.constant(rng.normal(size=(batch, units)).astype(np.float32)) for _ in range(kinds)]
    layer(x, initial_state=state)
    layer.cell.bias.assign(rng.normal(size=layer.cell.bias.shape).astype(np.float32))
    shapes = [(batch, steps, units)] + [(batch, units)] * kinds
    upstream = [tf.constant(rng.normal(size=s).astype(np.float32)) for s in shapes]
    weights = [layer.cell.kernel, layer.cell.recurrent_kernel, layer.cell.bias]

    keras_out, keras_grads = outputs_and_gradients(lambda: layer(x, initial_state=state), x, state, weights, upstream)
    kernel = tf.function(
        lambda: outputs_and_gradients(window_kernel(cell, x, state, weights), x, state, weights, upstream)
    )
    kernel_out, kernel_grads = kernel()
    for expected, got in zip([*keras_out, *keras_grads], [*kernel_out, *kernel_grads], strict=True):
        np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=1e-5)

    # It is what the stateful training model's layer runs here (a CPU).
    config = ModelConfig(vocabulary_size=7, cell=cell, num_layers=1, embedding_dim=4, hidden_dim=3)
    assert build_training_model(config, batch_size=2).get_layer("rnn_0")._window_kernel_applies(None)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh", "rnn_relu"])
def test_window_kernels_in_bfloat16_follow_float32(cell):
    """Under mixed_bfloat16 Keras hands the kernels bfloat16 inputs, state and weights; they multiply in
    bfloat16 and keep the elementwise mathematics and the state within the window in float32. Outputs
    and gradients come back in the dtypes they went in, equal to the float32 kernel run on the same
    (rounded) values within bfloat16 rounding."""
    import tensorflow as tf

    rng = np.random.default_rng(3)
    batch, steps, width, units = 8, 30, 16, 32
    gates = {"lstm": 4, "gru": 3}.get(cell, 1)
    bias_shape = (2, gates * units) if cell == "gru" else (gates * units,)
    shapes = [(batch, steps, width)] + [(batch, units)] * (2 if cell == "lstm" else 1)
    shapes += [(width, gates * units), (units, gates * units), bias_shape]
    # Values representable in bfloat16, so that both runs start from the same numbers; a contracting
    # recurrent kernel, so that rounding does not grow chaotically over the steps.
    scales = [1.0] * (len(shapes) - 3) + [0.3, 0.5 / np.sqrt(units), 0.3]
    values = [
        tf.cast(tf.cast(rng.normal(0, scale, s).astype(np.float32), tf.bfloat16), tf.float32)
        for s, scale in zip(shapes, scales, strict=True)
    ]
    n_state = len(shapes) - 4
    upstream = [tf.constant(rng.normal(size=s).astype(np.float32)) for s in [(batch, steps, units)] + shapes[1:-3]]

    def run(dtype):
        x, *rest = (tf.cast(v, dtype) for v in values)
        state, weights = rest[:n_state], rest[n_state:]
        return tf.function(
            lambda: outputs_and_gradients(window_kernel(cell, x, state, weights), x, state, weights, upstream)
        )()

    expected_out, expected_grads = run(tf.float32)
    low_out, low_grads = run(tf.bfloat16)
    # Relative error over each whole tensor: relu's derivative jumps at 0, so a pre-activation that
    # bfloat16 rounding moves across 0 changes single gradient entries by a lot. On a CPU without
    # bfloat16 units (AMD EPYC here, 2026-11-30) that took the largest relu entry 7.6% off while
    # each tensor as a whole stayed within 1.9%; the smooth cells stay within 0.6% either way.
    tolerance = 0.03 if cell == "rnn_relu" else 0.01
    for expected, got in zip([*expected_out, *expected_grads], [*low_out, *low_grads], strict=True):
        assert got.dtype == tf.bfloat16
        got, expected = tf.cast(got, tf.float32).numpy(), expected.numpy()
        error = np.linalg.norm(got - expected) / np.linalg.norm(expected)
        assert error <= tolerance, (got.shape, error)


@pytest.mark.parametrize("hidden_dim", [5, 9])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh", "rnn_relu"])
def test_token_step_with_split_weights_equals_the_twin(cell, hidden_dim):
    """generate's one-token step (weights cut into column blocks, keraslm.token_step) gives the
    twin's output and states, for hidden sizes that the blocks do not divide evenly."""
    import tensorflow as tf

    from keraslm.token_step import TokenStep

    config = ModelConfig(vocabulary_size=7, cell=cell, num_layers=2, embedding_dim=4, hidden_dim=hidden_dim)
    twin = build_step_model(config)
    rng = np.random.default_rng(4)
    for w in twin.weights:
        w.assign(rng.normal(0, 0.5, w.shape).astype(np.float32))
    tokens = np.array([[5], [2], [0]], np.int32)
    names = [f"{k}{i}" for i in range(2) for k in (["h", "c"] if cell == "lstm" else ["h"])]
    state = {f"{n}_in": rng.normal(0, 1, (3, hidden_dim)).astype(np.float32) for n in names}
    expected = twin({"tokens": tokens, **state})

    step = TokenStep(recurrent_layers(twin), config)
    x = twin.get_layer("embedding")(tokens[:, 0])
    output, new_state = step(x, {k: tf.constant(v) for k, v in state.items()}, step.weights())
    np.testing.assert_allclose(output.numpy(), expected["h1_out"].numpy()[:, :], atol=1e-5)
    for n in names:
        np.testing.assert_allclose(new_state[f"{n}_in"].numpy(), expected[f"{n}_out"].numpy(), atol=1e-5)
