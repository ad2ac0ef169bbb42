"""model.int8.onnx: model.onnx with int8 weights; and the check of how far int8 weights move a model
(model.int8.onnx from model.onnx, model.int8.tflite from model.tflite)."""

import contextlib
import logging
import os

import numpy as np

from keraslm import artifacts
from keraslm.errors import UsageError
from keraslm.export.litert import run_litert
from keraslm.states import input_name, state_names

# int8 weights change the model itself, so model.int8.onnx is checked against model.onnx by how far
# its next-token distributions move (mean KL divergence, nats), not by parity.
INT8_KL_TOLERANCE = 0.01


def write_onnx_int8(float_path, path):
    """Write model.onnx with its LSTM and projection weights quantized to int8.

    At batch 1 a step reads every weight once per token, so its speed is set by how many bytes
    the weights take: a quarter of the bytes fits the cores' caches far better, and ONNX Runtime's
    int8 kernels (VNNI / AMX) run the step faster (benchmarks/RESULTS.md, "Generation with int8
    weights"). Activations are quantized per call (dynamic quantization),
    so no calibration data is needed. GRU and RNN have no int8 kernel in ONNX Runtime; for them
    only the projection is quantized.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Per-tensor signed weights without reduce_range: of the four combinations, the closest to
    # float on a 2×512 LSTM (benchmarks/RESULTS.md, "Figures from code comments").
    with _preprocessing_advice_dropped():
        quantize_dynamic(float_path, path, weight_type=QuantType.QInt8, op_types_to_quantize=["LSTM", "MatMul"])


@contextlib.contextmanager
def _preprocessing_advice_dropped():
    """Drop ONNX Runtime's "Please consider to run pre-processing before quantization" warning.

    Its pre-processing (shape inference and graph optimization) finds the weights to quantize in
    graphs where they are hidden; the step graph's LSTM and MatMul weights are plain initializers,
    and check_int8 measures the result, so the advice would only alarm the user.
    """
    advice = "Please consider to run pre-processing"

    def keep(record):
        return not record.getMessage().startswith(advice)

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def check_int8(version_dir, model_config):
    """How far model.int8.onnx moves from model.onnx on random tokens: mean KL divergence of the
    next-token distributions (nats) and max |Δ| of the logits. Raises UsageError over
    INT8_KL_TOLERANCE."""
    import onnxruntime

    feed = _int8_feed(model_config)
    extra = os.path.join(version_dir, artifacts.EXTRA)
    logits = [
        onnxruntime.InferenceSession(os.path.join(extra, name), providers=["CPUExecutionProvider"]).run(
            ["logits"], feed
        )[0]
        for name in (artifacts.ONNX, artifacts.INT8_ONNX)
    ]
    return _int8_figures(artifacts.INT8_ONNX, *logits)


def check_litert_int8(version_dir, model_config):
    """model.int8.tflite against model.tflite, by the same rule and tolerance as `check_int8`."""
    feed = _int8_feed(model_config)
    extra = os.path.join(version_dir, artifacts.EXTRA)
    logits = [
        run_litert(os.path.join(extra, name), feed)["logits"] for name in (artifacts.LITERT, artifacts.INT8_LITERT)
    ]
    return _int8_figures(artifacts.INT8_LITERT, *logits)


def _int8_feed(model_config, batch_size=4, length=32, seed=0):
    """Random tokens from a zero state: the int8 checks' input."""
    rng = np.random.default_rng(seed)
    feed = {"tokens": rng.integers(0, model_config.vocabulary_size, (batch_size, length)).astype(np.int32)}
    return feed | {
        input_name(n): np.zeros((batch_size, model_config.hidden_dim), np.float32) for n in state_names(model_config)
    }


def _int8_figures(name, float_logits, int8_logits):
    """Mean KL divergence of the next-token distributions (nats) and max |Δ| of the logits; raises
    UsageError, naming the int8 model `name`, when the KL exceeds INT8_KL_TOLERANCE."""
    float_logits, int8_logits = (np.asarray(x, np.float64) for x in (float_logits, int8_logits))
    log_p, log_q = (x - np.logaddexp.reduce(x, axis=-1, keepdims=True) for x in (float_logits, int8_logits))
    figures = {
        "int8_kl_vs_float": float(np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=-1))),
        "int8_max_logit_diff": float(np.max(np.abs(float_logits - int8_logits))),
    }
    if not figures["int8_kl_vs_float"] <= INT8_KL_TOLERANCE:  # also catches NaN
        raise UsageError(
            f"int8 check failed: {name}'s mean KL to the float model {figures['int8_kl_vs_float']:.2e}"
            f" > {INT8_KL_TOLERANCE}"
        )
    return figures
