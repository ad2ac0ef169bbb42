"""keraslm's Python API: train a run from a config, export it, open an export and generate, score a text.

    import keraslm

    config = keraslm.RunConfig.for_level("char")
    config.data.source = "input.txt"
    run_dir = keraslm.train(config, "runs/demo")
    version_dir = keraslm.export_run(run_dir, "saved_models", name="demo")
    print(keraslm.load("saved_models/demo").generate("ROMEO:", num_tokens=100, seed=1)[0])
    print(keraslm.score("saved_models/demo", split="test").loss)  # results.json's test loss

Each function does what its command does (train.py, export.py, sample.py, score.py) with the same defaults,
but raises instead of exiting: a bad argument is an ArgumentError (a ValueError) naming the
argument as Python spells it, other bad input a UsageError. `import keraslm` loads none of this:
keraslm/__init__.py imports this module on first use, and TensorFlow loads only inside `train` and
`export` (and `load` with a backend that needs it), so inference with ONNX Runtime stays light.
"""

import os
from pathlib import Path

from keraslm import artifacts
from keraslm.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from keraslm.errors import ArgumentError, UsageError
from keraslm.generator import Generator
from keraslm.runtime import open_backend
from keraslm.scoring import Score, score_model

__all__ = [
    "ArgumentError",
    "DataConfig",
    "Generator",
    "ModelConfig",
    "RunConfig",
    "Score",
    "TrainConfig",
    "UsageError",
    "export_run",
    "load",
    "score",
    "train",
]


def train(config=None, run_dir=None, *, resume=False, dry_run=False, verbose=1, token_cache=None):
    """Train a model (or resume a run) and evaluate it on the test split, as train.py does.

    Args:
        config: a RunConfig; None runs train.py's defaults (`RunConfig.for_level()`), or with
            `resume` the run's own config.json.
        run_dir: where the run is written; None makes runs/NAME-CELL-STAMP, as train.py does.
        resume: continue the run in `run_dir` from its last finished epoch.
        dry_run: two windows of each phase per epoch (a smoke test).
        verbose: 0 silent, 1 a progress bar, 2 a line per epoch.
        token_cache: the folder of tokenized corpora, as train.py's --token-cache (default:
            $KERASLM_TOKEN_CACHE, else keraslm-tokens in TFDS's data dir).

    Returns:
        The run directory (a Path) holding config.json, vocab.json, model.keras and results.json.

    Raises:
        ArgumentError, UsageError: a bad config, corpus or run directory.
        keraslm.training.Interrupted: Ctrl-C; the checkpoint of the last finished epoch is intact.
    """
    if resume and run_dir is None:
        raise ArgumentError("{resume} needs {run_dir}, the run to continue")
    if config is None:
        config = RunConfig.load(os.path.join(run_dir, artifacts.CONFIG)) if resume else RunConfig.for_level()
    run_dir = run_dir if run_dir is not None else artifacts.default_run_dir(config)
    from keraslm.training import train as train_run  # TensorFlow loads here

    train_run(config, str(run_dir), resume=resume, dry_run=dry_run, verbose=verbose, token_cache_dir=token_cache)
    return Path(run_dir)


def export_run(run_dir, out="saved_models", name=None, version=None, overwrite=False):
    """Export a finished run for TF Serving and ONNX Runtime, as export.py does.

    Args:
        run_dir: a run directory written by `train` or train.py.
        out: the base folder of exported models.
        name: the model's folder under `out` (default: the run directory's name).
        version: the version number (default: the next free integer).
        overwrite: replace an existing `version`.

    Returns:
        The version directory (a Path): out/NAME/VERSION, which `load` opens.

    Raises:
        ArgumentError, UsageError: not a finished run; an existing version without `overwrite`;
            a failed check; a folder that cannot be written.
    """
    from keraslm import export  # TensorFlow loads here

    version_dir, _ = export.export_run(str(run_dir), str(out), name, version, overwrite)
    return Path(version_dir)


def load(model, backend=None, **options):
    """Open a model for generation, as sample.py opens MODEL.

    Args:
        model: an export (out/NAME or out/NAME/VERSION; NAME opens the newest version) or a run directory.
        backend: "onnx" (default for an export; needs only NumPy and ONNX Runtime), "litert" (needs
            only NumPy and ai-edge-litert), "savedmodel", "keras" (default for a run directory) or "tf-serving".
        **options: the backend's options, as sample.py's flags: `int8` (onnx, litert), and for tf-serving
            `server` ("http://host:8501" or "grpc://host:8500"), `model_name`, `version`, `timeout`.

    Returns:
        A Generator; `generate(prompt, num_tokens, temperature, top_k, top_p, seed, num_samples)`
        returns a list of texts, the same texts sample.py prints for the same settings.
    """
    return Generator(open_backend(str(model), backend, **options))


def score(model, text=None, *, split=None, backend=None, batch_size=None, bptt=None, **options):
    """Score a model on a text file or a split of its own corpus, as score.py does.

    Args:
        model: an export (out/NAME or out/NAME/VERSION) or a run directory.
        text: the path of a text file to score; or
        split: "train", "valid" or "test" of the corpus the model was trained on.
        backend: as for `load` (onnx for an export, keras for a run directory).
        batch_size, bptt: the windows the text is cut into (default: the model's, which make the
            test split's score results.json's test loss).
        **options: as score.py's flags: `data` (the corpus's path if it moved, with `split`),
            `encoding`, `skip_unknown`, `per_token` (a JSON-lines file of every token's
            log-probability), and the backend's options as for `load`.

    Returns:
        A Score: `loss` (nats per token), `perplexity`, `bits_per_char` (char level), `tokens`.
    """
    return score_model(str(model), text=text, split=split, backend=backend, batch_size=batch_size, bptt=bptt, **options)
