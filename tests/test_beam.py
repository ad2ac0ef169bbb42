"""Beam search (keraslm.beam, sample.py --beam-width, the SavedModel's beam_search signature) on a
model small enough to enumerate: a vocabulary of 8 words, so every continuation of 3 tokens (512)
can be scored and ranked by brute force, on every backend."""

import itertools
import json

import numpy as np
import pytest
from conftest import assert_one_line_refusal, run_command, shakespeare, tf_serving_double, wikitext_layout

from keraslm import serving
from keraslm.beam import beam_search, length_penalty, log_softmax
from keraslm.errors import ArgumentError, UsageError
from keraslm.generator import Generator
from keraslm.runtime import BACKENDS, open_backend
from keraslm.sampling import GreedySampler, generate

PROMPT = "the king"
LENGTH = 3


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(run_dir, version_dir) of a 2-layer LSTM over a vocabulary of 8 words.

    Two windows of training leave its distributions nearly uniform, so the continuations' scores
    would lie within 1e-5 of each other. A larger embedding, output kernel and output bias make
    them differ by 1e-4 or more (far above the backends' float32 differences), the bias outside
    what int8 quantises (LSTM and MatMul), so the export's int8 check still passes.
    """
    import keras

    from keraslm.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from keraslm.export import export_run
    from keraslm.training import train

    base = tmp_path_factory.mktemp("beam")
    corpus = base / "corpus.txt"
    corpus.write_text(wikitext_layout(shakespeare()[:40_000]), encoding="utf-8")
    config = RunConfig(
        model=ModelConfig(cell="lstm", num_layers=2, embedding_dim=8, hidden_dim=8, dropout=0.0, init="keras"),
        data=DataConfig(source=str(corpus), level="word", max_vocab=8),
        train=TrainConfig(batch_size=4, bptt=10, epochs=1, sample_tokens=0),
    )
    run_dir = base / "run"
    train(config, str(run_dir), dry_run=True, verbose=0)
    saved = keras.models.load_model(run_dir / "model.keras")
    weights = {w.path: w for w in saved.weights}
    weights["embedding/embeddings"].assign(weights["embedding/embeddings"].numpy() * 20)
    weights["logits/kernel"].assign(weights["logits/kernel"].numpy() * 6)
    weights["logits/bias"].assign(np.random.default_rng(0).normal(0, 1, 8).astype(np.float32))
    saved.save(run_dir / "model.keras")
    version_dir, _ = export_run(str(run_dir), out=str(base / "models"), name="lm")
    return run_dir, version_dir


@pytest.fixture(scope="module")
def server(model):
    """The export served by the TF Serving stand-in: its REST URL."""
    with tf_serving_double(model[1]) as (rest, _, _):
        yield rest


@pytest.fixture(scope="module")
def served(model):
    """The export loaded as TF Serving loads it (keraslm.session_loader)."""
    from keraslm.session_loader import SessionModel

    session = SessionModel(model[1])
    yield session
    session.close()


@pytest.fixture(params=BACKENDS)
def backend(request, model):
    """Every backend of keraslm.runtime (one added later is picked up here)."""
    run_dir, version_dir = model
    if request.param == "keras":
        return open_backend(str(run_dir), "keras")
    if request.param == "tf-serving":
        return open_backend(version_dir, "tf-serving", server=request.getfixturevalue("server"), model_name="lm")
    return open_backend(version_dir, request.param)


def brute_force(backend, prompt_ids, length=LENGTH):
    """Every continuation of `length` tokens [V^length, length] and its total log-probability,
    best first (ties: the lower sequence in lexicographic order)."""
    size = len(backend.vocab)
    sequences = np.array(list(itertools.product(range(size), repeat=length)), np.int32)
    rows = np.arange(len(sequences))
    logits, state = backend.step(np.repeat(prompt_ids[None], len(sequences), 0), backend.initial_state(len(rows)))
    scores = np.zeros(len(rows))
    for t in range(length):
        scores += log_softmax(logits[:, -1])[rows, sequences[:, t]]
        if t + 1 < length:
            logits, state = backend.step(sequences[:, t : t + 1], state)
    order = np.argsort(-scores, kind="stable")
    return sequences[order], scores[order]


def search(backend, width, num_return=1, length=LENGTH, **kwargs):
    ids = backend.vocab.encode(PROMPT)
    return beam_search(backend.step, ids, backend.initial_state(1), length, width, num_return, **kwargs)


def test_the_widest_beam_is_exact_and_no_beam_beats_brute_force(backend):
    size = len(backend.vocab)
    assert size == 8
    sequences, scores = brute_force(backend, backend.vocab.encode(PROMPT))
    # Far apart enough that float32 differences between batch sizes cannot reorder them.
    assert np.min(-np.diff(scores[: size * size + 1])) > 1e-5

    widest = search(backend, size * size, size * size)
    np.testing.assert_array_equal([h.tokens for h in widest], sequences[: size * size])
    np.testing.assert_allclose([h.score for h in widest], scores[: size * size], rtol=0, atol=1e-5)

    scored = {tuple(s): score for s, score in zip(sequences.tolist(), scores, strict=True)}
    for width in (1, 2, 3, 5, 8, 20, size * size - 1):
        found = search(backend, width, min(width, 4))
        assert found[0].score <= scores[0] + 1e-5
        assert [h.score for h in found] == sorted((h.score for h in found), reverse=True)
        for h in found:  # each reported score is the sequence's own, as brute force scores it
            assert h.score == pytest.approx(scored[tuple(h.tokens.tolist())], abs=1e-5)


def test_beam_width_one_is_greedy_decoding(backend):
    ids = backend.vocab.encode(PROMPT)
    greedy = generate(backend.step, ids[None], backend.initial_state(1), 12, GreedySampler(), None)[0]
    (found,) = search(backend, 1, length=12)
    np.testing.assert_array_equal(found.tokens, greedy)


def test_sample_script_beam_width_one_prints_the_greedy_text(model, tmp_path, capsys):
    _, version_dir = model
    common = [version_dir, "--prompt", PROMPT, "--num-tokens", "15"]
    code, greedy, _ = run_command("sample.py", [*common, "--greedy"], capsys)
    assert code == 0
    out = tmp_path / "beams.jsonl"
    code, printed, _ = run_command("sample.py", [*common, "--beam-width", "1", "--out", out], capsys)
    assert code == 0
    header, text = printed.splitlines()
    assert header.startswith("--- 1 of 1: log-probability -") and text + "\n" == greedy
    (line,) = out.read_text(encoding="utf-8").splitlines()
    assert json.loads(line)["text"] + "\n" == greedy


def test_sample_script_prints_and_writes_the_n_best(model, tmp_path, capsys):
    _, version_dir = model
    out = tmp_path / "beams.jsonl"
    argv = [version_dir, "--prompt", PROMPT, "--num-tokens", "3", "--beam-width", "64", "--num-return", "5"]
    code, printed, _ = run_command("sample.py", [*argv, "--out", out], capsys)
    assert code == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    backend = open_backend(version_dir, "onnx")
    sequences, scores = brute_force(backend, backend.vocab.encode(PROMPT))
    assert [r["rank"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["tokens"] for r in rows] == sequences[:5].tolist()
    np.testing.assert_allclose([r["score"] for r in rows], scores[:5], atol=1e-5)
    for r in rows:
        assert r["text"] == f"{PROMPT} {backend.vocab.decode(r['tokens'])}" and r["finished"] is False
        assert f"log-probability {r['score']:.4f} ---\n{r['text']}\n" in printed


class Bigram:
    """A step function over a fixed table of next-token log-probabilities (row = last token): a
    model whose every continuation, of any length, is easy to score by hand."""

    def __init__(self, table):
        self.logits = np.log(np.asarray(table, np.float64)).astype(np.float32)

    def step(self, tokens, state):
        assert len(state["h0_in"]) == len(tokens)  # the beams' state rows follow them
        return self.logits[np.asarray(tokens)], state

    def score(self, previous, tokens):
        log_probs = log_softmax(self.logits)
        return sum(log_probs[a, b] for a, b in zip([previous, *tokens[:-1]], tokens, strict=True))


# Token 0 is <eos>. From the prompt (token 1) <eos> is likely at once; after token 2 it is rare.
TABLE = [
    [0.25, 0.25, 0.25, 0.25],
    [0.40, 0.05, 0.50, 0.05],
    [0.01, 0.04, 0.90, 0.05],
    [0.30, 0.30, 0.20, 0.20],
]


def bigram_search(num_tokens, width, num_return, alpha=0.0, eos_id=0):
    model = Bigram(TABLE)
    return model, beam_search(
        model.step, [1], {"h0_in": np.zeros((1, 2), np.float32)}, num_tokens, width, num_return, alpha, eos_id
    )


def test_stop_at_eos_keeps_finished_hypotheses_and_ranks_them_with_the_length_penalty():
    model, found = bigram_search(num_tokens=6, width=3, num_return=3)
    assert found[0].finished and found[0].tokens.tolist() == [0]
    assert found[0].score == pytest.approx(np.log(0.40), abs=1e-6)
    for h in found:
        assert h.score == pytest.approx(model.score(1, h.tokens.tolist()), abs=1e-6)
        assert h.finished == (h.tokens[-1] == 0) and 0 not in h.tokens[:-1]
    # Every length-1..6 sequence that ends at its first <eos> or runs to 6 tokens, by brute force.
    every = [
        (model.score(1, list(s)), list(s))
        for n in range(1, 7)
        for s in itertools.product(range(4), repeat=n)
        if (s[-1] == 0 or n == 6) and 0 not in s[:-1]
    ]
    assert found[0].score == pytest.approx(max(every)[0], abs=1e-9)

    # A length penalty of 1 favours the long 2 2 2 … run (0.9 each) over stopping at once.
    _, penalised = bigram_search(num_tokens=6, width=3, num_return=3, alpha=1.0)
    assert penalised[0].tokens.tolist() == [2] * 6 and not penalised[0].finished
    for h in penalised:
        assert h.ranking_score == pytest.approx(h.score / length_penalty(len(h.tokens), 1.0))
    assert [h.ranking_score for h in penalised] == sorted((h.ranking_score for h in penalised), reverse=True)

    # Without stopping, <eos> is a token like any other: every hypothesis runs to 6 tokens.
    _, running = bigram_search(num_tokens=6, width=3, num_return=3, eos_id=None)
    assert all(len(h.tokens) == 6 and not h.finished for h in running)


def test_ties_go_to_the_better_beam_then_the_lower_id():
    uniform = Bigram(np.full((4, 4), 0.25))
    found = beam_search(uniform.step, [1], {"h0_in": np.zeros((1, 2), np.float32)}, 2, 16, 16)
    assert [h.tokens.tolist() for h in found] == [[a, b] for a in range(4) for b in range(4)]


def test_generator_beam_search_refuses_bad_settings(model):
    run_dir, version_dir = model
    generator = Generator(open_backend(version_dir, "onnx"))
    for kwargs, name in [
        ({"beam_width": 0}, "beam_width"),
        ({"beam_width": 2, "num_return": 3}, "num_return"),
        ({"num_tokens": 0}, "num_tokens"),
        ({"length_penalty": -0.5}, "length_penalty"),
        ({"length_penalty": float("nan")}, "length_penalty"),
    ]:
        with pytest.raises(ArgumentError) as error:
            generator.beam_search(PROMPT, **({"num_tokens": 3} | kwargs))
        assert error.value.name == name
    with pytest.raises(UsageError, match="memory"):
        generator.beam_search(PROMPT, num_tokens=3, beam_width=10**12)
    with pytest.raises(UsageError, match="memory"):
        generator.beam_search(PROMPT, num_tokens=10**13, beam_width=2)


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--beam-width", "2", "--temperature", "1.0"], ["--temperature is a sampling flag"]),
        (["--beam-width", "2", "--top-k", "3"], ["--top-k"]),
        (["--beam-width", "2", "--top-p", "0.9"], ["--top-p"]),
        (["--beam-width", "2", "--greedy"], ["--greedy"]),
        (["--beam-width", "2", "--stream"], ["--stream"]),
        (["--beam-width", "2", "--num-samples", "2"], ["--num-samples"]),
        (["--beam-width", "2", "--backend", "savedmodel", "--in-graph"], ["--in-graph"]),
        (["--beam-width", "2", "--num-return", "3"], ["--num-return must be at most --beam-width"]),
        (["--beam-width", "0"], ["--beam-width must be a positive integer"]),
        (["--beam-width", "2", "--length-penalty", "-1"], ["--length-penalty"]),
        (["--num-return", "2"], ["--num-return is a beam search flag", "--beam-width"]),
        (["--stop-at-eos"], ["--stop-at-eos", "--beam-width"]),
        (["--beam-width", "100000000000"], ["memory", "narrower beam"]),
        (["--beam-width", "2", "--num-tokens", "100000000000000"], ["memory"]),
    ],
)
def test_bad_beam_flags_are_one_line_and_exit_code_2(model, args, fragments, capsys):
    _, version_dir = model
    assert_one_line_refusal(run_command("sample.py", [version_dir, *args], capsys), *fragments)


def test_stop_at_eos_is_refused_at_char_level(tmp_path, capsys):
    from conftest import make_run

    run_dir = make_run(tmp_path, "gru", 1, "char", hidden_dim=4)
    outcome = run_command("sample.py", [run_dir, "--beam-width", "2", "--stop-at-eos", "--num-tokens", "2"], capsys)
    assert_one_line_refusal(outcome, "--stop-at-eos needs a word-level model")


def test_the_signature_under_tf_servings_loader_agrees_with_beam_py(model, served):
    _, version_dir = model
    backend = open_backend(version_dir, "onnx")
    prompts = [PROMPT, "you", ""]
    out = served.run(serving.BEAM_SEARCH_SIGNATURE, serving.beam_search_inputs(prompts, 6, 10, 4))
    assert out["tokens"].shape == (3, 4, 6) and out["texts"].shape == out["scores"].shape == (3, 4)
    for i, prompt in enumerate(prompts):
        found = Generator(backend).beam_search(prompt, 6, 10, 4)
        np.testing.assert_array_equal(out["tokens"][i], [h["tokens"] for h in found])
        np.testing.assert_allclose(out["scores"][i], [h["score"] for h in found], rtol=0, atol=1e-5)
        assert [t.decode() for t in out["texts"][i]] == [h["continuation"] for h in found]


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"beam_width": 0}, "beam_width must be in [1, 64]"),
        ({"beam_width": 65}, "beam_width must be in [1, 64]"),
        ({"beam_width": 4, "num_return": 5}, "num_return must be in [1, beam_width]"),
        ({"num_return": 0}, "num_return must be in [1, beam_width]"),
        ({"max_new_tokens": 0}, "max_new_tokens must be in [1, 4096]"),
        ({"max_new_tokens": 2**31 - 1}, "max_new_tokens must be in [1, 4096]"),
        ({"beam_width": 64, "max_new_tokens": 4096}, "prompts × beam_width × max_new_tokens"),
        ({"prompts": []}, "prompt must be a list of 1 to"),
        ({"prompts": ["y" * 10_000_000]}, "each prompt must be at most"),
        ({"prompts": ["the"] * 40_000, "beam_width": 2}, "prompts × beam_width × max_new_tokens"),
    ],
    ids=lambda value: repr(value)[:40],
)
def test_the_signature_refuses_requests_beyond_its_bounds(served, arguments, message):
    from keraslm.session_loader import RequestError

    prompts = arguments.pop("prompts", [PROMPT])
    with pytest.raises(RequestError, match="assertion failed") as error:
        served.run(
            serving.BEAM_SEARCH_SIGNATURE, serving.beam_search_inputs(prompts, **({"max_new_tokens": 5} | arguments))
        )
    assert message in str(error.value)
    # Still serving after every refusal.
    out = served.run(serving.BEAM_SEARCH_SIGNATURE, serving.beam_search_inputs([PROMPT], 2, 2, 2))
    assert out["tokens"].shape == (1, 2, 2)


def test_beam_search_on_the_onnx_path_never_imports_tensorflow(model, tmp_path):
    from conftest import run_script

    blocker = tmp_path / "blocker" / "tensorflow"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('the onnx path must not import TensorFlow')\n")
    argv = [model[1], "--prompt", PROMPT, "--num-tokens", "4", "--beam-width", "3", "--num-return", "2"]
    result = run_script("sample.py", *argv, env={"PYTHONPATH": str(blocker.parent)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("--- 1 of 2: log-probability -")
