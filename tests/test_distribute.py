"""tf.distribute: a mirrored run on 2 logical CPU devices and a 2-process multi-worker run on
127.0.0.1 equal a single-device run; checkpoints move between strategies. Each run is a fresh
process, since devices are fixed at TensorFlow start."""

import csv
import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
from conftest import ROOT, error_lines, run_script, shakespeare

DRIVER = textwrap.dedent(
    """
    import sys
    import tensorflow as tf

    if sys.argv[2] == "mirrored":  # two replicas on one machine: two logical CPU devices
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from keraslm.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from keraslm.training import train

    run_dir, strategy, epochs, resume, cell = sys.argv[1:6]
    epochs, resume = int(epochs), resume == "resume"
    if strategy == "one-device":  # what --strategy default is on a GPU machine, here on the CPU
        from keraslm.distribute import make_strategy

        strategy = make_strategy("default", device="/cpu:0")
    # float32: the comparisons below are exact to 1e-4, finer than bfloat16's rounding (which the
    # default would pick on a CPU with AMX).
    # lr 3e-3: at 1e-2 float rounding (a different but equally exact loss kernel, a different
    # reduction order) grew to ~1e-4 within two epochs; here it stays below 1e-6, while a wrong
    # column split, state or clipping norm shows at 1e-2.
    config = RunConfig(
        model=ModelConfig(cell=cell, num_layers=2, embedding_dim=16, hidden_dim=32, dropout=0.0),
        data=DataConfig(source={corpus!r}),
        train=TrainConfig(batch_size=8, bptt=20, epochs=epochs, lr=3e-3, clipnorm=0.25, sample_tokens=0, seed=3,
                           mixed_precision=False),
    )
    if resume:
        config = RunConfig.load(run_dir + "/config.json")
        config.train.epochs = epochs
    train(config, run_dir, resume=resume, verbose=0, strategy=strategy)
    """
)


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    base = tmp_path_factory.mktemp("distribute")
    corpus = base / "corpus.txt"
    corpus.write_text(shakespeare()[:40_000])
    path = base / "driver.py"
    path.write_text(DRIVER.format(corpus=str(corpus)))
    return path


def driver_env():
    """The environment a driver runs in: keraslm importable from the repository, as from its root."""
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def train(driver, run_dir, strategy, epochs, cell="lstm", resume=False):
    result = run_script(driver, run_dir, strategy, epochs, "resume" if resume else "new", cell, env=driver_env())
    assert result.returncode == 0, result.stderr[-3000:]
    with open(run_dir / "history.csv") as f:
        return [(float(r["loss"]), float(r["val_loss"])) for r in csv.DictReader(f)]


def assert_close(a, b, tolerance=1e-4):
    assert len(a) == len(b)
    for (x, y), (u, v) in zip(a, b, strict=True):
        assert abs(x - u) <= tolerance and abs(y - v) <= tolerance, (a, b)


@pytest.fixture(scope="module")
def single_lstm(driver, tmp_path_factory):
    """Two epochs of the LSTM on one device, what the mirrored and multi-worker runs must equal:
    (history, run directory)."""
    run_dir = tmp_path_factory.mktemp("single") / "run"
    return train(driver, run_dir, "default", 2), run_dir


def test_mirrored_equals_single_device(tmp_path, driver, single_lstm):
    assert_close(single_lstm[0], train(driver, tmp_path / "mirrored", "mirrored", 2))


@pytest.mark.slow  # 45 s on 2 cores; the LSTM's comparison stays in the default run
def test_mirrored_gru_equals_single_device(tmp_path, driver):
    single = train(driver, tmp_path / "single", "default", 2, "gru")
    assert_close(single, train(driver, tmp_path / "mirrored", "mirrored", 2, "gru"))


@pytest.mark.slow  # 22 s on 2 cores; the mirrored and multi-worker comparisons stay in the default run
def test_one_device_strategy_equals_the_default(tmp_path, driver):
    # On a GPU, --strategy default trains under OneDeviceStrategy so that windows prefetch to it.
    assert_close(train(driver, tmp_path / "plain", "default", 1), train(driver, tmp_path / "one", "one-device", 1))


@pytest.mark.slow  # 89 s on 2 cores; resume across a restart is tested in the default run
def test_checkpoints_move_between_strategies(tmp_path, driver):
    whole = train(driver, tmp_path / "whole", "default", 2)
    train(driver, tmp_path / "a", "mirrored", 1)
    assert_close(whole, train(driver, tmp_path / "a", "default", 2, resume=True))
    train(driver, tmp_path / "b", "default", 1)
    assert_close(whole, train(driver, tmp_path / "b", "mirrored", 2, resume=True))


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def train_multi_worker(driver, run_dir, epochs, workers=2):
    """train.py's code path under --strategy multi-worker: one process per worker, TF_CONFIG each."""
    addresses = [f"127.0.0.1:{port}" for port in free_ports(workers)]
    processes = []
    for index in range(workers):
        tf_config = {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}}
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "TF_CONFIG": json.dumps(tf_config), **driver_env()}
        command = [sys.executable, str(driver), str(run_dir), "multi-worker", str(epochs), "new", "lstm"]
        processes.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for process in processes:
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr[-3000:]
    with open(run_dir / "history.csv") as f:
        return [(float(r["loss"]), float(r["val_loss"])) for r in csv.DictReader(f)]


def test_multi_worker_equals_single_device(tmp_path, driver, single_lstm):
    single, single_dir = single_lstm
    assert_close(single, train_multi_worker(driver, tmp_path / "multi", 2))
    assert sorted(p.name for p in (tmp_path / "multi").iterdir()) == sorted(p.name for p in single_dir.iterdir())


@pytest.mark.slow  # 50 s on 2 cores; moving checkpoints between strategies is also in the slow run above
def test_a_multi_worker_checkpoint_resumes_on_one_device(tmp_path, driver, single_lstm):
    train_multi_worker(driver, tmp_path / "moved", 1)
    assert_close(single_lstm[0], train(driver, tmp_path / "moved", "default", 2, resume=True))


@pytest.mark.parametrize(
    "tf_config, message",
    [
        (None, "needs TF_CONFIG"),
        ("{not json", "TF_CONFIG is not a worker cluster description"),
        ('{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 3}}', "TF_CONFIG is not"),
    ],
)
def test_multi_worker_needs_a_valid_tf_config(tmp_path, monkeypatch, tf_config, message):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    env = {} if tf_config is None else {"TF_CONFIG": tf_config}
    result = run_script("train.py", "--strategy", "multi-worker", "--run-dir", tmp_path / "run", env=env)
    lines = error_lines(result.stderr)
    assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "run").exists()


def test_clipping_measures_the_dense_gradient_as_torch_does():
    import numpy as np
    import tensorflow as tf

    from keraslm.distribute import SGD

    # Token 1 occurs twice: torch's dense embedding gradient row is [3, 0] + [1, 0] = [4, 0],
    # norm 4; counted by occurrence (Keras' global_clipnorm) it would be sqrt(10).
    embedding = tf.IndexedSlices(tf.constant([[3.0, 0.0], [1.0, 0.0]]), tf.constant([1, 1]), tf.constant([5, 2]))
    dense = tf.constant([0.0, 0.0])
    clipped = SGD(1.0, global_clipnorm=2.0)._clip_gradients([embedding, dense])
    np.testing.assert_allclose(tf.convert_to_tensor(clipped[0]).numpy()[1], [2.0, 0.0], atol=1e-6)  # scaled by 2/4
