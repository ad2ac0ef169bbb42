"""model.tflite and the litert backend: the step contract of model.onnx, its numbers to 1e-4 for
every cell, the onnx backend's text, the int8 twin's KL check, refused exports, no TensorFlow."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
from ai_edge_litert.interpreter import Interpreter
from conftest import ROOT, make_run, run_script, step_feed

from keraslm import artifacts
from keraslm.errors import UsageError
from keraslm.export import export_run
from keraslm.export.int8 import INT8_KL_TOLERANCE
from keraslm.generator import Generator
from keraslm.runtime import open_backend

CELLS = ["lstm", "gru", "rnn_tanh", "rnn_relu"]
# Wide enough that every weight matrix has over 1,024 numbers, so the int8 model really is int8.
HIDDEN = 48


@pytest.fixture(scope="module", params=CELLS)
def exported(request, tmp_path_factory):
    """A 2-layer char model of each cell, trained for two windows and exported: (version_dir, report)."""
    base = tmp_path_factory.mktemp(f"litert-{request.param}")
    run_dir = make_run(base, request.param, num_layers=2, hidden_dim=HIDDEN)
    version_dir, report = export_run(str(run_dir), out=str(base / "models"), name="lm")
    return version_dir, report


def description(version_dir):
    with open(os.path.join(version_dir, artifacts.EXTRA, artifacts.DESCRIPTION), encoding="utf-8") as f:
        return json.load(f)


def test_model_tflite_is_model_onnx_for_every_cell(exported):
    version_dir, report = exported
    assert report["parity"]["litert_vs_onnx"] <= 1e-4
    extra = os.path.join(version_dir, artifacts.EXTRA)
    runner = Interpreter(model_path=os.path.join(extra, artifacts.LITERT)).get_signature_runner("serving_default")
    session = onnxruntime.InferenceSession(os.path.join(extra, artifacts.ONNX), providers=["CPUExecutionProvider"])
    assert set(runner.get_input_details()) == {i.name for i in session.get_inputs()}
    assert set(runner.get_output_details()) == {o.name for o in session.get_outputs()}
    # Batch and time above 1, random states; then another shape on the same runner (it resizes).
    for seed, shape in ((0, (3, 6)), (1, (1, 1)), (2, (2, 9))):
        size = description(version_dir)["config"]["model"]["vocabulary_size"]
        tokens = np.random.default_rng(seed).integers(0, size, shape)
        feed = step_feed(description(version_dir), tokens, seed)
        litert = runner(**feed)
        onnx = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed), strict=True))
        for name, value in onnx.items():
            assert litert[name].shape == value.shape, name
            assert np.max(np.abs(litert[name] - value)) <= 1e-4, name


def test_litert_backend_gives_the_onnx_backends_text(exported):
    version_dir, _ = exported
    onnx, litert = (Generator(open_backend(version_dir, name)) for name in ("onnx", "litert"))
    greedy = onnx.generate("Th", 30, temperature=0)
    assert litert.generate("Th", 30, temperature=0) == greedy
    assert len(greedy[0]) > 2
    sampled = onnx.generate("A", 30, temperature=0.9, seed=7, num_samples=2)
    assert litert.generate("A", 30, temperature=0.9, seed=7, num_samples=2) == sampled
    assert sampled != litert.generate("A", 30, temperature=0.9, seed=8, num_samples=2)


def test_int8_tflite_is_quantized_and_within_the_kl_tolerance(exported):
    version_dir, report = exported
    figures = report["litert_int8"]
    assert 0 < figures["int8_kl_vs_float"] <= INT8_KL_TOLERANCE
    assert 0 < figures["int8_max_logit_diff"] < 0.1
    sizes = report["sizes"]
    assert sizes[artifacts.INT8_LITERT] < 0.6 * sizes[artifacts.LITERT]
    int8 = open_backend(version_dir, "litert", int8=True)
    assert int8.source.endswith(artifacts.INT8_LITERT)
    float_logits, _ = open_backend(version_dir, "litert").step([[1, 2, 3]], int8.initial_state(1))
    int8_logits, _ = int8.step([[1, 2, 3]], int8.initial_state(1))
    assert 0 < np.max(np.abs(int8_logits - float_logits)) < 0.1


def test_litert_backend_refuses_bad_input_clearly(exported):
    version_dir, _ = exported
    backend = open_backend(version_dir, "litert")
    state = backend.initial_state(2)
    with pytest.raises(UsageError, match="non-empty"):
        backend.step(np.zeros((0, 3), np.int32), backend.initial_state(0))
    with pytest.raises(UsageError, match="must have shape"):
        backend.step([[1], [2]], {**state, backend.states[0]["input"]: np.zeros((2, HIDDEN + 1), np.float32)})
    with pytest.raises(UsageError, match="must have shape"):
        backend.step([[1], [2]], dict(list(state.items())[1:]))
    with pytest.raises(UsageError, match="integer ids"):
        backend.step([[1, -1]], backend.initial_state(1))


@pytest.fixture(scope="module")
def lstm_export(tmp_path_factory):
    base = tmp_path_factory.mktemp("litert-refusals")
    run_dir = make_run(base, "lstm", num_layers=2)
    version_dir, _ = export_run(str(run_dir), out=str(base / "models"), name="lm")
    return run_dir, version_dir


def test_an_export_whose_tflite_disagrees_with_onnx_is_refused(lstm_export, tmp_path, monkeypatch):
    """A real wrong model: model.tflite converted from other weights, run by the real LiteRT."""
    import keraslm.export
    from keraslm.runs import load_run

    run_dir, _ = lstm_export
    write = keraslm.export.write_litert

    def from_other_weights(twin, model_config, path, int8_path):
        _, _, other = load_run(str(run_dir), use_cudnn=False)
        other.set_weights([w * 1.01 for w in twin.get_weights()])
        write(other, model_config, path, int8_path)

    monkeypatch.setattr(keraslm.export, "write_litert", from_other_weights)
    with pytest.raises(UsageError, match=r"parity check failed: litert_vs_onnx max \|Δ\|"):
        export_run(str(run_dir), out=str(tmp_path / "models"), name="lm")
    assert os.listdir(tmp_path / "models" / "lm") == []


def test_an_export_whose_tflite_is_damaged_is_refused(lstm_export, tmp_path, monkeypatch):
    import keraslm.export

    run_dir, _ = lstm_export
    write = keraslm.export.write_litert

    def truncated(twin, model_config, path, int8_path):
        write(twin, model_config, path, int8_path)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)

    monkeypatch.setattr(keraslm.export, "write_litert", truncated)
    with pytest.raises(UsageError, match="cannot be run by LiteRT"):
        export_run(str(run_dir), out=str(tmp_path / "models"), name="lm")
    assert os.listdir(tmp_path / "models" / "lm") == []


def test_sample_py_litert_gives_onnx_text_and_a_missing_model_tflite_is_a_one_line_error(lstm_export, tmp_path):
    _, version_dir = lstm_export
    copy = tmp_path / "old"
    subprocess.run(["cp", "-r", version_dir, copy], check=True)
    os.remove(copy / artifacts.EXTRA / artifacts.LITERT)
    result = run_script("sample.py", copy, "--backend", "litert", "--num-tokens", "5")
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("sample.py")]
    assert len(lines) == 1 and "has no model.tflite" in lines[0] and "export again" in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    litert, onnx = (
        run_script("sample.py", version_dir, "--backend", name, "--prompt", "Th", "--greedy", "--num-tokens", "20")
        for name in ("litert", "onnx")
    )
    assert litert.returncode == 0 and onnx.returncode == 0, litert.stderr + onnx.stderr
    assert litert.stdout == onnx.stdout and litert.stdout.startswith("Th")
    # LiteRT's native "INFO: Created TensorFlow Lite XNNPACK delegate" line does not reach the user.
    assert "XNNPACK" not in litert.stderr, litert.stderr


def test_a_damaged_or_foreign_model_tflite_is_refused_when_opened(lstm_export, tmp_path):
    _, version_dir = lstm_export
    damaged = tmp_path / "damaged"
    subprocess.run(["cp", "-r", version_dir, damaged], check=True)
    path = damaged / artifacts.EXTRA / artifacts.LITERT
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(UsageError, match="cannot be loaded.*export the run again"):
        open_backend(str(damaged), "litert")
    # Another model's valid file: a one-layer GRU has no c0_in, h1_in, c1_in.
    gru_version, _ = export_run(str(make_run(tmp_path / "gru", "gru")), out=str(tmp_path / "models"), name="gru")
    path.write_bytes((Path(gru_version) / artifacts.EXTRA / artifacts.LITERT).read_bytes())
    with pytest.raises(UsageError, match="does not match keraslm.json"):
        open_backend(str(damaged), "litert")


def test_the_litert_backend_imports_no_tensorflow(lstm_export):
    _, version_dir = lstm_export
    probe = (
        "import sys, keraslm\n"
        "text = keraslm.load(sys.argv[1], backend='litert').generate('Th', 10, temperature=0)[0]\n"
        "heavy = sorted(m for m in ('tensorflow', 'keras', 'onnx') if m in sys.modules)\n"
        "print(repr(text), heavy)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, version_dir], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip().endswith("[]"), result.stdout
    assert result.stdout.startswith("'Th")
