"""Scoring a model on a text: its loss, perplexity and bits per character, as training evaluates a split.

The text is tokenized with the model's vocabulary into a temporary token file (streamed, never
whole in memory), cut into the TBPTT windows training evaluates (keraslm.data.window_views:
`batch_size` columns, `bptt` tokens a window, the state carried from each window to the next
and zero at the start), and every target's log-probability is read off the backend's logits.
On a run's own test split, with the run's batch size and bptt, this is the computation behind
results.json's test loss, run on any inference backend.

No TensorFlow here: the onnx backend scores where only NumPy and ONNX Runtime are installed.
"""

import contextlib
import dataclasses
import json
import math
import os
import tempfile

import numpy as np

from keraslm import artifacts
from keraslm.config import RunConfig
from keraslm.data import SPLITS, file_text, open_corpus, window_views
from keraslm.errors import ArgumentError, UsageError
from keraslm.files import OutputFile
from keraslm.progress import Progress
from keraslm.runtime import load_description, open_backend, resolve_model
from keraslm.sampling import refuse_over_memory
from keraslm.token_cache import CharEncoder, WordEncoder, token_dtype

LINES_AT_ONCE = 65536  # per-token lines formatted together: one NumPy read and one write each


@dataclasses.dataclass(frozen=True)
class Score:
    """How well a model predicts a text.

    Attributes:
        loss: mean negative log-likelihood of the scored tokens, in nats per token.
        tokens: the tokens scored (every target of the windows).
        unscored: tokens after the last whole window, not scored (as training's evaluation drops them).
        level: the vocabulary's level, "char" or "word".
        unknown: at word level the tokens that became `<unk>`; at char level the characters dropped.
    """

    loss: float
    tokens: int
    unscored: int
    level: str
    unknown: int = 0

    @property
    def perplexity(self):
        """exp(loss)."""
        return math.exp(self.loss)

    @property
    def bits_per_char(self):
        """loss / ln 2 at char level (bits per character), else None."""
        return self.loss / math.log(2) if self.level == "char" else None


def model_config(model):
    """The RunConfig of MODEL (an export or a run directory), read without loading the model."""
    kind, path = resolve_model(model)
    if kind == "run":
        return RunConfig.load(os.path.join(path, artifacts.CONFIG))
    description, _, _ = load_description(path)
    try:
        return RunConfig.from_dict(description["config"]).validate()
    except UsageError as e:
        raise UsageError(f"{path}/{artifacts.EXTRA}/{artifacts.DESCRIPTION}: {e}; export the run again") from None


def text_chunks(path, encoding="utf-8"):
    """The text of the file `path` in chunks, streamed; a missing file or a folder is refused now."""
    if not os.path.exists(path):
        raise ArgumentError("{text} {path}: no such file", path=path)
    if os.path.isdir(path):
        raise ArgumentError("{text} {path} is a folder; give a text file", path=path)
    return file_text(path, encoding, Progress(stream=None))


def split_chunks(config, split, data=None):
    """The text of one split of the corpus the model was trained on, streamed.

    Args:
        config: the model's RunConfig; its data section names the corpus and how it is split.
        split: "train", "valid" or "test".
        data: the corpus's path now, if it moved since training (split as it was then).
    """
    if split not in SPLITS:
        raise ArgumentError.unknown("split", split, SPLITS)
    data_config = dataclasses.replace(config.data, source=data or config.data.source)
    source = data_config.source
    if not source.startswith("tfds:") and not os.path.exists(source):
        raise ArgumentError(
            "the model's corpus {path} is not there; give its new place with {data} PATH, or score a file with {text}",
            path=source,
        )
    corpus = open_corpus(data_config)
    progress = Progress(stream=None)
    corpus.open(progress)
    return corpus.text(split, progress)


def score_model(
    model,
    *,
    text=None,
    split=None,
    data=None,
    encoding="utf-8",
    batch_size=None,
    bptt=None,
    skip_unknown=False,
    per_token=None,
    backend=None,
    **options,
):
    """Score MODEL on a text file or on a split of its own corpus (what keraslm.score and score.py do).

    Args:
        model: an export (NAME or NAME/VERSION folder) or a run directory.
        text: a text file to score; or
        split: "train", "valid" or "test" of the corpus the model was trained on (its config
            names it; `data` gives its path if it moved). Characters the vocabulary lacks are
            dropped, as training dropped them.
        encoding: the text file's encoding.
        batch_size, bptt: the windows (default: the model's training settings, which reproduce
            results.json's test loss on the test split).
        skip_unknown: char level: drop characters of `text` the vocabulary lacks instead of refusing.
        per_token: a file to write each scored token's log-probability to, as JSON lines.
        backend, **options: as keraslm.runtime.open_backend (onnx for an export, keras for a run).

    Returns:
        A Score.
    """
    if (text is None) == (split is None):
        raise ArgumentError("give {text} FILE or {split} NAME (one of them)")
    config = model_config(model)
    batch_size = config.train.batch_size if batch_size is None else batch_size
    bptt = config.train.bptt if bptt is None else bptt
    for name, value in (("batch_size", batch_size), ("bptt", bptt)):
        if not (isinstance(value, int) and value > 0):
            raise ArgumentError.about(name, f"must be a positive integer, got {value!r}")
    if text is not None:
        chunks, what = text_chunks(text, encoding), text
    else:
        chunks, what, skip_unknown = split_chunks(config, split, data), f"the {split} split", True
    opened = open_backend(model, backend, **options)
    return score(opened, chunks, batch_size, bptt, skip_unknown=skip_unknown, per_token=per_token, what=what)


def score(backend, chunks, batch_size, bptt, *, skip_unknown=False, per_token=None, what="the text"):
    """Score a text, given as chunks of characters, on an opened backend.

    Args:
        backend: a keraslm.runtime backend.
        chunks: the text, as an iterable of strings (a file streamed, or [text]).
        batch_size, bptt: the TBPTT windows (columns, tokens a window).
        skip_unknown: char level: drop characters the vocabulary lacks (else refuse the text).
        per_token: a path: each scored token's log-probability as JSON lines, written atomically.
        what: how messages name the text.

    Returns:
        A Score.
    """
    vocab = backend.vocab
    # A window's float32 logits [B, bptt, V], their shifted exponentials and the log-probabilities;
    # checked before the text is read, so the worst flags fail at once.
    refuse_over_memory(
        12 * batch_size * bptt * len(vocab),
        f"windows of {batch_size} × {bptt} tokens over {len(vocab):,} outputs",
        "score with a smaller batch size or bptt",
    )
    with contextlib.ExitStack() as stack:
        folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="keraslm-score-"))
        # Entered after the folder, so left before it: the lines are read from it while written.
        out = stack.enter_context(OutputFile(per_token, "per_token")) if per_token else None
        ids, unknown = encode(chunks, vocab, os.path.join(folder, "tokens.bin"), skip_unknown, what)
        scored = _check_length(ids, batch_size, bptt, what)
        log_probs = np.memmap(os.path.join(folder, "log_probs.bin"), np.float32, "w+", shape=scored) if out else None
        total = score_windows(backend, ids, batch_size, bptt, log_probs)
        if out:
            out.write(per_token_lines(ids, log_probs, vocab))
    return Score(-total / scored, scored, len(ids) - 1 - scored, vocab.level, unknown)


def encode(chunks, vocab, path, skip_unknown=False, what="the text"):
    """Tokenize text chunks into a token file at `path`, as training tokenizes a split.

    Word level: `<unk>` for words the vocabulary lacks and `<eos>` at every line's end (the last
    line's too). Char level: characters the vocabulary lacks are refused, or dropped with
    `skip_unknown` (training drops them from its valid and test splits).

    Returns:
        (ids, unknown): the token ids, memory-mapped from `path`, and the count of `<unk>` tokens
        (word level) or of dropped characters (char level).
    """
    char_level = vocab.level == "char"
    encoder = CharEncoder(vocab) if char_level else WordEncoder(vocab)
    dtype, count, unknown = token_dtype(vocab), 0, 0
    with open(path, "wb") as f:
        for ids in encoder.encode(chunks):
            if char_level and encoder.dropped and not skip_unknown:
                shown = ", ".join(repr(chr(c)) for c in sorted(encoder.unknown)[:10])
                raise ArgumentError(
                    "{what} holds characters the model's vocabulary lacks ({shown}); remove them or pass"
                    " {skip_unknown}",
                    what=what,
                    shown=shown,
                )
            f.write(ids.astype(dtype).data)
            count += len(ids)
            unknown += 0 if char_level else int(np.count_nonzero(ids == vocab.unk_id))
    if not encoder.had_text:
        raise UsageError(f"{what} holds no text to score")
    if char_level:
        unknown = encoder.dropped
    return (np.memmap(path, dtype, mode="r") if count else np.zeros(0, dtype)), unknown


def _check_length(ids, batch_size, bptt, what):
    """The number of targets the windows score; a text too short for one window is refused."""
    block = batch_size * bptt
    scored = (len(ids) - 1) // block * block
    if scored <= 0:
        raise ArgumentError(
            "{what} has {length} tokens; windows of {batch_size} × {bptt} = {rows} × {columns} need at least"
            " {needed}: give a longer text or a smaller {batch_size} or {bptt}",
            what=what,
            length=len(ids),
            rows=batch_size,
            columns=bptt,
            needed=block + 1,
        )
    return scored


def score_windows(backend, ids, batch_size, bptt, log_probs=None):
    """The sum of the log-probabilities of every target of the TBPTT windows of `ids`.

    The state starts at zero (training resets it before evaluating) and row b's state carries
    from window k to window k+1, as data.window_views lays the columns out. `log_probs`, if
    given (float32, one per target), receives each target's log-probability in stream order:
    log_probs[i] is that of ids[i + 1].
    """
    x, y = window_views(ids, batch_size, bptt)  # [B, windows, bptt] views of the stream
    rows = None if log_probs is None else log_probs.reshape(batch_size, -1)  # row b: column b's targets
    state = backend.initial_state(batch_size)
    total = 0.0
    for k in range(x.shape[1]):
        logits, state = backend.step(np.asarray(x[:, k], np.int32), state)  # (B, bptt, V)
        chosen = target_log_probs(logits, np.asarray(y[:, k], np.int64))  # (B, bptt)
        total += float(chosen.sum(dtype=np.float64))
        if rows is not None:
            rows[:, k * bptt : (k + 1) * bptt] = chosen
    return total


def target_log_probs(logits, targets):
    """log softmax(logits)[target] at each position: logits (..., V) and targets (...) → (...)."""
    top = logits.max(axis=-1, keepdims=True)  # shifted so exp never overflows
    log_total = np.log(np.exp(logits - top).sum(axis=-1))
    chosen = np.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return chosen - top[..., 0] - log_total


def per_token_lines(ids, log_probs, vocab):
    """JSON lines, one per scored token in text order: its position in the token stream (from 1:
    token 0 is only context), the token, and its log-probability in nats."""
    quoted = [json.dumps(token, ensure_ascii=False) for token in vocab.tokens]
    for start in range(0, len(log_probs), LINES_AT_ONCE):
        values = log_probs[start : start + LINES_AT_ONCE].tolist()
        targets = ids[start + 1 : start + 1 + len(values)].tolist()
        yield "".join(
            f'{{"position": {start + i + 1}, "token": {quoted[t]}, "logprob": {v!r}}}\n'
            for i, (t, v) in enumerate(zip(targets, values, strict=True))
        )
