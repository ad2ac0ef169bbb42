"""train.py end to end, as a user runs it: real TFDS loading, real files on disk."""

import csv
import json
import re
import signal
import subprocess
import sys
import time

import pytest
from conftest import OFFLINE, ROOT, error_lines, run_script, shakespeare

RUN_FILES = {
    "config.json",
    "vocab.json",
    "model.keras",
    "checkpoint.keras",
    "history.csv",
    "curves.png",
    "results.json",
    "tensorboard",
}
SMALL = ["--hidden-dim", "32", "--embedding-dim", "16", "--sample-tokens", "20", "--batch-size", "8", "--bptt", "25"]


def history(run_dir):
    with open(run_dir / "history.csv") as f:
        return list(csv.DictReader(f))


def test_char_level_through_the_tfds_manual_dir(tmp_path, tiny_shakespeare_dir):
    run_dir = tmp_path / "run"
    result = run_script(
        "train.py",
        "--tfds-manual-dir",
        tiny_shakespeare_dir,
        "--tfds-data-dir",
        tmp_path / "tfds",
        "--dry-run",
        "--epochs",
        "2",
        "--run-dir",
        run_dir,
        *SMALL,
    )
    assert result.returncode == 0, result.stderr
    assert RUN_FILES <= {p.name for p in run_dir.iterdir()}
    config = json.loads((run_dir / "config.json").read_text())
    assert config["data"]["source"] == "tfds:tiny_shakespeare" and config["model"]["vocabulary_size"] == 65
    rows = history(run_dir)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert {"loss", "perplexity", "bpc", "val_loss", "val_perplexity", "val_bpc", "lr"} <= set(rows[0])
    assert "--- sample" in result.stdout and "best epoch" in result.stdout
    assert set(json.loads((run_dir / "results.json").read_text())) >= {"test_loss", "test_perplexity", "test_bpc"}


def test_offline_tiny_shakespeare_is_prepared_from_the_bundled_copy(tmp_path):
    run_dir, temporary = tmp_path / "run", tmp_path / "tmp"
    temporary.mkdir()
    result = run_script(
        "train.py",
        "--tfds-data-dir",
        tmp_path / "tfds",
        "--dry-run",
        "--epochs",
        "1",
        "--run-dir",
        run_dir,
        *SMALL,
        env=OFFLINE | {"TMPDIR": str(temporary)},
    )
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stdout.splitlines() if line.startswith("note:")]
    assert len(notes) == 1, result.stdout
    assert notes[0].startswith("note: TFDS could not download tiny_shakespeare (")
    assert notes[0].endswith("prepared it from the copy bundled with keraslm")
    # TFDS's own 90/5/5 split, prepared into the data dir; the bundled copy's folder is gone.
    assert "tokens train/valid/test 1,003,854/55,770/55,770" in result.stdout
    assert (tmp_path / "tfds" / "tiny_shakespeare").is_dir()
    assert not list(temporary.glob("keraslm-tiny-shakespeare-*"))
    config = json.loads((run_dir / "config.json").read_text())
    assert config["data"]["source"] == "tfds:tiny_shakespeare" and config["model"]["vocabulary_size"] == 65
    assert [r["epoch"] for r in history(run_dir)] == ["1"]


def test_word_level_on_wikitext(tmp_path, wikitext_dir):
    run_dir = tmp_path / "run"
    result = run_script(
        "train.py",
        "--data",
        wikitext_dir,
        "--level",
        "word",
        "--dry-run",
        "--epochs",
        "1",
        "--run-dir",
        run_dir,
        "--cell",
        "gru",
        "--tie-weights",
        "--hidden-dim",
        "16",
        "--embedding-dim",
        "16",
        "--sample-tokens",
        "10",
    )
    assert result.returncode == 0, result.stderr
    assert RUN_FILES <= {p.name for p in run_dir.iterdir()}
    vocab = json.loads((run_dir / "vocab.json").read_text())
    assert vocab["level"] == "word" and vocab["tokens"][:2] == ["<unk>", "<eos>"]
    config = json.loads((run_dir / "config.json").read_text())
    # Word-level defaults follow pytorch/examples: SGD at lr 20, clip 0.25, batch 20, bptt 35.
    assert (config["train"]["optimizer"], config["train"]["lr"], config["train"]["clipnorm"]) == ("sgd", 20.0, 0.25)
    assert (config["train"]["batch_size"], config["train"]["bptt"]) == (20, 35)
    assert "bpc" not in history(run_dir)[0]


def test_resume_continues_from_the_right_epoch(tmp_path):
    run_dir = tmp_path / "run"
    data = tmp_path / "corpus.txt"
    data.write_text(shakespeare()[:60_000])
    first = run_script("train.py", "--data", data, "--epochs", "1", "--run-dir", run_dir, *SMALL)
    assert first.returncode == 0, first.stderr
    again = run_script("train.py", "--data", data, "--epochs", "3", "--run-dir", run_dir, *SMALL, "--resume")
    assert again.returncode == 0, again.stderr
    assert "resuming" in again.stdout and "after epoch 1" in again.stdout
    assert [r["epoch"] for r in history(run_dir)] == ["1", "2", "3"]
    refused = run_script("train.py", "--run-dir", run_dir, "--resume", "--lr", "0.5")
    assert refused.returncode == 2 and "lr" in error_lines(refused.stderr)[0]


def test_same_seed_same_run_and_options_that_change_the_step(tmp_path):
    data = tmp_path / "corpus.txt"
    data.write_text(shakespeare()[:30_000])
    losses = []
    for name, extra in (("a", []), ("b", []), ("xla", ["--jit-compile"]), ("bf16", ["--mixed-precision"])):
        result = run_script(
            "train.py",
            "--data",
            data,
            "--epochs",
            "1",
            "--run-dir",
            tmp_path / name,
            "--seed",
            "7",
            "--cell",
            "gru",
            "--dropout",
            "0.3",
            *SMALL,
            *extra,
        )
        assert result.returncode == 0, result.stderr
        losses.append([(r["loss"], r["val_loss"]) for r in history(tmp_path / name)])
    assert losses[0] == losses[1]
    # XLA and bfloat16 compute change the arithmetic, not the model: close, not equal.
    for other in losses[2:]:
        assert abs(float(other[0][1]) - float(losses[0][0][1])) < 0.1


def test_ctrl_c_keeps_a_resumable_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    data = tmp_path / "corpus.txt"
    data.write_text(shakespeare()[:60_000])
    args = ["train.py", "--data", data, "--epochs", "50", "--run-dir", run_dir, *SMALL]
    proc = subprocess.Popen(
        [sys.executable, *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 300
    while not (run_dir / "history.csv").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "--resume" in err
    done = int(re.search(r"holds epoch (\d+)", err).group(1))
    assert done >= 1  # history.csv appeared, so an epoch's checkpoint was already written
    resumed = run_script("train.py", "--run-dir", run_dir, "--resume", "--epochs", str(done + 1))
    assert resumed.returncode == 0, resumed.stderr
    assert f"after epoch {done}" in resumed.stdout
    assert [int(r["epoch"]) for r in history(run_dir)] == list(range(1, done + 2))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--cell", "transformer"], "invalid choice"),
        (["--data", "/no/such/corpus.txt"], "no such file"),
        (["--tie-weights", "--embedding-dim", "10", "--hidden-dim", "20"], "--embedding-dim equal to --hidden-dim"),
        (["--dropout", "1.5"], "--dropout"),
        (["--bptt", "0"], "--bptt"),
        (["--resume"], "not a directory"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, args, message):
    result = run_script("train.py", "--run-dir", tmp_path / "run", *args)
    lines = error_lines(result.stderr)
    assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "run").exists()


def test_corpus_shorter_than_one_block(tmp_path):
    data = tmp_path / "short.txt"
    data.write_text("to be or not to be\n" * 20)
    result = run_script("train.py", "--data", data, "--run-dir", tmp_path / "run")
    lines = error_lines(result.stderr)
    assert result.returncode == 2 and len(lines) == 1 and "needs at least 3201" in lines[0], result.stderr
