"""The sampling rule of `keraslm.sampling`, in TensorFlow, for the SavedModel's `generate` signature.

keraslm.sampling states the rule and its NumPy samplers are the reference; these functions do the
same on graph tensors, and tests/test_sampling_spec.py checks that both keep the same tokens with
the same probabilities. The scalars are the signature's tensors (temperature float32, top_k int32,
top_p float32), already checked against rule 1; the filters run in float64, as NumPy's do, so both
decide every boundary on the same numbers.
"""

import numpy as np
import tensorflow as tf

from keraslm.sampling import TOP_K_OFF, TOP_P_OFF


def keep_top_k(scaled, k):
    """Rule 4 on scaled logits [B, V]: -inf below the k-th largest of each row (ties with it stay); k ≥ 1."""
    kth = tf.math.top_k(scaled, tf.minimum(k, tf.shape(scaled)[-1])).values[:, -1:]
    return tf.where(scaled < kth, tf.constant(-np.inf, scaled.dtype), scaled)


def keep_nucleus(scaled, p):
    """Rule 5 on scaled logits [B, V] (-inf = already dropped): -inf outside each row's nucleus."""
    ordered = tf.sort(scaled, direction="DESCENDING")
    before = tf.cumsum(tf.nn.softmax(ordered), axis=-1, exclusive=True)
    threshold = tf.reduce_min(tf.where(before < p, ordered, np.inf), axis=-1, keepdims=True)
    return tf.where(scaled < threshold, tf.constant(-np.inf, scaled.dtype), scaled)


def filter_logits(logits, temperature, top_k, top_p):
    """Rules 3 to 5: float64 logits [B, V] / temperature, -inf for the dropped tokens; temperature > 0."""
    scaled = tf.cast(logits, tf.float64) / tf.cast(temperature, tf.float64)
    # Each filter runs only when asked for: a sort per token costs as much as a layer.
    scaled = tf.cond(top_k > TOP_K_OFF, lambda: keep_top_k(scaled, top_k), lambda: scaled)
    p = tf.cast(top_p, tf.float64)
    return tf.cond(top_p < TOP_P_OFF, lambda: keep_nucleus(scaled, p), lambda: scaled)


def greedy(logits):
    """Rule 2: the largest logit's token of each row [B], int32."""
    return tf.argmax(logits, axis=-1, output_type=tf.int32)


def probabilities(logits, temperature, top_k, top_p):
    """The float64 distribution [B, V] the next token is drawn from (one-hot when greedy)."""
    return tf.cond(
        temperature > 0,
        lambda: tf.nn.softmax(filter_logits(logits, temperature, top_k, top_p)),
        lambda: tf.one_hot(greedy(logits), tf.shape(logits)[-1], dtype=tf.float64),
    )


def sample(logits, temperature, top_k, top_p, key):
    """One token per row [B], int32, from logits [B, V]; `key` is the int64 [2] stateless seed of this step."""

    def draw():
        filtered = filter_logits(logits, temperature, top_k, top_p)
        return tf.random.stateless_categorical(filtered, 1, key, tf.int32)[:, 0]

    return tf.cond(temperature > 0, draw, lambda: greedy(logits))
