"""An LSTM over a whole window with a hand-written backward pass, for training on a CPU.

Keras runs a recurrent layer as a `tf.while_loop` over its cell and lets TensorFlow differentiate
the loop. Each backward step then runs four matmuls (gradients of the input, the state and both
weight matrices) and adds two weight-sized gradients into accumulators, 100 times per window.
Most of that does not need to be inside the loop: only the gradient flowing back through the
state is sequential. This module does what cuDNN and PyTorch's CPU kernels do:

    forward   Z_x = X·W + b for all steps at once; the loop does h·R and the gates
    backward  the loop only carries dh, dc and computes dZ_t (one dZ_t·Rᵀ per step);
              dW = Xᵀ·dZ, dR = H_prevᵀ·dZ, db = Σ dZ and dX = dZ·Wᵀ are single large matmuls

The mathematics is Keras' LSTM cell (gates i, f, c, o; sigmoid, tanh), so weights, checkpoints and
exports are unchanged. `tests/test_model.py` checks outputs and every gradient against Keras'.
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
    x = tf.transpose(inputs, [1, 0, 2])  # [T, B, I]: the loop reads one step at a time
    steps, batch, width = tf.shape(x)[0], tf.shape(x)[1], tf.shape(x)[2]
    units = tf.shape(h0)[1]
    x_flat = tf.reshape(x, [-1, width])
    z_x = tf.reshape(tf.matmul(x_flat, kernel) + bias, [steps, batch, 4 * units])

    def step(t, h, c, hs, cs, gates):
        i, f, g, o = _gate_activations(z_x[t] + tf.matmul(h, recurrent_kernel))
        c = f * c + i * g
        h = o * tf.tanh(c)
        return t + 1, h, c, hs.write(t, h), cs.write(t, c), gates.write(t, tf.concat([i, f, g, o], -1))

    def arrays():
        return tf.TensorArray(inputs.dtype, size=steps, element_shape=h0.shape)

    gate_array = tf.TensorArray(inputs.dtype, size=steps, element_shape=[h0.shape[0], None])
    _, h_last, c_last, hs, cs, gates = tf.while_loop(
        lambda t, *_: t < steps, step, (0, h0, c0, arrays(), arrays(), gate_array)
    )
    hs, cs, gates = hs.stack(), cs.stack(), gates.stack()  # [T, B, H], [T, B, H], [T, B, 4H]

    def grad(d_outputs, d_h_last, d_c_last):
        d_outputs = tf.transpose(d_outputs, [1, 0, 2]) if d_outputs is not None else tf.zeros_like(hs)
        d_h = d_h_last if d_h_last is not None else tf.zeros_like(h0)
        d_c = d_c_last if d_c_last is not None else tf.zeros_like(c0)
        # Everything elementwise that does not depend on the backward recursion, for all steps at once.
        i, f, g, o = tf.split(gates, 4, axis=-1)
        c_prev = tf.concat([c0[None], cs[:-1]], 0)
        h_prev = tf.concat([h0[None], hs[:-1]], 0)
        tanh_c = tf.tanh(cs)
        dc_from_dh = o * (1 - tanh_c * tanh_c)  # ∂c_t-contribution of dh_t
        # dZ_t = [dc·g, dc·c_prev, dc·i, dh·tanh(c)] ⊙ activation derivatives
        factors = tf.concat([g * i * (1 - i), c_prev * f * (1 - f), i * (1 - g * g), tanh_c * o * (1 - o)], -1)

        def back(t, d_h, d_c, d_z):
            d_h = d_outputs[t] + d_h
            d_c = d_c + d_h * dc_from_dh[t]
            z = tf.concat([d_c, d_c, d_c, d_h], -1) * factors[t]
            return t - 1, tf.matmul(z, recurrent_kernel, transpose_b=True), d_c * f[t], d_z.write(t, z)

        d_z = tf.TensorArray(inputs.dtype, size=steps, element_shape=[h0.shape[0], None])
        _, d_h0, d_c0, d_z = tf.while_loop(lambda t, *_: t >= 0, back, (steps - 1, d_h, d_c, d_z))
        d_z = tf.reshape(d_z.stack(), [-1, 4 * units])  # [T·B, 4H]
        d_kernel = tf.matmul(x_flat, d_z, transpose_a=True)
        d_recurrent = tf.matmul(tf.reshape(h_prev, [-1, units]), d_z, transpose_a=True)
        d_bias = tf.reduce_sum(d_z, 0)
        d_inputs = tf.transpose(tf.reshape(tf.matmul(d_z, kernel, transpose_b=True), [steps, batch, width]), [1, 0, 2])
        return d_inputs, d_h0, d_c0, d_kernel, d_recurrent, d_bias

    return (tf.transpose(hs, [1, 0, 2]), h_last, c_last), grad
