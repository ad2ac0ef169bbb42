"""The names of the files keraslm writes: a run directory and an exported version, each defined once."""

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
RUN_FILES = (CONFIG, VOCAB, BEST_MODEL, CHECKPOINT, HISTORY, CURVES, RESULTS)
FINISHED_RUN_FILES = (CONFIG, VOCAB, BEST_MODEL)  # what sample.py and export.py need

# An exported version, written by export.py: a SavedModel, and beside it in EXTRA (which TF Serving
# ignores) keraslm's description of the export and the ONNX models.
EXTRA = "assets.extra"
DESCRIPTION = "keraslm.json"
ONNX = "model.onnx"
INT8_ONNX = "model.int8.onnx"
