"""keraslm's cross-entropy equals TensorFlow's fused op in value and gradient, also in a training step."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keraslm.losses import SparseCrossEntropy, sparse_cross_entropy


@pytest.mark.parametrize("shape, vocabulary", [((3, 7), 11), ((20, 35), 14_143), ((1, 1), 2)])
def test_value_and_gradient_equal_the_fused_op(shape, vocabulary):
    rng = np.random.default_rng(0)
    logits = tf.constant(rng.normal(0, 4, (*shape, vocabulary)).astype(np.float32))
    labels = tf.constant(rng.integers(0, vocabulary, shape).astype(np.int32))
    weights = tf.constant(rng.random(shape).astype(np.float32))  # a non-uniform upstream gradient
    results = []
    for loss_fn in (sparse_cross_entropy, tf.nn.sparse_softmax_cross_entropy_with_logits):
        with tf.GradientTape() as tape:
            tape.watch(logits)
            loss = loss_fn(labels=labels, logits=logits)
            weighted = tf.reduce_sum(loss * weights)
        results.append((loss.numpy(), tape.gradient(weighted, logits).numpy()))
    (ours, our_gradient), (fused, fused_gradient) = results
    np.testing.assert_allclose(ours, fused, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(our_gradient, fused_gradient, rtol=1e-5, atol=1e-7)


def test_extreme_logits_stay_finite():
    logits = tf.constant([[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4]])
    labels = tf.constant([1, 2])
    loss = sparse_cross_entropy(labels, logits).numpy()
    np.testing.assert_allclose(loss, [2e4, np.log(3.0)], rtol=1e-6)


def test_training_with_it_equals_training_with_keras_loss():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 30, (8, 10)).astype(np.int32)
    y = rng.integers(0, 30, (8, 10)).astype(np.int32)
    weights = []
    for loss in (SparseCrossEntropy(), keras.losses.SparseCategoricalCrossentropy(from_logits=True)):
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [keras.Input((10,), dtype="int32"), keras.layers.Embedding(30, 8), keras.layers.Dense(30)]
        )
        model.compile(keras.optimizers.SGD(1.0), loss)
        losses = [model.train_on_batch(x, y) for _ in range(5)]
        weights.append((losses, model.get_weights()))
    np.testing.assert_allclose(weights[0][0], weights[1][0], rtol=1e-5)
    for ours, theirs in zip(weights[0][1], weights[1][1], strict=True):
        np.testing.assert_allclose(ours, theirs, atol=1e-5)
