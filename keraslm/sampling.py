"""The sampling rule, stated once, and its NumPy samplers and decoding loop.

Every backend supplies one `step(tokens, state) -> (logits, state)`; sampling stays here, so one
seed gives one sequence on every backend. No TensorFlow is imported: the SavedModel's in-graph
`generate` signature implements the same rule in `keraslm.graph_sampling`, and
tests/test_sampling_spec.py holds both to it.

The rule (Hugging Face transformers' order, temperature → top-k → top-p, which keras-hub's
`TopPSampler(p, k)` shares: top-k first, then the nucleus of what remains):

1. Settings: `temperature` is 0 (greedy) or a finite number ≥ MIN_TEMPERATURE; `top_k` ≥ 0 with
   TOP_K_OFF (0) meaning off; `top_p` in (0, 1] with TOP_P_OFF (1) meaning off. Anything else is
   refused, on both paths, before sampling starts.
2. Greedy (temperature 0): the token with the largest logit, ties going to the lowest id. top-k and
   top-p change nothing then.
3. Otherwise, in float64: `scaled = logits / temperature`.
4. Top-k: tokens whose scaled logit is below the k-th largest of their row are dropped. Tokens tied
   with the k-th largest all stay, so more than k tokens may remain; k ≥ V keeps every token.
5. Top-p, on the distribution softmax(scaled) of the tokens top-k kept (renormalised): sort them by
   logit, largest first; a token is in the nucleus while the mass of the tokens before it is below
   p (so the top token always is, and the nucleus is the smallest head holding mass ≥ p). Every
   token whose logit equals that of the nucleus's last token stays too: ties are never split by id.
6. The next token is drawn from softmax of the logits that stayed (dropped ones are -inf).

The keep-every-tie rule of 4 and 5 is transformers' for top-k (`scores < kth` are removed); for
the nucleus transformers leaves ties to the sort order, which would make the kept set depend on
token ids, so here ties are kept there too. Both paths decide the boundaries on float64 numbers;
the signature's float32 scalars (temperature, top_p) are widened to float64 as sent.
"""

import os

import numpy as np

from keraslm.errors import ArgumentError, UsageError

# The smallest temperature that samples: below it, logits / temperature overflows float32 logits
# (and float64 soon after) and every draw is garbage. 0 means greedy; anything in between is refused.
MIN_TEMPERATURE = 1e-3
TOP_K_OFF = 0
TOP_P_OFF = 1.0


def check_temperature(temperature, name="temperature"):
    """Refuse a temperature outside rule 1; `name` is the argument that gave it."""
    if not (temperature == 0 or MIN_TEMPERATURE <= temperature < np.inf):
        raise ArgumentError.about(
            name, f"must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE}, got {temperature}"
        )


def check_settings(temperature, top_k, top_p):
    """Refuse settings outside rule 1 with an ArgumentError naming the argument and its range."""
    check_temperature(temperature)
    if not (isinstance(top_k, (int, np.integer)) and top_k >= 0):
        raise ArgumentError.about("top_k", f"must be an integer >= 0 ({TOP_K_OFF} = off), got {top_k}")
    if not 0 < top_p <= 1:
        raise ArgumentError.about("top_p", f"must be in (0, 1] ({TOP_P_OFF:g} = off), got {top_p}")


def keep_top_k(scaled, k):
    """Rule 4 on scaled logits [B, V]: -inf below the k-th largest of each row (ties with it stay)."""
    if k >= scaled.shape[-1]:
        return scaled
    kth = np.partition(scaled, -k, axis=-1)[:, -k, None]
    return np.where(scaled < kth, -np.inf, scaled)


def keep_nucleus(scaled, p):
    """Rule 5 on scaled logits [B, V] (-inf = already dropped): -inf outside each row's nucleus."""
    ordered = -np.sort(-scaled, axis=-1)
    probs = np.exp(ordered - ordered[:, :1])
    probs /= probs.sum(axis=-1, keepdims=True)
    # The mass before each token (an exclusive cumulative sum, as tf.cumsum(exclusive=True) gives).
    before = np.concatenate([np.zeros_like(probs[:, :1]), np.cumsum(probs, axis=-1)[:, :-1]], axis=-1)
    threshold = np.where(before < p, ordered, np.inf).min(axis=-1, keepdims=True)
    return np.where(scaled < threshold, -np.inf, scaled)


class Sampler:
    """Picks the next token of each row from logits [B, V], by the rule above.

    Subclasses only say which tokens stay (`filter`); scaling, the softmax and the draw are here.

    Args:
        temperature: logits are divided by it before the softmax (≥ MIN_TEMPERATURE).

    Example:
        >>> Sampler(0.8)(np.log([[0.7, 0.2, 0.1]]), np.random.default_rng(0)).shape
        (1,)
    """

    def __init__(self, temperature=1.0):
        if not temperature > 0:
            raise ArgumentError.about("temperature", f"must be > 0 for random sampling, got {temperature}")
        self.temperature = temperature

    def __call__(self, logits, rng):
        probs = self.probabilities(logits)
        # Inverse-CDF draw: one uniform per row, the same draws whatever the backend.
        u = rng.random((probs.shape[0], 1))
        ids = (np.cumsum(probs, axis=-1) < u).sum(axis=-1)
        return np.minimum(ids, probs.shape[-1] - 1).astype(np.int32)

    def scaled_logits(self, logits):
        """float64 logits [B, V] divided by the temperature, -inf for the tokens `filter` drops."""
        return self.filter(np.asarray(logits, np.float64) / self.temperature)

    def probabilities(self, logits):
        """The distribution [B, V] the next token is drawn from."""
        scaled = self.scaled_logits(logits)
        probs = np.exp(scaled - scaled.max(axis=-1, keepdims=True))
        return probs / probs.sum(axis=-1, keepdims=True)

    def filter(self, scaled):
        """Set the scaled logits of excluded tokens to -inf; the base sampler keeps all."""
        return scaled


class GreedySampler(Sampler):
    """The most likely token (ties: the lowest id); no randomness."""

    def __init__(self, temperature=1.0):
        self.temperature = temperature

    def __call__(self, logits, rng=None):
        return np.argmax(np.asarray(logits), axis=-1).astype(np.int32)

    def probabilities(self, logits):
        logits = np.asarray(logits)
        probs = np.zeros(logits.shape)
        np.put_along_axis(probs, np.argmax(logits, axis=-1)[:, None], 1.0, axis=-1)
        return probs


class TopKSampler(Sampler):
    """Sample among the `k` most likely tokens (and any tied with the k-th).

    Args:
        k: how many tokens stay in the running (k ≥ 1).
        temperature: as in `Sampler`.
    """

    def __init__(self, k, temperature=1.0):
        super().__init__(temperature)
        if not (isinstance(k, (int, np.integer)) and k >= 1):
            raise ArgumentError.about("k", f"must be a positive integer, got {k}")
        self.k = int(k)

    def filter(self, scaled):
        return keep_top_k(scaled, self.k)


class TopPSampler(Sampler):
    """Nucleus sampling: the smallest set of most likely tokens whose probability reaches `p`.

    Args:
        p: probability mass kept, in (0, 1]; 1 keeps every token.
        temperature: as in `Sampler`.
        k: if set, top-k runs first and the nucleus is taken of the k tokens left, renormalised
            (keras-hub's `TopPSampler(p, k)`).
    """

    def __init__(self, p, temperature=1.0, k=None):
        super().__init__(temperature)
        if not 0 < p <= 1:
            raise ArgumentError.about("p", f"must be in (0, 1], got {p}")
        if not (k is None or (isinstance(k, (int, np.integer)) and k >= 1)):
            raise ArgumentError.about("k", f"must be a positive integer or None, got {k}")
        self.p = p
        self.k = None if k is None else int(k)

    def filter(self, scaled):
        if self.k is not None:
            scaled = keep_top_k(scaled, self.k)
        return scaled if self.p >= TOP_P_OFF else keep_nucleus(scaled, self.p)


def make_sampler(temperature=1.0, top_k=TOP_K_OFF, top_p=TOP_P_OFF):
    """The sampler for command-line settings: temperature 0 is greedy; top-k 0 and top-p 1 are off;
    top-k and top-p together keep the nucleus of the top k (see the rule above)."""
    check_settings(temperature, top_k, top_p)
    if temperature == 0:
        return GreedySampler()
    if top_p < TOP_P_OFF:
        return TopPSampler(top_p, temperature, k=top_k or None)
    if top_k:
        return TopKSampler(top_k, temperature)
    return Sampler(temperature)


def memory_budget():
    """The most memory one generation may ask for: half the machine's physical memory (bytes)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows)
        return 2**32


def check_memory(batch_size, prompt_length, num_tokens, vocabulary_size):
    """Refuse a generation that would need more than half the machine's memory, before it starts.

    The estimate counts what `generate` holds at once: the prompt's float32 logits [B, T0, V], a
    step's logits and probabilities [B, V], and the tokens with their text [B, num_tokens].
    """
    needed = 4 * batch_size * prompt_length * vocabulary_size + 16 * batch_size * vocabulary_size
    needed += 12 * batch_size * num_tokens
    refuse_over_memory(
        needed,
        f"{batch_size} samples of {num_tokens} tokens after a {prompt_length}-token prompt",
        "ask for fewer samples, fewer tokens or a shorter prompt",
    )


def refuse_over_memory(needed, what, remedy):
    """Refuse work that needs `needed` bytes when that is over memory_budget(): one line naming
    `what` and the `remedy`, instead of an allocation that aborts or swaps the process."""
    budget = memory_budget()
    if needed > budget:
        raise UsageError(
            f"{what}: about {needed / 1e9:,.1f} GB of memory needed, more than half of this machine's"
            f" {2 * budget / 1e9:.0f} GB; {remedy}"
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
