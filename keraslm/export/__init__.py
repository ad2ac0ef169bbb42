"""Export a run as `saved_models/NAME/VERSION/`: a SavedModel TF Serving loads as it is, and ONNX.

    VERSION/saved_model.pb, variables/     signatures `serving_default` (one step) and `generate`
    VERSION/assets.extra/model.onnx        the step function for ONNX Runtime (fused RNN ops)
    VERSION/assets.extra/model.int8.onnx   the same with int8 weights (sample.py --int8)
    VERSION/assets.extra/keraslm.json      config, vocabulary, state tensor names and shapes

Everything is built from the stateless twin with `use_cudnn=False`, so a model trained on a GPU
exports and serves on a CPU, and serving assigns no variable. The version is written to a hidden
temporary directory beside the others (TF Serving only watches integer names), checked, and then
renamed into place (`publish`); a failed check leaves nothing behind.
"""

import contextlib
import json
import os
import time

import tensorflow as tf

from keraslm.errors import UsageError, first_line
from keraslm.export.checks import check_generate, check_parity
from keraslm.export.int8 import INT8_ONNX, check_int8, write_onnx_int8
from keraslm.export.onnx import write_onnx
from keraslm.export.publish import folder_size, open_workspace, publish
from keraslm.export.signatures import ServingFunctions, artifact_description, write_saved_model
from keraslm.limits import ServingLimits
from keraslm.runs import load_run
from keraslm.session_loader import RequestError, ServingError, SessionModel
from keraslm.versions import MAX_VERSION


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
        tmp = open_workspace(base_dir, workspace)
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
        version_dir = publish(tmp, base_dir, version, overwrite)
    report = {
        "seconds": time.perf_counter() - started,
        "parity": parity,
        "int8": int8,
        "onnx_ops": sorted({node.op_type for node in onnx_proto.graph.node}),
        "sizes": {
            "saved_model": folder_size(version_dir, exclude="assets.extra"),
            "model.onnx": os.path.getsize(os.path.join(version_dir, "assets.extra", "model.onnx")),
            INT8_ONNX: os.path.getsize(os.path.join(version_dir, "assets.extra", INT8_ONNX)),
        },
    }
    return version_dir, report
