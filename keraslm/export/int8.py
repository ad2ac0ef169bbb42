"""model.int8.onnx: model.onnx with int8 weights, and the check of how far that moves the model."""

import os

import numpy as np

from keraslm import artifacts
from keraslm.errors import UsageError
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
    quantize_dynamic(float_path, path, weight_type=QuantType.QInt8, op_types_to_quantize=["LSTM", "MatMul"])


def check_int8(version_dir, model_config, batch_size=4, length=32, seed=0):
    """How far model.int8.onnx moves from model.onnx on random tokens: mean KL divergence of the
    next-token distributions (nats) and max |Δ| of the logits. Raises UsageError over
    INT8_KL_TOLERANCE."""
    import onnxruntime

    rng = np.random.default_rng(seed)
    feed = {"tokens": rng.integers(0, model_config.vocabulary_size, (batch_size, length)).astype(np.int32)}
    feed |= {
        input_name(n): np.zeros((batch_size, model_config.hidden_dim), np.float32) for n in state_names(model_config)
    }
    extra = os.path.join(version_dir, artifacts.EXTRA)
    logits = [
        onnxruntime.InferenceSession(os.path.join(extra, name), providers=["CPUExecutionProvider"])
        .run(["logits"], feed)[0]
        .astype(np.float64)
        for name in (artifacts.ONNX, artifacts.INT8_ONNX)
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
