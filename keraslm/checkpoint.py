"""The run's resumable checkpoint: the bookkeeping a run carries (`Run`), saved and loaded with
the model in one atomic checkpoint.keras.

The bookkeeping travels inside the checkpoint's zip, so weights, optimizer state, dropout RNG
state and epoch are replaced together by one rename and can never disagree.
"""

import functools
import json
import math
import os
import zipfile

from keraslm import artifacts
from keraslm.config import RunConfig
from keraslm.errors import ArgumentError, UsageError, first_line
from keraslm.files import atomic_path
from keraslm.model import build_step_model
from keraslm.runs import archive_problem


class Run:
    """A run directory and the bookkeeping that a checkpoint carries.

    Args:
        run_dir: the directory.
        config: its `RunConfig`.
        vocab: its `Vocabulary`.
    """

    def __init__(self, run_dir, config, vocab):
        self.run_dir = run_dir
        self.config = config
        self.vocab = vocab
        self.twin = build_step_model(config.model)  # stateless: saved as model.keras, samples
        self.epoch = 0
        self.history = []
        self.best_val_loss = math.inf
        self.best_epoch = 0
        self.wait = 0
        self.checkpoint_epoch = 0  # the epoch the checkpoint on disk holds

    def path(self, name):
        """Path of a file in the run directory."""
        return os.path.join(self.run_dir, name)

    @property
    def title(self):
        """A one-line description for plots."""
        m = self.config.model
        return f"{self.config.data.source} · {m.num_layers}×{m.hidden_dim} {m.cell.upper()} · {self.vocab.level}"

    def save_best_model(self):
        """Write the twin (current weights, no optimizer) as model.keras, atomically."""
        with atomic_path(self.path(artifacts.BEST_MODEL)) as tmp:
            self.twin.save(tmp)

    def state(self):
        """The bookkeeping as a JSON-ready dict."""
        return {
            "epoch": self.epoch,
            "history": self.history,
            "best_val_loss": self.best_val_loss,
            "best_epoch": self.best_epoch,
            "wait": self.wait,
            "config": self.config.to_dict(),
            "vocabulary_sha256": self.vocab.sha256(),
        }

    def restore(self, state):
        """Inverse of `state()`."""
        self.epoch = state["epoch"]
        self.history = state["history"]
        self.best_val_loss = state["best_val_loss"]
        self.best_epoch = state["best_epoch"]
        self.wait = state["wait"]


def seed_states(model):
    """The dropout layers' random-number states, which model.save leaves out.

    Restoring them makes a resumed run draw the same dropout masks as one never stopped.
    """
    return [v for v in model.variables if v.path.endswith("seed_generator_state")]


def save_checkpoint(run, model):
    """Weights, optimizer state (learning rate included), RNG state and bookkeeping, in one atomic file."""
    state = {**run.state(), "seed_states": [v.numpy().tolist() for v in seed_states(model)]}
    with atomic_path(run.path(artifacts.CHECKPOINT)) as tmp:
        model.save(tmp)
        with zipfile.ZipFile(tmp, "a") as archive:
            archive.writestr(artifacts.CHECKPOINT_STATE, json.dumps(state))
    run.checkpoint_epoch = run.epoch


def _damaged(path, reason):
    return ArgumentError("{resume}: {path} is damaged ({reason}); start a new run", path=path, reason=reason)


def read_checkpoint_state(path):
    """The bookkeeping inside the checkpoint at `path`, its archive and its keys and types checked,
    its config as a `RunConfig`.

    Raises:
        UsageError: the checkpoint is damaged, named with what is wrong.
    """
    damaged = functools.partial(_damaged, path)

    problem = archive_problem(path)
    if problem:
        raise damaged(problem)
    try:
        with zipfile.ZipFile(path) as archive:
            state = json.loads(archive.read(artifacts.CHECKPOINT_STATE))
    except KeyError:
        raise damaged(f"no {artifacts.CHECKPOINT_STATE}") from None
    except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, too deep
        raise damaged(f"{artifacts.CHECKPOINT_STATE}: {first_line(e)}") from None
    # What save_checkpoint writes, by JSON type; counts are never negative, and true is no number.
    kinds = {"epoch": int, "best_epoch": int, "wait": int, "best_val_loss": (int, float), "history": list}
    kinds |= {"config": dict, "vocabulary_sha256": str, "seed_states": list}
    if not isinstance(state, dict):
        raise damaged(f"{artifacts.CHECKPOINT_STATE} is not a JSON object")
    for key, kind in kinds.items():
        value = state.get(key)
        if isinstance(value, bool) or not isinstance(value, kind) or (kind is int and value < 0):
            raise damaged(f"{artifacts.CHECKPOINT_STATE}: {key} is missing or not of the right type")
    if not all(isinstance(row, dict) for row in state["history"]):
        raise damaged(f"{artifacts.CHECKPOINT_STATE}: history holds something other than per-epoch objects")
    try:
        state["config"] = RunConfig.from_dict(state["config"])
    except UsageError as e:
        raise damaged(f"{artifacts.CHECKPOINT_STATE}: config: {e}") from None
    return state


def load_checkpoint(run, model):
    """Restore `model` (compiled) and `run` from the run directory's checkpoint.

    The archive's CRCs and the bookkeeping's keys and types are checked before any of it is
    used, so a damaged checkpoint is one UsageError naming it, never a Keras or h5py traceback.
    """
    path = run.path(artifacts.CHECKPOINT)
    if not os.path.exists(path):
        raise ArgumentError("{resume}: no checkpoint in {path}; start a new run without {resume}", path=run.run_dir)
    state = read_checkpoint_state(path)
    saved = state["config"]
    saved.train.epochs = run.config.train.epochs  # only the epoch count may change on resume
    if saved != run.config:
        raise ArgumentError("{resume}: {path} was written with another configuration; start a new run", path=path)
    if state["vocabulary_sha256"] != run.vocab.sha256():
        raise ArgumentError(
            "{resume}: {path} was written with another vocabulary than vocab.json; start a new run", path=path
        )
    variables = seed_states(model)
    if len(state["seed_states"]) != len(variables):
        raise _damaged(path, f"{artifacts.CHECKPOINT_STATE}: seed_states does not match the model's dropout layers")
    try:
        model.load_weights(path)
        for variable, value in zip(variables, state["seed_states"], strict=True):
            variable.assign(value)
    except Exception as e:  # intact zip, wrong content: Keras and h5py raise ValueError, KeyError, OSError …
        raise _damaged(path, first_line(e)) from None
    run.restore(state)
    run.checkpoint_epoch = run.epoch
