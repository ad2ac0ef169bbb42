"""Recurrent layers over a whole window with hand-written backward passes, for training on a CPU.

Keras runs a recurrent layer as a `tf.while_loop` over its cell and lets TensorFlow differentiate
the loop. Each backward step then runs four matmuls (gradients of the input, the state and both
weight matrices) and adds two weight-sized gradients into accumulators, 100 times per window.
Only the gradient flowing back through the state is sequential. These kernels do what cuDNN and
PyTorch's CPU kernels do:

    forward   X·W + b for all steps at once; the loop does h·R and the gates
    backward  the loop carries only the state's gradient (one matmul by Rᵀ per step); dW = Xᵀ·dZ,
              dR = H_prevᵀ·dZ, db = Σ dZ and dX = dZ·Wᵀ are single large matmuls after it

The mathematics is Keras' cells (LSTM; GRU with reset_after; SimpleRNN), written over the gates by
name; where each gate sits in the weight columns and which activation it takes come from
keraslm.cells, so weights, checkpoints and exports are unchanged. tests/test_cell_math.py checks
outputs and every gradient against Keras' differentiated loop. keras_compat.WindowKernel puts them under
the stateful training layers.
"""

import tensorflow as tf

from keraslm.cells import CELLS

LSTM, GRU = CELLS["lstm"], CELLS["gru"]
# The activations keraslm.cells names, and each one's derivative written in its output y: the
# backward pass keeps outputs, not pre-activations.
ACTIVATIONS = {"sigmoid": tf.sigmoid, "tanh": tf.tanh, "relu": tf.nn.relu}
_DERIVATIVES = {
    "sigmoid": lambda y: y * (1 - y),
    "tanh": lambda y: 1 - y * y,
    "relu": lambda y: tf.cast(y > 0, y.dtype),
}


def split_gates(cell, z):
    """Pre-activations z [..., g·H] as {gate: [..., H]}, cut in the cell's column order."""
    return dict(zip(cell.gates, tf.split(z, len(cell.gates), axis=-1), strict=True))


def activated_gates(cell, z):
    """{gate: its activation} of pre-activations z [..., g·H]."""
    return {gate: ACTIVATIONS[cell.gate_activation(gate)](pre) for gate, pre in split_gates(cell, z).items()}


def _derivative(cell, gate, y):
    """The derivative of `gate`'s activation, from its output y."""
    return _DERIVATIVES[cell.gate_activation(gate)](y)


def _join_gates(cell, by_gate):
    """{gate: [..., H]} as one [..., g·H], in the cell's column order."""
    return tf.concat([by_gate[gate] for gate in cell.gates], -1)


def lstm_update(cell, gate, c):
    """An LSTM's activated gates {i, f, c, o} and cell state c → (h, c_next, activation(c_next))."""
    c_next = gate["f"] * c + gate["i"] * gate["c"]
    out = ACTIVATIONS[cell.activation](c_next)
    return gate["o"] * out, c_next, out


def gru_update(cell, x_pre, h_pre, h):
    """One step of a reset_after GRU from the input's and the state's pre-activations [B, 3H], each
    with its bias row, and h [B, H] → (h_next, (z, r, candidate, h·R_h + b_Rh)): the gates are
    for the backward pass."""
    x_gate, h_gate = split_gates(cell, x_pre), split_gates(cell, h_pre)
    z, r = (ACTIVATIONS[cell.gate_activation(g)](x_gate[g] + h_gate[g]) for g in ("z", "r"))
    candidate = ACTIVATIONS[cell.activation](x_gate["h"] + r * h_gate["h"])  # reset after h·R + b_R
    return z * h + (1 - z) * candidate, (z, r, candidate, h_gate["h"])


def lstm_sequence(inputs, h0, c0, kernel, recurrent_kernel, bias):
    """Run an LSTM over inputs [B, T, I] from (h0, c0) [B, H].

    Args:
        inputs: the window, batch-major; its dtype is the matmuls' (bfloat16 under mixed precision).
        h0, c0: the carried state.
        kernel [I, 4H], recurrent_kernel [H, 4H], bias [4H]: Keras' LSTM weights.

    Returns:
        (outputs [B, T, H] in inputs' dtype, h_T, c_T in h0's and c0's), differentiable in every argument.
    """
    dtype = inputs.dtype
    return _lstm(inputs, h0, c0, tf.cast(kernel, dtype), tf.cast(recurrent_kernel, dtype), tf.cast(bias, tf.float32))


def _lstm_step(z, c):
    """One LSTM step from pre-activations z [B, 4H] and c [B, H]: (h, c_next, backward factors)."""
    gate = activated_gates(LSTM, z)
    i, f, g, o = gate["i"], gate["f"], gate["c"], gate["o"]
    h, c_next, out = lstm_update(LSTM, gate, c)
    # What the backward pass needs of this step, computed here while the step's gates are in
    # cache: over a whole window afterwards the same products stream [T, B, 4H] tensors
    # through memory (30 ms a layer and window at the char benchmark's size).
    # dZ_t = [dc·g, dc·c_prev, dc·i, dh·tanh(c)] ⊙ the activations' derivatives:
    derivative = {name: _derivative(LSTM, name, y) for name, y in gate.items()}
    by_gate = {"i": g * derivative["i"], "f": c * derivative["f"], "c": i * derivative["c"], "o": out * derivative["o"]}
    dc_from_dh = o * _DERIVATIVES[LSTM.activation](out)  # what dh_t adds to the gradient of c_t
    return h, c_next, (_join_gates(LSTM, by_gate), dc_from_dh, f)


@tf.custom_gradient
def _lstm(inputs, h0, c0, kernel, recurrent_kernel, bias):
    low = inputs.dtype
    x_flat, steps, batch, width = _time_major(inputs)
    units = tf.shape(h0)[1]
    columns = LSTM.kernel_columns(units)
    z_x = tf.reshape(_float_product(x_flat, kernel) + bias, [steps, batch, columns])

    def step(t, h, c, hs, *saved):
        h, c_next, factors = _lstm_step(z_x[t] + _float(tf.matmul(h, recurrent_kernel)), c)
        h = tf.cast(h, low)
        saved = (array.write(t, factor) for array, factor in zip(saved, factors, strict=True))
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
            z = tf.cast(_join_gates(LSTM, {"i": d_c, "f": d_c, "c": d_c, "o": d_h}) * factors[t], low)
            d_h = _float(tf.matmul(z, recurrent_t))
            return t - 1, d_h, d_c * f[t], d_z.write(t, z)

        back_start = (steps - 1, d_h, d_c, _array(low, steps, h0))
        _, d_h0, d_c0, d_z = tf.while_loop(lambda t, *_: t >= 0, back, back_start)
        d_z = tf.reshape(d_z.stack(), [-1, columns])  # [T·B, 4H]
        d_recurrent = tf.matmul(tf.reshape(h_prev, [-1, units]), d_z, transpose_a=True)
        d_inputs, d_kernel = _input_gradients(d_z, x_flat, kernel, steps, batch, width)
        d_h0, d_c0 = tf.cast(d_h0, h0.dtype), tf.cast(d_c0, c0.dtype)
        return d_inputs, d_h0, d_c0, d_kernel, d_recurrent, _column_sums(d_z)

    return (tf.transpose(hs, [1, 0, 2]), tf.cast(h_last, h0.dtype), tf.cast(c_last, c0.dtype)), grad


def gru_sequence(inputs, h0, kernel, recurrent_kernel, bias):
    """Run Keras' GRU (reset_after=True) over inputs [B, T, I] from h0 [B, H].

    bias is Keras' [2, 3H]: the input bias, then the recurrent bias. Returns (outputs [B, T, H] in
    inputs' dtype, h_T in h0's).
    """
    dtype = inputs.dtype
    return _gru(inputs, h0, tf.cast(kernel, dtype), tf.cast(recurrent_kernel, dtype), tf.cast(bias, tf.float32))


def _gru_step(x_pre, h_pre, h):
    """One GRU step (reset_after) from the input's and the state's pre-activations [B, 3H] (each
    with its bias row) and h [B, H]: (h_next, backward factors)."""
    h_next, (z, r, candidate, h_term) = gru_update(GRU, x_pre, h_pre, h)
    # What the backward pass needs of this step, computed while it is in cache (see _lstm_step).
    # With dh the gradient of h_t: ∂z_pre = dh·f_z, ∂r_pre = dh·f_r, ∂candidate_pre = dh·f_c,
    # and the recurrent pre-activations get [f_z, f_r, f_c·r]·dh.
    f_z = (h - candidate) * _derivative(GRU, "z", z)
    f_c = (1 - z) * _derivative(GRU, "h", candidate)
    f_r = f_c * h_term * _derivative(GRU, "r", r)
    input_factors = _join_gates(GRU, {"z": f_z, "r": f_r, "h": f_c})
    recurrent_factors = _join_gates(GRU, {"z": f_z, "r": f_r, "h": f_c * r})
    return h_next, (input_factors, recurrent_factors, z)


@tf.custom_gradient
def _gru(inputs, h0, kernel, recurrent_kernel, bias):
    low = inputs.dtype
    x_flat, steps, batch, width = _time_major(inputs)
    units = tf.shape(h0)[1]
    columns = GRU.kernel_columns(units)
    z_x = tf.reshape(_float_product(x_flat, kernel) + bias[0], [steps, batch, columns])

    def step(t, h, hs, *saved):
        h_pre = _float(tf.matmul(tf.cast(h, low), recurrent_kernel)) + bias[1]
        h, factors = _gru_step(z_x[t], h_pre, h)  # the state stays float32 from step to step
        saved = (array.write(t, factor) for array, factor in zip(saved, factors, strict=True))
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
            d_h3 = tf.concat([d_h] * len(GRU.gates), -1)
            d_rec = tf.cast(d_h3 * recurrent_factors[t], low)
            d_h_prev = d_h * z[t] + _float(tf.matmul(d_rec, recurrent_t))
            return t - 1, d_h_prev, d_xs.write(t, tf.cast(d_h3 * input_factors[t], low)), d_recs.write(t, d_rec)

        back_start = (steps - 1, d_h, _array(low, steps, h0), _array(low, steps, h0))
        _, d_h0, d_x, d_rec = tf.while_loop(lambda t, *_: t >= 0, back, back_start)
        d_x, d_rec = tf.reshape(d_x.stack(), [-1, columns]), tf.reshape(d_rec.stack(), [-1, columns])
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
    run = _SIMPLE_RNN_KERNELS[activation]
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


def _simple_rnn_kernel(activation):
    """The SimpleRNN window kernel for `activation`, with its backward pass."""
    forward, derivative = ACTIVATIONS[activation], _DERIVATIVES[activation]

    @tf.custom_gradient
    def run(inputs, h0, kernel, recurrent_kernel, bias):
        return _simple_rnn(inputs, h0, kernel, recurrent_kernel, bias, forward, derivative)

    return run


# One kernel per SimpleRNN activation keraslm.cells lists (tanh, relu).
_SIMPLE_RNN_KERNELS = {
    cell.activation: _simple_rnn_kernel(cell.activation) for cell in CELLS.values() if cell.keras_layer == "SimpleRNN"
}


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
    convert every element and run slower (benchmarks/RESULTS.md, "Figures from code comments")."""
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
