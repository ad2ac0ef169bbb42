"""Reading a finished run directory: config.json, vocab.json and model.keras, checked together."""

import os
import zipfile
import zlib

from keraslm import artifacts
from keraslm.config import RunConfig
from keraslm.errors import UsageError, first_line
from keraslm.vocab import Vocabulary


def load_run(run_dir, use_cudnn="auto"):
    """Load a run's config, vocabulary and best model as the stateless twin.

    Args:
        run_dir: a directory written by train.py.
        use_cudnn: for the rebuilt LSTM / GRU layers; export passes False so that the traced
            graph holds no CudnnRNN op, whatever machine trained the model.

    Returns:
        (RunConfig, Vocabulary, keras.Model): the twin built from config.json with the weights of
        model.keras, loaded in Keras' safe mode (no code runs from the file).
    """
    config, vocab = _config_and_vocabulary(run_dir)
    saved = _best_model(run_dir)
    return config, vocab, _stateless_twin(run_dir, config, saved, use_cudnn)


def _config_and_vocabulary(run_dir):
    """config.json and vocab.json of a finished run, checked to agree on the vocabulary size."""
    if not os.path.isdir(run_dir):
        raise UsageError(f"{run_dir} is not a directory; give a run directory written by train.py")
    missing = [f for f in artifacts.FINISHED_RUN_FILES if not os.path.exists(os.path.join(run_dir, f))]
    if missing:
        raise UsageError(f"{run_dir} is not a finished keraslm run (no {', '.join(missing)}); give a run directory")
    config = RunConfig.load(os.path.join(run_dir, artifacts.CONFIG))
    vocab = Vocabulary.load(os.path.join(run_dir, artifacts.VOCAB))
    if len(vocab) != config.model.vocabulary_size:
        raise UsageError(
            f"{run_dir}: vocab.json has {len(vocab)} tokens but the model has {config.model.vocabulary_size} outputs"
        )
    return config, vocab


def _best_model(run_dir):
    """model.keras as Keras loads it in safe mode, after its archive passes its CRC checks."""
    problem = archive_problem(os.path.join(run_dir, artifacts.BEST_MODEL))
    if problem:
        raise UsageError(
            f"{run_dir}/model.keras cannot be loaded: it is damaged ({problem}); train again or use another run"
        )

    import keras

    try:
        return keras.models.load_model(os.path.join(run_dir, artifacts.BEST_MODEL), safe_mode=True)
    except Exception as e:  # Keras raises ValueError, OSError, zipfile errors … on a damaged file
        raise UsageError(f"{run_dir}/model.keras cannot be loaded ({first_line(e)}); it is damaged") from None


def _stateless_twin(run_dir, config, saved, use_cudnn):
    """The twin config.json describes, holding the weights of the saved model."""
    from keraslm.model import build_step_model

    # Compared before the twin is built: a config.json damaged into a huge model fails here, fast.
    stored, described = saved.count_params(), config.model.num_parameters()
    if stored != described:
        raise UsageError(
            f"{run_dir}/model.keras does not match config.json ({stored:,} parameters, config.json describes "
            f"{described:,}); the run directory is damaged"
        )
    twin = build_step_model(config.model, use_cudnn=use_cudnn)
    try:
        twin.set_weights(saved.get_weights())
    except ValueError as e:
        raise UsageError(f"{run_dir}/model.keras does not match config.json ({first_line(e)})") from None
    return twin


def archive_problem(path):
    """Why the zip archive at `path` (a .keras file) is damaged, or None when every member passes
    its CRC check.

    Keras opens the archive without checking it: a truncated file is reported as "File not found",
    and a flipped bit surfaces as a zipfile or h5py exception from deep inside the loading.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            member = archive.testzip()
    except zipfile.BadZipFile:  # no central directory: cut short, or not a zip at all
        return "truncated or not a Keras archive"
    except (EOFError, OSError, zlib.error) as e:  # offsets or sizes pointing outside the file
        return first_line(e)
    return None if member is None else f"{member} fails its CRC check"
