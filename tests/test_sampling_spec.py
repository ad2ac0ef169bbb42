"""One sampling rule, two implementations: keraslm.sampling's NumPy samplers (every sample.py backend)
and keraslm.graph_sampling (the SavedModel's generate signature) keep the same tokens with the same
probabilities on the same logits. Distributions are compared, not draws."""

import itertools

import numpy as np
import pytest
import tensorflow as tf

from keraslm import graph_sampling
from keraslm.sampling import MIN_TEMPERATURE, TOP_K_OFF, TOP_P_OFF, make_sampler

SCALARS = [tf.TensorSpec([], tf.float32), tf.TensorSpec([], tf.int32), tf.TensorSpec([], tf.float32)]
LOGITS = tf.TensorSpec([None, None], tf.float32)
graph_filter = tf.function(graph_sampling.filter_logits, input_signature=[LOGITS, *SCALARS])
graph_probabilities = tf.function(graph_sampling.probabilities, input_signature=[LOGITS, *SCALARS])
graph_sample = tf.function(graph_sampling.sample, input_signature=[LOGITS, *SCALARS, tf.TensorSpec([2], tf.int64)])


def f32(x):
    """The value the signature's float32 scalar carries, so both sides get the same number."""
    return float(np.float32(x))


def both(logits, temperature, top_k, top_p):
    """(kept mask, probabilities) from NumPy and from the graph, for one setting."""
    logits = np.asarray(logits, np.float32)
    sampler = make_sampler(f32(temperature), top_k, f32(top_p))
    args = (logits, np.float32(temperature), np.int32(top_k), np.float32(top_p))
    numpy_kept = np.isfinite(sampler.scaled_logits(logits))
    graph_kept = np.isfinite(graph_filter(*args).numpy())
    return (numpy_kept, sampler.probabilities(logits)), (graph_kept, graph_probabilities(*args).numpy())


def assert_same(logits, temperature, top_k, top_p):
    (numpy_kept, numpy_probs), (graph_kept, graph_probs) = both(logits, temperature, top_k, top_p)
    np.testing.assert_array_equal(numpy_kept, graph_kept, err_msg=f"T={temperature} k={top_k} p={top_p}")
    np.testing.assert_allclose(numpy_probs, graph_probs, rtol=0, atol=1e-6)
    assert not (numpy_probs[~numpy_kept] > 0).any()  # dropped tokens are never drawn
    return numpy_kept


def random_logits(seed, batch, vocabulary_size):
    """Gaussian logits, and a rounded copy full of ties (at the k-th place and the nucleus boundary)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2, (batch, vocabulary_size))
    return [logits, np.round(logits)]


TEMPERATURES = [MIN_TEMPERATURE, 0.5, 1.0, 1.7]
TOP_PS = [TOP_P_OFF, 0.95, 0.6, 0.2, 1e-6]


@pytest.mark.parametrize("vocabulary_size", [7, 300])
def test_numpy_and_graph_keep_the_same_tokens_with_the_same_probabilities(vocabulary_size):
    top_ks = [TOP_K_OFF, 1, 3, vocabulary_size - 1, vocabulary_size + 5]
    for seed, logits in enumerate(random_logits(vocabulary_size, 5, vocabulary_size) * 2):
        logits = logits * (seed + 1)  # sharper rows too
        for temperature, top_k, top_p in itertools.product(TEMPERATURES, top_ks, TOP_PS):
            assert_same(logits, temperature, top_k, top_p)


@pytest.mark.parametrize("vocabulary_size", [7, 300])
def test_greedy_is_the_argmax_on_both_sides_ties_to_the_lowest_id(vocabulary_size):
    logits = np.round(np.random.default_rng(1).normal(0, 1, (6, vocabulary_size)))
    logits[0, :3] = logits[0].max() + 1  # a three-way tie for the top
    expected = np.eye(vocabulary_size)[np.argmax(logits, axis=-1)]
    assert expected[0, 0] == 1
    for top_k, top_p in [(TOP_K_OFF, TOP_P_OFF), (2, 0.5)]:  # top-k and top-p change nothing
        (_, numpy_probs), (_, graph_probs) = both(logits, 0.0, top_k, top_p)
        np.testing.assert_array_equal(numpy_probs, expected)
        np.testing.assert_array_equal(graph_probs, expected)
        draws = graph_sample(np.float32(logits), 0.0, top_k, top_p, [0, 0]).numpy()
        np.testing.assert_array_equal(draws, make_sampler(0.0, top_k, top_p)(logits))


# The rule on a vocabulary of 7, with the expected kept set (ids) written out.
CASES = [
    # top-k: every token tied with the k-th stays (k=2: 3 and three 2s)
    ([3, 2, 2, 2, 1, 0, 0], TOP_K_OFF + 2, TOP_P_OFF, {0, 1, 2, 3}),
    ([3, 2, 2, 2, 1, 0, 0], 1, TOP_P_OFF, {0}),
    ([0, 0, 0, 0, 0, 0, 0], 3, TOP_P_OFF, {0, 1, 2, 3, 4, 5, 6}),
    # top-p: 4 equal tokens, p = 0.3 is reached inside the tie: all four stay
    ([0, 0, 0, 0, -50, -50, -50], TOP_K_OFF, 0.3, {0, 1, 2, 3}),
    ([5, 0, 0, 0, -50, -50, -50], TOP_K_OFF, 0.5, {0}),
    ([1, 0, 0, 0, -50, -50, -50], TOP_K_OFF, 0.5, {0, 1, 2, 3}),
    # top-k then top-p on the renormalised top k: [.4 .3 .2 .1] with k=3 is [4/9 3/9 2/9]
    (np.log([0.4, 0.3, 0.2, 0.1, 1e-9, 1e-9, 1e-9]), 3, 0.75, {0, 1}),
    (np.log([0.4, 0.3, 0.2, 0.1, 1e-9, 1e-9, 1e-9]), TOP_K_OFF, 0.75, {0, 1, 2}),
]


@pytest.mark.parametrize("logits, top_k, top_p, expected", CASES)
def test_the_rule_on_small_examples(logits, top_k, top_p, expected):
    kept = assert_same(np.array([logits]), 1.0, top_k, top_p)
    assert set(np.flatnonzero(kept[0])) == expected


def test_graph_draws_follow_the_distribution_the_numpy_sampler_states():
    logits = np.tile(np.log([[0.35, 0.25, 0.2, 0.1, 0.06, 0.04, 1e-3]]), (6000, 1)).astype(np.float32)
    for temperature, top_k, top_p in [(1.0, TOP_K_OFF, TOP_P_OFF), (0.8, 4, 0.8), (1.3, TOP_K_OFF, 0.7)]:
        expected = make_sampler(f32(temperature), top_k, f32(top_p)).probabilities(logits[:1])[0]
        draws = graph_sample(logits, temperature, top_k, top_p, [7, 0]).numpy()
        np.testing.assert_allclose(np.bincount(draws, minlength=7) / len(draws), expected, atol=0.02)
