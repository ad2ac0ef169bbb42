"""keraslm.keras_compat: the private Keras APIs are as checked (or the test names the one that
changed), the check notices a change, and --kernels keras trains as keraslm's kernels do, resumes
and exports, without them."""

import csv
import json

import keras
import pytest
from conftest import make_run

from keraslm import keras_compat
from keraslm.config import CELLS, ModelConfig, RunConfig
from keraslm.errors import UsageError
from keraslm.export import export_run
from keraslm.keras_compat import check, choose_kernels


def test_private_keras_apis_are_as_checked():
    problem = check()
    assert problem is None, (
        f"{problem}. Until keraslm/keras_compat.py is updated for this Keras, training falls back "
        "to --kernels keras (plain Keras layers, slower, one device)."
    )


def test_check_names_a_method_keras_removed(monkeypatch):
    monkeypatch.delattr(keras.layers.RNN, "_create_state_variables")
    problem = check()
    assert "keras.layers.RNN._create_state_variables is gone" in problem
    assert f"Keras {keras.__version__}" in problem and "\n" not in problem


def test_check_names_a_method_whose_signature_changed(monkeypatch):
    monkeypatch.setattr(keras.optimizers.Optimizer, "_clip_gradients", lambda self, grads, variables: grads)
    assert "Optimizer._clip_gradients takes (self, grads, variables) instead of (self, grads)" in check()


def test_check_names_a_method_keras_no_longer_calls(monkeypatch):
    # Keras' build no longer calling _create_state_variables would skip the override silently.
    monkeypatch.setattr(keras.layers.RNN, "build", lambda self, input_shape: None)
    assert "RNN._create_state_variables is no longer called by keras.layers.RNN.build" in check()


def test_a_changed_api_switches_to_stock_kernels_with_one_line(monkeypatch, capsys):
    monkeypatch.setattr(keras_compat, "check", lambda: "Keras 9 changed a private API keraslm relies on: X")
    assert choose_kernels("keraslm", replicas=1) == "keras"
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "X" in out and "--kernels keras" in out
    with pytest.raises(UsageError, match="X; 2 replicas need it"):  # refused, never trained wrong
        choose_kernels("keraslm", replicas=2)
    # A checkpoint names its weights by layer class: a keraslm run resumes only on keraslm kernels.
    with pytest.raises(UsageError, match="X; this run's checkpoint needs it: resume with Keras 3.15"):
        choose_kernels("keraslm", replicas=1, resume=True)


def test_training_falls_back_to_stock_kernels_and_records_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(keras_compat, "check", lambda: "Keras 9 changed a private API keraslm relies on: X")
    run_dir = make_run(tmp_path)
    assert "note: Keras 9 changed a private API keraslm relies on: X; training with --kernels keras" in (
        capsys.readouterr().out
    )
    assert json.loads((run_dir / "config.json").read_text())["train"]["kernels"] == "keras"


def test_stock_kernels_refuse_several_replicas():
    assert choose_kernels("keras", replicas=1) == "keras"
    assert choose_kernels("keraslm", replicas=2) == "keraslm"
    with pytest.raises(UsageError, match="kernels keras .* 2 replicas would overwrite") as refused:
        choose_kernels("keras", replicas=2)
    assert refused.value.worded(lambda name: "--" + name).startswith("--kernels keras")


def test_config_without_kernels_loads_as_keraslm():
    saved = RunConfig().to_dict()
    del saved["train"]["kernels"]  # a config.json written before the field existed
    assert RunConfig.from_dict(saved).train.kernels == "keraslm"
    with pytest.raises(UsageError, match="unknown kernels 'fast'; choose one of keraslm, keras"):
        RunConfig.from_dict({**saved, "train": {**saved["train"], "kernels": "fast"}}).validate()


def _losses(run_dir):
    with open(run_dir / "history.csv", newline="") as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


def _resume(run_dir, epochs, kernels):
    from keraslm.training import train

    config = RunConfig.load(run_dir / "config.json")
    config.train.epochs, config.train.kernels = epochs, kernels
    train(config, str(run_dir), resume=True, dry_run=True, verbose=0)


def test_stock_kernels_train_as_keraslm_does_then_resume_and_export(tmp_path):
    losses = {}
    for kernels in ("keras", "keraslm"):
        # No clipping: Keras' own global_clipnorm measures the embedding's gradient otherwise.
        run_dir = make_run(tmp_path / kernels, kernels=kernels, lr=1e-2, clipnorm=0)
        _resume(run_dir, 4, kernels)
        losses[kernels] = _losses(run_dir)
    assert losses["keras"] == pytest.approx(losses["keraslm"], rel=1e-4)
    assert losses["keras"] == sorted(losses["keras"], reverse=True) and losses["keras"][-1] < losses["keras"][0] - 0.1

    run_dir = tmp_path / "keras" / "run"
    assert json.loads((run_dir / "config.json").read_text())["train"]["kernels"] == "keras"
    # The checkpoint holds Keras' own layer; model.keras is the same stateless twin as ever.
    checkpoint = keras.saving.load_model(run_dir / "checkpoint.keras", compile=False)
    assert type(checkpoint.get_layer("rnn_0")) is keras.layers.LSTM

    _, report = export_run(str(run_dir), out=str(tmp_path / "models"), name="lm")
    assert max(report["parity"].values()) <= 1e-4


@pytest.mark.parametrize("cell", CELLS)
def test_window_kernels_cover_every_cell_keraslm_builds(cell):
    """Each cell the model builds takes the fast window kernels (a miss would only be slower: the
    gradient tests could not see it); a layout keraslm.cells does not describe keeps Keras' path."""
    from keraslm.keras_compat import StatefulGRU, StatefulLSTM
    from keraslm.model import build_training_model

    config = ModelConfig(vocabulary_size=7, cell=cell, num_layers=1, embedding_dim=4, hidden_dim=3)
    assert build_training_model(config, batch_size=2).get_layer("rnn_0")._cell_is_covered()
    assert not StatefulGRU(3, stateful=True, reset_after=False)._cell_is_covered()
    assert not StatefulLSTM(3, stateful=True, recurrent_activation="hard_sigmoid")._cell_is_covered()
