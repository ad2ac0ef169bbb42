"""An export runs through TensorFlow's C API, driven by a client written in C.

tests/c_api/run_signature.c loads the SavedModel with TF_LoadSessionFromSavedModel -- the C++
SavedModel loader TF Serving links -- and runs one request read from stdin (its header documents
the line protocol). No Python and no tf.function tracing sit between the export and the session, so
these tests show what a TF Serving process would compute. The C program knows tensor names only:
the tests read the signature_def here and map logical names to tensor names for it.
"""

import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path
from urllib.parse import unquote_to_bytes

import numpy as np
import onnxruntime
import pytest
import tensorflow as tf
from conftest import make_run, step_feed
from tensorflow.core.protobuf import saved_model_pb2

import keraslm
from keraslm.export import export_run
from keraslm.serving import beam_search_inputs

SOURCE = Path(__file__).resolve().parent / "c_api" / "run_signature.c"
TOLERANCE = 1e-4
DTYPE_WORDS = {np.dtype(np.int32): "int32", np.dtype(np.int64): "int64", np.dtype(np.float32): "float"}
NUMPY_DTYPES = {"int32": np.int32, "int64": np.int64, "float": np.float32, "string": object}
MODELS = {"lstm-2-char": ("lstm", 2, "char"), "gru-2-word": ("gru", 2, "word")}
PROMPTS = {"char": ["ROMEO:\nWhat say", "to be, or"], "word": ["the city of", "in the"]}


@pytest.fixture(scope="module")
def c_client(tmp_path_factory):
    """run_signature.c compiled against the C API that ships in the tensorflow wheel."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.fail("gcc is not on PATH: it is needed to build tests/c_api/run_signature.c")
    tf_dir = Path(importlib.util.find_spec("tensorflow").submodule_search_locations[0])
    needed = [
        tf_dir / "libtensorflow_cc.so.2",
        tf_dir / "libtensorflow_framework.so.2",
        tf_dir / "include/tensorflow/c",
    ]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        pytest.fail(f"the tensorflow wheel lacks its C API: missing {missing}")
    binary = tmp_path_factory.mktemp("c_api") / "run_signature"
    command = [
        gcc, "-std=c11", "-O1", "-Wall", "-Wextra", "-Werror", "-isystem", str(tf_dir / "include"),
        "-o", str(binary), str(SOURCE),
        f"-L{tf_dir}", "-l:libtensorflow_cc.so.2", "-l:libtensorflow_framework.so.2", f"-Wl,-rpath,{tf_dir}",
    ]  # fmt: skip
    built = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, f"compiling {SOURCE.name} failed:\n{built.stderr}"
    return binary


@pytest.fixture(scope="module", params=list(MODELS))
def export(request, tmp_path_factory):
    """(version_dir, keraslm.json) of a fresh export of a tiny trained model."""
    base = tmp_path_factory.mktemp(request.param)
    version_dir, _ = export_run(str(make_run(base, *MODELS[request.param])), out=str(base / "models"), name="lm")
    with open(os.path.join(version_dir, "assets.extra", "keraslm.json"), encoding="utf-8") as f:
        return version_dir, json.load(f)


def signature_tensors(export_dir, name):
    """({input name: tensor name}, {output name: tensor name}) of a signature in saved_model.pb."""
    saved_model = saved_model_pb2.SavedModel()
    saved_model.ParseFromString(Path(export_dir, "saved_model.pb").read_bytes())
    signature = saved_model.meta_graphs[0].signature_def[name]
    return {k: v.name for k, v in signature.inputs.items()}, {k: v.name for k, v in signature.outputs.items()}


def encode_string(value):
    """run_signature's string encoding: percent-escape bytes outside 0x21..0x7E and '%'; "" is "%"."""
    return "".join(chr(b) if 0x21 <= b <= 0x7E and b != 0x25 else f"%{b:02X}" for b in value) or "%"


def decode_string(word):
    return b"" if word == "%" else unquote_to_bytes(word)


def request_text(feeds, fetches):
    """The stdin of run_signature for {tensor name: array} and [tensor name]."""
    lines = []
    for name, value in feeds.items():
        array = np.asarray(value)
        if array.dtype.kind in "SUO":
            dtype, words = "string", [encode_string(v if isinstance(v, bytes) else v.encode()) for v in array.flat]
        else:
            dtype, words = DTYPE_WORDS[array.dtype], [repr(v) for v in array.ravel().tolist()]
        dims = ",".join(map(str, array.shape)) or "-"
        lines.append(" ".join(["input", name, dtype, dims, *words]))
    lines += [f"fetch {name}" for name in fetches]
    return "\n".join(lines) + "\n"


def run_request(c_client, export_dir, feeds, fetches):
    """Run the C client on one request; return the CompletedProcess."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    text = request_text(feeds, fetches)
    return subprocess.run(
        [str(c_client), str(export_dir)], input=text, capture_output=True, text=True, env=env, timeout=120
    )


def parse_tensor(line):
    """(tensor name, array) from one output line of run_signature."""
    name, dtype, dims, *words = line.split(" ")
    shape = () if dims == "-" else tuple(int(d) for d in dims.split(","))
    if dtype == "string":
        values = [decode_string(w) for w in words]
    else:
        values = [float(w) if dtype == "float" else int(w) for w in words]
    array = np.empty(len(values), dtype=NUMPY_DTYPES[dtype])
    array[:] = values
    return name, array.reshape(shape)


def run_c(c_client, export_dir, feeds, fetches):
    """{tensor name: array} of `fetches` after feeding {tensor name: array}, through the C API."""
    done = run_request(c_client, export_dir, feeds, fetches)
    assert done.returncode == 0, f"run_signature exited {done.returncode}:\n{done.stderr}"
    return dict(parse_tensor(line) for line in done.stdout.splitlines())


def error_messages(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def random_step_feed(description, batch_size=2, length=7, seed=0):
    """{input name: array} for serving_default: random tokens and random (nonzero) states."""
    vocabulary_size = description["config"]["model"]["vocabulary_size"]
    tokens = np.random.default_rng(seed).integers(0, vocabulary_size, (batch_size, length), dtype=np.int32)
    return step_feed(description, tokens, seed)


def test_serving_default_through_the_c_api_equals_onnx_runtime(c_client, export):
    version_dir, description = export
    inputs, outputs = signature_tensors(version_dir, "serving_default")
    feed = random_step_feed(description)
    got = run_c(c_client, version_dir, {inputs[k]: v for k, v in feed.items()}, list(outputs.values()))

    session = onnxruntime.InferenceSession(os.path.join(version_dir, "assets.extra", "model.onnx"))
    names = [o.name for o in session.get_outputs()]
    expected = dict(zip(names, session.run(None, feed), strict=True))
    assert set(expected) == set(outputs)
    for name, tensor in outputs.items():
        assert got[tensor].shape == expected[name].shape, name
        gap = float(np.max(np.abs(got[tensor] - expected[name])))
        assert gap <= TOLERANCE, f"{name}: max |C API - ONNX Runtime| = {gap}"


def test_greedy_generate_through_the_c_api_equals_the_python_session_loader(c_client, export):
    version_dir, description = export
    prompts = PROMPTS[description["config"]["data"]["level"]]
    feed = {
        "prompt": np.array([p.encode() for p in prompts], dtype=object),
        "max_new_tokens": np.int32(24),
        "temperature": np.float32(0.0),
        "top_k": np.int32(0),
        "top_p": np.float32(1.0),
        "seed": np.int64(0),
    }
    inputs, outputs = signature_tensors(version_dir, "generate")
    got = run_c(c_client, version_dir, {inputs[k]: v for k, v in feed.items()}, list(outputs.values()))

    with tf.compat.v1.Session(graph=tf.Graph()) as session:
        tf.compat.v1.saved_model.loader.load(session, ["serve"], version_dir)
        expected = session.run(outputs, {inputs[k]: v for k, v in feed.items()})
    assert got[outputs["text"]].tolist() == expected["text"].tolist()
    assert len(expected["text"][0]) > 0
    np.testing.assert_array_equal(got[outputs["tokens"]], expected["tokens"])


def test_beam_search_through_the_c_api_equals_sample_pys_beam_search(c_client, export):
    version_dir, description = export
    prompts = PROMPTS[description["config"]["data"]["level"]]
    inputs, outputs = signature_tensors(version_dir, "beam_search")
    feed = beam_search_inputs([p.encode() for p in prompts], max_new_tokens=8, beam_width=5, num_return=3)
    got = run_c(c_client, version_dir, {inputs[k]: v for k, v in feed.items()}, list(outputs.values()))

    generator = keraslm.load(version_dir, backend="onnx")  # what sample.py --beam-width runs
    for row, prompt in enumerate(prompts):
        expected = generator.beam_search(prompt, num_tokens=8, beam_width=5, num_return=3)
        assert [t.decode() for t in got[outputs["texts"]][row]] == [e["continuation"] for e in expected]
        np.testing.assert_array_equal(got[outputs["tokens"]][row], [e["tokens"] for e in expected])
        np.testing.assert_allclose(got[outputs["scores"]][row], [e["score"] for e in expected], atol=TOLERANCE)


def test_an_out_of_vocabulary_token_is_a_clean_invalid_argument(c_client, export):
    version_dir, description = export
    inputs, outputs = signature_tensors(version_dir, "serving_default")
    feed = random_step_feed(description, batch_size=1, length=3)
    fetches = [outputs["logits"]]
    # The same request with in-range tokens runs: the error below comes from the run, not the load.
    assert run_request(c_client, version_dir, {inputs[k]: v for k, v in feed.items()}, fetches).returncode == 0

    feed["tokens"][0, 1] = description["config"]["model"]["vocabulary_size"]
    done = run_request(c_client, version_dir, {inputs[k]: v for k, v in feed.items()}, fetches)
    assert done.returncode == 1, f"expected exit 1 (a clean error), got {done.returncode}:\n{done.stderr}"
    assert done.stdout == ""
    errors = error_messages(done.stderr)
    assert len(errors) == 1 and errors[0].startswith("error: INVALID_ARGUMENT: "), done.stderr


def test_inputs_of_another_rank_are_a_clean_invalid_argument(c_client, export):
    """TF Serving feeds a tensor with the shape the client sent, whatever the signature declares;
    every such request must end in an error, not a crash."""
    version_dir, description = export
    step_inputs, step_outputs = signature_tensors(version_dir, "serving_default")
    generate_inputs, generate_outputs = signature_tensors(version_dir, "generate")
    step = random_step_feed(description, batch_size=1, length=3)
    request = {
        "prompt": np.array([b"ab"], dtype=object),
        "max_new_tokens": np.int32(4),
        "temperature": np.float32(0.0),
        "top_k": np.int32(0),
        "top_p": np.float32(1.0),
        "seed": np.int64(0),
    }
    cases = [
        ("serving_default", step | {"tokens": step["tokens"][0]}),
        ("serving_default", step | {"h0_in": step["h0_in"][None]}),
        ("generate", request | {"max_new_tokens": np.array([4, 5], np.int32)}),
        ("generate", request | {"temperature": np.array([0.5, 0.5], np.float32)}),
        ("generate", request | {"prompt": np.array(b"ab", dtype=object)}),
        ("generate", request | {"prompt": np.array([[b"ab"]], dtype=object)}),
    ]
    for signature, feed in cases:
        inputs, outputs = (
            (step_inputs, step_outputs)
            if signature == "serving_default"
            else (
                generate_inputs,
                generate_outputs,
            )
        )
        done = run_request(c_client, version_dir, {inputs[k]: v for k, v in feed.items()}, list(outputs.values()))
        errors = error_messages(done.stderr)
        assert done.returncode == 1 and len(errors) == 1, (signature, done.returncode, done.stderr)
        assert errors[0].startswith("error: INVALID_ARGUMENT: "), (signature, errors)
