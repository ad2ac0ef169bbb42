"""Beam search over any backend's `step(tokens, state) -> (logits, state)`: the N most likely
continuations of a prompt, with their total log-probabilities. NumPy only (no TensorFlow).

The rule, stated once (the SavedModel's `beam_search` signature does the same in the graph, without
`<eos>` stopping or a length penalty, and tests/test_beam.py holds both to it):

1. The prompt primes the state in one call; its last logits give the first token's distribution.
2. A hypothesis's score is the sum of its tokens' log-probabilities, log-softmax of the float32
   logits computed in float64.
3. Each step extends every beam by every token and keeps the `beam_width` best candidates by
   score. Ties go to the candidate of the better-ranked beam, then to the lower token id (so
   `beam_width` 1 is greedy decoding, ties to the lowest id as `GreedySampler` breaks them).
   The kept beams' state rows are gathered from the rows of the beams they extend.
4. With `eos_id` (sample.py --stop-at-eos, word level), a candidate ending in `<eos>` that ranks
   among the best `beam_width` is finished: it is set aside (its `<eos>` included) and the beam is
   filled with the best candidates that do not end there, as Hugging Face's BeamSearchScorer does.
   The search stops early once no open beam can still beat the N-th best finished hypothesis.
5. Finished hypotheses and the beams still open after `num_tokens` tokens are ranked by
   score / length_penalty(length), GNMT's ((5 + length) / 6) ** alpha (Wu et al. 2016, eq. 14);
   alpha 0 (the default) ranks by the total log-probability itself. Ties keep the earlier
   finished (then the better-ranked) hypothesis first. The N best are returned.

Memory: the search holds [beam_width, V] logits and candidates and [beam_width, num_tokens] tokens
and parent beams at once; `check_beam_memory` refuses a search that would not fit, before it starts.
"""

import dataclasses

import numpy as np

from keraslm.errors import ArgumentError
from keraslm.sampling import refuse_over_memory


@dataclasses.dataclass(frozen=True)
class Hypothesis:
    """One continuation found by `beam_search`.

    Attributes:
        tokens: int32 [length], the generated ids (an `<eos>` it stopped at included).
        score: the sum of the tokens' log-probabilities (natural log).
        ranking_score: score / length_penalty(length, alpha), what the hypotheses are ranked by.
        finished: whether it stopped at `<eos>` (else it ran to `num_tokens`).
    """

    tokens: np.ndarray
    score: float
    ranking_score: float
    finished: bool


def length_penalty(length, alpha):
    """GNMT's length penalty ((5 + length) / 6) ** alpha; 1 for alpha 0."""
    return ((5.0 + length) / 6.0) ** alpha


def check_beam_settings(num_tokens, beam_width, num_return, alpha=0.0):
    """Refuse settings no beam search can run, with an ArgumentError naming the argument."""
    for name, value in (("num_tokens", num_tokens), ("beam_width", beam_width), ("num_return", num_return)):
        if not (isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1):
            raise ArgumentError.about(name, f"must be a positive integer, got {value}")
    if num_return > beam_width:
        raise ArgumentError(
            "{num_return} must be at most {beam_width}, got {got} > {width}", got=num_return, width=beam_width
        )
    if not 0 <= alpha < np.inf:
        raise ArgumentError.about("length_penalty", f"must be a finite number >= 0 (0 = off), got {alpha}")


def check_beam_memory(beam_width, prompt_length, num_tokens, vocabulary_size):
    """Refuse a search that would need more than half the machine's memory (sampling's budget).

    Counted: the prompt's float32 logits [T0, V]; per step the float32 logits, the float64
    log-probabilities, candidates and their partition, [2 x beam_width, V] with `<eos>` stopping; and
    each step's tokens and parent beams, with the rows read back, [3 x beam_width, num_tokens].
    """
    needed = 4 * prompt_length * vocabulary_size + 2 * 28 * beam_width * vocabulary_size
    needed += 3 * 4 * beam_width * num_tokens
    refuse_over_memory(
        needed,
        f"a beam of {beam_width} over {num_tokens} tokens after a {prompt_length}-token prompt",
        "ask for a narrower beam, fewer tokens or a shorter prompt",
    )


def log_softmax(logits):
    """float64 log-probabilities [B, V] of float logits [B, V] (rule 2)."""
    x = np.asarray(logits, np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def best_candidates(scores, log_probs, count):
    """The `count` best extensions of beams with `scores` [B] by log-probabilities [B, V] (rule 3).

    Returns:
        (beam [n], token [n], score [n]) in rank order, n = min(count, B x V): by score, ties to the
        lower beam index (the better-ranked beam), then the lower token id.
    """
    flat = (scores[:, None] + log_probs).ravel()
    if count < flat.size:
        # Everything tied with the count-th best stays in, so the exact tie order below decides.
        kth = np.partition(flat, flat.size - count)[flat.size - count]
        chosen = np.flatnonzero(flat >= kth)
    else:
        chosen = np.arange(flat.size)
    chosen = chosen[np.argsort(-flat[chosen], kind="stable")[:count]]  # stable: index order among ties
    vocabulary_size = log_probs.shape[-1]
    return chosen // vocabulary_size, (chosen % vocabulary_size).astype(np.int32), flat[chosen]


class _Finished:
    """The `size` best finished hypotheses so far, best first (rule 5)."""

    def __init__(self, size, alpha):
        self.size, self.alpha, self.hypotheses = size, alpha, []

    def add(self, tokens, score, finished):
        ranking = score / length_penalty(len(tokens), self.alpha)
        if len(self.hypotheses) == self.size and ranking <= self.hypotheses[-1].ranking_score:
            return  # an equal one found earlier keeps its place
        hypothesis = Hypothesis(np.array(tokens, np.int32), float(score), float(ranking), finished)
        # After every hypothesis ranked at least as high: the earlier one wins a tie.
        place = sum(h.ranking_score >= ranking for h in self.hypotheses)
        self.hypotheses.insert(place, hypothesis)
        del self.hypotheses[self.size :]

    def beats(self, scores, num_tokens):
        """Whether no open beam with `scores` can still rank above the size-th finished one.

        Log-probabilities are ≤ 0, so a score only falls; with alpha ≥ 0 the penalty grows with the
        length, so score / penalty(num_tokens) bounds every ranking score a beam can still reach.
        """
        if not len(scores):
            return True
        if len(self.hypotheses) < self.size:
            return False
        best = scores.max() / length_penalty(num_tokens, self.alpha)
        return best <= self.hypotheses[-1].ranking_score


def beam_search(step, prompt_ids, state, num_tokens, beam_width, num_return=1, alpha=0.0, eos_id=None):
    """The `num_return` best continuations of one prompt, by the rule in the module docstring.

    Args:
        step: `step(tokens [B, T] int32, state) -> (logits [B, T, V], state)`, as every backend's.
        prompt_ids: int32 [T0], T0 ≥ 1: the prompt's ids.
        state: the initial state for a batch of one (`backend.initial_state(1)`).
        num_tokens: the most tokens to generate.
        beam_width: beams kept at each step.
        num_return: hypotheses returned, at most `beam_width`.
        alpha: the length penalty's exponent (0 = rank by total log-probability).
        eos_id: stop a hypothesis when it generates this id (None = never stop early).

    Returns:
        Up to `num_return` Hypothesis, best first (fewer only if fewer distinct continuations exist).

    Example:
        >>> backend = open_backend("saved_models/lm")  # doctest: +SKIP
        >>> ids = backend.vocab.encode("ROMEO:")  # doctest: +SKIP
        >>> best = beam_search(backend.step, ids, backend.initial_state(1), 20, 4, 2)  # doctest: +SKIP
    """
    check_beam_settings(num_tokens, beam_width, num_return, alpha)
    logits, state = step(np.asarray(prompt_ids, np.int32)[None, :], state)
    scores, history = np.zeros(1), _History()
    finished = _Finished(num_return, alpha)
    for t in range(num_tokens):
        width = beam_width if eos_id is None else 2 * beam_width
        beams, next_ids, scores = best_candidates(scores, log_softmax(logits[:, -1]), width)
        if eos_id is not None:
            beams, next_ids, scores = _set_aside_eos(beams, next_ids, scores, history, eos_id, beam_width, finished)
            beams, next_ids, scores = beams[:beam_width], next_ids[:beam_width], scores[:beam_width]
        history.append(beams, next_ids)
        if finished.beats(scores, num_tokens) or t + 1 == num_tokens:
            break
        # Only the beams still open are stepped: a batch of 0 rows would abort ONNX Runtime's kernels.
        logits, state = step(next_ids[:, None], {name: rows[beams] for name, rows in state.items()})
    for row, score in zip(history.rows(np.arange(len(scores))), scores, strict=True):
        finished.add(row, score, False)
    return finished.hypotheses


class _History:
    """The beams' tokens as a tree: each step's tokens and the beams of the step before that they
    extend. A step costs O(beam_width), not a copy of every beam's tokens so far."""

    def __init__(self):
        self.tokens, self.parents = [], []

    def append(self, parents, tokens):
        self.parents.append(np.asarray(parents, np.int32))
        self.tokens.append(np.asarray(tokens, np.int32))

    def rows(self, beams):
        """The tokens [len(beams), steps] of the last step's `beams`, read back to the first step."""
        out = np.empty((len(beams), len(self.tokens)), np.int32)
        for t in reversed(range(len(self.tokens))):
            out[:, t] = self.tokens[t][beams]
            beams = self.parents[t][beams]
        return out


def _set_aside_eos(beams, next_ids, scores, history, eos_id, beam_width, finished):
    """Rule 4: candidates ending in eos_id go to `finished` if they rank within the first
    `beam_width`; the candidates that go on are the others, in rank order."""
    ends = next_ids == eos_id
    for rank in np.flatnonzero(ends):
        if rank < beam_width:
            finished.add([*history.rows(beams[rank : rank + 1])[0], eos_id], scores[rank], True)
    keep = ~ends
    return beams[keep], next_ids[keep], scores[keep]
