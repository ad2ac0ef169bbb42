"""The checks before publishing: the served step against Keras and ONNX, model.tflite against
model.onnx, and `generate` and `beam_search` against the Keras step. Anything over PARITY_TOLERANCE
stops the export."""

import dataclasses
import os

import numpy as np

from keraslm import artifacts, beam
from keraslm.errors import UsageError
from keraslm.export.litert import run_litert
from keraslm.limits import BYTES_PER_TOKEN
from keraslm.model import keras_step
from keraslm.serving import (
    BEAM_SEARCH_SIGNATURE,
    GENERATE_SIGNATURE,
    STEP_SIGNATURE,
    beam_search_inputs,
    generate_inputs,
)
from keraslm.states import input_name, state_names

PARITY_TOLERANCE = 1e-4


@dataclasses.dataclass(frozen=True)
class CheckSizes:
    """The sizes of the checks' requests to the served version: as large as the checks want, within
    the export's ServingLimits, so that an export with small limits is checked, not refused by them.

    rows: prompts of generate and beam_search, rows of the step; step_length: tokens per step row;
    prompt_tokens: the longer prompt's tokens; new_tokens: generate's; beam_width and beam_tokens:
    beam_search's. Each request's rows × length stays within max_batch_tokens.
    """

    rows: int = 2
    step_length: int = 7
    prompt_tokens: int = 3
    new_tokens: int = 8
    beam_width: int = 3
    beam_tokens: int = 4

    @classmethod
    def within(cls, limits):
        """The wanted sizes, each cut to what `limits` allow."""
        wanted = cls()
        rows = min(wanted.rows, limits.max_batch_tokens)
        per_row = limits.max_batch_tokens // rows
        beam_width = min(wanted.beam_width, limits.max_beam_width, per_row)
        return cls(
            rows=rows,
            step_length=min(wanted.step_length, per_row),
            prompt_tokens=min(wanted.prompt_tokens, limits.max_prompt_tokens, per_row),
            new_tokens=min(wanted.new_tokens, limits.max_new_tokens, per_row),
            beam_width=beam_width,
            beam_tokens=min(wanted.beam_tokens, limits.max_new_tokens, per_row // beam_width),
        )


def check_parity(model, twin, model_config, batch_size=2, length=7, seed=0):
    """Compare the session-loaded SavedModel, ONNX and Keras steps on random tokens and states.

    Args:
        model: the version as TF Serving loads it (a SessionModel).

    Returns the figures: max |Δ| of every output between backends, and of the logits between
    one call over the sequence and the state carried token by token. Raises UsageError over
    PARITY_TOLERANCE.
    """
    feed = _random_feed(model_config, batch_size, length, seed)
    keras_out = {k: np.asarray(v) for k, v in twin(feed, training=False).items()}
    saved_out = model.run(STEP_SIGNATURE, feed)
    onnx_out = _onnx_outputs(model.version_dir, feed)
    if set(onnx_out) != set(keras_out) or set(saved_out) != set(keras_out):
        raise UsageError(
            f"export outputs differ: keras {sorted(keras_out)}, saved {sorted(saved_out)}, onnx {sorted(onnx_out)}"
        )

    def max_diff(a, b):
        return max(float(np.max(np.abs(a[k] - b[k]))) for k in keras_out)

    carried = _carried_logits(twin, model_config, feed)
    figures = {
        "savedmodel_vs_keras": max_diff(saved_out, keras_out),
        "savedmodel_vs_onnx": max_diff(saved_out, onnx_out),
        "onnx_vs_keras": max_diff(onnx_out, keras_out),
        "carried_vs_whole_sequence": float(np.max(np.abs(carried - keras_out["logits"]))),
    }
    worst = max(figures, key=figures.get)
    if figures[worst] > PARITY_TOLERANCE:
        raise UsageError(f"parity check failed: {worst} max |Δ| = {figures[worst]:.2e} > {PARITY_TOLERANCE}")
    return figures


def _random_feed(model_config, batch_size, length, seed):
    """Random tokens [B, T] and random (nonzero) states: a zero state would hide a swapped state."""
    rng = np.random.default_rng(seed)
    feed = {"tokens": rng.integers(0, model_config.vocabulary_size, (batch_size, length)).astype(np.int32)}
    return feed | {
        input_name(n): rng.normal(0, 0.5, (batch_size, model_config.hidden_dim)).astype(np.float32)
        for n in state_names(model_config)
    }


def check_litert(version_dir, model_config, batch_size=3, length=7, seed=1):
    """Compare model.tflite with model.onnx on random tokens and states (batch and time > 1).

    Returns {"litert_vs_onnx": max |Δ| over the logits and every state}. Raises UsageError over
    PARITY_TOLERANCE, when LiteRT cannot run the file, or when its outputs are not model.onnx's.
    """
    feed = _random_feed(model_config, batch_size, length, seed)
    onnx_out = _onnx_outputs(version_dir, feed)
    litert_out = run_litert(os.path.join(version_dir, artifacts.EXTRA, artifacts.LITERT), feed)
    if set(litert_out) != set(onnx_out) or any(litert_out[k].shape != onnx_out[k].shape for k in onnx_out):
        shapes = {k: v.shape for k, v in litert_out.items()}
        raise UsageError(f"{artifacts.LITERT} does not compute the step: it returned {shapes}")
    figure = max(float(np.max(np.abs(litert_out[k] - onnx_out[k]))) for k in onnx_out)
    if not figure <= PARITY_TOLERANCE:  # also catches NaN
        raise UsageError(f"parity check failed: litert_vs_onnx max |Δ| = {figure:.2e} > {PARITY_TOLERANCE}")
    return {"litert_vs_onnx": figure}


def _onnx_outputs(version_dir, feed):
    """{output name: value} of the version's model.onnx on `feed`."""
    import onnxruntime

    session = onnxruntime.InferenceSession(
        os.path.join(version_dir, artifacts.EXTRA, artifacts.ONNX), providers=["CPUExecutionProvider"]
    )
    onnx_names = [o.name for o in session.get_outputs()]
    return dict(zip(onnx_names, session.run(onnx_names, feed), strict=True))


def _carried_logits(twin, model_config, feed):
    """Logits [B, T, V] of the Keras step run token by token on `feed`, carrying the state."""
    batch_size, length = feed["tokens"].shape
    step, _ = keras_step(twin, model_config, batch_size)
    state = {k: v for k, v in feed.items() if k != "tokens"}
    carried = []
    for t in range(length):
        logits, state = step(feed["tokens"][:, t : t + 1], state)
        carried.append(logits)
    return np.concatenate(carried, 1)


def check_generate(model, twin, model_config, vocab, sizes):
    """Run the session-loaded `generate` greedily on `sizes.rows` prompts of different lengths and follow
    its tokens with the Keras step in a NumPy loop: each must be the step's most likely token
    (to PARITY_TOLERANCE in logits, so a near-tie may go either way) and the text their decoding.

    Returns the largest logit gap between a chosen token and the step's best. Raises UsageError.
    """
    prompts = _check_prompts(vocab, sizes)
    out = model.run(GENERATE_SIGNATURE, generate_inputs(prompts, sizes.new_tokens, temperature=0.0))
    step, zero = keras_step(twin, model_config, batch_size=1)
    worst = 0.0
    for row, prompt in enumerate(prompts):
        chosen = out["tokens"][row]
        logits, state = step(vocab.encode(prompt)[None, :], zero)
        for token in chosen:
            worst = max(worst, float(np.max(logits[0, -1]) - logits[0, -1, token]))
            logits, state = step(np.array([[token]], np.int32), state)
        if out["text"][row].decode("utf-8") != vocab.decode(chosen):
            raise UsageError(f"generate check failed: its text for prompt {prompt!r} is not its tokens' decoding")
    if worst > PARITY_TOLERANCE:
        raise UsageError(f"generate check failed: a greedy token is {worst:.2e} below the step's best logit")
    return worst


def check_beam_search(model, twin, model_config, vocab, sizes):
    """Run the session-loaded `beam_search` on check_generate's prompts and keraslm.beam's search
    over the Keras step on each: the scores must agree rank by rank, and each continuation the
    signature returns, scored token by token with the Keras step, must have the score it reports
    (both to PARITY_TOLERANCE; comparing scores, not tokens, lets equal-scored ties go either way).

    Returns the largest score difference. Raises UsageError.
    """
    prompts, width, num_tokens = _check_prompts(vocab, sizes), sizes.beam_width, sizes.beam_tokens
    out = model.run(BEAM_SEARCH_SIGNATURE, beam_search_inputs(prompts, num_tokens, width, width))
    step, zero = keras_step(twin, model_config, batch_size=1)
    worst = 0.0
    for row, prompt in enumerate(prompts):
        ids = vocab.encode(prompt)
        expected = [h.score for h in beam.beam_search(step, ids, zero, num_tokens, width, width)]
        # A vocabulary too small for `width` distinct continuations leaves the signature's last
        # ranks at -inf, where keraslm.beam returns fewer: only the ranks both have are compared.
        ranks = len(expected)
        rescored = [_sequence_score(step, ids, zero, tokens) for tokens in out["tokens"][row][:ranks]]
        reported = out["scores"][row][:ranks].astype(np.float64)
        worst = max(worst, float(np.max(np.abs(reported - expected))), float(np.max(np.abs(reported - rescored))))
    if worst > PARITY_TOLERANCE:
        raise UsageError(f"beam_search check failed: its scores are {worst:.2e} from the Keras step's")
    return worst


def _check_prompts(vocab, sizes):
    """`sizes.rows` prompts of the vocabulary's plain tokens: `sizes.prompt_tokens` tokens, then one.

    Only tokens short enough for the signatures' byte bound (BYTES_PER_TOKEN per token, separator
    included) are used, so the prompts' bytes stay within the export's limits too.
    """
    specials = set(vocab.to_dict()["special_tokens"].values())
    plain = [t for t in vocab.tokens if t not in specials and t.strip() == t and t]
    short = [t for t in plain if len(t.encode("utf-8")) < BYTES_PER_TOKEN] or plain
    separator = "" if vocab.level == "char" else " "
    prompts = [separator.join(short[: sizes.prompt_tokens]), short[sizes.prompt_tokens % len(short)]]
    return prompts[: sizes.rows]


def _sequence_score(step, prompt_ids, state, tokens):
    """The sum of `tokens`' log-probabilities after the prompt, by keraslm.beam's log-softmax."""
    logits, state = step(np.asarray(prompt_ids, np.int32)[None, :], state)
    score = 0.0
    for token in tokens:
        score += float(beam.log_softmax(logits[:, -1])[0, token])
        logits, state = step(np.array([[token]], np.int32), state)
    return score
