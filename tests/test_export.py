"""export.py: the SavedModel and ONNX artifacts, their signatures, parity and atomic versions."""

import json
import os

import numpy as np
import onnx
import onnxruntime
import pytest
import tensorflow as tf
import tf2onnx
from conftest import error_lines, make_run, run_script

from keraslm.cli import message
from keraslm.errors import UsageError
from keraslm.export import export_run
from keraslm.export.signatures import ServingFunctions
from keraslm.limits import ServingLimits
from keraslm.model import keras_step
from keraslm.runs import load_run
from keraslm.sampling import GreedySampler, generate
from keraslm.serving import generate_inputs
from keraslm.session_loader import SessionModel


@pytest.mark.parametrize("level", ["char", "word"])
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh", "rnn_relu"])
def test_export_reloads_with_parity(tmp_path, cell, num_layers, level):
    run_dir = make_run(tmp_path, cell, num_layers, level)
    version_dir, report = export_run(str(run_dir), out=str(tmp_path / "models"), name="lm")
    assert version_dir == str(tmp_path / "models" / "lm" / "1")
    assert max(report["parity"].values()) <= 1e-4

    description = json.loads((tmp_path / "models/lm/1/assets.extra/keraslm.json").read_text())
    kinds = ["h", "c"] if cell == "lstm" else ["h"]
    names = [f"{k}{i}" for i in range(num_layers) for k in kinds]
    assert [s["name"] for s in description["states"]] == names
    assert description["vocabulary"]["level"] == level

    # ONNX Runtime: the contract's names, dynamic batch and time, zero initial state.
    session = onnxruntime.InferenceSession(os.path.join(version_dir, "assets.extra", "model.onnx"))
    assert sorted(i.name for i in session.get_inputs()) == sorted(["tokens", *(f"{n}_in" for n in names)])
    assert sorted(o.name for o in session.get_outputs()) == sorted(["logits", *(f"{n}_out" for n in names)])
    feed = {
        "tokens": np.array([[1, 2, 3, 4, 5]] * 3, np.int32),
        **{f"{n}_in": np.zeros((3, 16), np.float32) for n in names},
    }
    onnx_outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed), strict=True))
    logits = onnx_outputs["logits"]
    assert logits.shape == (3, 5, description["config"]["model"]["vocabulary_size"])

    # The SavedModel as TF Serving loads it (graph-mode session, signatures by tensor names).
    saved = SessionModel(version_dir).run("serving_default", feed)
    for name, value in onnx_outputs.items():
        np.testing.assert_allclose(saved[name], value, atol=1e-4)

    # The graph runs the cell as one fused ONNX operator, and agrees with an independent
    # conversion of the same step function by tf2onnx (which leaves GRU and RNN as a Loop).
    fused = {"lstm": "LSTM", "gru": "GRU"}.get(cell, "RNN")
    assert fused in report["onnx_ops"] and "Loop" not in report["onnx_ops"]

    # The int8 twin: LSTM weights run in ONNX Runtime's int8 LSTM kernel, the projection as an
    # integer MatMul; its next-token distributions stay close to the float model's.
    int8_path = os.path.join(version_dir, "assets.extra", description["onnx_int8"]["path"])
    int8_ops = {node.op_type for node in onnx.load(int8_path).graph.node}
    assert "MatMulInteger" in int8_ops and (cell != "lstm" or "DynamicQuantizeLSTM" in int8_ops)
    assert report["int8"]["int8_kl_vs_float"] <= 1e-2
    int8_logits = onnxruntime.InferenceSession(int8_path).run(["logits"], feed)[0]
    assert int8_logits.shape == logits.shape and 0 < np.max(np.abs(int8_logits - logits)) < 0.1
    config, vocab, twin = load_run(str(run_dir), use_cudnn=False)
    module = ServingFunctions(config, vocab, twin, ServingLimits.default(len(vocab)))
    reference, _ = tf2onnx.convert.from_function(module.step, input_signature=module.step.input_signature, opset=17)
    reference_session = onnxruntime.InferenceSession(reference.SerializeToString())
    np.testing.assert_allclose(reference_session.run(["logits"], feed)[0], logits, atol=1e-5)

    # The generate signature steps one token through the cells directly; greedy, it must follow
    # the model's own argmax continuation.
    separator = "" if level == "char" else " "
    prompt = separator.join(vocab.tokens[5:9])
    produced = module.generate(
        tf.constant([prompt]),
        tf.constant(8),
        tf.constant(0.0),
        tf.constant(0),
        tf.constant(1.0),
        tf.constant(0, tf.int64),
    )
    step, state = keras_step(twin, config.model, batch_size=1)
    expected = generate(step, vocab.encode(prompt)[None, :], state, 8, GreedySampler(), None)
    np.testing.assert_array_equal(produced["tokens"].numpy(), expected)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    base = tmp_path_factory.mktemp("export")
    run_dir = make_run(base, "lstm", 2, "char")
    version_dir, _ = export_run(str(run_dir), out=str(base / "models"), name="lm")
    config, vocab, twin = load_run(str(run_dir))
    return SessionModel(version_dir), config, vocab, twin


def call_generate(model, prompts, max_new_tokens=12, temperature=0.8, top_k=0, top_p=1.0, seed=1):
    """The generate signature as TF Serving runs it."""
    out = model.run("generate", generate_inputs(prompts, max_new_tokens, temperature, top_k, top_p, seed))
    return [t.decode() for t in out["text"]], out["tokens"]


def test_generate_same_seed_same_text_and_seeds_differ(exported):
    signature, *_ = exported
    a, _ = call_generate(signature, ["ROMEO:"], seed=3)
    b, _ = call_generate(signature, ["ROMEO:"], seed=3)
    c, _ = call_generate(signature, ["ROMEO:"], seed=4)
    assert a == b and a != c


def test_generate_greedy_is_the_argmax_continuation(exported):
    signature, config, vocab, twin = exported
    texts, tokens = call_generate(signature, ["First Citizen:"], temperature=0.0)
    step, state = keras_step(twin, config.model, batch_size=1)
    expected = generate(step, vocab.encode("First Citizen:")[None, :], state, 12, GreedySampler(), None)
    np.testing.assert_array_equal(tokens, expected)
    assert texts[0] == vocab.decode(expected[0])


def test_generate_batches_prompts_of_different_lengths_and_the_empty_prompt(exported):
    signature, *_ = exported
    prompts = ["To be, or not", "", "A"]
    texts, tokens = call_generate(signature, prompts, temperature=0.0)
    assert tokens.shape == (3, 12)
    for i, prompt in enumerate(prompts):  # each row as if generated alone
        alone, alone_tokens = call_generate(signature, [prompt], temperature=0.0)
        np.testing.assert_array_equal(tokens[i], alone_tokens[0])
        assert texts[i] == alone[0]


def test_generate_only_emits_vocabulary_tokens(exported):
    signature, _, vocab, _ = exported
    texts, tokens = call_generate(signature, ["x", "yz"], temperature=1.5, top_k=5, max_new_tokens=30)
    assert tokens.min() >= 0 and tokens.max() < len(vocab)
    assert all(set(t) <= set(vocab.tokens) for t in texts)
    texts, _ = call_generate(signature, ["x"], temperature=1.0, top_p=0.5, max_new_tokens=5)
    assert len(texts[0]) == 5


def test_generate_top_k_1_and_a_tiny_nucleus_are_greedy(exported):
    signature, *_ = exported
    _, greedy = call_generate(signature, ["ROMEO:"], temperature=0.0, max_new_tokens=20)
    _, top_1 = call_generate(signature, ["ROMEO:"], temperature=1.0, top_k=1, max_new_tokens=20)
    _, nucleus = call_generate(signature, ["ROMEO:"], temperature=1.0, top_p=1e-6, max_new_tokens=20)
    np.testing.assert_array_equal(top_1, greedy)
    np.testing.assert_array_equal(nucleus, greedy)


def test_existing_version_is_never_overwritten(tmp_path):
    run_dir = make_run(tmp_path)
    out = str(tmp_path / "models")
    export_run(str(run_dir), out=out, name="lm")
    stamp = os.path.getmtime(tmp_path / "models/lm/1/saved_model.pb")
    with pytest.raises(UsageError, match="pass overwrite to replace it or omit version") as refused:
        export_run(str(run_dir), out=out, name="lm", version=1)
    assert "pass --overwrite to replace it or omit --version" in message(refused.value)
    assert os.path.getmtime(tmp_path / "models/lm/1/saved_model.pb") == stamp
    version_dir, _ = export_run(str(run_dir), out=out, name="lm")
    assert version_dir.endswith("/2")
    export_run(str(run_dir), out=out, name="lm", version=1, overwrite=True)
    assert sorted(os.listdir(tmp_path / "models/lm")) == ["1", "2"]


def test_failure_midway_leaves_no_partial_version(tmp_path, monkeypatch):
    import keraslm.export

    run_dir = make_run(tmp_path)

    def broken(*args, **kwargs):
        raise UsageError("parity check failed: simulated")

    monkeypatch.setattr(keraslm.export, "check_parity", broken)
    with pytest.raises(UsageError):
        export_run(str(run_dir), out=str(tmp_path / "models"), name="lm")
    assert os.listdir(tmp_path / "models/lm") == []


SMALL_LIMITS = {
    "tiny": {"max_new_tokens": 1, "max_prompt_tokens": 1, "max_batch_tokens": 1, "max_beam_width": 1},
    "keyboard": {"max_new_tokens": 3, "max_prompt_tokens": 2, "max_batch_tokens": 10, "max_beam_width": 2},
}


@pytest.mark.parametrize("level", ["char", "word"])
@pytest.mark.parametrize("limits", SMALL_LIMITS, ids=str)
def test_an_export_with_small_limits_is_checked_within_them(tmp_path, limits, level):
    """The checks' requests fit the export's own limits: small limits are checked, not refused."""
    run_dir = make_run(tmp_path, "lstm", 1, level)
    version_dir, report = export_run(str(run_dir), out=str(tmp_path / "models"), name="lm", limits=SMALL_LIMITS[limits])
    assert {"generate_greedy_gap", "beam_search_score_gap", "carried_vs_whole_sequence"} <= set(report["parity"])
    assert max(report["parity"].values()) <= 1e-4
    description = json.loads((tmp_path / "models/lm/1/assets.extra/keraslm.json").read_text())
    assert SMALL_LIMITS[limits].items() <= description["limits"].items()


@pytest.mark.parametrize("damage", ["scores", "ranks"])
def test_a_beam_search_that_disagrees_with_the_step_is_not_published(tmp_path, monkeypatch, damage):
    run_dir = make_run(tmp_path)
    served_run = SessionModel.run

    def damaged(self, signature, inputs):
        out = served_run(self, signature, inputs)
        if signature == "beam_search" and damage == "scores":
            out["scores"] = out["scores"] - 1e-3
        elif signature == "beam_search":
            out["tokens"] = out["tokens"][:, ::-1]  # each rank holds another rank's continuation
        return out

    monkeypatch.setattr(SessionModel, "run", damaged)
    with pytest.raises(UsageError, match="beam_search check failed"):
        export_run(str(run_dir), out=str(tmp_path / "models"), name="lm")
    assert os.listdir(tmp_path / "models/lm") == []


def test_export_script(tmp_path):
    run_dir = make_run(tmp_path)
    result = run_script("export.py", run_dir, "--out", tmp_path / "models", "--check")
    assert result.returncode == 0, result.stderr
    assert error_lines(result.stderr) == []  # no library's advice or warning reaches the user
    assert "parity onnx_vs_keras" in result.stdout and "LSTM" in result.stdout
    assert "parity beam_search_score_gap" in result.stdout
    assert "parity litert_vs_onnx" in result.stdout and "model.tflite" in result.stdout
    assert "model.int8.onnx: mean KL" in result.stdout and "model.int8.tflite: mean KL" in result.stdout
    bad = run_script("export.py", tmp_path / "models", "--out", tmp_path / "models")
    assert bad.returncode == 2 and len(error_lines(bad.stderr)) == 1


def test_mixed_precision_checkpoint_exports_for_cpu_without_cudnn_ops(tmp_path):
    from tensorflow.core.protobuf import saved_model_pb2

    run_dir = make_run(tmp_path, "gru", 2, "char", mixed_precision=True)
    version_dir, report = export_run(str(run_dir), out=str(tmp_path / "models"), name="lm")
    assert max(report["parity"].values()) <= 1e-4
    saved = saved_model_pb2.SavedModel.FromString(open(os.path.join(version_dir, "saved_model.pb"), "rb").read())
    graph = saved.meta_graphs[0].graph_def
    ops = {node.op for node in graph.node} | {n.op for f in graph.library.function for n in f.node_def}
    assert "While" in ops or "StatelessWhile" in ops  # the recurrent loop is there …
    assert not {op for op in ops if op.startswith("Cudnn")}  # … and no cuDNN kernel
    assert json.loads((tmp_path / "models/lm/1/assets.extra/keraslm.json").read_text())["config"]["train"][
        "mixed_precision"
    ]
