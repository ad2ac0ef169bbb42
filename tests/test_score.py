"""Scoring (score.py, keraslm.score): a run's own test split scored on every backend gives the test
loss of its results.json; --per-token lines add up to the total; bad input is one line and exit 2;
the onnx backend scores without TensorFlow."""

import json
import math
import os
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
from conftest import ROOT, assert_one_line_refusal, run_command, shakespeare, tf_serving_double, wikitext_layout

import keraslm
from keraslm.data import split_text
from keraslm.files import OutputFile
from keraslm.scoring import encode
from keraslm.vocab import Vocabulary

HEAVY = ("tensorflow", "keras", "tensorflow_datasets", "matplotlib", "onnx")


def trained_run(directory, level):
    """A tiny model trained one whole epoch (no --dry-run: results.json's test loss then covers the
    whole test split) on 20,000 characters of Tiny Shakespeare, and its export. The char model's
    corpus is one file (split 90/5/5), the word model's a train/valid/test folder in WikiText's layout."""
    from keraslm.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from keraslm.training import train

    directory.mkdir(parents=True)
    text = shakespeare()[:20_000]
    if level == "char":
        corpus = directory / "corpus.txt"
        corpus.write_text(text, encoding="utf-8")
    else:
        corpus = directory / "corpus"
        corpus.mkdir()
        for name, split in split_text(text).items():
            (corpus / f"{name}.txt").write_text(wikitext_layout(split), encoding="utf-8")
    config = RunConfig(
        model=ModelConfig(cell="lstm", num_layers=1, embedding_dim=8, hidden_dim=16, dropout=0.0, init="keras"),
        data=DataConfig(source=str(corpus), level=level),
        # At word level a slower rate: the export's int8 check (mean KL ≤ 0.01) refuses the sharper
        # distributions of a word model this small after a whole epoch at Adam's 2e-3.
        train=TrainConfig(
            batch_size=4,
            bptt=10,
            epochs=1,
            lr=2e-3 if level == "char" else 3e-4,
            sample_tokens=0,
            mixed_precision=False,
        ),
    )
    train(config, str(directory / "run"), verbose=0)
    version_dir = keraslm.export_run(directory / "run", directory / "models", name="lm")
    return directory / "run", version_dir


@pytest.fixture(scope="module")
def char_model(tmp_path_factory):
    """(run directory, version directory) of a char-level model."""
    return trained_run(tmp_path_factory.mktemp("score") / "char", "char")


@pytest.fixture(scope="module")
def word_model(tmp_path_factory):
    """(run directory, version directory) of a word-level model."""
    return trained_run(tmp_path_factory.mktemp("score") / "word", "word")


def results_test_loss(run_dir):
    return json.loads((run_dir / "results.json").read_text())["test_loss"]


@pytest.mark.parametrize("backend", ["keras", "onnx", "savedmodel"])
def test_the_test_split_gives_results_json_test_loss_on_every_backend(char_model, backend):
    run_dir, version_dir = char_model
    score = keraslm.score(run_dir if backend == "keras" else version_dir, split="test", backend=backend)
    assert score.loss == pytest.approx(results_test_loss(run_dir), rel=1e-3)
    # 5% of 20,000 characters; the windows of 4 × 10 score all but the last 39 targets.
    assert (score.tokens, score.unscored, score.level) == (960, 39, "char")


def test_tf_serving_scores_as_onnx_over_rest_and_grpc(char_model):
    _, version_dir = char_model
    local = keraslm.score(version_dir, split="test")
    with tf_serving_double(version_dir) as (rest, grpc, _):
        for server in (rest, grpc):
            remote = keraslm.score(version_dir, split="test", backend="tf-serving", server=server, model_name="lm")
            assert remote.tokens == local.tokens
            assert remote.loss == pytest.approx(local.loss, rel=1e-5)


def test_word_level_test_split_gives_results_json_test_loss(word_model):
    run_dir, version_dir = word_model
    for model, backend in ((run_dir, "keras"), (version_dir, "onnx")):
        assert keraslm.score(model, split="test", backend=backend).loss == pytest.approx(
            results_test_loss(run_dir), rel=1e-3
        )


def test_a_text_file_scores_as_the_split_it_holds(char_model, tmp_path):
    run_dir, version_dir = char_model
    test_text = split_text(shakespeare()[:20_000])["test"]
    (tmp_path / "test.txt").write_text(test_text, encoding="utf-8")
    from_file = keraslm.score(version_dir, tmp_path / "test.txt")
    assert from_file == keraslm.score(version_dir, split="test")


def test_figures_per_token_lines_and_the_printed_report(char_model, tmp_path, capsys):
    run_dir, version_dir = char_model
    per_token = tmp_path / "tokens.jsonl"
    code, out, errors = run_command("score.py", [version_dir, "--split", "test", "--per-token", per_token], capsys)
    assert code == 0 and not errors, errors
    score = keraslm.score(version_dir, split="test")
    assert score.bits_per_char == score.loss / math.log(2)
    assert score.perplexity == math.exp(score.loss)
    assert f"loss {score.loss:.6f} nats/token" in out.splitlines()
    assert f"bpc {score.bits_per_char:.6f}" in out.splitlines()
    assert "960 tokens scored" in out and "the last 39 tokens fill no window" in out
    assert score.unknown == 0  # no character of the test split is missing from the vocabulary
    lines = [json.loads(line) for line in per_token.read_text(encoding="utf-8").splitlines()]
    assert [line["position"] for line in lines] == list(range(1, 961))
    assert -sum(line["logprob"] for line in lines) / len(lines) == pytest.approx(score.loss, rel=1e-9)
    test_text = split_text(shakespeare()[:20_000])["test"]
    assert "".join(line["token"] for line in lines) == test_text[1:961]


def test_smaller_windows_score_more_of_the_text(char_model):
    _, version_dir = char_model
    score = keraslm.score(version_dir, split="test", batch_size=1, bptt=7)
    assert (score.tokens, score.unscored) == (994, 5)
    assert score.loss == pytest.approx(keraslm.score(version_dir, split="test").loss, rel=0.05)


def test_word_level_counts_unknown_words_as_unk(word_model, tmp_path):
    _, version_dir = word_model
    known = keraslm.load(version_dir).vocab.tokens[2:6]  # after <unk> and <eos>: the commonest words
    line = f"{known[0]} {known[1]} zyzzyva {known[2]} {known[3]}\n"
    (tmp_path / "text.txt").write_text(line * 20, encoding="utf-8")
    score = keraslm.score(version_dir, tmp_path / "text.txt", batch_size=2, bptt=5)
    assert (score.level, score.unknown, score.bits_per_char) == ("word", 20, None)
    # Six tokens a line (<eos> included) and the first one only context.
    assert score.tokens + score.unscored == 6 * 20 - 1


def test_unknown_characters_are_refused_or_skipped(char_model, tmp_path, capsys):
    _, version_dir = char_model
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be\u2603 that is the question.\n" * 10, encoding="utf-8")
    outcome = run_command("score.py", [version_dir, "--text", text], capsys)
    assert_one_line_refusal(outcome, "'\u2603'", "--skip-unknown")
    skipped = keraslm.score(version_dir, text, skip_unknown=True, batch_size=2, bptt=10)
    assert skipped.unknown == 10


@pytest.mark.parametrize(
    "content, flags, fragments",
    [
        ("", [], ["holds no text"]),
        (" \n\n  \n", [], ["holds no text"]),
        ("First Citizen:\n", [], ["has 15 tokens", "4 × 10", "at least 41", "--batch-size", "--bptt"]),
        (b"\x7fELF\x02\x01\x01\x00\x00\x00" * 10, [], ["looks binary"]),
        (b"caf\xe9 " * 50, [], ["not valid utf-8", "--encoding"]),
        ("First Citizen:\n" * 10, ["--batch-size", "0"], ["--batch-size must be a positive integer"]),
        ("First Citizen:\n" * 10, ["--per-token", "/no/such/folder/x.jsonl"], ["--per-token", "folder does not exist"]),
        (
            "First Citizen:\n" * 10,
            ["--batch-size", "1000000", "--bptt", "1000000"],
            ["1000000 × 1000000 tokens", "GB of memory", "smaller batch size or bptt"],
        ),
    ],
    ids=[
        "empty",
        "whitespace",
        "shorter than a window",
        "binary",
        "not utf-8",
        "batch size 0",
        "per-token folder",
        "windows over memory",
    ],
)
def test_bad_text_is_one_line_and_exit_2(char_model, tmp_path, capsys, content, flags, fragments):
    _, version_dir = char_model
    text = tmp_path / "text.txt"
    text.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert_one_line_refusal(run_command("score.py", [version_dir, "--text", text, *flags], capsys), *fragments)


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["--text", "no-such.txt"], ["--text no-such.txt: no such file"]),
        (["--text", "."], ["is a folder"]),
        (["--split", "test", "--data", "no-such-corpus.txt"], ["no-such-corpus.txt is not there", "--data"]),
        (["--text", "x.txt", "--data", "y.txt"], ["--data names the corpus of --split"]),
        (["--text", "x.txt", "--split", "test"], ["not allowed with argument"]),
        ([], ["one of the arguments --text --split is required"]),
        (["--split", "test", "--backend", "keras"], ["the keras backend needs a run directory"]),
    ],
    ids=[
        "missing file",
        "folder",
        "corpus moved",
        "data without split",
        "text and split",
        "neither",
        "keras on export",
    ],
)
def test_bad_flags_are_one_line_and_exit_2(char_model, capsys, argv, fragments):
    _, version_dir = char_model
    assert_one_line_refusal(run_command("score.py", [version_dir, *argv], capsys), *fragments)


def test_a_refused_per_token_file_keeps_its_old_content(char_model, tmp_path, capsys):
    _, version_dir = char_model
    per_token, text = tmp_path / "tokens.jsonl", tmp_path / "short.txt"
    per_token.write_text("old\n")
    text.write_text("too short")
    outcome = run_command("score.py", [version_dir, "--text", text, "--per-token", per_token], capsys)
    assert_one_line_refusal(outcome, "has 9 tokens")
    assert per_token.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_the_onnx_backend_scores_without_tensorflow(char_model):
    _, version_dir = char_model
    probe = (
        "import sys\n"
        "from keraslm.commands.score import main\n"
        f"main([{str(version_dir)!r}, '--split', 'test'])\n"
        f"print([m for m in {HEAVY!r} if m in sys.modules])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[]", result.stdout


def test_per_token_lines_that_fail_midway_leave_the_old_file(tmp_path):
    target = tmp_path / "tokens.jsonl"
    target.write_text("old\n")

    def lines():
        yield '{"position": 1}\n'
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), OutputFile(target, "per_token") as out:
        out.write(lines())
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["tokens.jsonl"]  # no temporary left


def peak_memory_of_encoding(chunks, count, path):
    """(ids, unknown, peak bytes traced) of encoding `count` times the same chunk."""
    tracemalloc.start()
    try:
        ids, unknown = encode((chunks for _ in range(count)), Vocabulary.build("abc \n", "char"), path)
        return ids, unknown, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_long_text_is_encoded_streamed_into_a_token_file(tmp_path):
    piece = "abc cab\n" * (1 << 19)  # 4 MiB a chunk, as keraslm.data reads a file
    _, _, short_peak = peak_memory_of_encoding(piece, 3, tmp_path / "short.bin")
    ids, unknown, long_peak = peak_memory_of_encoding(piece, 12, tmp_path / "long.bin")
    assert isinstance(ids, np.memmap) and len(ids) == 12 * len(piece) and unknown == 0
    assert np.array_equal(ids[: len(piece)], Vocabulary.build("abc \n", "char").encode(piece))
    # Four times the text, the same memory: one chunk's work, never the whole stream (its uint16
    # ids alone would take 96 MiB more).
    assert long_peak < short_peak + (4 << 20), (short_peak, long_peak)
