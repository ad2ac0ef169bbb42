"""The training loss: softmax cross-entropy of the logits, written for speed on a CPU.

At word level the loss over a [B·T, V] logit matrix costs as much as a matmul, and TensorFlow's
fused `SparseSoftmaxCrossEntropyWithLogits` was a large part of the training step. The same
mathematics as two small XLA-compiled functions (forward, and the gradient softmax − one-hot)
is faster: XLA fuses each into one or two passes over the matrix (benchmarks/RESULTS.md, "Figures from code comments").
Values and gradients equal the fused op's to float rounding (tests/test_losses.py).
"""

import keras
import tensorflow as tf


@tf.function(jit_compile=True)
def _forward(logits, labels):
    top = tf.reduce_max(logits, axis=-1, keepdims=True)  # shifted so exp never overflows
    exp = tf.exp(logits - top)
    total = tf.reduce_sum(exp, axis=-1, keepdims=True)
    # log Σ exp(l - top) - (l_label - top): the shift cancels before rounding, as in the fused op.
    shifted_label = tf.gather(logits, labels, batch_dims=1) - tf.squeeze(top, -1)
    loss = tf.squeeze(tf.math.log(total), -1) - shifted_label
    return loss, exp / total


@tf.function(jit_compile=True)
def _backward(softmax, labels, upstream):
    one_hot = tf.one_hot(labels, tf.shape(softmax)[-1], dtype=softmax.dtype)
    return (softmax - one_hot) * upstream[:, None]


@tf.custom_gradient
def _cross_entropy(logits, labels):
    loss, softmax = _forward(logits, labels)

    def gradient(upstream):
        return _backward(softmax, labels, upstream), None

    return loss, gradient


def sparse_cross_entropy(labels, logits):
    """-log softmax(logits)[label] per position: labels [...], logits [..., V] → loss [...] (float32)."""
    shape = tf.shape(logits)
    flat_logits = tf.reshape(tf.cast(logits, tf.float32), [-1, shape[-1]])
    flat_labels = tf.reshape(tf.cast(labels, tf.int32), [-1])
    return tf.reshape(_cross_entropy(flat_logits, flat_labels), shape[:-1])


@keras.saving.register_keras_serializable(package="keraslm")
class SparseCrossEntropy(keras.losses.Loss):
    """`keras.losses.SparseCategoricalCrossentropy(from_logits=True)`, computed by `sparse_cross_entropy`."""

    def __init__(self, name="sparse_cross_entropy", **kwargs):
        super().__init__(name=name, **kwargs)

    def call(self, y_true, y_pred):
        return sparse_cross_entropy(y_true, y_pred)
