"""sample.py and its backends on a real export: ONNX Runtime, SavedModel, Keras, and TF Serving's protocols."""

import os
import socket

import numpy as np
import pytest
from conftest import error_lines, make_run, run_script, tf_serving_double

from keraslm.export import export_run
from keraslm.runtime import open_backend
from keraslm.sampling import GreedySampler, Sampler, generate


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    base = tmp_path_factory.mktemp("sample")
    run_dir = make_run(base, "lstm", 2, "char")
    version_dir, _ = export_run(str(run_dir), out=str(base / "models"), name="lm")
    return run_dir, version_dir


def tokens_from(backend, sampler, seed=5, prompt="ROMEO:", batch=2, count=25):
    ids = backend.vocab.encode(prompt)
    rng = np.random.default_rng(seed)
    return generate(backend.step, np.repeat(ids[None], batch, 0), backend.initial_state(batch), count, sampler, rng)


def test_greedy_and_seeded_sampling_agree_on_every_local_backend(model):
    run_dir, version_dir = model
    backends = {
        "onnx": open_backend(version_dir, "onnx"),
        "savedmodel": open_backend(version_dir, "savedmodel"),
        "keras": open_backend(str(run_dir), "keras"),
    }
    greedy = {name: tokens_from(b, GreedySampler()) for name, b in backends.items()}
    sampled = {name: tokens_from(b, Sampler(1.0)) for name, b in backends.items()}
    for name in ("savedmodel", "keras"):
        np.testing.assert_array_equal(greedy[name], greedy["onnx"])
        np.testing.assert_array_equal(sampled[name], sampled["onnx"])
    assert not np.array_equal(tokens_from(backends["onnx"], Sampler(1.0), seed=6), sampled["onnx"])


def test_in_graph_generate_agrees_with_the_python_loop_when_greedy(model):
    _, version_dir = model
    backend = open_backend(version_dir, "savedmodel")
    texts, tokens = backend.generate_in_graph(["ROMEO:", "ROMEO:"], 25, 0.0, 0, 1.0, 0)
    np.testing.assert_array_equal(tokens, tokens_from(backend, GreedySampler()))


def test_sample_script_on_each_backend(model, tmp_path):
    run_dir, version_dir = model
    outputs = {}
    for backend, path in (("onnx", version_dir), ("savedmodel", version_dir), ("keras", run_dir)):
        result = run_script(
            "sample.py", path, "--backend", backend, "--prompt", "First:", "--num-tokens", "30", "--seed", "3"
        )
        assert result.returncode == 0, result.stderr
        outputs[backend] = result.stdout
    assert outputs["onnx"].startswith("First:") and len(outputs["onnx"]) == len("First:") + 30 + 1
    assert outputs["onnx"] == outputs["savedmodel"] == outputs["keras"]
    in_graph = run_script(
        "sample.py", version_dir, "--backend", "savedmodel", "--in-graph", "--greedy", "--prompt", "First:"
    )
    greedy = run_script("sample.py", version_dir, "--greedy", "--prompt", "First:")
    assert in_graph.returncode == 0 and in_graph.stdout == greedy.stdout

    int8 = run_script("sample.py", version_dir, "--int8", "--prompt", "First:", "--num-tokens", "30")
    assert int8.returncode == 0, int8.stderr
    assert int8.stdout.startswith("First:") and len(int8.stdout) == len(outputs["onnx"])


def test_onnx_path_never_imports_tensorflow(model, tmp_path):
    _, version_dir = model
    blocker = tmp_path / "blocker" / "tensorflow"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('the onnx path must not import TensorFlow')\n")
    env = {"PYTHONPATH": str(blocker.parent)}
    result = run_script("sample.py", os.path.dirname(version_dir), "--num-tokens", "10", env=env)
    assert result.returncode == 0, result.stderr


def test_num_samples_out_file_and_stream(model, tmp_path):
    _, version_dir = model
    out = tmp_path / "samples.txt"
    result = run_script("sample.py", version_dir, "--num-samples", "3", "--num-tokens", "20", "--out", out)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("--- sample") == 3 and out.read_text().count("\n\n") == 2
    stream = run_script("sample.py", version_dir, "--stream", "--num-tokens", "20", "--prompt", "A", "--seed", "1")
    batch = run_script("sample.py", version_dir, "--num-tokens", "20", "--prompt", "A", "--seed", "1")
    assert stream.returncode == 0 and stream.stdout == batch.stdout


def test_word_level_writes_eos_as_newlines(tmp_path):
    run_dir = make_run(tmp_path, "gru", 1, "word")
    out = tmp_path / "generate.txt"
    result = run_script(
        "sample.py",
        run_dir,
        "--backend",
        "keras",
        "--num-tokens",
        "200",
        "--temperature",
        "1.5",
        "--out",
        out,
        "--prompt",
        "the zzzunseen",
    )
    assert result.returncode == 0, result.stderr
    assert "<eos>" not in out.read_text() and "<unk>" not in result.stdout.splitlines()[0][:3]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--temperature", "-1"], "temperature"),
        (["--top-k", "-2"], "top-k"),
        (["--top-p", "1.5"], "top-p"),
        (["--num-tokens", "0"], "--num-tokens"),
        (["--prompt", "\u00e9\u00e9"], "not in the vocabulary"),
        (["--backend", "tf-serving"], "--server"),
        (["--int8", "--backend", "savedmodel"], "--int8"),
    ],
)
def test_bad_parameters_are_one_line_and_exit_code_2(model, args, message):
    _, version_dir = model
    result = run_script("sample.py", version_dir, *args)
    lines = error_lines(result.stderr)
    assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr


def test_not_a_model(tmp_path):
    result = run_script("sample.py", tmp_path)
    assert result.returncode == 2 and "neither a keraslm export" in error_lines(result.stderr)[0]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tf_serving_rest_and_grpc_against_a_session_loaded_double(model):
    _, version_dir = model
    local = run_script("sample.py", version_dir, "--prompt", "First:", "--num-tokens", "15", "--seed", "2")
    with tf_serving_double(version_dir) as (rest, grpc, _):
        for server in (rest, grpc):
            remote = run_script(
                *("sample.py", version_dir, "--backend", "tf-serving", "--server", server),
                *("--prompt", "First:", "--num-tokens", "15", "--seed", "2"),
            )
            assert remote.returncode == 0, remote.stderr
            assert remote.stdout == local.stdout
            wrong = run_script(
                "sample.py", version_dir, "--backend", "tf-serving", "--server", server, "--model-name", "other"
            )
            lines = error_lines(wrong.stderr)
            assert wrong.returncode == 2 and len(lines) == 1 and "TF Serving" in lines[0], wrong.stderr


def test_unreachable_server(model):
    _, version_dir = model
    for server in (f"http://127.0.0.1:{free_port()}", f"grpc://127.0.0.1:{free_port()}"):
        result = run_script("sample.py", version_dir, "--backend", "tf-serving", "--server", server, "--timeout", "2")
        lines = error_lines(result.stderr)
        assert result.returncode == 2 and len(lines) == 1, result.stderr
