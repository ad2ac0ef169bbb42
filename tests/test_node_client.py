"""An export runs from Node.js: tests/node/greedy.mjs, on ONNX Runtime for Node.js, writes the same
greedy text as `python sample.py EXPORT --greedy`.

greedy.mjs reads only the export's assets.extra (keraslm.json and model.onnx), as a deploy machine
without Python would. onnxruntime-node comes from the npm registry (`npm install --ignore-scripts`:
its CPU binaries are in the package; the install script only fetches GPU ones), hence `slow`.
"""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, make_run

from keraslm import artifacts
from keraslm.export import export_run

NODE_CLIENT = ROOT / "tests" / "node"
# LSTMs: GRUs of this size fall into one repeated token even with the varied weights below.
MODELS = {"char": ("lstm", 2, "char"), "word": ("lstm", 2, "word")}
NUM_TOKENS = 40
# Prompts per level: plain, empty (the start token), ending in a newline (no space added before the
# continuation) and, at word level, a word outside the vocabulary (<unk>).
PROMPTS = {
    "char": ["ROMEO:", "", "ROMEO:\n"],
    "word": ["the king", "", "the king\n", "zyzzyva the", "the\x1cking\u3000the\x85king"],
}
CASES = [(level, prompt) for level, prompts in PROMPTS.items() for prompt in prompts]

pytestmark = pytest.mark.slow


def tool(name):
    """The path of node or npm; fails (not skips) without it: this test is the Node.js client's check."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not on PATH: Node.js 18+ and npm are needed to check tests/node/greedy.mjs")
    return path


@pytest.fixture(scope="module")
def node_client(tmp_path_factory):
    """A copy of tests/node with onnxruntime-node installed from the npm registry."""
    folder = tmp_path_factory.mktemp("node")
    for name in ("package.json", "package-lock.json", "greedy.mjs"):
        shutil.copy(NODE_CLIENT / name, folder / name)
    command = [tool("npm"), "install", "--ignore-scripts", "--no-audit", "--no-fund"]
    installed = subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, f"npm install failed:\n{installed.stderr}"
    return folder / "greedy.mjs"


def vary_weights(run_dir, gain=1.5, seed=0):
    """Give the run's model.keras random weights (normal, std gain/sqrt(fan-in); zero biases).

    A model trained for two windows continues every prompt with one repeated token, so any client
    that picks that token would pass; with these weights greedy text changes from token to token.
    """
    from keraslm.runs import load_run

    _, _, model = load_run(str(run_dir))
    rng = np.random.default_rng(seed)
    model.set_weights(
        [
            rng.normal(0, gain / np.sqrt(w.shape[0]), w.shape).astype(w.dtype) if w.ndim == 2 else np.zeros_like(w)
            for w in model.get_weights()
        ]
    )
    model.save(run_dir / artifacts.BEST_MODEL)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """{level: version directory} of fresh exports with varied weights."""
    found = {}
    for level, model in MODELS.items():
        base = tmp_path_factory.mktemp(level)
        run_dir = make_run(base, *model)
        vary_weights(run_dir)
        found[level], _ = export_run(str(run_dir), out=str(base / "models"), name="lm")
    return found


def sample_py(version_dir, prompt):
    """stdout of `python sample.py VERSION_DIR --greedy --prompt PROMPT --num-tokens NUM_TOKENS`."""
    command = [sys.executable, str(ROOT / "sample.py"), str(version_dir), "--greedy"]
    command += ["--prompt", prompt, "--num-tokens", str(NUM_TOKENS)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=python_env())
    assert done.returncode == 0, done.stderr
    return done.stdout


def python_env():
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT)}


@pytest.mark.parametrize(("level", "prompt"), CASES, ids=[f"{level}-{prompt!r}" for level, prompt in CASES])
def test_node_greedy_text_matches_sample_py(node_client, exports, level, prompt):
    command = [tool("node"), str(node_client), str(exports[level]), prompt, str(NUM_TOKENS)]
    node = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert node.returncode == 0, node.stderr
    expected = sample_py(exports[level], prompt)
    assert node.stdout == expected
    # The comparison means something only if the text varies: not one token over and over.
    continuation = expected[len(prompt) :]
    pieces = set(continuation) if level == "char" else set(continuation.split())
    assert len(pieces) >= 5, f"greedy text too uniform to tell clients apart: {expected!r}"


def test_node_client_refuses_bad_input_in_one_line(node_client, exports):
    """A character the vocabulary lacks, or a bad NUM_TOKENS: one line on stderr, exit 2."""
    node = tool("node")
    for args in (["\u2603", "5"], ["ROMEO:", "0"], ["ROMEO:", "x"]):
        done = subprocess.run([node, str(node_client), str(exports["char"]), *args], capture_output=True, text=True)
        assert done.returncode == 2, (args, done.stderr)
        assert done.stdout == ""
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
