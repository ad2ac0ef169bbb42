"""Bad input, numerical faults, interruptions, concurrent exports and safe loading (issue: reliability)."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
import zipfile

import keras
import pytest
from conftest import (
    OFFLINE,
    ROOT,
    assert_one_line_error,
    assert_one_line_refusal,
    make_run,
    run_command,
    run_script,
    shakespeare,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from keraslm.vocab import Vocabulary

SMALL = ["--hidden-dim", "32", "--embedding-dim", "16", "--sample-tokens", "0", "--batch-size", "8", "--bptt", "25"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(shakespeare()[:60_000])
    return path


def history(run_dir):
    with open(run_dir / "history.csv") as f:
        return [(float(r["loss"]), float(r["val_loss"])) for r in csv.DictReader(f)]


# 1. Bad input: one line naming the problem and the fix, exit code 2, nothing written.


def test_bad_corpora(tmp_path, monkeypatch, capsys):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "binary.bin").write_bytes(bytes(range(256)) * 40)
    (tmp_path / "latin1.txt").write_bytes("naïve café\n".encode("latin-1") * 500)
    cases = [
        (["--data", tmp_path / "empty.txt"], ["empty"]),
        (["--data", tmp_path / "binary.bin"], ["binary"]),
        (["--data", tmp_path / "latin1.txt"], ["not valid utf-8", "line 1", "--encoding"]),
        (["--dataset", "tfds:no_such_dataset_xyz", "--tfds-data-dir", tmp_path / "tfds"], ["no dataset"]),
        (["--dataset", "tfds:mnist", "--tfds-data-dir", tmp_path / "tfds"], ["no text feature"]),
        # Offline, tiny_shakespeare comes from the bundled copy (tests/test_train_script.py) unless
        # a manual dir is given; any other dataset TFDS cannot download is refused. imdb_reviews is
        # known to TFDS without network.
        (
            ["--tfds-manual-dir", tmp_path / "nothing", "--tfds-data-dir", tmp_path / "tfds"],
            ["could not download or prepare 'tiny_shakespeare'", str(tmp_path / "nothing")],
        ),
        (
            ["--dataset", "tfds:imdb_reviews", "--tfds-data-dir", tmp_path / "tfds"],
            ["could not download or prepare 'imdb_reviews'", "--tfds-manual-dir"],
        ),
        (["--level", "byte"], ["invalid choice"]),
        (["--lr", "-1"], ["--lr"]),
        (["--batch-size", "0"], ["--batch-size"]),
        (["--hidden-dim", "-3"], ["--hidden-dim"]),
    ]
    # The first case as the user runs it, the rest in this process: each new interpreter would
    # import TensorFlow again for the same one-line answer.
    (first_args, first_fragments), *others = cases
    result = run_script("train.py", *first_args, "--run-dir", tmp_path / "run", env=OFFLINE)
    assert_one_line_error(result, *first_fragments)
    assert not (tmp_path / "run").exists()
    for name, value in OFFLINE.items():
        monkeypatch.setenv(name, value)
    for args, fragments in others:
        assert_one_line_refusal(run_command("train.py", [*args, "--run-dir", tmp_path / "run"], capsys), *fragments)
        assert not (tmp_path / "run").exists()


def test_resume_refuses_a_missing_or_foreign_checkpoint(tmp_path, corpus, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert_one_line_error(run_script("train.py", "--resume", "--run-dir", run_dir), "config.json")
    # The rest in this process (run_command), as train.py runs it, without a TensorFlow import each.
    assert (
        run_command("train.py", ["--data", corpus, "--epochs", "1", "--run-dir", tmp_path / "a", *SMALL], capsys)[0]
        == 0
    )
    (tmp_path / "a" / "checkpoint.keras").unlink()
    assert_one_line_refusal(run_command("train.py", ["--resume", "--run-dir", tmp_path / "a"], capsys), "no checkpoint")
    # A vocabulary swapped under the checkpoint (same size, other tokens) is refused too.
    assert (
        run_command("train.py", ["--data", corpus, "--epochs", "1", "--run-dir", tmp_path / "b", *SMALL], capsys)[0]
        == 0
    )
    resume_b = ["--resume", "--run-dir", tmp_path / "b"]
    config_path = tmp_path / "b" / "config.json"
    original = config_path.read_text()
    edited = json.loads(original)
    edited["train"]["lr"] = 0.5  # config.json no longer matches the checkpoint written with it
    config_path.write_text(json.dumps(edited))
    assert_one_line_refusal(run_command("train.py", resume_b, capsys), "another configuration")
    config_path.write_text(original)
    vocab = json.loads((tmp_path / "b" / "vocab.json").read_text())
    vocab["tokens"][-1] = "\u2603"
    (tmp_path / "b" / "vocab.json").write_text(json.dumps(vocab))
    assert_one_line_refusal(run_command("train.py", resume_b, capsys), "vocabulary")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from keraslm.export import export_run

    base = tmp_path_factory.mktemp("artifacts")
    run_dir = make_run(base)
    version_dir, _ = export_run(str(run_dir), out=str(base / "models"), name="lm")
    return run_dir, version_dir


def test_not_a_run_and_not_an_export(tmp_path, exported):
    run_dir, version_dir = exported
    assert_one_line_error(run_script("export.py", version_dir, "--out", tmp_path), "not a finished keraslm run")
    assert_one_line_error(run_script("export.py", tmp_path / "nope", "--out", tmp_path), "not a directory")
    assert_one_line_error(run_script("sample.py", tmp_path), "neither a keraslm export")


def copy_tree(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_damaged_artifacts(tmp_path, exported):
    run_dir, version_dir = exported
    onnx_case = copy_tree(version_dir, tmp_path / "onnx" / "1")
    path = onnx_case / "assets.extra" / "model.onnx"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert_one_line_error(run_script("sample.py", onnx_case), "model.onnx cannot be loaded")

    pb_case = copy_tree(version_dir, tmp_path / "pb" / "1")
    (pb_case / "saved_model.pb").write_bytes(b"\x08garbage" * 10)
    assert_one_line_error(run_script("sample.py", pb_case, "--backend", "savedmodel"), "cannot load the SavedModel")

    keras_case = copy_tree(run_dir, tmp_path / "run")
    model = keras_case / "model.keras"
    model.write_bytes(model.read_bytes()[:1000])
    assert_one_line_error(run_script("sample.py", keras_case), "model.keras cannot be loaded")
    assert_one_line_error(run_script("export.py", keras_case, "--out", tmp_path / "m"), "model.keras cannot be loaded")
    assert not (tmp_path / "m" / "run" / "1").exists()

    vocab_case = copy_tree(version_dir, tmp_path / "vocab" / "1")
    meta_path = vocab_case / "assets.extra" / "keraslm.json"
    meta = json.loads(meta_path.read_text())
    meta["vocabulary"]["tokens"] = meta["vocabulary"]["tokens"][:-1]
    meta_path.write_text(json.dumps(meta))
    assert_one_line_error(run_script("sample.py", vocab_case), "vocabulary")
    meta["config"]["model"]["vocabulary_size"] -= 1  # consistent json, but not the model's size
    meta_path.write_text(json.dumps(meta))
    assert_one_line_error(run_script("sample.py", vocab_case), "outputs")
    meta = json.loads(open(os.path.join(version_dir, "assets.extra", "keraslm.json")).read())
    meta.pop("onnx_int8")  # an export from before model.int8.onnx
    meta_path.write_text(json.dumps(meta))
    assert_one_line_error(run_script("sample.py", vocab_case, "--int8"), "no int8 model")
    meta_path.write_text("{not json")
    assert_one_line_error(run_script("sample.py", vocab_case), "damaged")

    config_case = copy_tree(run_dir, tmp_path / "config")
    config = json.loads((config_case / "config.json").read_text())
    config["model"]["dropout"] = 7
    (config_case / "config.json").write_text(json.dumps(config))
    # A damaged file names the field as config.json spells it, not a flag the user never gave.
    assert_one_line_error(
        run_script("export.py", config_case, "--out", tmp_path / "m"), "config.json: dropout must be in"
    )


def test_model_files_load_in_safe_mode(tmp_path, exported):
    # A model.keras holding a Lambda layer (arbitrary code) is refused, not run.
    run_dir, _ = exported
    unsafe = copy_tree(run_dir, tmp_path / "unsafe")
    inputs = keras.Input((None,), dtype="int32")
    outputs = keras.layers.Lambda(lambda x: x * 2)(inputs)
    keras.Model(inputs, outputs).save(unsafe / "model.keras")
    assert_one_line_error(run_script("export.py", unsafe, "--out", tmp_path / "m"), "model.keras cannot be loaded")


# 2. Numerical faults.


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, corpus):
    run_dir = tmp_path / "run"
    result = run_script(
        "train.py",
        "--data",
        corpus,
        "--cell",
        "rnn_relu",
        "--optimizer",
        "sgd",
        "--lr",
        "1e6",
        "--clipnorm",
        "0",
        "--epochs",
        "3",
        "--run-dir",
        run_dir,
        *SMALL,
    )
    assert_one_line_error(result, "diverged", "--lr")
    with zipfile.ZipFile(run_dir / "checkpoint.keras") as archive:
        assert json.loads(archive.read("keraslm_state.json"))["epoch"] == 0  # the good one, untouched
    assert not (run_dir / "model.keras").exists() and not (run_dir / "history.csv").exists()


# 3. Interruptions.


def start_training(args):
    return subprocess.Popen(
        [sys.executable, "train.py", *map(str, args)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )


def wait_for_rows(run_dir, rows, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if (run_dir / "history.csv").exists() and len(history(run_dir)) >= rows:
            return
        time.sleep(0.05)
    raise AssertionError(f"no {rows} epochs within {timeout} s")


def test_sigterm_saves_and_exits_cleanly(tmp_path, corpus):
    run_dir = tmp_path / "run"
    proc = start_training(["--data", corpus, "--epochs", "50", "--run-dir", run_dir, *SMALL])
    wait_for_rows(run_dir, 1, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "--resume" in err


def test_kill_9_mid_epoch_then_resume_reproduces_the_uninterrupted_run(tmp_path, corpus):
    args = ["--data", corpus, "--epochs", "3", "--seed", "11", "--dropout", "0.2", *SMALL]
    assert run_script("train.py", *args, "--run-dir", tmp_path / "whole").returncode == 0

    run_dir = tmp_path / "killed"
    proc = start_training([*args, "--run-dir", run_dir])
    wait_for_rows(run_dir, 1, proc)
    time.sleep(0.3)  # into epoch 2
    proc.kill()
    proc.communicate()
    resumed = run_script("train.py", "--resume", "--run-dir", run_dir)
    assert resumed.returncode == 0, resumed.stderr
    whole, pieced = history(tmp_path / "whole"), history(run_dir)
    assert len(whole) == len(pieced) == 3
    for (a, b), (c, d) in zip(whole, pieced, strict=True):
        assert abs(a - c) <= 1e-5 and abs(b - d) <= 1e-5, (whole, pieced)


def test_kill_9_at_any_moment_leaves_loadable_files(tmp_path, corpus):
    run_dir = tmp_path / "run"
    for delay in (4.0, 5.5, 7.0, 8.5, 10.0):  # import, first epoch, saves: different moments
        proc = start_training(
            [
                "--data",
                corpus,
                "--epochs",
                "50",
                "--run-dir",
                run_dir,
                *SMALL,
                *(["--resume"] if (run_dir / "config.json").exists() else []),
            ]
        )
        time.sleep(delay)
        proc.kill()
        proc.communicate()
        if (run_dir / "checkpoint.keras").exists():
            with zipfile.ZipFile(run_dir / "checkpoint.keras") as archive:
                assert archive.testzip() is None
                json.loads(archive.read("keraslm_state.json"))
        if (run_dir / "model.keras").exists():
            keras.models.load_model(run_dir / "model.keras")
    resumed = run_script("train.py", "--resume", "--run-dir", run_dir, "--epochs", "1")
    assert resumed.returncode == 0, resumed.stderr
    assert not [p for p in os.listdir(run_dir) if ".tmp" in p]


# 4. Concurrent exports.


def test_concurrent_exports_get_distinct_complete_versions(tmp_path, exported):
    run_dir, _ = exported
    procs = [
        subprocess.Popen(
            [sys.executable, "export.py", str(run_dir), "--out", str(tmp_path), "--name", "lm"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(3)
    ]
    for proc in procs:
        proc.communicate(timeout=300)
        assert proc.returncode == 0
    assert sorted(os.listdir(tmp_path / "lm")) == ["1", "2", "3"]  # no hidden temporaries left either
    for version in ("1", "2", "3"):
        assert {"saved_model.pb", "variables", "assets.extra"} <= set(os.listdir(tmp_path / "lm" / version))


# 6. Property-based round trips.


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(exclude_categories=("Cs",)), min_size=1))
def test_char_vocabulary_round_trip(text):
    vocab = Vocabulary.build(text, "char")
    assert vocab.decode(vocab.encode(text)) == text
    assert Vocabulary.from_dict(json.loads(json.dumps(vocab.to_dict()))).tokens == vocab.tokens


# The reserved tokens are left out: a literal "<eos>" is the line-end token, as in pytorch/examples
# (test_literal_reserved_words_are_the_reserved_tokens).
words = st.text(
    alphabet=st.characters(exclude_categories=("Cs", "Zs", "Cc", "Zl", "Zp")), min_size=1, max_size=8
).filter(lambda word: word not in ("<eos>", "<unk>"))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(words, max_size=6), min_size=1, max_size=6))
def test_word_vocabulary_round_trip(lines):
    text = "\n".join(" ".join(line) for line in lines) + "\n"
    vocab = Vocabulary.build(text, "word")
    assert vocab.decode(vocab.encode(text)) == text


def test_literal_reserved_words_are_the_reserved_tokens():
    vocab = Vocabulary.build("a <eos> b <unk>\n", "word")
    ids = vocab.encode("a <eos> b <unk>\n")
    assert [vocab.tokens[i] for i in ids] == ["a", "<eos>", "b", "<unk>", "<eos>"]
    assert vocab.decode(ids) == "a\nb <unk>\n"


def test_an_interrupt_lost_in_a_finalizer_is_raised_again_at_the_next_batch(monkeypatch):
    """Ctrl-C is remembered as well as raised, so a KeyboardInterrupt that Python swallowed (raised
    inside a __del__ it prints as "Exception ignored") still stops training at the next batch."""

    from keraslm import callbacks, cli

    monkeypatch.setattr(cli, "_interrupted", False)  # restored after the test
    check = callbacks.InterruptCheck(cli.interrupted)  # what train.py passes to training.train
    check.on_train_batch_end(0)  # no signal yet: nothing happens
    with pytest.raises(KeyboardInterrupt):
        cli._interrupt(signal.SIGINT, None)  # the handler run_main installs
    assert cli.interrupted()
    for callback in (check.on_train_batch_end, check.on_test_batch_end, check.on_epoch_end):
        with pytest.raises(KeyboardInterrupt):
            callback(1, logs={})
