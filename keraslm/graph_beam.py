"""The beam search rule of `keraslm.beam`, in TensorFlow, for the SavedModel's `beam_search` signature.

keraslm.beam states the rule and its NumPy search is the reference; these functions are its step
(rule 3: the best candidates, in the same tie order) and the read-back of the kept hypotheses on
graph tensors. tests/test_beam.py holds the signature to the NumPy search: same tokens, scores
within 1e-5. Row b × K + k of the [B × K, …] tensors is beam k of prompt b.
"""

import tensorflow as tf


def best_candidates(logits, scores, beam_width, vocabulary_size):
    """Rule 3 on logits [B × K, V] and scores [B, K] (float64): per prompt, the beam [B, K] each
    of the K best candidates extends, its token [B, K] and its score [B, K]."""
    log_probs = tf.nn.log_softmax(tf.cast(logits, tf.float64))
    candidates = scores[:, :, None] + tf.reshape(log_probs, tf.stack([-1, beam_width, vocabulary_size]))
    # Flat index beam × V + token; top_k puts the lower index first among equal values, which is
    # keraslm.beam's tie order (the better-ranked beam, then the lower id).
    best = tf.math.top_k(tf.reshape(candidates, tf.stack([-1, beam_width * vocabulary_size])), beam_width)
    return best.indices // vocabulary_size, best.indices % vocabulary_size, best.values


def trace_back(tokens, parents, num_return):
    """The tokens [B, N, T] of the N best final beams, from each step's tokens and parent beams
    [T, B, K], followed from the last step back to the first."""
    steps = tf.shape(tokens)[0]
    beams = tf.tile(tf.range(num_return)[None, :], tf.stack([tf.shape(tokens)[1], 1]))  # [B, N]

    def body(t, beams, out):
        out = out.write(t, tf.gather(tokens[t], beams, batch_dims=1))
        return t - 1, tf.gather(parents[t], beams, batch_dims=1), out

    out = tf.TensorArray(tf.int32, size=steps, element_shape=[None, None])
    _, _, out = tf.while_loop(lambda t, *_: t >= 0, body, (steps - 1, beams, out))
    return tf.transpose(out.stack(), [1, 2, 0])
