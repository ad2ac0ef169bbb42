"""Exports under TF Serving's own loading path, and requests that must not take a server down.

TF Serving imports the MetaGraph into a Session, runs the restore and init ops, and runs a
signature_def by tensor names. `tf.saved_model.load` does something else, so these tests use the
path TF Serving uses: `saved_model_cli run` (TensorFlow's own tool, which loads that way) and
keraslm.session_loader, which the export check, the savedmodel backend and the TF Serving
stand-in (tests/tf_serving_double.py) run. tests/test_c_api.py loads through the C API.
"""

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import onnxruntime
import pytest
import tensorflow as tf
from conftest import ROOT, error_lines, make_run, run_script, step_feed, tf_serving_double

from keraslm import serving
from keraslm.errors import UsageError
from keraslm.export import export_run
from keraslm.model import keras_step
from keraslm.runs import load_run
from keraslm.runtime import load_description
from keraslm.sampling import GreedySampler, generate
from keraslm.session_loader import SessionModel


def export(tmp_path, cell="lstm", level="char", **kwargs):
    version_dir, _ = export_run(str(make_run(tmp_path, cell, 2, level, **kwargs)), out=str(tmp_path / "m"), name="lm")
    return version_dir


def onnx_step(version_dir):
    session = onnxruntime.InferenceSession(os.path.join(version_dir, "assets.extra", "model.onnx"))
    names = [o.name for o in session.get_outputs()]
    return lambda feed: dict(zip(names, session.run(names, feed), strict=True))


def description(version_dir):
    """The export's keraslm.json."""
    return load_description(version_dir)[0]


@pytest.mark.parametrize(
    "cell, level, kwargs",
    [
        ("lstm", "word", {"hidden_dim": 8, "model_overrides": {"tie_weights": True}}),
        pytest.param("gru", "char", {"model_overrides": {"one_hot": True}}, marks=pytest.mark.slow),
        ("lstm", "char", {"mixed_precision": True}),
        pytest.param("rnn_relu", "word", {"mixed_precision": True}, marks=pytest.mark.slow),
    ],
    ids=["tied", "one-hot", "mixed-precision-lstm", "mixed-precision-rnn"],
)
def test_every_kind_of_model_runs_under_tf_servings_loader(tmp_path, cell, level, kwargs):
    version_dir = export(tmp_path, cell, level, **kwargs)
    model = SessionModel(version_dir)
    feed = step_feed(description(version_dir), [[1, 2, 3, 4], [5, 6, 7, 0]])
    served, expected = model.run("serving_default", feed), onnx_step(version_dir)(feed)
    assert set(served) == set(expected)
    for name in expected:
        np.testing.assert_allclose(served[name], expected[name], atol=1e-4)

    config, vocab, twin = load_run(str(tmp_path / "run"))
    # Each weight is stored once: the checkpoint holds exactly the twin's weights, no copies.
    stored = tf.train.load_checkpoint(os.path.join(version_dir, "variables", "variables")).get_variable_to_shape_map()
    weights = [v for k, v in stored.items() if k != "_CHECKPOINTABLE_OBJECT_GRAPH"]
    assert sorted(map(tuple, weights)) == sorted(tuple(w.shape) for w in twin.weights)

    # generate, greedy, follows the model's own argmax continuation.
    prompt = " ".join(vocab.tokens[5:8]) if level == "word" else "".join(vocab.tokens[5:8])
    out = model.run("generate", serving.generate_inputs([prompt], 10, temperature=0.0))
    step, state = keras_step(twin, config.model, batch_size=1)
    np.testing.assert_array_equal(
        out["tokens"], generate(step, vocab.encode(prompt)[None, :], state, 10, GreedySampler(), None)
    )


def test_an_export_tf_serving_cannot_run_is_never_published(tmp_path, monkeypatch):
    """The check before publishing loads the version as TF Serving does. Saved the way keraslm did
    before (the Keras model inside a plain tf.Module), every weight restores into a copy the graph
    never reads, and the export must stop there."""
    import keraslm.export

    def through_a_plain_module(functions, path):
        module = tf.Module()
        module.twin, module.table = functions.twin, functions.table
        signatures = {"serving_default": functions.step, "generate": functions.generate}
        tf.saved_model.save(module, path, signatures=signatures)

    monkeypatch.setattr(keraslm.export, "write_saved_model", through_a_plain_module)
    run_dir = make_run(tmp_path)
    with pytest.raises(UsageError, match="TF Serving's loader cannot run the new version.*Could not find variable"):
        export_run(str(run_dir), out=str(tmp_path / "m"), name="lm")
    assert os.listdir(tmp_path / "m" / "lm") == []


def saved_model_cli(version_dir, signature, outdir, inputs="", input_exprs=""):
    """`saved_model_cli run` (TensorFlow's tool, loading as TF Serving does); its outputs as arrays."""
    args = ["run", "--dir", version_dir, "--tag_set", "serve", "--signature_def", signature, "--outdir", outdir]
    args += ["--inputs", inputs] if inputs else []
    args += ["--input_exprs", input_exprs] if input_exprs else []
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    result = subprocess.run(
        [cli, *args], capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return {f[: -len(".npy")]: np.load(os.path.join(outdir, f), allow_pickle=True) for f in os.listdir(outdir)}


# LSTM in the default run; every cell with -m slow.
@pytest.mark.parametrize(
    "cell", ["lstm", *(pytest.param(c, marks=pytest.mark.slow) for c in ("gru", "rnn_tanh", "rnn_relu"))]
)
def test_saved_model_cli_runs_every_signature(tmp_path, cell):
    version_dir = export(tmp_path, cell)
    feed = step_feed(description(version_dir), [[1, 2, 3], [4, 5, 6]])
    for name, value in feed.items():
        np.save(tmp_path / f"{name}.npy", value)
    inputs = ";".join(f"{name}={tmp_path / name}.npy" for name in feed)
    step = saved_model_cli(version_dir, "serving_default", str(tmp_path / "step"), inputs=inputs)
    expected = onnx_step(version_dir)(feed)
    assert set(step) == set(expected)
    for name in expected:
        np.testing.assert_allclose(step[name], expected[name], atol=1e-4)

    exprs = 'prompt=["First"];max_new_tokens=30;temperature=0.0;top_k=0;top_p=1.0;seed=0'
    text = saved_model_cli(version_dir, "generate", str(tmp_path / "gen"), input_exprs=exprs)["text"][0].decode()
    sample = run_script("sample.py", version_dir, "--greedy", "--prompt", "First", "--num-tokens", "30")
    assert sample.returncode == 0, sample.stderr
    assert sample.stdout == "First" + text + "\n"

    exprs = 'prompt=["First"];max_new_tokens=6;beam_width=4;num_return=2'
    beams = saved_model_cli(version_dir, "beam_search", str(tmp_path / "beam"), input_exprs=exprs)
    best = tmp_path / "best.jsonl"
    sample = run_script(
        "sample.py", version_dir, "--prompt", "First", "--beam-width", "4", "--num-return", "2", "--num-tokens", "6",
        "--out", best,
    )  # fmt: skip
    assert sample.returncode == 0, sample.stderr
    expected = [json.loads(line) for line in best.read_text().splitlines()]
    assert [t.decode() for t in beams["texts"][0]] == [e["continuation"] for e in expected]
    np.testing.assert_allclose(beams["scores"][0], [e["score"] for e in expected], atol=1e-4)


# Requests a TF Serving client can send, found by probing the signatures. Each must end in an
# InvalidArgument naming the argument, quickly and within bounded memory, with the server alive.
GENERATE_ABUSE = [
    ({"max_new_tokens": 2**31 - 1}, "max_new_tokens"),
    ({"max_new_tokens": 10**9}, "max_new_tokens"),
    ({"max_new_tokens": 10**8}, "max_new_tokens"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": -3}, "max_new_tokens"),
    ({"prompts": ["x" * 10_000] + [""] * 1000}, "prompt"),
    ({"prompts": ["y" * 10_000_000]}, "prompt"),
    ({"prompts": []}, "prompt"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": -0.5}, "top_p"),
    ({"temperature": -1.0}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": 1e-30}, "temperature"),
    ({"top_k": -1}, "top_k"),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    version_dir = export(tmp_path_factory.mktemp("hostile"))
    with tf_serving_double(version_dir) as (rest, grpc_url, process):
        yield version_dir, rest, grpc_url, process


def post(rest, signature, inputs, timeout=60):
    """(HTTP status, parsed body) of a REST predict request."""
    body = json.dumps(serving.rest_body(signature, inputs)).encode()
    request = urllib.request.Request(rest + serving.predict_path("lm"), body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def peak_memory_mb(process):
    """The process's peak resident memory (VmHWM), in MB."""
    with open(f"/proc/{process.pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def assert_still_serving(rest, process):
    assert process.poll() is None, "the server died"
    status, body = post(rest, "generate", serving.generate_inputs(["ROMEO:"], 5))
    assert status == 200 and len(body["outputs"]["tokens"][0]) == 5


@pytest.mark.parametrize("arguments, named", GENERATE_ABUSE, ids=[repr(a)[:40] for a, _ in GENERATE_ABUSE])
def test_hostile_generate_request_is_refused_and_the_server_keeps_serving(server, arguments, named):
    _, rest, _, process = server
    assert_still_serving(rest, process)
    before = peak_memory_mb(process)
    prompts = arguments.pop("prompts", ["ROMEO:"])
    started = time.monotonic()
    status, body = post(rest, "generate", serving.generate_inputs(prompts, **({"max_new_tokens": 5} | arguments)))
    assert status == 400 and named in body["error"], body
    assert time.monotonic() - started < 30
    assert peak_memory_mb(process) < before + 300
    assert_still_serving(rest, process)


def test_hostile_step_requests_are_refused_and_the_server_keeps_serving(server):
    version_dir, rest, grpc_url, process = server
    meta = description(version_dir)
    vocabulary_size = meta["config"]["model"]["vocabulary_size"]
    good = step_feed(meta, [[1, 2]])
    cases = [
        (step_feed(meta, [[-1, 2]]), "tokens"),  # negative ids would index from the end
        (step_feed(meta, [[vocabulary_size]]), "tokens"),
        (good | {"h0_in": np.zeros((2, 16), np.float32)}, "h0_in"),  # a state batch that would broadcast
        (step_feed(meta, np.zeros((0, 3))), "tokens"),
        (step_feed(meta, np.zeros((1, 100_000))), "tokens"),
    ]
    for feed, named in cases:
        status, body = post(rest, "serving_default", feed)
        assert status == 400 and named in body["error"], body
        assert process.poll() is None
    # gRPC: the same refusal comes back as INVALID_ARGUMENT.
    from keraslm.runtime import TFServingBackend

    backend = TFServingBackend(version_dir, grpc_url, "lm")
    with pytest.raises(Exception, match="INVALID_ARGUMENT.*tokens must be ids"):
        backend._run(step_feed(meta, [[vocabulary_size]]))
    assert_still_serving(rest, process)


def test_generate_memory_grows_with_the_tokens_produced(server):
    """A request at the limits runs, and a short one does not pay for the maximum."""
    version_dir, rest, _, process = server
    limits = description(version_dir)["limits"]
    status, body = post(rest, "generate", serving.generate_inputs(["A"], limits["max_new_tokens"], seed=1))
    assert status == 200 and len(body["outputs"]["tokens"][0]) == limits["max_new_tokens"]
    longest = "B" * limits["max_prompt_tokens"]
    status, _ = post(rest, "generate", serving.generate_inputs([longest] * 2, 5))
    assert status == 200
    assert_still_serving(rest, process)


ONNX_ABUSE = """
import sys
import numpy as np
from keraslm.errors import UsageError
from keraslm.runtime import open_backend
backend = open_backend(sys.argv[1], int8=sys.argv[2] == "int8")
size = len(backend.vocab)
for tokens, batch in (([[1, -1]], 1), ([[size]], 1), (np.zeros((0, 3), np.int32), 0), ([[1, 2]], 2)):
    try:
        backend.step(tokens, backend.initial_state(batch))
    except UsageError as e:
        print(e)
    else:
        print("accepted", tokens)
"""


@pytest.mark.parametrize("int8", ["float", "int8"])
def test_onnx_path_refuses_what_would_abort_onnx_runtime(server, int8):
    version_dir, *_ = server
    # In a process of its own: ONNX Runtime's LSTM kernel aborts the process on an empty batch.
    result = subprocess.run(
        [sys.executable, "-c", ONNX_ABUSE, version_dir, int8],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 4 and not any(line.startswith("accepted") for line in lines), lines
    assert "tokens must be integer ids" in lines[0] and "tokens must be integer ids" in lines[1]
    assert "non-empty" in lines[2] and "state h0_in must have shape" in lines[3]


def test_sample_in_graph_beyond_the_limit_is_one_line(server):
    version_dir, *_ = server
    result = run_script("sample.py", version_dir, "--backend", "savedmodel", "--in-graph", "--num-tokens", "5000")
    lines = error_lines(result.stderr)
    assert result.returncode == 2 and len(lines) == 1 and "max_new_tokens" in lines[0], result.stderr
