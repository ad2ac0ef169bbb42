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
keras_compat.WindowKernel puts them under the stateful training layers.
"""

import tensorflow as tf


def lstm_sequence(inputs, h0, c0, kernel, recurrent_kernel, bias):
    """Run an LSTM over inputs [B, T, I] from (h0, c0) [B, H].

    Args:
        inputs: the window, batch-major; its dtype is the matmuls' (bfloat16 under mixed precision).
        h0, c0: the carried state.
        kernel [I, 4H], recurrent_kernel [H, 4H], bias [4H]: Keras' LSTM weights (gates i, f, c, o).

    Returns:
        (outputs [B, T, H] in inputs' dtype, h_T, c_T in h0's and c0's), differentiable in every argument.
    """
    dtype = inputs.dtype
    return _lstm(inputs, h0, c0, tf.cast(kernel, dtype), tf.cast(recurrent_kernel, dtype), tf.cast(bias, tf.float32))


def _gate_activations(z):
    i, f, g, o = tf.split(z, 4, axis=-1)
    return tf.sigmoid(i), tf.sigmoid(f), tf.tanh(g), tf.sigmoid(o)


@tf.custom_gradient
def _lstm(inputs, h0, c0, kernel, recurrent_kernel, bias):
    low = inputs.dtype
    x_flat, steps, batch, width = _time_major(inputs)
    units = tf.shape(h0)[1]
    z_x = tf.reshape(_float_product(x_flat, kernel) + bias, [steps, batch, 4 * units])

    def step(t, h, c, hs, factor_s, dc_s, f_s):
        i, f, g, o = _gate_activations(z_x[t] + _float(tf.matmul(h, recurrent_kernel)))
        c_next = f * c + i * g
        tanh_c = tf.tanh(c_next)
        h = tf.cast(o * tanh_c, low)
        # What the backward pass needs of this step, computed here while the step's gates are in
        # cache: over a whole window afterwards the same products stream [T, B, 4H] tensors
        # through memory (30 ms a layer and window at the char benchmark's size).
        # dZ_t = [dc·g, dc·c_prev, dc·i, dh·tanh(c)] ⊙ the activations' derivatives:
        factors = tf.concat([g * i * (1 - i), c * f * (1 - f), i * (1 - g * g), tanh_c * o * (1 - o)], -1)
        dc_from_dh = o * (1 - tanh_c * tanh_c)  # what dh_t adds to the gradient of c_t
        saved = (factor_s.write(t, factors), dc_s.write(t, dc_from_dh), f_s.write(t, f))
        return t + 1, h, c_next, hs.write(t, h), *saved

    arrays = (_array(low, steps, h0), *(_array(tf.float32, steps, h0) for _ in range(3)))
    h_first, c_first = tf.cast(h0, low), _float(c0)
    _, h_last, c_last, *arrays = tf.while_loop(lambda t, *_: t < steps, step, (0, h_first, c_first, *arrays))
    hs, factors, dc_from_dh, f = (array.stack() for array in arrays)  # [T, B, H], [T, B, 4H], [T, B, H] × 2

    def grad(d_outputs, d_h_last, d_c_last):
        # Rᵀ once, rather than a transposed product every step: in float32 the backward loop's
        # 100 [64, 2048]·[512, 2048]ᵀ products took 118-129 ms, by a transposed copy 69-99 ms.
        recurrent_t = tf.transpose(recurrent_kernel)
        d_outputs, d_h = _float(_upstream(d_outputs, hs)), _float(_upstream(d_h_last, h0))
        d_c = _float(_upstream(d_c_last, c0))
        h_prev = tf.concat([h_first[None], hs[:-1]], 0)

        def back(t, d_h, d_c, d_z):
            d_h = d_outputs[t] + d_h
            d_c = d_c + d_h * dc_from_dh[t]
            z = tf.cast(tf.concat([d_c, d_c, d_c, d_h], -1) * factors[t], low)
            d_h = _float(tf.matmul(z, recurrent_t))
            return t - 1, d_h, d_c * f[t], d_z.write(t, z)

        back_start = (steps - 1, d_h, d_c, _array(low, steps, h0))
        _, d_h0, d_c0, d_z = tf.while_loop(lambda t, *_: t >= 0, back, back_start)
        d_z = tf.reshape(d_z.stack(), [-1, 4 * units])  # [T·B, 4H]
        d_recurrent = tf.matmul(tf.reshape(h_prev, [-1, units]), d_z, transpose_a=True)
        d_inputs, d_kernel = _input_gradients(d_z, x_flat, kernel, steps, batch, width)
        d_h0, d_c0 = tf.cast(d_h0, h0.dtype), tf.cast(d_c0, c0.dtype)
        return d_inputs, d_h0, d_c0, d_kernel, d_recurrent, _column_sums(d_z)

    return (tf.transpose(hs, [1, 0, 2]), tf.cast(h_last, h0.dtype), tf.cast(c_last, c0.dtype)), grad


def gru_sequence(inputs, h0, kernel, recurrent_kernel, bias):
    """Run Keras' GRU (reset_after=True, gates z, r, h) over inputs [B, T, I] from h0 [B, H].

    bias is Keras' [2, 3H]: the input bias, then the recurrent bias. Returns (outputs [B, T, H] in
    inputs' dtype, h_T in h0's).
    """
    dtype = inputs.dtype
    return _gru(inputs, h0, tf.cast(kernel, dtype), tf.cast(recurrent_kernel, dtype), tf.cast(bias, tf.float32))


@tf.custom_gradient
def _gru(inputs, h0, kernel, recurrent_kernel, bias):
    low = inputs.dtype
    x_flat, steps, batch, width = _time_major(inputs)
    units = tf.shape(h0)[1]
    z_x = tf.reshape(_float_product(x_flat, kernel) + bias[0], [steps, batch, 3 * units])

    def step(t, h, hs, input_factor_s, recurrent_factor_s, z_s):
        r_z, r_r, r_h = tf.split(_float(tf.matmul(tf.cast(h, low), recurrent_kernel)) + bias[1], 3, -1)
        x_z, x_r, x_h = tf.split(z_x[t], 3, -1)
        z, r = tf.sigmoid(x_z + r_z), tf.sigmoid(x_r + r_r)
        candidate = tf.tanh(x_h + r * r_h)
        # What the backward pass needs of this step, computed while it is in cache (see _lstm).
        # With dh the gradient of h_t: ∂z_pre = dh·f_z, ∂r_pre = dh·f_r, ∂candidate_pre = dh·f_c,
        # and the recurrent pre-activations get [f_z, f_r, f_c·r]·dh.
        f_z = (h - candidate) * z * (1 - z)
        f_c = (1 - z) * (1 - candidate * candidate)
        f_r = f_c * r_h * r * (1 - r)
        saved = (
            input_factor_s.write(t, tf.concat([f_z, f_r, f_c], -1)),
            recurrent_factor_s.write(t, tf.concat([f_z, f_r, f_c * r], -1)),
            z_s.write(t, z),
        )
        h = z * h + (1 - z) * candidate  # the state stays float32 from step to step
        return t + 1, h, hs.write(t, tf.cast(h, low)), *saved

    h_first = _float(h0)
    arrays = (_array(low, steps, h0), *(_array(tf.float32, steps, h0) for _ in range(3)))
    _, h_last, *arrays = tf.while_loop(lambda t, *_: t < steps, step, (0, h_first, *arrays))
    hs, input_factors, recurrent_factors, z = (array.stack() for array in arrays)  # [T, B, H or 3H]

    def grad(d_outputs, d_h_last):
        recurrent_t = tf.transpose(recurrent_kernel)  # once (see _lstm)
        d_outputs, d_h = _float(_upstream(d_outputs, hs)), _float(_upstream(d_h_last, h0))

        def back(t, d_h, d_xs, d_recs):
            d_h = d_outputs[t] + d_h
            d_h3 = tf.concat([d_h, d_h, d_h], -1)
            d_rec = tf.cast(d_h3 * recurrent_factors[t], low)
            d_h_prev = d_h * z[t] + _float(tf.matmul(d_rec, recurrent_t))
            return t - 1, d_h_prev, d_xs.write(t, tf.cast(d_h3 * input_factors[t], low)), d_recs.write(t, d_rec)

        back_start = (steps - 1, d_h, _array(low, steps, h0), _array(low, steps, h0))
        _, d_h0, d_x, d_rec = tf.while_loop(lambda t, *_: t >= 0, back, back_start)
        d_x, d_rec = tf.reshape(d_x.stack(), [-1, 3 * units]), tf.reshape(d_rec.stack(), [-1, 3 * units])
        d_bias = tf.stack([_column_sums(d_x), _column_sums(d_rec)])
        h_prev = tf.concat([tf.cast(h_first, low)[None], hs[:-1]], 0)
        d_recurrent = tf.matmul(tf.reshape(h_prev, [-1, units]), d_rec, transpose_a=True)
        d_inputs, d_kernel = _input_gradients(d_x, x_flat, kernel, steps, batch, width)
        return d_inputs, tf.cast(d_h0, h0.dtype), d_kernel, d_recurrent, d_bias

    return (tf.transpose(hs, [1, 0, 2]), tf.cast(h_last, h0.dtype)), grad


def rnn_sequence(inputs, h0, kernel, recurrent_kernel, bias, activation):
    """Run Keras' SimpleRNN (activation "tanh" or "relu") over inputs [B, T, I] from h0 [B, H].

    Returns (outputs [B, T, H] in inputs' dtype, h_T in h0's).
    """
    dtype = inputs.dtype
    run = _rnn_tanh if activation == "tanh" else _rnn_relu
    return run(inputs, h0, tf.cast(kernel, dtype), tf.cast(recurrent_kernel, dtype), tf.cast(bias, tf.float32))


def _simple_rnn(inputs, h0, kernel, recurrent_kernel, bias, activation, derivative):
    low = inputs.dtype
    x_flat, steps, batch, width = _time_major(inputs)
    units = tf.shape(h0)[1]
    x_w = tf.reshape(_float_product(x_flat, kernel) + bias, [steps, batch, units])

    def step(t, h, hs):
        h = tf.cast(activation(x_w[t] + _float(tf.matmul(h, recurrent_kernel))), low)
        return t + 1, h, hs.write(t, h)

    h_first = tf.cast(h0, low)
    _, h_last, hs = tf.while_loop(lambda t, *_: t < steps, step, (0, h_first, _array(low, steps, h0)))
    hs = hs.stack()

    def grad(d_outputs, d_h_last):
        recurrent_t = tf.transpose(recurrent_kernel)  # once (see _lstm)
        d_outputs, d_h = _float(_upstream(d_outputs, hs)), _float(_upstream(d_h_last, h0))
        factors = derivative(_float(hs))  # the activation's derivative, from its output

        def back(t, d_h, d_pre):
            pre = tf.cast((d_outputs[t] + d_h) * factors[t], low)
            return t - 1, _float(tf.matmul(pre, recurrent_t)), d_pre.write(t, pre)

        _, d_h0, d_pre = tf.while_loop(lambda t, *_: t >= 0, back, (steps - 1, d_h, _array(low, steps, h0)))
        d_pre = tf.reshape(d_pre.stack(), [-1, units])
        h_prev = tf.reshape(tf.concat([h_first[None], hs[:-1]], 0), [-1, units])
        d_recurrent = tf.matmul(h_prev, d_pre, transpose_a=True)
        d_inputs, d_kernel = _input_gradients(d_pre, x_flat, kernel, steps, batch, width)
        return d_inputs, tf.cast(d_h0, h0.dtype), d_kernel, d_recurrent, _column_sums(d_pre)

    return (tf.transpose(hs, [1, 0, 2]), tf.cast(h_last, h0.dtype)), grad


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


def _array(dtype, steps, h0):
    """A TensorArray of `steps` tensors of `dtype` with h0's batch size."""
    return tf.TensorArray(dtype, size=steps, element_shape=[h0.shape[0], None])


def _column_sums(x):
    """Σ over rows of x [N, K] as float32 [K]: a product by a row of ones. tf.reduce_sum over axis 0
    of a [6,400, 2,048] gradient took 20 ms here, plus 10 ms to cast it from bfloat16 first."""
    ones = tf.ones([1, tf.shape(x)[0]], x.dtype)
    return _float(tf.matmul(ones, x)[0])


@tf.function(jit_compile=True)
def _xla_float_product(a, b):
    return tf.linalg.matmul(a, b, output_type=tf.float32)


def _float_product(a, b):
    """a·b as float32. In bfloat16 through XLA's dot, which accumulates and returns float32 where
    TensorFlow's kernel would round to bfloat16 and a cast would copy the product again."""
    if a.dtype == tf.bfloat16:
        return _xla_float_product(a, b)
    return tf.matmul(a, b)


def _float(x):
    """x in float32, where the elementwise mathematics runs: TensorFlow's CPU kernels for bfloat16
    convert every element and run 2-3× slower (sigmoid over a [64, 2048] step: 244 µs against 89)."""
    return tf.cast(x, tf.float32)


def _upstream(gradient, like):
    """An output's upstream gradient; None (the output unused) is zeros. Outputs come batch-major."""
    if gradient is None:
        return tf.zeros_like(like)
    return tf.transpose(gradient, [1, 0, 2]) if gradient.shape.rank == 3 else gradient


def _input_gradients(d_pre, x_flat, kernel, steps, batch, width):
    """(d_inputs [B, T, I], d_kernel) from the gradient of x·W [T·B, gH]: two single matmuls."""
    d_inputs = tf.reshape(tf.matmul(d_pre, kernel, transpose_b=True), [steps, batch, width])
    return tf.transpose(d_inputs, [1, 0, 2]), tf.matmul(x_flat, d_pre, transpose_a=True)
