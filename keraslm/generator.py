"""Text from an opened model: a prompt in, its samples (or its most likely continuations) out.

`keraslm.load` returns a `Generator` and sample.py runs `Generator.generate` (or, with --beam-width,
`Generator.beam_search`), so one seed gives one text from either. No TensorFlow is imported here:
the backend brings whatever it needs.
"""

import numpy as np

from keraslm.beam import beam_search, check_beam_memory, check_beam_settings
from keraslm.errors import ArgumentError
from keraslm.sampling import TOP_K_OFF, TOP_P_OFF, check_memory, generate, make_sampler
from keraslm.vocab import EOS


def check_request(num_tokens, num_samples, stream=False):
    """Refuse a request no backend can run: no tokens, no samples, or a stream of several samples."""
    if num_tokens <= 0:
        raise ArgumentError.about("num_tokens", f"must be positive, got {num_tokens}")
    if num_samples <= 0:
        raise ArgumentError.about("num_samples", f"must be positive, got {num_samples}")
    if stream and num_samples > 1:
        raise ArgumentError("{stream} prints one sample; drop {num_samples} or {stream}")


class Generator:
    """An opened model (an export or a run directory) that continues prompts; `keraslm.load` returns one.

    Args:
        backend: a backend of keraslm.runtime (what `open_backend` returns): its vocabulary, a
            `step` and an `initial_state`, and for the savedmodel backend `generate_in_graph`.

    Example:
        >>> generator = keraslm.load("saved_models/lm")  # doctest: +SKIP
        >>> generator.generate("ROMEO:", num_tokens=20, seed=1)  # doctest: +SKIP
        ['ROMEO: and the king of ...']
    """

    def __init__(self, backend):
        self.backend = backend

    @property
    def vocab(self):
        """The model's vocabulary (keraslm.vocab.Vocabulary)."""
        return self.backend.vocab

    def generate(
        self,
        prompt="",
        num_tokens=200,
        temperature=0.8,
        top_k=TOP_K_OFF,
        top_p=TOP_P_OFF,
        seed=0,
        num_samples=1,
        *,
        skip_unknown=False,
        in_graph=False,
        stream=None,
    ):
        """Continue `prompt` `num_samples` times, as sample.py does with the same arguments.

        Args:
            prompt: text to continue; "" starts from the start token (or a token drawn with `seed`).
            num_tokens: tokens to generate after the prompt.
            temperature: softmax temperature; 0 is greedy.
            top_k: sample among the k most likely tokens (0 = off).
            top_p: nucleus mass in (0, 1] (1 = off).
            seed: one seed, one text, on every backend.
            num_samples: continuations drawn as one batch.
            skip_unknown: char level: drop prompt characters the model lacks instead of refusing.
            in_graph: savedmodel backend: sample inside the graph (the export's generate signature).
            stream: a text file (sys.stdout) to write the prompt and each token to as it comes; one sample.

        Returns:
            One text per sample: the prompt and its continuation.

        Raises:
            ArgumentError: a setting out of range, named as above.
            UsageError: a prompt the vocabulary cannot encode, or a request larger than memory.
        """
        check_request(num_tokens, num_samples, stream is not None)
        if in_graph and not hasattr(self.backend, "generate_in_graph"):
            raise ArgumentError("{in_graph} needs the savedmodel backend")
        sampler = make_sampler(temperature, top_k, top_p)
        rng = np.random.default_rng(seed)
        ids = self.vocab.encode_prompt(prompt, rng, skip_unknown=skip_unknown)
        shown = prompt if prompt else self.vocab.decode(ids)
        if in_graph:
            texts, _ = self.backend.generate_in_graph(
                [prompt] * num_samples, num_tokens, temperature, top_k, top_p, seed
            )
        else:
            texts = self._sample(ids, shown, num_tokens, sampler, rng, num_samples, stream)
        return [self.vocab.join(shown, text) for text in texts]

    def beam_search(
        self,
        prompt="",
        num_tokens=20,
        beam_width=4,
        num_return=1,
        length_penalty=0.0,
        *,
        stop_at_eos=False,
        seed=0,
        skip_unknown=False,
    ):
        """The `num_return` most likely continuations of `prompt`, by beam search (keraslm.beam).

        Args:
            prompt: text to continue; "" starts from the start token (or a token drawn with `seed`).
            num_tokens: the most tokens to generate after the prompt.
            beam_width: hypotheses kept at each step; 1 is greedy decoding.
            num_return: continuations returned, at most `beam_width`.
            length_penalty: alpha of GNMT's ((5 + length) / 6) ** alpha, which the hypotheses'
                log-probabilities are divided by to rank them (0 = rank by log-probability).
            stop_at_eos: word level: a hypothesis ends at `<eos>` (kept, `<eos>` included).
            seed: only draws the first token of an empty prompt when the vocabulary has no start token.
            skip_unknown: char level: drop prompt characters the model lacks instead of refusing.

        Returns:
            Up to `num_return` dicts, best first: `text` (prompt and continuation), `continuation`,
            `tokens` (the continuation's ids), `score` (its total log-probability, natural log),
            `ranking_score` (score / length penalty) and `finished` (stopped at `<eos>`).

        Raises:
            ArgumentError: a setting out of range, named as above.
            UsageError: a prompt the vocabulary cannot encode, or a search larger than memory.

        Example:
            >>> generator.beam_search("ROMEO:", num_tokens=10, beam_width=4, num_return=2)  # doctest: +SKIP
            [{'text': 'ROMEO: ...', 'score': -9.81, ...}, {...}]
        """
        check_beam_settings(num_tokens, beam_width, num_return, length_penalty)
        vocab = self.vocab
        if stop_at_eos and vocab.level != "word":
            raise ArgumentError("{stop_at_eos} needs a word-level model (one with <eos>); this one is char level")
        ids = vocab.encode_prompt(prompt, np.random.default_rng(seed), skip_unknown=skip_unknown)
        shown = prompt if prompt else vocab.decode(ids)
        check_beam_memory(beam_width, len(ids), num_tokens, len(vocab))
        eos_id = vocab.index[EOS] if stop_at_eos else None
        found = beam_search(
            self.backend.step, ids, self.backend.initial_state(1), num_tokens, beam_width, num_return,
            length_penalty, eos_id,
        )  # fmt: skip
        return [_beam_result(vocab, shown, h) for h in found]

    def _sample(self, ids, shown, num_tokens, sampler, rng, num_samples, stream):
        """The NumPy loop over the backend's step: the decoded continuations."""
        vocab = self.vocab
        on_token = None
        if stream is not None:
            on_token = _streamer(vocab, shown, stream)
        check_memory(num_samples, len(ids), num_tokens, len(vocab))
        batch = np.repeat(ids[None, :], num_samples, axis=0)
        state = self.backend.initial_state(num_samples)
        tokens = generate(self.backend.step, batch, state, num_tokens, sampler, rng, on_token)
        if stream is not None:
            stream.write("\n")
            stream.flush()
        return [vocab.decode(row) for row in tokens]


def _beam_result(vocab, shown, hypothesis):
    """A Hypothesis as beam_search returns it: plain Python values, ready for JSON."""
    continuation = vocab.decode(hypothesis.tokens)
    return {
        "text": vocab.join(shown, continuation),
        "continuation": continuation,
        "tokens": hypothesis.tokens.tolist(),
        "score": hypothesis.score,
        "ranking_score": hypothesis.ranking_score,
        "finished": hypothesis.finished,
    }


def _streamer(vocab, shown, stream):
    """Write the prompt to `stream` now; return the on_token that writes each token as it comes."""
    separator = " " if vocab.level == "word" and shown and not shown.endswith(("\n", " ")) else ""
    stream.write(shown + separator)
    stream.flush()

    def on_token(column):
        piece = vocab.decode(column[:1])
        stream.write(piece if vocab.level == "char" or piece.endswith("\n") else piece + " ")
        stream.flush()

    return on_token
