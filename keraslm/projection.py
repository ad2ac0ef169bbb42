"""The output projection under bfloat16 mixed precision: AMX matmuls, float32 logits.

At word level the projection (700 × 200 by 200 × 14,143 per window, forward and both gradients) is
four fifths of the FLOPs. Keras' mixed precision keeps such an output layer in float32, so the
bfloat16 units never see it. TensorFlow's CPU kernels multiply bfloat16 only into bfloat16 (which
would round the logits to 8 bits); XLA's dot accumulates in float32 and returns float32, so the
forward product runs there. The gradients are bfloat16 products like every other layer's under
the policy. On this project's CPU, forward and backward of that shape took 38.5 and 43.5 ms against
90.9 and 66.1 ms in float32 (two runs) (benchmarks/RESULTS.md).
"""

import tensorflow as tf


@tf.function(jit_compile=True)
def _logits(x, kernel):
    return tf.linalg.matmul(x, kernel, output_type=tf.float32)


@tf.custom_gradient
def _project(x, kernel, bias):
    def gradient(d_logits):
        d_low = tf.cast(d_logits, tf.bfloat16)
        d_x = tf.matmul(d_low, kernel, transpose_b=True)
        d_kernel = tf.matmul(x, d_low, transpose_a=True)
        return d_x, d_kernel, tf.reduce_sum(d_logits, 0)

    return _logits(x, kernel) + bias, gradient


def bfloat16_projection(x, kernel, bias):
    """x [..., H] · kernel [H, V] + bias → float32 logits [..., V], the products in bfloat16."""
    shape = tf.shape(x)
    flat = tf.reshape(tf.cast(x, tf.bfloat16), [-1, shape[-1]])
    logits = _project(flat, tf.cast(kernel, tf.bfloat16), tf.cast(bias, tf.float32))
    return tf.reshape(logits, tf.concat([shape[:-1], [-1]], 0))
