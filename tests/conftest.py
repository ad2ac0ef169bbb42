"""Shared fixtures: corpora made from the Tiny Shakespeare bundled with keraslm (nothing outside the
repository), a runner for the scripts, tiny runs, and a TF Serving stand-in over a session-loaded model."""

import contextlib
import functools
import importlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from keraslm.corpora import tiny_shakespeare_text, write_tiny_shakespeare
from keraslm.data import split_text

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parents[1]
# No network for a script run with this environment: a proxy nobody listens on makes every download
# fail at once, as offline. Both spellings, since Python's lower-case one wins where both are set.
DEAD_PROXY = "http://127.0.0.1:9"
OFFLINE = {"https_proxy": DEAD_PROXY, "HTTPS_PROXY": DEAD_PROXY, "http_proxy": DEAD_PROXY, "HTTP_PROXY": DEAD_PROXY}
OFFLINE |= {"no_proxy": "", "NO_PROXY": ""}


@functools.cache
def shakespeare():
    """The full Tiny Shakespeare corpus, from the copy bundled with keraslm."""
    return tiny_shakespeare_text()


def wikitext_layout(text):
    """`text` in WikiText's word-level layout: words and punctuation separated by single spaces,
    every line ending in a newline ("Nay , but speak not maliciously .")."""
    return "".join(" ".join(re.findall(r"\w+(?:'\w+)*|[^\w\s]", line)) + "\n" for line in text.splitlines())


@pytest.fixture(scope="session", autouse=True)
def token_cache_folder(tmp_path_factory):
    """The tests' token cache: a temporary folder, never the user's (scripts inherit it)."""
    folder = tmp_path_factory.mktemp("keraslm-tokens")
    os.environ["KERASLM_TOKEN_CACHE"] = str(folder)
    return folder


@pytest.fixture(scope="session")
def shakespeare_text():
    """The full Tiny Shakespeare corpus."""
    return shakespeare()


@pytest.fixture(scope="session")
def tiny_shakespeare_dir(tmp_path_factory):
    """A folder holding the bundled corpus as input.txt: TFDS's manual dir for tiny_shakespeare."""
    folder = tmp_path_factory.mktemp("tinyshakespeare")
    write_tiny_shakespeare(folder)
    return folder


@pytest.fixture(scope="session")
def wikitext_dir(tmp_path_factory):
    """A word-level corpus folder in WikiText's layout (train.txt, valid.txt, test.txt), made from
    Tiny Shakespeare split 90/5/5."""
    folder = tmp_path_factory.mktemp("wikitext-layout")
    for name, text in split_text(shakespeare()).items():
        (folder / f"{name}.txt").write_text(wikitext_layout(text), encoding="utf-8")
    return folder


def run_script(*args, timeout=600, env=None, **kwargs):
    """Run one of the project's scripts as a user would (plus `env`); return the CompletedProcess."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, **kwargs
    )


def run_command(script, argv, capsys):
    """Run a script's main (train.py → keraslm.commands.train) through run_main in this process, as
    its script does but without a new interpreter and TensorFlow import per call; return (exit code,
    stdout, non-empty stderr lines). run_main's signal handlers are undone afterwards."""
    from keraslm.cli import run_main

    command = importlib.import_module(f"keraslm.commands.{script.removesuffix('.py')}")
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    code = 0
    try:
        run_main(command.main, [str(arg) for arg in argv])
    except SystemExit as exit_info:
        code = exit_info.code
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])
    captured = capsys.readouterr()
    return code, captured.out, [line for line in captured.err.splitlines() if line.strip()]


def assert_one_line_refusal(outcome, *fragments):
    """assert_one_line_error for run_command's (exit code, stdout, stderr lines)."""
    code, _, lines = outcome
    assert code == 2 and len(lines) == 1, lines
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def error_lines(stderr):
    """stderr without TensorFlow's C++ log lines (and their tab-indented continuations), which no
    flag silences."""
    return [
        line
        for line in stderr.splitlines()
        if line.strip() and not line.startswith(("I0000", "W0000", "E0000", "WARNING: All log messages", "\t"))
    ]


def assert_one_line_error(result, *fragments):
    """The promise for bad input: exit code 2, one line on stderr holding `fragments`, no traceback."""
    lines = error_lines(result.stderr)
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.stderr


def make_run(
    directory, cell="lstm", num_layers=1, level="char", hidden_dim=16, model_overrides=None, **train_overrides
):
    """Train a tiny model for two windows (in-process) and return its run directory."""
    from keraslm.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from keraslm.training import train

    directory.mkdir(parents=True, exist_ok=True)
    corpus = directory / "corpus.txt"
    text = shakespeare()[:40_000]
    corpus.write_text(text if level == "char" else wikitext_layout(text), encoding="utf-8")
    # The fixtures' tiny models keep no dropout and Keras' initialisers, as they were made before
    # the dataclasses' defaults became the command line's (issue #15).
    model_settings = {"dropout": 0.0, "init": "keras"} | (model_overrides or {})
    config = RunConfig(
        model=ModelConfig(cell=cell, num_layers=num_layers, embedding_dim=8, hidden_dim=hidden_dim, **model_settings),
        data=DataConfig(source=str(corpus), level=level),
        train=TrainConfig(batch_size=4, bptt=10, epochs=1, sample_tokens=0, **train_overrides),
    )
    run_dir = directory / "run"
    train(config, str(run_dir), dry_run=True, verbose=0)
    return run_dir


def step_feed(description, tokens, seed=0):
    """serving_default inputs: `tokens` and random (nonzero) states for an export's keraslm.json."""
    import numpy as np

    rng = np.random.default_rng(seed)
    tokens = np.asarray(tokens, np.int32)
    states = {s["input"]: rng.normal(0, 0.5, (len(tokens), s["shape"][-1])) for s in description["states"]}
    return {"tokens": tokens} | {name: value.astype(np.float32) for name, value in states.items()}


@contextlib.contextmanager
def tf_serving_double(version_dir, model_name="lm"):
    """Serve an export from tests/tf_serving_double.py (session-loaded, as TF Serving loads it);
    yield (REST URL, gRPC URL, the server's Popen)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "tf_serving_double.py"), str(version_dir), model_name],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        rest_port, grpc_port = server.stdout.readline().split()
        yield f"http://127.0.0.1:{rest_port}", f"grpc://127.0.0.1:{grpc_port}", server
    finally:
        server.stdin.close()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
