"""Text from an opened model: a prompt in, its samples out, by the one sampling rule.

`keraslm.load` returns a `Generator` and sample.py runs `Generator.generate`, so one seed gives one
text from either. No TensorFlow is imported here: the backend brings whatever it needs.
"""

import numpy as np

from keraslm.errors import ArgumentError
from keraslm.sampling import TOP_K_OFF, TOP_P_OFF, check_memory, generate, make_sampler


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
