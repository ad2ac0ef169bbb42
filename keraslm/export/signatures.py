"""The exported signatures: ServingFunctions (the in-graph step, tokenizer and sampler) and the
SavedModel and keraslm.json written from them.

`serving_default` is one step of the stateless twin; `generate` tokenises, primes and samples in
the graph; `beam_search` tokenises, primes and runs keraslm.beam's search in the graph. Each checks
every argument before it allocates anything (`_Checks`), so a request can never take TF Serving down.
"""

import numpy as np
import tensorflow as tf

from keraslm import __version__, artifacts, graph_beam, graph_sampling
from keraslm.export.onnx_step import OPSET as ONNX_OPSET
from keraslm.model import ModelLayers, build_primer_model
from keraslm.sampling import MIN_TEMPERATURE
from keraslm.serving import BEAM_SEARCH_SIGNATURE, GENERATE_SIGNATURE, STEP_SIGNATURE
from keraslm.states import in_name, input_name, layer_state_names, output_name, state_names
from keraslm.token_step import TokenStep

FORMAT_VERSION = 1
# Every character Python's str.split() splits on but "\n" (which becomes <eos>), as an RE2 class:
# Vocabulary splits words with str.split(), tf.strings.split only on ASCII whitespace.
_WHITESPACE = "[" + "".join(f"\\x{{{ord(c):x}}}" for c in map(chr, range(0x110000)) if c.isspace() and c != "\n") + "]"


class ServingFunctions:
    """The exported signatures as tf.functions over the stateless twin's weights.

    `step(tokens, h0_in, …)` is serving_default; `generate(prompt, …)` tokenises, primes the
    state with the whole prompt in one pass and samples in a `tf.while_loop`; `beam_search(prompt,
    …)` primes the same way and keeps the best `beam_width` hypotheses of each prompt in one. Each
    checks every argument against `limits` before it allocates anything (see `_Checks`).

    Args:
        config: the run's RunConfig.
        vocab: its Vocabulary.
        twin: the stateless model (use_cudnn=False) with the trained weights.
        limits: the ServingLimits the signatures enforce.
    """

    def __init__(self, config, vocab, twin, limits):
        model_config = config.model
        self.model_config = model_config
        self.limits = limits
        self.twin = twin
        # The same layers (one copy of the weights) with a mask input and only the states as
        # outputs, to prime prompts of different lengths without [B, T, V] logits.
        self.primer = build_primer_model(model_config, twin)
        self.layers = ModelLayers.of(model_config, twin)
        self.states = state_names(model_config)
        self.token_step = TokenStep(self.layers.recurrent, model_config)
        self.level = vocab.level
        self.vocabulary_size = len(vocab)
        self.tokenizer = PromptTokenizer(vocab)
        self.tokens, self.table, self.start_id = self.tokenizer.tokens, self.tokenizer.table, self.tokenizer.start_id

        hidden = model_config.hidden_dim
        step_signature = [tf.TensorSpec([None, None], tf.int32, name="tokens")] + [
            tf.TensorSpec([None, hidden], tf.float32, name=input_name(name)) for name in self.states
        ]
        self.step = tf.function(self._step, input_signature=step_signature)
        self.generate = tf.function(
            self._generate,
            input_signature=[
                tf.TensorSpec([None], tf.string, name="prompt"),
                tf.TensorSpec([], tf.int32, name="max_new_tokens"),
                tf.TensorSpec([], tf.float32, name="temperature"),
                tf.TensorSpec([], tf.int32, name="top_k"),
                tf.TensorSpec([], tf.float32, name="top_p"),
                tf.TensorSpec([], tf.int64, name="seed"),
            ],
        )
        self.beam_search = tf.function(
            self._beam_search,
            input_signature=[
                tf.TensorSpec([None], tf.string, name="prompt"),
                tf.TensorSpec([], tf.int32, name="max_new_tokens"),
                tf.TensorSpec([], tf.int32, name="beam_width"),
                tf.TensorSpec([], tf.int32, name="num_return"),
            ],
        )

    def _step(self, tokens, *states):
        # No rank checks: Grappler folds tf.rank to the signature's static rank, and a tensor fed
        # with another rank already fails TF's own shape checks with InvalidArgument (test_c_api).
        checks, limit, hidden = _Checks(), self.limits.max_batch_tokens, self.model_config.hidden_dim
        batch, length = tf.shape(tokens)[0], tf.shape(tokens)[1]
        checks.require(
            (batch >= 1) & (length >= 1) & (batch * length <= limit),
            f"tokens must hold 1 to {limit} ids (batch × length), at least 1 row and 1 column; got shape",
            tf.shape(tokens),
        )
        checks.require(
            lambda: (tf.reduce_min(tokens) >= 0) & (tf.reduce_max(tokens) < self.vocabulary_size),
            f"tokens must be ids in [0, {self.vocabulary_size}), got min and max",
            lambda: tf.stack([tf.reduce_min(tokens), tf.reduce_max(tokens)]),
        )
        for name, state in zip(self.states, states, strict=True):
            checks.require(
                tf.reduce_all(tf.equal(tf.shape(state), tf.stack([batch, hidden]))),
                f"{name}_in must be [batch of tokens, {hidden}], got shape",
                tf.shape(state),
            )
        tokens, *states = checks.passed(tokens, *states)
        inputs = {"tokens": tokens, **{input_name(n): s for n, s in zip(self.states, states, strict=True)}}
        return self.twin(inputs, training=False)  # {"logits": [B, T, V], "h0_out": [B, H], …}

    def _pad(self, ids, seed):
        """Ragged ids to left-padded ids [B, T] and a mask; an empty prompt gets the start token."""
        lengths = ids.row_lengths()
        width = tf.maximum(tf.reduce_max(tf.concat([lengths, [0]], 0)), 1)
        # Right-align: reverse each row, pad on the right, reverse back.
        padded = tf.reverse(ids[:, ::-1].to_tensor(0, shape=tf.stack([ids.nrows(), width])), axis=[1])
        mask = tf.reverse(tf.sequence_mask(lengths, width), axis=[1])
        if self.start_id >= 0:
            start = tf.constant(self.start_id, tf.int32)
        else:  # no start token: a seeded random one, as the word-level tutorial starts
            start = tf.random.stateless_uniform([], [seed, -1], 0, self.vocabulary_size, tf.int32)
        last = tf.equal(tf.range(width), width - 1)[None, :]
        empty = tf.equal(lengths, 0)[:, None]
        padded = tf.where(empty & last, start, padded)
        mask = mask | (empty & last)
        return padded, mask

    def _sample(self, logits, temperature, top_k, top_p, seed, t):
        """One token per row from logits [B, V], by the rule of keraslm.sampling (see graph_sampling)."""
        return graph_sampling.sample(logits, temperature, top_k, top_p, tf.stack([seed, tf.cast(t, tf.int64)]))

    def _one_token(self, ids, states, weights):
        """Logits [B, V] and the next states for one token per row: the embedding and output layers
        of the twin, the recurrent cells as TokenStep (split weights, every core busy at batch 1).
        Dropout is off at inference, so it is left out."""
        x = self.layers.embedding(ids)
        x, new_states = self.token_step(tf.cast(x, tf.float32), states, weights)
        return self._project(x), new_states

    def _project(self, x):
        """Logits [B, V] in float32 from the top layer's output [B, H]."""
        return tf.cast(self.layers.logits(x), tf.float32)

    def _decode(self, ids):
        pieces = tf.gather(self.tokens, ids)
        if self.level == "char":
            return tf.strings.reduce_join(pieces, axis=1)
        pieces = tf.where(tf.equal(pieces, "<eos>"), "\n", pieces)
        return tf.strings.regex_replace(tf.strings.reduce_join(pieces, axis=1, separator=" "), " ?\n ?", "\n")

    def _check_request(self, prompt, max_new_tokens, temperature, top_k, top_p, seed):
        """The generate arguments after every check on them passed (see _Checks), the prompts as
        ragged ids [B, (length)]: the arguments themselves first, then the prompts' token counts."""
        limits, checks = self.limits, _Checks()
        # No rank checks: see _step (a scalar fed as [n] fails TF's own checks with InvalidArgument).
        batch = tf.size(prompt)
        self._check_prompt_count(checks, batch, prompt)
        self._check_new_tokens(checks, max_new_tokens)
        checks.require(
            lambda: batch * max_new_tokens <= limits.max_batch_tokens,
            f"prompts × max_new_tokens must be at most {limits.max_batch_tokens}; got prompts, max_new_tokens",
            lambda: tf.stack([batch, max_new_tokens]),
        )
        checks.require(
            lambda: tf.equal(temperature, 0.0) | ((temperature >= MIN_TEMPERATURE) & tf.math.is_finite(temperature)),
            f"temperature must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE}, got",
            temperature,
        )
        checks.require(lambda: top_k >= 0, "top_k must be >= 0 (0 = off), got", top_k)
        checks.require(lambda: (top_p > 0.0) & (top_p <= 1.0), "top_p must be in (0, 1] (1 = off), got", top_p)
        self._check_prompt_bytes(checks, prompt)
        prompt, *scalars = checks.passed(prompt, max_new_tokens, temperature, top_k, top_p, seed)
        return self._tokenize_checked(checks, batch, prompt), *scalars

    def _check_beam_request(self, prompt, max_new_tokens, beam_width, num_return):
        """The beam_search arguments once every check passed, the prompts as ragged ids, as
        `_check_request` does for generate: the beams of all prompts and their tokens,
        [B x beam_width, max_new_tokens], are bounded by max_batch_tokens like generate's output."""
        limits, checks = self.limits, _Checks()
        batch = tf.size(prompt)
        self._check_prompt_count(checks, batch, prompt)
        self._check_new_tokens(checks, max_new_tokens)
        checks.require(
            lambda: (beam_width >= 1) & (beam_width <= limits.max_beam_width),
            f"beam_width must be in [1, {limits.max_beam_width}], got",
            beam_width,
        )
        checks.require(
            lambda: (num_return >= 1) & (num_return <= beam_width),
            "num_return must be in [1, beam_width]; got num_return, beam_width",
            lambda: tf.stack([num_return, beam_width]),
        )
        checks.require(  # in int64: the product of three int32 limits overflows int32
            lambda: (
                tf.cast(batch, tf.int64) * tf.cast(beam_width, tf.int64) * tf.cast(max_new_tokens, tf.int64)
                <= limits.max_batch_tokens
            ),
            f"prompts × beam_width × max_new_tokens must be at most {limits.max_batch_tokens}; got prompts,"
            " beam_width, max_new_tokens",
            lambda: tf.stack([batch, beam_width, max_new_tokens]),
        )
        self._check_prompt_bytes(checks, prompt)
        prompt, *scalars = checks.passed(prompt, max_new_tokens, beam_width, num_return)
        return self._tokenize_checked(checks, batch, prompt), *scalars

    def _check_prompt_count(self, checks, batch, prompt):
        limit = self.limits.max_batch_tokens
        checks.require(
            lambda: (batch >= 1) & (batch <= limit),
            f"prompt must be a list of 1 to {limit} strings, got shape",
            tf.shape(prompt),
        )

    def _check_new_tokens(self, checks, max_new_tokens):
        limit = self.limits.max_new_tokens
        checks.require(
            lambda: (max_new_tokens >= 1) & (max_new_tokens <= limit),
            f"max_new_tokens must be in [1, {limit}], got",
            max_new_tokens,
        )

    def _check_prompt_bytes(self, checks, prompt):
        """Bytes first: they bound what tokenising allocates."""
        limits = self.limits
        size = tf.strings.length(prompt)
        checks.require(
            lambda: tf.reduce_max(size) <= limits.max_prompt_bytes,
            f"each prompt must be at most {limits.max_prompt_bytes} bytes, the longest has",
            lambda: tf.reduce_max(size),
        )
        checks.require(
            lambda: tf.reduce_sum(size) <= limits.max_request_bytes,
            f"the prompts together must be at most {limits.max_request_bytes} bytes, got",
            lambda: tf.reduce_sum(size),
        )

    def _tokenize_checked(self, checks, batch, prompt):
        """Ragged ids [B, (length)] of prompts that passed `checks`, once their token counts pass too."""
        limits = self.limits
        ids = self.tokenizer(prompt)
        lengths = ids.row_lengths()
        longest = tf.cast(tf.reduce_max(lengths), tf.int32)
        checks.require(
            lambda: longest <= limits.max_prompt_tokens,
            f"each prompt must be at most {limits.max_prompt_tokens} tokens, the longest has",
            longest,
        )
        checks.require(
            lambda: batch * tf.maximum(longest, 1) <= limits.max_batch_tokens,
            f"prompts × longest prompt must be at most {limits.max_batch_tokens} tokens; got prompts, longest",
            lambda: tf.stack([batch, longest]),
        )
        values, row_splits = checks.passed(ids.flat_values, ids.row_splits)
        return tf.RaggedTensor.from_row_splits(values, row_splits, validate=False)

    def _prime(self, ids, seed):
        """Logits [B, V] of each prompt's next token and the states after it, prompts primed in one pass."""
        tokens, mask = self._pad(ids, seed)
        batch = tf.shape(tokens)[0]
        zeros = tf.zeros([batch, self.model_config.hidden_dim], tf.float32)
        states = self.primer(
            {"tokens": tokens, "mask": mask, **{input_name(n): zeros for n in self.states}}, training=False
        )
        states = {in_name(name): value for name, value in states.items()}
        # The top layer's last h (its first state) is its output at the last position (prompts
        # are left-padded).
        top = layer_state_names(self.model_config.cell, self.model_config.num_layers - 1)[0]
        return self._project(states[input_name(top)]), states

    def _generate(self, prompt, max_new_tokens, temperature, top_k, top_p, seed):
        ids, max_new_tokens, temperature, top_k, top_p, seed = self._check_request(
            prompt, max_new_tokens, temperature, top_k, top_p, seed
        )
        logits, states = self._prime(ids, seed)
        batch = tf.shape(logits)[0]
        weights = self.token_step.weights()  # split once per call, outside the loop

        def body(t, logits, states, generated):
            next_ids = self._sample(logits, temperature, top_k, top_p, seed, t)
            logits, states = self._one_token(next_ids, states, weights)
            return t + 1, logits, states, generated.write(t, next_ids)

        # Grows with the tokens produced: a TensorArray of the requested size would reserve them all.
        generated = tf.TensorArray(tf.int32, size=0, dynamic_size=True, element_shape=[None])
        _, _, _, generated = tf.while_loop(lambda t, *_: t < max_new_tokens, body, (0, logits, states, generated))
        ids = tf.reshape(tf.transpose(generated.stack()), [batch, max_new_tokens])
        return {"text": self._decode(ids), "tokens": ids}

    def _beam_search(self, prompt, max_new_tokens, beam_width, num_return):
        ids, max_new_tokens, beam_width, num_return = self._check_beam_request(
            prompt, max_new_tokens, beam_width, num_return
        )
        # An empty prompt of a vocabulary without a start token starts from a token seeded with 0.
        logits, states = self._prime(ids, tf.constant(0, tf.int64))
        batch = tf.shape(logits)[0]
        # Row b x beam_width + k is beam k of prompt b. Every prompt starts as beam 0; the copies
        # start at -inf, so they rank below every real candidate and are gone once there are enough.
        logits = tf.repeat(logits, beam_width, axis=0)  # [B x K, V]
        states = {name: tf.repeat(value, beam_width, axis=0) for name, value in states.items()}
        first = tf.where(tf.equal(tf.range(beam_width), 0), 0.0, -np.inf)
        scores = tf.tile(tf.cast(first, tf.float64)[None, :], tf.stack([batch, 1]))  # [B, K]
        weights = self.token_step.weights()

        def body(t, logits, states, scores, tokens, parents):
            beams, next_ids, scores = graph_beam.best_candidates(logits, scores, beam_width, self.vocabulary_size)
            rows = tf.reshape(beams + beam_width * tf.range(batch)[:, None], [-1])
            states = {name: tf.gather(value, rows) for name, value in states.items()}
            logits, states = self._one_token(tf.reshape(next_ids, [-1]), states, weights)
            return t + 1, logits, states, scores, tokens.write(t, next_ids), parents.write(t, beams)

        # Grow with the tokens produced, as generate's do.
        history = [tf.TensorArray(tf.int32, size=0, dynamic_size=True, element_shape=[None, None]) for _ in "tp"]
        _, _, _, scores, tokens, parents = tf.while_loop(
            lambda t, *_: t < max_new_tokens, body, (0, logits, states, scores, *history)
        )
        ids = graph_beam.trace_back(tokens.stack(), parents.stack(), num_return)  # [B, N, T]
        texts = tf.reshape(self._decode(tf.reshape(ids, [batch * num_return, max_new_tokens])), [batch, num_return])
        return {"texts": texts, "tokens": ids, "scores": tf.cast(scores[:, :num_return], tf.float32)}


class PromptTokenizer:
    """Vocabulary.encode in the graph: prompts [B] to ragged ids [B, (length)].

    Char level drops the characters the vocabulary lacks (Vocabulary.encode's skip_unknown: a
    server cannot ask the user); word level maps them to `<unk>`. tests/test_tokenizer_agreement.py
    holds both tokenizers to the same ids on arbitrary text.

    Args:
        vocab: the run's Vocabulary.

    Example:
        tokenize = PromptTokenizer(vocab)
        ids = tokenize(tf.constant(["to be or\\n"]))  # tf.RaggedTensor [[…, <eos> id]]
    """

    def __init__(self, vocab):
        self.level = vocab.level
        self.tokens = tf.constant(vocab.tokens)
        self.table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(self.tokens, tf.range(len(vocab), dtype=tf.int64)),
            default_value=vocab.unk_id if vocab.unk_id is not None else -1,
        )
        start = vocab.start_token
        self.start_id = vocab.index[start] if start is not None else -1  # what an empty prompt begins with

    def __call__(self, prompt):
        """Ragged int32 ids [B, (length)] of prompts, a string tensor [B]."""
        if self.level == "char":
            pieces = tf.strings.unicode_split(prompt, "UTF-8")
        else:
            words = tf.strings.regex_replace(tf.strings.regex_replace(prompt, _WHITESPACE, " "), "\n", " <eos> ")
            pieces = tf.strings.split(words)
        ids = tf.ragged.map_flat_values(self.table.lookup, pieces)
        return tf.cast(tf.ragged.boolean_mask(ids, ids >= 0), tf.int32)  # char level: drop unknown


class _Checks:
    """In-graph argument checks, run one after another before anything they guard.

    A failed check ends the call with InvalidArgument ("assertion failed: [message] [value]"),
    which TF Serving returns to the client while it goes on serving. Conditions and values may be
    callables: they are then built after the checks before them have passed, so a check can rely
    on those (the token range is only read once the batch is known not to be empty).
    """

    def __init__(self):
        self._last = []

    def require(self, condition, message, value):
        with tf.control_dependencies(self._last):
            condition = condition() if callable(condition) else condition
            value = value() if callable(value) else value
            self._last = [tf.debugging.Assert(condition, [message, value], summarize=4)]

    def passed(self, *tensors):
        """`tensors`, readable only once every check so far has passed."""
        with tf.control_dependencies(self._last):
            return [tf.identity(t) for t in tensors]


def write_saved_model(functions, path):
    """Write the SavedModel of `functions` (a ServingFunctions) to `path`.

    keras.export.ExportArchive saves exactly the variables the signatures read. Saving a tf.Module
    that holds the Keras model instead writes each Keras 3 weight as an object of its own, which
    TF Serving's loader restores into a copy the graph never reads (keras-team/keras#20095): the
    model then fails there with "Could not find variable", although tf.saved_model.load runs it.
    The model itself is not tracked, so each weight is stored once.
    """
    import keras

    archive = keras.export.ExportArchive()
    archive.track(functions.table)  # generate's vocabulary; the endpoints track the variables
    archive.add_endpoint(STEP_SIGNATURE, functions.step)
    archive.add_endpoint(GENERATE_SIGNATURE, functions.generate)
    archive.add_endpoint(BEAM_SEARCH_SIGNATURE, functions.beam_search)
    # Saving warns about the lookup table's initializer collection; it is harmless (the init op
    # fills the table), so keep the export log clean.
    tf.get_logger().setLevel("ERROR")
    archive.write_out(path, verbose=False)


def artifact_description(config, vocab, limits):
    """keraslm.json: what a client needs besides the model itself."""
    hidden = config.model.hidden_dim
    return {
        "format_version": FORMAT_VERSION,
        "keraslm_version": __version__,
        "config": config.to_dict(),
        "vocabulary": vocab.to_dict(),
        "limits": limits.to_dict(),
        "onnx": {"path": artifacts.ONNX, "opset": ONNX_OPSET},
        "onnx_int8": {"path": artifacts.INT8_ONNX, "weights": "int8, ONNX Runtime dynamic quantization"},
        "inputs": {"tokens": {"dtype": "int32", "shape": [None, None]}}
        | {input_name(n): {"dtype": "float32", "shape": [None, hidden]} for n in state_names(config.model)},
        "outputs": {"logits": {"dtype": "float32", "shape": [None, None, len(vocab)]}}
        | {output_name(n): {"dtype": "float32", "shape": [None, hidden]} for n in state_names(config.model)},
        "states": [
            {"name": n, "input": input_name(n), "output": output_name(n), "shape": [None, hidden], "initial": "zeros"}
            for n in state_names(config.model)
        ],
    }
