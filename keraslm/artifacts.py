"""The names of the files keraslm writes: a run directory and an exported version, each defined once."""

import datetime
import os

# A run directory, written by train.py.
CONFIG = "config.json"
VOCAB = "vocab.json"
BEST_MODEL = "model.keras"  # the stateless twin with the best validation loss's weights
CHECKPOINT = "checkpoint.keras"  # the last epoch's stateful model, optimizer and bookkeeping
CHECKPOINT_STATE = "keraslm_state.json"  # the bookkeeping, inside the checkpoint archive
HISTORY = "history.csv"
CURVES = "curves.png"
RESULTS = "results.json"
TENSORBOARD = "tensorboard"
RUNS = "runs"  # where a run goes when no run directory is given
RUN_FILES = (CONFIG, VOCAB, BEST_MODEL, CHECKPOINT, HISTORY, CURVES, RESULTS)
FINISHED_RUN_FILES = (CONFIG, VOCAB, BEST_MODEL)  # what sample.py and export.py need

# An exported version, written by export.py: a SavedModel, and beside it in EXTRA (which TF Serving
# ignores) keraslm's description of the export, the ONNX models and the LiteRT models.
EXTRA = "assets.extra"
DESCRIPTION = "keraslm.json"
ONNX = "model.onnx"
INT8_ONNX = "model.int8.onnx"
LITERT = "model.tflite"
INT8_LITERT = "model.int8.tflite"


def default_run_dir(config):
    """runs/NAME-CELL-STAMP for a run given no directory: NAME is the dataset's or the corpus file's name."""
    source = config.data.source
    name = (
        source[len("tfds:") :]
        if source.startswith("tfds:")
        else os.path.splitext(os.path.basename(os.path.normpath(source)))[0]
    )
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join(RUNS, f"{name}-{config.model.cell}-{stamp}")
