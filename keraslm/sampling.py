"""Samplers on logits, in NumPy, and the decoding loop around a step function.

Every backend supplies one `step(tokens, state) -> (logits, state)`; sampling stays here, so one
seed gives one sequence on every backend. No TensorFlow is imported.
"""

import os

import numpy as np

from keraslm.errors import UsageError

# The smallest temperature that samples: below it, logits / temperature overflows float32 logits
# (and float64 soon after) and every draw is garbage. 0 means greedy; anything in between is refused.
MIN_TEMPERATURE = 1e-3


class Sampler:
    """Picks the next token of each row from logits [B, V].

    Args:
        temperature: logits are divided by it before the softmax.
    """

    def __init__(self, temperature=1.0):
        if not temperature > 0:
            raise UsageError(f"temperature must be > 0 for random sampling, got {temperature}")
        self.temperature = temperature

    def __call__(self, logits, rng):
        logits = np.asarray(logits, np.float64) / self.temperature
        logits = self.filter(logits)
        probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        # Inverse-CDF draw: one uniform per row, the same draws whatever the backend.
        u = rng.random((probs.shape[0], 1))
        ids = (np.cumsum(probs, axis=-1) < u).sum(axis=-1)
        return np.minimum(ids, probs.shape[-1] - 1).astype(np.int32)

    def filter(self, logits):
        """Set the logits of excluded tokens to -inf; the base sampler keeps all."""
        return logits


class GreedySampler(Sampler):
    """The most likely token (ties: the lowest id); no randomness."""

    def __init__(self, temperature=1.0):
        self.temperature = temperature

    def __call__(self, logits, rng=None):
        return np.argmax(np.asarray(logits), axis=-1).astype(np.int32)


class TopKSampler(Sampler):
    """Sample among the `k` most likely tokens.

    Args:
        k: how many tokens stay in the running (k ≥ 1).
        temperature: as in `Sampler`.
    """

    def __init__(self, k, temperature=1.0):
        super().__init__(temperature)
        if not (isinstance(k, (int, np.integer)) and k >= 1):
            raise UsageError(f"top-k must be a positive integer, got {k}")
        self.k = int(k)

    def filter(self, logits):
        if self.k >= logits.shape[-1]:
            return logits
        kth = np.partition(logits, -self.k, axis=-1)[:, -self.k, None]
        return np.where(logits >= kth, logits, -np.inf)


class TopPSampler(Sampler):
    """Nucleus sampling: the smallest set of most likely tokens whose probability reaches `p`.

    Args:
        p: probability mass kept, in (0, 1].
        temperature: as in `Sampler`.
    """

    def __init__(self, p, temperature=1.0):
        super().__init__(temperature)
        if not 0 < p <= 1:
            raise UsageError(f"top-p must be in (0, 1], got {p}")
        self.p = p

    def filter(self, logits):
        order = np.argsort(-logits, axis=-1, kind="stable")
        sorted_logits = np.take_along_axis(logits, order, axis=-1)
        probs = np.exp(sorted_logits - sorted_logits[:, :1])
        probs /= probs.sum(axis=-1, keepdims=True)
        # Keep a token while the mass before it is still short of p (the top token always stays).
        keep_sorted = np.cumsum(probs, axis=-1) - probs < self.p
        keep = np.empty_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
        return np.where(keep, logits, -np.inf)


SAMPLERS = {"greedy": GreedySampler, "random": Sampler, "top_k": TopKSampler, "top_p": TopPSampler}


def make_sampler(temperature=1.0, top_k=0, top_p=1.0):
    """The sampler for command-line settings: temperature 0 is greedy; top-k 0 and top-p 1 are off."""
    if not (temperature == 0 or MIN_TEMPERATURE <= temperature < np.inf):
        raise UsageError(f"temperature must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE}, got {temperature}")
    if top_k < 0:
        raise UsageError(f"top-k must be >= 0 (0 = off), got {top_k}")
    if not 0 < top_p <= 1:
        raise UsageError(f"top-p must be in (0, 1] (1 = off), got {top_p}")
    if temperature == 0:
        return GreedySampler()
    if top_k and top_p < 1:
        raise UsageError("choose one of top-k and top-p, not both")
    if top_k:
        return TopKSampler(top_k, temperature)
    if top_p < 1:
        return TopPSampler(top_p, temperature)
    return Sampler(temperature)


def check_memory(batch_size, prompt_length, num_tokens, vocabulary_size):
    """Refuse a generation that would need more than half the machine's memory, before it starts.

    The estimate counts what `generate` holds at once: the prompt's float32 logits [B, T0, V], a
    step's logits and probabilities [B, V], and the tokens with their text [B, num_tokens].
    """
    needed = 4 * batch_size * prompt_length * vocabulary_size + 16 * batch_size * vocabulary_size
    needed += 12 * batch_size * num_tokens
    try:
        budget = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows)
        budget = 2**32
    if needed > budget:
        raise UsageError(
            f"{batch_size} samples of {num_tokens} tokens after a {prompt_length}-token prompt need about"
            f" {needed / 1e9:,.1f} GB of memory, more than half of this machine's {2 * budget / 1e9:.0f} GB;"
            " ask for fewer samples, fewer tokens or a shorter prompt"
        )


def generate(step, prompt_ids, state, num_tokens, sampler, rng, on_token=None):
    """Prime the state with the prompt in one call, then sample `num_tokens` tokens.

    Args:
        step: `step(tokens [B, T] int32, state) -> (logits [B, T, V], state)`.
        prompt_ids: int32 [B, T0], T0 ≥ 1.
        state: the initial state, as `step` expects it.
        num_tokens: tokens to generate.
        sampler: a `Sampler`.
        rng: a `numpy.random.Generator`.
        on_token: called with each new column of tokens [B] as it comes (streaming).

    Returns:
        int32 [B, num_tokens], the generated tokens.
    """
    logits, state = step(np.asarray(prompt_ids, np.int32), state)
    out = np.empty((len(prompt_ids), num_tokens), np.int32)
    for t in range(num_tokens):
        out[:, t] = sampler(logits[:, -1], rng)
        if on_token is not None:
            on_token(out[:, t])
        if t + 1 < num_tokens:
            logits, state = step(out[:, t : t + 1], state)
    return out
