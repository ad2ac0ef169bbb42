"""Export a run as `saved_models/NAME/VERSION/`: a SavedModel TF Serving loads as it is, and ONNX.

    VERSION/saved_model.pb, variables/     signatures `serving_default` (one step) and `generate`
    VERSION/assets.extra/model.onnx        the step function for ONNX Runtime (fused RNN ops)
    VERSION/assets.extra/model.int8.onnx   the same with int8 weights (sample.py --int8)
    VERSION/assets.extra/keraslm.json      config, vocabulary, state tensor names and shapes

Everything is built from the stateless twin with `use_cudnn=False`, so a model trained on a GPU
exports and serves on a CPU, and serving assigns no variable. The version is written to a hidden
temporary directory beside the others (TF Serving only watches integer names), checked, and then
renamed into place; a failed check leaves nothing behind.
"""

import json
import os
import shutil
import tempfile
import time

import numpy as np
import tensorflow as tf

from keraslm import __version__
from keraslm.errors import UsageError
from keraslm.model import build_model, keras_step, state_names
from keraslm.onnx_step import OPSET as ONNX_OPSET
from keraslm.onnx_step import build_step_graph
from keraslm.runs import load_run
from keraslm.token_step import TokenStep

PARITY_TOLERANCE = 1e-4
# int8 weights change the model itself, so model.int8.onnx is checked against model.onnx by how far
# its next-token distributions move (mean KL divergence, nats), not by parity.
INT8_KL_TOLERANCE = 0.01
FORMAT_VERSION = 1


class ExportModule(tf.Module):
    """The exported functions, as a tf.Module that tf.saved_model.save writes.

    `step(tokens, h0_in, …)` is the serving_default signature; `generate(prompt, …)` tokenises,
    primes the state with the whole prompt in one pass, and samples in a `tf.while_loop`.

    Args:
        config: the run's RunConfig.
        vocab: its Vocabulary.
        twin: the stateless model (use_cudnn=False) with the trained weights.
    """

    def __init__(self, config, vocab, twin):
        super().__init__()
        model_config = config.model
        self.model_config = model_config
        self.twin = twin
        # The same layers (one copy of the weights) with a mask input, for prompts of different lengths.
        self.masked_twin = build_model(model_config, use_cudnn=False, with_mask=True, layers_of=twin)
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
        inputs = {"tokens": tokens, **{f"{n}_in": s for n, s in zip(self.states, states, strict=True)}}
        return self.twin(inputs, training=False)  # {"logits": [B, T, V], "h0_out": [B, H], …}

    def _encode(self, prompt, seed):
        """Prompts to left-padded ids [B, T] and a mask; an empty prompt gets the start token."""
        if self.level == "char":
            pieces = tf.strings.unicode_split(prompt, "UTF-8")
        else:
            pieces = tf.strings.split(tf.strings.regex_replace(prompt, "\n", " <eos> "))
        ids = tf.ragged.map_flat_values(self.table.lookup, pieces)
        ids = tf.cast(tf.ragged.boolean_mask(ids, ids >= 0), tf.int32)  # char level: drop unknown
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
        scaled = logits / tf.maximum(temperature, 1e-6)

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
        if c.tie_weights:
            logits = self.twin.get_layer("embedding")(x, reverse=True)
        else:
            logits = self.twin.get_layer("logits")(x)
        return tf.cast(logits, tf.float32), new_states

    def _decode(self, ids):
        pieces = tf.gather(self.tokens, ids)
        if self.level == "char":
            return tf.strings.reduce_join(pieces, axis=1)
        pieces = tf.where(tf.equal(pieces, "<eos>"), "\n", pieces)
        return tf.strings.regex_replace(tf.strings.reduce_join(pieces, axis=1, separator=" "), " ?\n ?", "\n")

    def _generate(self, prompt, max_new_tokens, temperature, top_k, top_p, seed):
        tokens, mask = self._encode(prompt, seed)
        batch = tf.shape(tokens)[0]
        zeros = tf.zeros([batch, self.twin.input["h0_in"].shape[-1]], tf.float32)
        states = {f"{n}_in": zeros for n in self.states}
        outputs = self.masked_twin({"tokens": tokens, "mask": mask, **states}, training=False)
        logits = outputs.pop("logits")[:, -1]
        states = {name.replace("_out", "_in"): value for name, value in outputs.items()}

        weights = self.token_step.weights()  # split once per call, outside the loop

        def body(t, logits, states, generated):
            next_ids = self._sample(logits, temperature, top_k, top_p, seed, t)
            logits, states = self._one_token(next_ids, states, weights)
            return t + 1, logits, states, generated.write(t, next_ids)

        count = tf.maximum(max_new_tokens, 0)
        generated = tf.TensorArray(tf.int32, size=count, element_shape=[None])
        _, _, _, generated = tf.while_loop(lambda t, *_: t < count, body, (0, logits, states, generated))
        ids = tf.reshape(tf.transpose(generated.stack()), [batch, count])
        return {"text": self._decode(ids), "tokens": ids}


def artifact_description(config, vocab):
    """keraslm.json: what a client needs besides the model itself."""
    hidden = config.model.hidden_dim
    return {
        "format_version": FORMAT_VERSION,
        "keraslm_version": __version__,
        "config": config.to_dict(),
        "vocabulary": vocab.to_dict(),
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


def check_parity(version_dir, twin, model_config, batch_size=2, length=7, seed=0):
    """Compare the SavedModel, ONNX and Keras steps on random tokens and states.

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
    serving = tf.saved_model.load(version_dir).signatures["serving_default"]
    saved_out = {k: v.numpy() for k, v in serving(**{k: tf.constant(v) for k, v in feed.items()}).items()}
    session = onnxruntime.InferenceSession(
        os.path.join(version_dir, "assets.extra", "model.onnx"), providers=["CPUExecutionProvider"]
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
        "onnx_vs_keras": max_diff(onnx_out, keras_out),
        "carried_vs_whole_sequence": float(np.max(np.abs(np.concatenate(carried, 1) - keras_out["logits"]))),
    }
    worst = max(figures, key=figures.get)
    if figures[worst] > PARITY_TOLERANCE:
        raise UsageError(f"parity check failed: {worst} max |Δ| = {figures[worst]:.2e} > {PARITY_TOLERANCE}")
    return figures


def next_version(base_dir):
    """One more than the largest integer version in base_dir (1 when there is none)."""
    versions = [int(d) for d in os.listdir(base_dir) if d.isdigit()] if os.path.isdir(base_dir) else []
    return max(versions, default=0) + 1


def export_run(run_dir, out="saved_models", name=None, version=None, overwrite=False):
    """Export a run; return (version_dir, report) where report holds timings, sizes and parity.

    Raises:
        UsageError: not a run; version exists without `overwrite`; conversion or parity failed.
    """
    started = time.perf_counter()
    config, vocab, twin = load_run(run_dir, use_cudnn=False)
    name = name or os.path.basename(os.path.normpath(run_dir))
    base_dir = os.path.join(out, name)
    if version is not None and version < 1:
        raise UsageError(f"--version must be a positive integer, got {version}")
    if version is not None and os.path.exists(os.path.join(base_dir, str(version))) and not overwrite:
        raise UsageError(f"{base_dir}/{version} exists; pass --overwrite to replace it or omit --version")
    os.makedirs(base_dir, exist_ok=True)

    tmp = tempfile.mkdtemp(prefix=".export-", dir=base_dir)
    try:
        module = ExportModule(config, vocab, twin)
        # tf.saved_model.save warns about the lookup table's initializer collection; it is harmless
        # (the table is restored through the object graph), so keep the export log clean.
        tf.get_logger().setLevel("ERROR")
        tf.saved_model.save(module, tmp, signatures={"serving_default": module.step, "generate": module.generate})
        extra = os.path.join(tmp, "assets.extra")
        os.makedirs(extra, exist_ok=True)
        onnx_proto = write_onnx(twin, config.model, os.path.join(extra, "model.onnx"))
        write_onnx_int8(os.path.join(extra, "model.onnx"), os.path.join(extra, INT8_ONNX))
        with open(os.path.join(extra, "keraslm.json"), "w", encoding="utf-8") as f:
            json.dump(artifact_description(config, vocab), f, ensure_ascii=False, indent=1)
        parity = check_parity(tmp, twin, config.model)
        int8 = check_int8(tmp, config.model)
        version_dir = _publish(tmp, base_dir, version, overwrite)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
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


def _publish(tmp, base_dir, version, overwrite):
    """Rename the finished directory into place as an integer version; never two with one number."""
    if version is None:
        # Renaming a directory onto a non-empty one fails, so two exports racing for the same
        # number cannot both win: the loser takes the next number.
        for _ in range(100):
            target = os.path.join(base_dir, str(next_version(base_dir)))
            try:
                os.rename(tmp, target)
                return target
            except OSError:
                continue
        raise UsageError(f"could not claim a version number in {base_dir}")
    target = os.path.join(base_dir, str(version))
    if os.path.exists(target):
        if not overwrite:
            raise UsageError(f"{target} exists; pass --overwrite to replace it")
        old = tempfile.mkdtemp(prefix=".replaced-", dir=base_dir)
        os.rename(target, os.path.join(old, "v"))
        os.rename(tmp, target)
        shutil.rmtree(old)
        return target
    os.rename(tmp, target)
    return target


def _size(directory, exclude=None):
    total = 0
    for root, dirs, files in os.walk(directory):
        dirs[:] = [d for d in dirs if d != exclude]
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total
