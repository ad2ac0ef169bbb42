"""Export a run as `saved_models/NAME/VERSION/`: a SavedModel TF Serving loads as it is, and ONNX.

    VERSION/saved_model.pb, variables/     signatures `serving_default` (one step) and `generate`
    VERSION/assets.extra/model.onnx        the step function for ONNX Runtime (fused RNN ops)
    VERSION/assets.extra/model.int8.onnx   the same with int8 weights (sample.py --int8)
    VERSION/assets.extra/keraslm.json      config, vocabulary, state tensor names and shapes

Everything is built from the stateless twin with `use_cudnn=False`, so a model trained on a GPU
exports and serves on a CPU, and serving assigns no variable. The version is written to a hidden
temporary directory beside the others (TF Serving only watches integer names), checked, and then
renamed into place (`_publish`); a failed check leaves nothing behind.
"""

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
import time

import numpy as np
import tensorflow as tf

from keraslm import __version__, locks
from keraslm.errors import UsageError, first_line
from keraslm.export.onnx_step import OPSET as ONNX_OPSET
from keraslm.export.onnx_step import build_step_graph
from keraslm.files import cannot_write, current_umask, exchange, rename_new
from keraslm.limits import ServingLimits
from keraslm.model import build_model, in_name, keras_step, state_names
from keraslm.runs import load_run
from keraslm.sampling import MIN_TEMPERATURE
from keraslm.serving import GENERATE_SIGNATURE, STEP_SIGNATURE, generate_inputs
from keraslm.session_loader import RequestError, ServingError, SessionModel
from keraslm.token_step import TokenStep
from keraslm.versions import MAX_VERSION, versions

PARITY_TOLERANCE = 1e-4
# int8 weights change the model itself, so model.int8.onnx is checked against model.onnx by how far
# its next-token distributions move (mean KL divergence, nats), not by parity.
INT8_KL_TOLERANCE = 0.01
FORMAT_VERSION = 1


class ServingFunctions:
    """The exported signatures as tf.functions over the stateless twin's weights.

    `step(tokens, h0_in, …)` is serving_default; `generate(prompt, …)` tokenises, primes the
    state with the whole prompt in one pass and samples in a `tf.while_loop`. Both check every
    argument against `limits` before they allocate anything (see `_Checks`).

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
        self.primer = build_model(model_config, use_cudnn=False, with_mask=True, layers_of=twin)
        self.states = state_names(model_config)
        self.token_step = TokenStep(twin, model_config)
        self.level = vocab.level
        self.vocabulary_size = len(vocab)
        self.tokens = tf.constant(vocab.tokens)
        self.table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(self.tokens, tf.range(len(vocab), dtype=tf.int64)),
            default_value=vocab.unk_id if vocab.unk_id is not None else -1,
        )
        start = vocab.start_token
        self.start_id = vocab.index[start] if start is not None else -1

        hidden = model_config.hidden_dim
        step_signature = [tf.TensorSpec([None, None], tf.int32, name="tokens")] + [
            tf.TensorSpec([None, hidden], tf.float32, name=f"{name}_in") for name in self.states
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
        inputs = {"tokens": tokens, **{f"{n}_in": s for n, s in zip(self.states, states, strict=True)}}
        return self.twin(inputs, training=False)  # {"logits": [B, T, V], "h0_out": [B, H], …}

    def _tokenize(self, prompt):
        """Prompts [B] to ragged ids [B, (length)], as Vocabulary.encode splits them."""
        if self.level == "char":
            pieces = tf.strings.unicode_split(prompt, "UTF-8")
        else:
            pieces = tf.strings.split(tf.strings.regex_replace(prompt, "\n", " <eos> "))
        ids = tf.ragged.map_flat_values(self.table.lookup, pieces)
        return tf.cast(tf.ragged.boolean_mask(ids, ids >= 0), tf.int32)  # char level: drop unknown

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
        """One token per row from logits [B, V]: greedy at temperature 0, else filtered sampling."""

        def keep_top_k(scaled):
            kth = tf.math.top_k(scaled, tf.clip_by_value(top_k, 1, self.vocabulary_size)).values[:, -1:]
            return tf.where(scaled < kth, -np.inf, scaled)

        def keep_nucleus(scaled):
            # Keep the most likely tokens while the mass before each is below top_p.
            ordered = tf.sort(scaled, direction="DESCENDING")
            before = tf.cumsum(tf.nn.softmax(ordered), axis=-1, exclusive=True)
            threshold = tf.reduce_min(tf.where(before < top_p, ordered, np.inf), axis=-1, keepdims=True)
            return tf.where(scaled < threshold, -np.inf, scaled)

        def draw():
            # Each filter runs only when asked for: a sort per token costs as much as a layer.
            scaled = logits / temperature  # >= MIN_TEMPERATURE here (checked)
            filtered = tf.cond(top_k > 0, lambda: keep_top_k(scaled), lambda: scaled)
            filtered = tf.cond(top_p < 1.0, lambda: keep_nucleus(filtered), lambda: filtered)
            key = tf.stack([seed, tf.cast(t, tf.int64)])
            return tf.random.stateless_categorical(filtered, 1, key, tf.int32)[:, 0]

        return tf.cond(temperature > 0, draw, lambda: tf.argmax(logits, axis=-1, output_type=tf.int32))

    def _one_token(self, ids, states, weights):
        """Logits [B, V] and the next states for one token per row: the embedding and output layers
        of the twin, the recurrent cells as TokenStep (split weights, every core busy at batch 1).
        Dropout is off at inference, so it is left out."""
        c = self.model_config
        x = self.twin.get_layer("one_hot" if c.one_hot else "embedding")(ids)
        x, new_states = self.token_step(tf.cast(x, tf.float32), states, weights)
        return self._project(x), new_states

    def _project(self, x):
        """Logits [B, V] in float32 from the top layer's output [B, H]."""
        if self.model_config.tie_weights:
            logits = self.twin.get_layer("embedding")(x, reverse=True)
        else:
            logits = self.twin.get_layer("logits")(x)
        return tf.cast(logits, tf.float32)

    def _decode(self, ids):
        pieces = tf.gather(self.tokens, ids)
        if self.level == "char":
            return tf.strings.reduce_join(pieces, axis=1)
        pieces = tf.where(tf.equal(pieces, "<eos>"), "\n", pieces)
        return tf.strings.regex_replace(tf.strings.reduce_join(pieces, axis=1, separator=" "), " ?\n ?", "\n")

    def _check_request(self, prompt, max_new_tokens, temperature, top_k, top_p, seed):
        """The generate arguments after every check on them passed (see _Checks)."""
        limits, checks = self.limits, _Checks()
        scalars = [max_new_tokens, temperature, top_k, top_p, seed]
        # No rank checks: see _step (a scalar fed as [n] fails TF's own checks with InvalidArgument).
        batch = tf.size(prompt)
        checks.require(
            lambda: (batch >= 1) & (batch <= limits.max_batch_tokens),
            f"prompt must be a list of 1 to {limits.max_batch_tokens} strings, got shape",
            tf.shape(prompt),
        )
        checks.require(
            lambda: (max_new_tokens >= 1) & (max_new_tokens <= limits.max_new_tokens),
            f"max_new_tokens must be in [1, {limits.max_new_tokens}], got",
            max_new_tokens,
        )
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
        # Bytes first: they bound what tokenising allocates.
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
        prompt, *scalars = checks.passed(prompt, *scalars)
        ids = self._tokenize(prompt)
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
        return tf.RaggedTensor.from_row_splits(values, row_splits, validate=False), *scalars

    def _generate(self, prompt, max_new_tokens, temperature, top_k, top_p, seed):
        ids, max_new_tokens, temperature, top_k, top_p, seed = self._check_request(
            prompt, max_new_tokens, temperature, top_k, top_p, seed
        )
        tokens, mask = self._pad(ids, seed)
        batch = tf.shape(tokens)[0]
        zeros = tf.zeros([batch, self.model_config.hidden_dim], tf.float32)
        states = self.primer(
            {"tokens": tokens, "mask": mask, **{f"{n}_in": zeros for n in self.states}}, training=False
        )
        states = {in_name(name): value for name, value in states.items()}
        # The top layer's last state is its output at the last position (prompts are left-padded).
        logits = self._project(states[f"h{self.model_config.num_layers - 1}_in"])

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
        "onnx": {"path": "model.onnx", "opset": ONNX_OPSET},
        "onnx_int8": {"path": INT8_ONNX, "weights": "int8, ONNX Runtime dynamic quantization"},
        "inputs": {"tokens": {"dtype": "int32", "shape": [None, None]}}
        | {f"{n}_in": {"dtype": "float32", "shape": [None, hidden]} for n in state_names(config.model)},
        "outputs": {"logits": {"dtype": "float32", "shape": [None, None, len(vocab)]}}
        | {f"{n}_out": {"dtype": "float32", "shape": [None, hidden]} for n in state_names(config.model)},
        "states": [
            {"name": n, "input": f"{n}_in", "output": f"{n}_out", "shape": [None, hidden], "initial": "zeros"}
            for n in state_names(config.model)
        ],
    }


def write_onnx(twin, model_config, path):
    """Write the step function as ONNX with fused LSTM / GRU / RNN ops (see onnx_step)."""
    import onnx

    model_proto = build_step_graph(twin, model_config)
    onnx.save(model_proto, path)
    return model_proto


INT8_ONNX = "model.int8.onnx"


def write_onnx_int8(float_path, path):
    """Write model.onnx with its LSTM and projection weights quantized to int8.

    At batch 1 a step reads every weight once per token, so its speed is set by how many bytes
    the weights take: the 2×512 char LSTM's 13.6 MB of float32 do not fit in the cores' caches,
    3.4 MB of int8 nearly do, and ONNX Runtime's int8 kernels (VNNI / AMX) run the step about 4×
    faster (benchmarks/RESULTS.md). Activations are quantized per call (dynamic quantization),
    so no calibration data is needed. GRU and RNN have no int8 kernel in ONNX Runtime; for them
    only the projection is quantized.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Per-tensor signed weights without reduce_range: of the four combinations, the closest to
    # float on a 2×512 LSTM (max |Δ logit| 4.9e-3, against 5.4e-3 to 7.8e-3).
    quantize_dynamic(float_path, path, weight_type=QuantType.QInt8, op_types_to_quantize=["LSTM", "MatMul"])


def check_int8(version_dir, model_config, batch_size=4, length=32, seed=0):
    """How far model.int8.onnx moves from model.onnx on random tokens: mean KL divergence of the
    next-token distributions (nats) and max |Δ| of the logits. Raises UsageError over
    INT8_KL_TOLERANCE."""
    import onnxruntime

    rng = np.random.default_rng(seed)
    feed = {"tokens": rng.integers(0, model_config.vocabulary_size, (batch_size, length)).astype(np.int32)}
    feed |= {f"{n}_in": np.zeros((batch_size, model_config.hidden_dim), np.float32) for n in state_names(model_config)}
    extra = os.path.join(version_dir, "assets.extra")
    logits = [
        onnxruntime.InferenceSession(os.path.join(extra, name), providers=["CPUExecutionProvider"])
        .run(["logits"], feed)[0]
        .astype(np.float64)
        for name in ("model.onnx", INT8_ONNX)
    ]
    log_p, log_q = (x - np.logaddexp.reduce(x, axis=-1, keepdims=True) for x in logits)
    figures = {
        "int8_kl_vs_float": float(np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=-1))),
        "int8_max_logit_diff": float(np.max(np.abs(logits[0] - logits[1]))),
    }
    if not figures["int8_kl_vs_float"] <= INT8_KL_TOLERANCE:  # also catches NaN
        raise UsageError(
            f"int8 check failed: mean KL to the float model {figures['int8_kl_vs_float']:.2e} > {INT8_KL_TOLERANCE}"
        )
    return figures


def check_parity(model, twin, model_config, batch_size=2, length=7, seed=0):
    """Compare the session-loaded SavedModel, ONNX and Keras steps on random tokens and states.

    Args:
        model: the version as TF Serving loads it (a SessionModel).

    Returns the figures: max |Δ| of every output between backends, and of the logits between
    one call over the sequence and the state carried token by token. Raises UsageError over
    PARITY_TOLERANCE.
    """
    import onnxruntime

    rng = np.random.default_rng(seed)
    feed = {"tokens": rng.integers(0, model_config.vocabulary_size, (batch_size, length)).astype(np.int32)}
    feed |= {
        f"{n}_in": rng.normal(0, 0.5, (batch_size, model_config.hidden_dim)).astype(np.float32)
        for n in state_names(model_config)
    }

    keras_out = {k: np.asarray(v) for k, v in twin(feed, training=False).items()}
    saved_out = model.run(STEP_SIGNATURE, feed)
    session = onnxruntime.InferenceSession(
        os.path.join(model.version_dir, "assets.extra", "model.onnx"), providers=["CPUExecutionProvider"]
    )
    onnx_names = [o.name for o in session.get_outputs()]
    onnx_out = dict(zip(onnx_names, session.run(onnx_names, feed), strict=True))
    if set(onnx_out) != set(keras_out) or set(saved_out) != set(keras_out):
        raise UsageError(
            f"export outputs differ: keras {sorted(keras_out)}, saved {sorted(saved_out)}, onnx {sorted(onnx_out)}"
        )

    def max_diff(a, b):
        return max(float(np.max(np.abs(a[k] - b[k]))) for k in keras_out)

    step, _ = keras_step(twin, model_config, batch_size)
    state = {k: v for k, v in feed.items() if k != "tokens"}
    carried = []
    for t in range(length):
        logits, state = step(feed["tokens"][:, t : t + 1], state)
        carried.append(logits)
    figures = {
        "savedmodel_vs_keras": max_diff(saved_out, keras_out),
        "savedmodel_vs_onnx": max_diff(saved_out, onnx_out),
        "onnx_vs_keras": max_diff(onnx_out, keras_out),
        "carried_vs_whole_sequence": float(np.max(np.abs(np.concatenate(carried, 1) - keras_out["logits"]))),
    }
    worst = max(figures, key=figures.get)
    if figures[worst] > PARITY_TOLERANCE:
        raise UsageError(f"parity check failed: {worst} max |Δ| = {figures[worst]:.2e} > {PARITY_TOLERANCE}")
    return figures


def check_generate(model, twin, model_config, vocab, num_tokens=8):
    """Run the session-loaded `generate` greedily on two prompts of different lengths and follow
    its tokens with the Keras step in a NumPy loop: each must be the step's most likely token
    (to PARITY_TOLERANCE in logits, so a near-tie may go either way) and the text their decoding.

    Returns the largest logit gap between a chosen token and the step's best. Raises UsageError.
    """
    specials = set(vocab.to_dict()["special_tokens"].values())
    plain = [t for t in vocab.tokens if t not in specials and t.strip() == t and t]
    separator = "" if vocab.level == "char" else " "
    prompts = [separator.join(plain[:3]), plain[3 % len(plain)]]
    out = model.run(GENERATE_SIGNATURE, generate_inputs(prompts, num_tokens, temperature=0.0))
    step, zero = keras_step(twin, model_config, batch_size=1)
    worst = 0.0
    for row, prompt in enumerate(prompts):
        chosen = out["tokens"][row]
        logits, state = step(vocab.encode(prompt)[None, :], zero)
        for token in chosen:
            worst = max(worst, float(np.max(logits[0, -1]) - logits[0, -1, token]))
            logits, state = step(np.array([[token]], np.int32), state)
        if out["text"][row].decode("utf-8") != vocab.decode(chosen):
            raise UsageError(f"generate check failed: its text for prompt {prompt!r} is not its tokens' decoding")
    if worst > PARITY_TOLERANCE:
        raise UsageError(f"generate check failed: a greedy token is {worst:.2e} below the step's best logit")
    return worst


def next_version(base_dir):
    """One more than the largest version in base_dir (1 when there is none)."""
    number = max(versions(base_dir), default=0) + 1
    if number > MAX_VERSION:
        raise UsageError(f"{base_dir} holds version 2^63 - 1, the largest TF Serving reads; give --version N")
    return number


def export_run(run_dir, out="saved_models", name=None, version=None, overwrite=False, limits=None):
    """Export a run; return (version_dir, report) where report holds timings, sizes and parity.

    Args:
        limits: {limit name: value} overriding `ServingLimits.default` (None values keep it).

    Raises:
        UsageError: not a run; version exists without `overwrite`; conversion or parity failed;
            the export cannot be written (disk full, read-only, not a folder).
    """
    started = time.perf_counter()
    if version is not None and not 1 <= version <= MAX_VERSION:
        raise UsageError(f"--version must be in [1, 2^63 - 1] (TF Serving reads 64-bit versions), got {version}")
    config, vocab, twin = load_run(run_dir, use_cudnn=False)
    limits = ServingLimits.default(len(vocab), **(limits or {}))
    name = name or os.path.basename(os.path.normpath(run_dir))
    base_dir = os.path.join(out, name)
    if version is not None and os.path.exists(os.path.join(base_dir, str(version))) and not overwrite:
        raise UsageError(f"{base_dir}/{version} exists; pass --overwrite to replace it or omit --version")

    with contextlib.ExitStack() as workspace:
        tmp = _workspace(base_dir, workspace)
        extra = os.path.join(tmp, "assets.extra")
        try:
            write_saved_model(ServingFunctions(config, vocab, twin, limits), tmp)
            os.makedirs(extra, exist_ok=True)
            onnx_proto = write_onnx(twin, config.model, os.path.join(extra, "model.onnx"))
            write_onnx_int8(os.path.join(extra, "model.onnx"), os.path.join(extra, INT8_ONNX))
            with open(os.path.join(extra, "keraslm.json"), "w", encoding="utf-8") as f:
                json.dump(artifact_description(config, vocab, limits), f, ensure_ascii=False, indent=1)
        except (OSError, tf.errors.OpError) as e:  # TensorFlow's own file system reports OpErrors
            raise UsageError(f"--out: cannot write the export in {base_dir} ({first_line(e)})") from None
        served = SessionModel(tmp)  # as TF Serving loads it: nothing it cannot run is published
        try:
            parity = check_parity(served, twin, config.model)
            parity["generate_greedy_gap"] = check_generate(served, twin, config.model, vocab)
        except (RequestError, ServingError) as e:
            raise UsageError(f"export check failed: TF Serving's loader cannot run the new version ({e})") from None
        finally:
            served.close()
        int8 = check_int8(tmp, config.model)
        version_dir = _publish(tmp, base_dir, version, overwrite)
    report = {
        "seconds": time.perf_counter() - started,
        "parity": parity,
        "int8": int8,
        "onnx_ops": sorted({node.op_type for node in onnx_proto.graph.node}),
        "sizes": {
            "saved_model": _size(version_dir, exclude="assets.extra"),
            "model.onnx": os.path.getsize(os.path.join(version_dir, "assets.extra", "model.onnx")),
            INT8_ONNX: os.path.getsize(os.path.join(version_dir, "assets.extra", INT8_ONNX)),
        },
    }
    return version_dir, report


# Versions are built in hidden folders beside the others (TF Serving only watches integer names).
WORKSPACE_PREFIX = ".export-"


def _workspace(base_dir, stack):
    """A new folder in base_dir to build a version in, locked and finally removed through `stack`.

    Folders of exports that were killed (their lock died with them) are removed first. The model
    base is locked meanwhile, so a new folder is locked before any other export can see it.
    """
    try:
        os.makedirs(base_dir, exist_ok=True)
        with locks.held(base_dir):
            for entry in os.scandir(base_dir):
                abandoned = re.fullmatch(rf"{re.escape(WORKSPACE_PREFIX)}[a-z0-9_]{{8}}", entry.name)
                if abandoned and entry.is_dir(follow_symlinks=False) and not locks.is_held(entry.path):
                    shutil.rmtree(entry.path, ignore_errors=True)
            tmp = tempfile.mkdtemp(prefix=WORKSPACE_PREFIX, dir=base_dir)
            # mkdtemp's folder is private (0700); the published version must be readable by
            # a server running as another user, as a folder made by mkdir would be.
            os.chmod(tmp, 0o777 & ~current_umask())
            stack.enter_context(locks.held(tmp))
    except FileExistsError:
        raise UsageError(f"--out: {base_dir} exists and is not a folder; give another --out or --name") from None
    except OSError as e:
        raise UsageError(f"--out: {cannot_write(base_dir, e)}") from None
    # After publishing, the folder is gone, or holds the version --overwrite replaced.
    stack.callback(shutil.rmtree, tmp, ignore_errors=True)
    return tmp


def _publish(tmp, base_dir, version, overwrite):
    """Rename the finished folder into place as an integer version: a new number never replaces
    anything, and --overwrite swaps the old and new version in one step, so TF Serving's poller
    (or a kill at any moment) sees the old version or the new one, never none."""
    if version is None:
        # Two exports racing for one number cannot both win: the loser takes the next number.
        for _ in range(100):
            target = os.path.join(base_dir, str(next_version(base_dir)))
            with contextlib.suppress(FileExistsError):
                rename_new(tmp, target)
                return target
        raise UsageError(f"could not claim a version number in {base_dir}")
    target = os.path.join(base_dir, str(version))
    try:
        rename_new(tmp, target)
        return target
    except FileExistsError:
        if not overwrite:
            raise UsageError(f"{target} exists; pass --overwrite to replace it") from None
    if not os.path.isdir(target) or os.path.islink(target):
        raise UsageError(f"{target} is not a version folder; remove it or choose another --version")
    try:
        exchange(tmp, target)
    except OSError as e:
        if e.errno in (errno.ENOSYS, errno.EINVAL):
            raise UsageError(
                f"--overwrite needs a file system that swaps two folders in one step (Linux renameat2), and"
                f" {base_dir} is not on one; export to a new version instead"
            ) from None
        raise UsageError(f"--overwrite: {cannot_write(target, e)}") from None
    return target


def _size(directory, exclude=None):
    total = 0
    for root, dirs, files in os.walk(directory):
        dirs[:] = [d for d in dirs if d != exclude]
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total
