"""One step of each Keras cell equals the textbook equations in NumPy, using the layer's weights."""

import numpy as np

from keraslm.config import ModelConfig
from keraslm.model import build_model


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def one_step(cell, **kwargs):
    """Run the twin one token from a random state; return (layer weights, x, h, (c), outputs)."""
    config = ModelConfig(vocabulary_size=7, cell=cell, num_layers=1, embedding_dim=4, hidden_dim=3, **kwargs)
    twin = build_model(config)
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
