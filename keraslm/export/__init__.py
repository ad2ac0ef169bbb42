"""Export a run as `saved_models/NAME/VERSION/`: a SavedModel TF Serving loads as it is, and ONNX.

    VERSION/saved_model.pb, variables/     signatures `serving_default` (one step) and `generate`
    VERSION/assets.extra/model.onnx        the step function for ONNX Runtime (fused RNN ops)
    VERSION/assets.extra/model.int8.onnx   the same with int8 weights (sample.py --int8)
    VERSION/assets.extra/model.tflite      the step function for LiteRT (sample.py --backend litert)
    VERSION/assets.extra/model.int8.tflite the same with int8 weights (dynamic-range quantisation)
    VERSION/assets.extra/keraslm.json      config, vocabulary, state tensor names and shapes

Everything is built from the stateless twin with `use_cudnn=False`, so a model trained on a GPU
exports and serves on a CPU, and serving assigns no variable. The version is written to a hidden
temporary directory beside the others (TF Serving only watches integer names), checked, and then
renamed into place (`publish`); a failed check leaves nothing behind.

`export_run` is that sequence of steps; each module does one: `signatures` (ServingFunctions, the
SavedModel, keraslm.json), `onnx` (model.onnx), `litert` (model.tflite, model.int8.tflite), `int8`
(model.int8.onnx and the int8 checks), `checks` (parity before publishing) and `publish`
(workspace, version numbers, the rename).

Called, the package is the public API's export: `keraslm.export(run_dir)` is `keraslm.api.export(run_dir)`.
"""

import contextlib
import json
import os
import time

import tensorflow as tf

from keraslm import artifacts
from keraslm.errors import ArgumentError, UsageError, first_line
from keraslm.export.checks import CheckSizes, check_beam_search, check_generate, check_litert, check_parity
from keraslm.export.int8 import check_int8, check_litert_int8, write_onnx_int8
from keraslm.export.litert import write_litert
from keraslm.export.onnx import write_onnx
from keraslm.export.publish import (
    check_version_number,
    folder_size,
    open_workspace,
    publish,
    refuse_existing_version,
)
from keraslm.export.signatures import ServingFunctions, artifact_description, write_saved_model
from keraslm.limits import ServingLimits
from keraslm.runs import load_run
from keraslm.session_loader import RequestError, ServingError, SessionModel


def export_run(run_dir, out="saved_models", name=None, version=None, overwrite=False, limits=None):
    """Export a run; return (version_dir, report) where report holds timings, sizes and parity.

    Args:
        limits: {limit name: value} overriding `ServingLimits.default` (None values keep it).

    Raises:
        UsageError: not a run; version exists without `overwrite`; conversion or parity failed;
            the export cannot be written (disk full, read-only, not a folder).
    """
    started = time.perf_counter()
    check_version_number(version)
    config, vocab, twin = load_run(run_dir, use_cudnn=False)
    limits = ServingLimits.default(len(vocab), **(limits or {}))
    base_dir = os.path.join(out, name or os.path.basename(os.path.normpath(run_dir)))
    refuse_existing_version(base_dir, version, overwrite)

    with contextlib.ExitStack() as workspace:
        tmp = open_workspace(base_dir, workspace)
        onnx_proto = _write_artifacts(tmp, base_dir, config, vocab, twin, limits)
        parity = _check_as_served(tmp, twin, config.model, vocab, CheckSizes.within(limits))
        int8 = check_int8(tmp, config.model)
        parity |= check_litert(tmp, config.model)
        litert_int8 = check_litert_int8(tmp, config.model)
        version_dir = publish(tmp, base_dir, version, overwrite)
    return version_dir, _report(version_dir, time.perf_counter() - started, parity, int8, litert_int8, onnx_proto)


def _write_artifacts(tmp, base_dir, config, vocab, twin, limits):
    """Write the SavedModel, the ONNX and LiteRT models and keraslm.json into `tmp`; return the
    ONNX model."""
    extra = os.path.join(tmp, artifacts.EXTRA)
    try:
        write_saved_model(ServingFunctions(config, vocab, twin, limits), tmp)
        os.makedirs(extra, exist_ok=True)
        onnx_proto = write_onnx(twin, config.model, os.path.join(extra, artifacts.ONNX))
        write_onnx_int8(os.path.join(extra, artifacts.ONNX), os.path.join(extra, artifacts.INT8_ONNX))
        write_litert(
            twin, config.model, os.path.join(extra, artifacts.LITERT), os.path.join(extra, artifacts.INT8_LITERT)
        )
        with open(os.path.join(extra, artifacts.DESCRIPTION), "w", encoding="utf-8") as f:
            json.dump(artifact_description(config, vocab, limits), f, ensure_ascii=False, indent=1)
    except (OSError, tf.errors.OpError) as e:  # TensorFlow's own file system reports OpErrors
        raise ArgumentError.about("out", f"cannot write the export in {base_dir} ({first_line(e)})", ": ") from None
    return onnx_proto


def _check_as_served(tmp, twin, model_config, vocab, sizes):
    """Parity, generate and beam_search checks on the version loaded as TF Serving loads it, with
    requests of `sizes` (within the export's limits): nothing it cannot run is published. Returns
    the parity figures with the greedy and beam score gaps."""
    served = SessionModel(tmp)
    try:
        parity = check_parity(served, twin, model_config, sizes.rows, sizes.step_length)
        parity["generate_greedy_gap"] = check_generate(served, twin, model_config, vocab, sizes)
        parity["beam_search_score_gap"] = check_beam_search(served, twin, model_config, vocab, sizes)
    except (RequestError, ServingError) as e:
        raise UsageError(f"export check failed: TF Serving's loader cannot run the new version ({e})") from None
    finally:
        served.close()
    return parity


def _report(version_dir, seconds, parity, int8, litert_int8, onnx_proto):
    extra = os.path.join(version_dir, artifacts.EXTRA)
    return {
        "seconds": seconds,
        "parity": parity,
        "int8": int8,
        "litert_int8": litert_int8,
        "onnx_ops": sorted({node.op_type for node in onnx_proto.graph.node}),
        "sizes": {
            "saved_model": folder_size(version_dir, exclude=artifacts.EXTRA),
            **{
                name: os.path.getsize(os.path.join(extra, name))
                for name in (artifacts.ONNX, artifacts.INT8_ONNX, artifacts.LITERT, artifacts.INT8_LITERT)
            },
        },
    }
