"""Recurrent layers over a whole window with hand-written backward passes, for training on a CPU.

Keras runs a recurrent layer as a `tf.while_loop` over its cell and lets TensorFlow differentiate
the loop. Each backward step then runs four matmuls (gradients of the input, the state and both
weight matrices) and adds two weight-sized gradients into accumulators, 100 times per window.
Only the gradient flowing back through the state is sequential. These kernels do what cuDNN and
PyTorch's CPU kernels do:

    forward   X·W + b for all steps at once; the loop does h·R and the gates
    backward  the loop carries only the state's gradient (one matmul by Rᵀ per step); dW = Xᵀ·dZ,
              dR = H_prevᵀ·dZ, db = Σ dZ and dX = dZ·Wᵀ are single large matmuls after it

The mathematics is Keras' cells (LSTM gates i, f, c, o; GRU with reset_after, gates z, r, h;
SimpleRNN with tanh or relu), so weights, checkpoints and exports are unchanged;
tests/test_cell_math.py checks outputs and every gradient against Keras' differentiated loop.
model.WindowKernel puts them under the stateful training layers.
"""

import tensorflow as tf


def lstm_sequence(inputs, h0, c0, kernel, recurrent_kernel, bias):
    """Run an LSTM over inputs [B, T, I] from (h0, c0) [B, H].

    Args:
        inputs: the window, batch-major.
        h0, c0: the carried state.
        kernel [I, 4H], recurrent_kernel [H, 4H], bias [4H]: Keras' LSTM weights (gates i, f, c, o).

    Returns:
        (outputs [B, T, H], h_T, c_T), differentiable in every argument.
    """
    dtype = inputs.dtype
    return _lstm(inputs, h0, c0, tf.cast(kernel, dtype), tf.cast(recurrent_kernel, dtype), tf.cast(bias, dtype))


def _gate_activations(z):
    i, f, g, o = tf.split(z, 4, axis=-1)
    return tf.sigmoid(i), tf.sigmoid(f), tf.tanh(g), tf.sigmoid(o)


@tf.custom_gradient
def _lstm(inputs, h0, c0, kernel, recurrent_kernel, bias):
    x_flat, steps, batch, width = _time_major(inputs)
    units = tf.shape(h0)[1]
    z_x = tf.reshape(tf.matmul(x_flat, kernel) + bias, [steps, batch, 4 * units])

    def step(t, h, c, hs, cs, gates):
        i, f, g, o = _gate_activations(z_x[t] + tf.matmul(h, recurrent_kernel))
        c = f * c + i * g
        h = o * tf.tanh(c)
        return t + 1, h, c, hs.write(t, h), cs.write(t, c), gates.write(t, tf.concat([i, f, g, o], -1))

    arrays = tuple(_array(inputs, steps, h0) for _ in range(3))
    _, h_last, c_last, hs, cs, gates = tf.while_loop(lambda t, *_: t < steps, step, (0, h0, c0, *arrays))
    hs, cs, gates = hs.stack(), cs.stack(), gates.stack()  # [T, B, H], [T, B, H], [T, B, 4H]

    def grad(d_outputs, d_h_last, d_c_last):
        d_outputs, d_h, d_c = _upstream(d_outputs, hs), _upstream(d_h_last, h0), _upstream(d_c_last, c0)
        # Everything elementwise that does not depend on the backward recursion, for all steps at once.
        i, f, g, o = tf.split(gates, 4, axis=-1)
        c_prev = tf.concat([c0[None], cs[:-1]], 0)
        h_prev = tf.concat([h0[None], hs[:-1]], 0)
        tanh_c = tf.tanh(cs)
        dc_from_dh = o * (1 - tanh_c * tanh_c)  # what dh_t adds to the gradient of c_t
        # dZ_t = [dc·g, dc·c_prev, dc·i, dh·tanh(c)] ⊙ the activations' derivatives
        factors = tf.concat([g * i * (1 - i), c_prev * f * (1 - f), i * (1 - g * g), tanh_c * o * (1 - o)], -1)

        def back(t, d_h, d_c, d_z):
            d_h = d_outputs[t] + d_h
            d_c = d_c + d_h * dc_from_dh[t]
            z = tf.concat([d_c, d_c, d_c, d_h], -1) * factors[t]
            return t - 1, tf.matmul(z, recurrent_kernel, transpose_b=True), d_c * f[t], d_z.write(t, z)

        _, d_h0, d_c0, d_z = tf.while_loop(lambda t, *_: t >= 0, back, (steps - 1, d_h, d_c, _array(inputs, steps, h0)))
        d_z = tf.reshape(d_z.stack(), [-1, 4 * units])  # [T·B, 4H]
        d_recurrent = tf.matmul(tf.reshape(h_prev, [-1, units]), d_z, transpose_a=True)
        d_inputs, d_kernel = _input_gradients(d_z, x_flat, kernel, steps, batch, width)
        return d_inputs, d_h0, d_c0, d_kernel, d_recurrent, tf.reduce_sum(d_z, 0)

    return (tf.transpose(hs, [1, 0, 2]), h_last, c_last), grad


def gru_sequence(inputs, h0, kernel, recurrent_kernel, bias):
    """Run Keras' GRU (reset_after=True, gates z, r, h) over inputs [B, T, I] from h0 [B, H].

    bias is Keras' [2, 3H]: the input bias, then the recurrent bias. Returns (outputs [B, T, H], h_T).
    """
    dtype = inputs.dtype
    return _gru(inputs, h0, tf.cast(kernel, dtype), tf.cast(recurrent_kernel, dtype), tf.cast(bias, dtype))


@tf.custom_gradient
def _gru(inputs, h0, kernel, recurrent_kernel, bias):
    x_flat, steps, batch, width = _time_major(inputs)
    units = tf.shape(h0)[1]
    x_z, x_r, x_h = tf.split(tf.reshape(tf.matmul(x_flat, kernel) + bias[0], [steps, batch, 3 * units]), 3, -1)

    def step(t, h, hs, saved):
        r_z, r_r, r_h = tf.split(tf.matmul(h, recurrent_kernel) + bias[1], 3, -1)
        z, r = tf.sigmoid(x_z[t] + r_z), tf.sigmoid(x_r[t] + r_r)
        candidate = tf.tanh(x_h[t] + r * r_h)
        h = z * h + (1 - z) * candidate
        return t + 1, h, hs.write(t, h), saved.write(t, tf.concat([z, r, candidate, r_h], -1))

    _, h_last, hs, saved = tf.while_loop(
        lambda t, *_: t < steps, step, (0, h0, _array(inputs, steps, h0), _array(inputs, steps, h0))
    )
    hs, saved = hs.stack(), saved.stack()

    def grad(d_outputs, d_h_last):
        d_outputs, d_h = _upstream(d_outputs, hs), _upstream(d_h_last, h0)
        z, r, candidate, r_h = tf.split(saved, 4, -1)
        h_prev = tf.concat([h0[None], hs[:-1]], 0)
        # With dh the gradient of h_t: ∂z_pre = dh·f_z, ∂r_pre = dh·f_r, ∂candidate_pre = dh·f_c,
        # and the recurrent pre-activations get [f_z, f_r, f_c·r]·dh.
        f_z = (h_prev - candidate) * z * (1 - z)
        f_c = (1 - z) * (1 - candidate * candidate)
        f_r = f_c * r_h * r * (1 - r)
        input_factors = tf.concat([f_z, f_r, f_c], -1)
        recurrent_factors = tf.concat([f_z, f_r, f_c * r], -1)

        def back(t, d_h, d_hs):
            d_h = d_outputs[t] + d_h
            d_rec = tf.concat([d_h, d_h, d_h], -1) * recurrent_factors[t]
            return t - 1, d_h * z[t] + tf.matmul(d_rec, recurrent_kernel, transpose_b=True), d_hs.write(t, d_h)

        _, d_h0, d_hs = tf.while_loop(lambda t, *_: t >= 0, back, (steps - 1, d_h, _array(inputs, steps, h0)))
        d_hs = tf.tile(d_hs.stack(), [1, 1, 3])
        d_x = tf.reshape(d_hs * input_factors, [-1, 3 * units])
        d_rec = tf.reshape(d_hs * recurrent_factors, [-1, 3 * units])
        d_bias = tf.stack([tf.reduce_sum(d_x, 0), tf.reduce_sum(d_rec, 0)])
        d_recurrent = tf.matmul(tf.reshape(h_prev, [-1, units]), d_rec, transpose_a=True)
        d_inputs, d_kernel = _input_gradients(d_x, x_flat, kernel, steps, batch, width)
        return d_inputs, d_h0, d_kernel, d_recurrent, d_bias

    return (tf.transpose(hs, [1, 0, 2]), h_last), grad


def rnn_sequence(inputs, h0, kernel, recurrent_kernel, bias, activation):
    """Run Keras' SimpleRNN (activation "tanh" or "relu") over inputs [B, T, I] from h0 [B, H].

    Returns (outputs [B, T, H], h_T).
    """
    dtype = inputs.dtype
    run = _rnn_tanh if activation == "tanh" else _rnn_relu
    return run(inputs, h0, tf.cast(kernel, dtype), tf.cast(recurrent_kernel, dtype), tf.cast(bias, dtype))


def _simple_rnn(inputs, h0, kernel, recurrent_kernel, bias, activation, derivative):
    x_flat, steps, batch, width = _time_major(inputs)
    units = tf.shape(h0)[1]
    x_w = tf.reshape(tf.matmul(x_flat, kernel) + bias, [steps, batch, units])

    def step(t, h, hs):
        h = activation(x_w[t] + tf.matmul(h, recurrent_kernel))
        return t + 1, h, hs.write(t, h)

    _, h_last, hs = tf.while_loop(lambda t, *_: t < steps, step, (0, h0, _array(inputs, steps, h0)))
    hs = hs.stack()

    def grad(d_outputs, d_h_last):
        d_outputs, d_h = _upstream(d_outputs, hs), _upstream(d_h_last, h0)
        factors = derivative(hs)  # the activation's derivative, from its output

        def back(t, d_h, d_pre):
            pre = (d_outputs[t] + d_h) * factors[t]
            return t - 1, tf.matmul(pre, recurrent_kernel, transpose_b=True), d_pre.write(t, pre)

        _, d_h0, d_pre = tf.while_loop(lambda t, *_: t >= 0, back, (steps - 1, d_h, _array(inputs, steps, h0)))
        d_pre = tf.reshape(d_pre.stack(), [-1, units])
        h_prev = tf.reshape(tf.concat([h0[None], hs[:-1]], 0), [-1, units])
        d_recurrent = tf.matmul(h_prev, d_pre, transpose_a=True)
        d_inputs, d_kernel = _input_gradients(d_pre, x_flat, kernel, steps, batch, width)
        return d_inputs, d_h0, d_kernel, d_recurrent, tf.reduce_sum(d_pre, 0)

    return (tf.transpose(hs, [1, 0, 2]), h_last), grad


@tf.custom_gradient
def _rnn_tanh(inputs, h0, kernel, recurrent_kernel, bias):
    return _simple_rnn(inputs, h0, kernel, recurrent_kernel, bias, tf.tanh, lambda h: 1 - h * h)


@tf.custom_gradient
def _rnn_relu(inputs, h0, kernel, recurrent_kernel, bias):
    return _simple_rnn(inputs, h0, kernel, recurrent_kernel, bias, tf.nn.relu, lambda h: tf.cast(h > 0, h.dtype))


def _time_major(inputs):
    """inputs [B, T, I] → (time-major inputs as [T·B, I], T, B, I)."""
    x = tf.transpose(inputs, [1, 0, 2])
    steps, batch, width = tf.shape(x)[0], tf.shape(x)[1], tf.shape(x)[2]
    return tf.reshape(x, [-1, width]), steps, batch, width


def _array(inputs, steps, h0):
    """A TensorArray of `steps` tensors with h0's batch size."""
    return tf.TensorArray(inputs.dtype, size=steps, element_shape=[h0.shape[0], None])


def _upstream(gradient, like):
    """An output's upstream gradient; None (the output unused) is zeros. Outputs come batch-major."""
    if gradient is None:
        return tf.zeros_like(like)
    return tf.transpose(gradient, [1, 0, 2]) if gradient.shape.rank == 3 else gradient


def _input_gradients(d_pre, x_flat, kernel, steps, batch, width):
    """(d_inputs [B, T, I], d_kernel) from the gradient of x·W [T·B, gH]: two single matmuls."""
    d_inputs = tf.reshape(tf.matmul(d_pre, kernel, transpose_b=True), [steps, batch, width])
    return tf.transpose(d_inputs, [1, 0, 2]), tf.matmul(x_flat, d_pre, transpose_a=True)
