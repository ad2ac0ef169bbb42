"""The token cache: a corpus tokenized once into flat token files that every later run memory-maps.

An entry is a folder `<cache>/<key>/`:

    train.bin, valid.bin, test.bin   the token ids of each split, flat, uint16 (or uint32 when the
                                     vocabulary has more than 65,536 tokens), native byte order
    vocab.json                       the vocabulary, as keraslm.vocab writes it
    meta.json                        format, key, dtype, tokens per split, notes, the corpus

The key is a SHA-256 over the corpus content (each split's bytes) and every setting that changes
the ids (see `key_settings`), so a changed corpus or setting makes a new entry, never a stale hit.
An entry is written in a temporary folder and renamed into place: of two processes building one
entry at once (the workers of a multi-worker run), one wins and the other uses the winner's. An
entry whose files disagree with its meta.json (truncated, damaged) is rebuilt, never used.

The text is streamed: characters become ids by a lookup table over code points (NumPy, no Python
object per character), words in chunks cut after a space or newline. No TensorFlow here.
"""

import collections
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time

import numpy as np

from keraslm.errors import ArgumentError, UsageError
from keraslm.progress import Progress
from keraslm.vocab import EOS, UNK, Vocabulary, words

FORMAT_VERSION = 1
META, VOCAB = "meta.json", "vocab.json"
SPLITS = ("train", "valid", "test")
CODE_POINTS = 0x110000  # every Unicode code point
UINT16_TOKENS = 1 << 16
DIRECTORY_NAME = "keraslm-tokens"  # the default folder, inside TFDS's data dir
STALE_SECONDS = 24 * 3600  # a temporary folder this old is a killed build's


def token_file(split):
    """The file name of a split's tokens in an entry."""
    return f"{split}.bin"


def default_folder(tfds_data_dir=None):
    """The cache folder when none is given: $KERASLM_TOKEN_CACHE, else `keraslm-tokens` inside
    TFDS's data dir (`tfds_data_dir`, $TFDS_DATA_DIR or ~/tensorflow_datasets, as TFDS decides),
    where a user already keeps prepared corpora, on a disk chosen for them."""
    if os.environ.get("KERASLM_TOKEN_CACHE"):
        return os.environ["KERASLM_TOKEN_CACHE"]
    tfds_dir = tfds_data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.join("~", "tensorflow_datasets")
    return os.path.join(os.path.expanduser(tfds_dir), DIRECTORY_NAME)


def key_settings(corpus_kind, data_config):
    """The settings that change a corpus's ids (and nothing else, so that no setting makes a
    needless miss): the level, how the corpus is split, the encoding of files, and at word level
    the vocabulary cut."""
    settings = {"format": FORMAT_VERSION, "kind": corpus_kind, "level": data_config.level}
    if corpus_kind != "tfds":  # TFDS text is UTF-8 whatever --encoding says
        settings["encoding"] = data_config.encoding
    if data_config.level == "word":
        settings |= {"min_freq": data_config.min_freq, "max_vocab": data_config.max_vocab}
    return settings


def cache_key(corpus, settings, progress):
    """The entry's name: SHA-256 over `settings` and each split's content, hashed apart."""
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    splits = collections.defaultdict(hashlib.sha256)
    for split, raw in corpus.identity(progress):
        splits[split].update(raw)
    for split in sorted(splits):
        key.update(split.encode() + b"\0" + splits[split].digest())
    return key.hexdigest()


@dataclasses.dataclass
class Entry:
    """A cache entry in use: the vocabulary and the memory-mapped token stream of each split.

    Attributes:
        path: the entry's folder.
        vocabulary: its Vocabulary.
        streams: {split: read-only np.memmap of token ids}.
        meta: meta.json's content.
        status: "hit" (found) or "built" (made by this process).
        notes: one-line notes for the user (characters dropped, an entry rebuilt).
        seconds: how long finding or building it took.
    """

    path: str
    vocabulary: Vocabulary
    streams: dict
    meta: dict
    status: str
    notes: list = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    def summary(self):
        """One line: hit or built, key prefix, tokens per split, dtype, size on disk, time."""
        tokens = "/".join(f"{self.meta['tokens'][s]:,}" for s in SPLITS)
        size = sum(stream.nbytes for stream in self.streams.values()) / 1e6
        return (
            f"token cache: {self.status} {os.path.basename(self.path)[:12]} in {os.path.dirname(self.path)}, "
            f"tokens train/valid/test {tokens}, {self.meta['dtype']}, {size:,.1f} MB, {self.seconds:.1f} s"
        )


def prepare(corpus, data_config, folder, vocabulary=None, progress=None):
    """The corpus's cache entry in `folder`: found, or built from the corpus and kept.

    Args:
        corpus: a keraslm.data.Corpus.
        data_config: its DataConfig (level, min_freq, max_vocab, encoding).
        folder: the cache folder, created if missing.
        vocabulary: a Vocabulary the ids must use (a resumed run's); None: built from the train
            split. An entry whose vocabulary differs is not used: the ids of this vocabulary get
            an entry of their own.
        progress: a keraslm.progress.Progress (default: on stderr).

    Raises:
        ArgumentError: the folder cannot hold the entry (named `token_cache_dir`, as train() calls it).
        UsageError: the corpus is unreadable or a split is empty.
    """
    started = time.monotonic()
    progress = progress or Progress()
    try:
        progress.phase("hashing", corpus.nbytes)
        settings = key_settings(corpus.kind, data_config)
        entry = _find_or_build(corpus, settings, cache_key(corpus, settings, progress), folder, None, progress)
        if vocabulary is not None and entry.vocabulary.to_dict() != vocabulary.to_dict():
            settings["vocabulary"] = vocabulary.sha256()
            key = hashlib.sha256((os.path.basename(entry.path) + vocabulary.sha256()).encode()).hexdigest()
            entry = _find_or_build(corpus, settings, key, folder, vocabulary, progress)
            entry.notes.append("note: the run's vocab.json differs from the corpus's; its ids have their own entry")
    finally:
        progress.close()
    entry.seconds = time.monotonic() - started
    return entry


def _find_or_build(corpus, settings, key, folder, vocabulary, progress):
    path = os.path.join(folder, key)
    entry, problem = open_entry(path, key)
    if entry:
        return entry
    notes = [f"note: token cache entry {path} is damaged ({problem}); rebuilding it"] if problem else []
    _build(corpus, settings, key, folder, vocabulary, progress)
    entry, problem = open_entry(path, key)
    if not entry:  # another process replaced it with a broken one between our rename and now
        raise UsageError(f"token cache entry {path} is damaged right after it was built ({problem}); remove it")
    entry.status, entry.notes = "built", notes + entry.notes
    return entry


def open_entry(path, key):
    """(Entry, None) for a whole entry, (None, None) for none, (None, problem) for a damaged one."""
    if not os.path.isdir(path):
        return None, None
    try:
        with open(os.path.join(path, META), encoding="utf-8") as f:
            meta = json.load(f)
        if meta.get("format") != FORMAT_VERSION or meta.get("key") != key:
            return None, f"{META} is of another format or entry"
        dtype = np.dtype({"uint16": np.uint16, "uint32": np.uint32}[meta["dtype"]])
        vocabulary = Vocabulary.load(os.path.join(path, VOCAB))
        if len(vocabulary) != meta["vocabulary_size"]:
            return None, f"{VOCAB} holds {len(vocabulary)} tokens, {META} says {meta['vocabulary_size']}"
        streams = {}
        for split in SPLITS:
            file, tokens = os.path.join(path, token_file(split)), int(meta["tokens"][split])
            size = os.path.getsize(file)
            if size != tokens * dtype.itemsize:
                return None, f"{token_file(split)} holds {size:,} bytes, {META} says {tokens:,} tokens of {dtype}"
            streams[split] = np.memmap(file, dtype, mode="r") if tokens else np.zeros(0, dtype)
    except (OSError, ValueError, KeyError, TypeError, UsageError) as e:
        return None, f"{type(e).__name__}: {e}"[:200]
    return Entry(path, vocabulary, streams, meta, "hit", list(meta.get("notes", []))), None


def _build(corpus, settings, key, folder, vocabulary, progress):
    """Write the entry in a temporary folder beside its place, then rename it into place."""
    temporary = _temporary_folder(folder, key)
    try:
        corpus.open(progress)
        if vocabulary is None:
            progress.phase("counting the vocabulary", corpus.nbytes)
            vocabulary = build_vocabulary(corpus.text("train", progress), settings["level"], **_cut(settings))
        meta = _write_tokens(corpus, vocabulary, temporary, progress)
        meta |= {"format": FORMAT_VERSION, "key": key, "settings": settings, "corpus": corpus.source}
        vocabulary.save(os.path.join(temporary, VOCAB))
        _write_json(os.path.join(temporary, META), meta)  # last: an entry without it is not one
        _commit(temporary, os.path.join(folder, key))
    except OSError as e:
        raise ArgumentError(
            "cannot write the {token_cache_dir} entry {path}: {reason}; free some space or give another"
            " {token_cache_dir} DIR",
            path=os.path.join(folder, key),
            reason=e.strerror or e,
        ) from None
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def _cut(settings):
    return {"min_freq": settings.get("min_freq", 1), "max_vocab": settings.get("max_vocab", 0)}


def _temporary_folder(folder, key):
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ArgumentError("{token_cache_dir} {path} is a file, not a folder; give a folder", path=folder)
    try:
        os.makedirs(folder, exist_ok=True)
        _remove_stale_temporaries(folder)
        return tempfile.mkdtemp(prefix=f".{key}.", suffix=".tmp", dir=folder)
    except OSError as e:
        raise ArgumentError(
            "cannot write the {token_cache_dir} folder {path}: {reason}; give a writable {token_cache_dir} DIR",
            path=folder,
            reason=e.strerror or e,
        ) from None


def _remove_stale_temporaries(folder):
    """Remove the temporary folders of builds killed long ago (a build that is interrupted or
    fails removes its own); a day is far longer than any build, so none in progress is touched."""
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if name.startswith(".") and name.endswith(".tmp") and time.time() - os.path.getmtime(path) > STALE_SECONDS:
            shutil.rmtree(path, ignore_errors=True)


def _commit(temporary, path):
    """Rename the finished entry into place. Another process's whole entry there wins (ours is
    thrown away); a damaged one is moved aside first and removed."""
    if os.path.isdir(path) and open_entry(path, os.path.basename(path))[1]:
        aside = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".damaged.tmp", dir=os.path.dirname(path))
        os.replace(path, os.path.join(aside, "entry"))
        shutil.rmtree(aside, ignore_errors=True)
    try:
        os.rename(temporary, path)
    except OSError:
        if not os.path.isdir(path):  # not lost to another process's entry: a real failure
            raise


def _write_json(path, value):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, ensure_ascii=False, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def build_vocabulary(chunks, level, min_freq=1, max_vocab=0):
    """The vocabulary `Vocabulary.build` makes of the text whose chunks these are, read in one
    streamed pass: the code points seen (char level) or the words counted in order (word level)."""
    if level == "char":
        seen = np.zeros(CODE_POINTS, bool)
        for chunk in chunks:
            seen[code_points(chunk)] = True
        return Vocabulary("char", [chr(c) for c in np.flatnonzero(seen)])
    counts = collections.Counter()
    for piece in whole_word_pieces(chunks):
        counts.update(words(piece))
    return Vocabulary.from_word_counts(counts, min_freq, max_vocab)


def code_points(text):
    """The code points of `text` as a uint32 array (one NumPy buffer, no object per character)."""
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32)


def whole_word_pieces(chunks):
    """The text of `chunks` cut again after the last space or newline of each, so that no word
    straddles two pieces (a piece tokenizes as it would inside the whole text)."""
    carry = ""
    for chunk in chunks:
        text = carry + chunk
        cut = max(text.rfind("\n"), text.rfind(" ")) + 1
        carry = text[cut:]
        if cut:
            yield text[:cut]
    if carry:
        yield carry


def token_dtype(vocabulary):
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16 if len(vocabulary) <= UINT16_TOKENS else np.uint32)


def _write_tokens(corpus, vocabulary, folder, progress):
    """Encode every split into its token file in one pass; meta.json's dtype, tokens and notes."""
    encoder = CharEncoder(vocabulary) if vocabulary.level == "char" else WordEncoder(vocabulary)
    dtype, tokens, notes = token_dtype(vocabulary), {}, []
    progress.phase("encoding", corpus.nbytes)
    for split, chunks in corpus.splits(progress):
        with open(os.path.join(folder, token_file(split)), "wb") as f:
            tokens[split] = 0
            for ids in encoder.encode(chunks):
                f.write(ids.astype(dtype).data)
                tokens[split] += len(ids)
                progress.advance(tokens=len(ids))
            f.flush()
            os.fsync(f.fileno())
        if not encoder.had_text:
            raise corpus.empty(split)
        notes += encoder.notes(split)
    for split in SPLITS:
        if split not in tokens:  # a single file too short to give this split a character
            raise corpus.empty(split)
    return {"dtype": dtype.name, "tokens": tokens, "vocabulary_size": len(vocabulary), "notes": notes}


class CharEncoder:
    """Characters to ids by a lookup table over code points; characters the vocabulary lacks are
    dropped and reported (training.encode_splits' rule, with `Vocabulary.encode(skip_unknown=True)`)."""

    def __init__(self, vocabulary):
        self.table = np.full(CODE_POINTS, -1, np.int64)
        for i, token in enumerate(vocabulary.tokens):
            self.table[ord(token)] = i

    def encode(self, chunks):
        """Yield the id array of each chunk of one split."""
        self.had_text, self.dropped, self.unknown = False, 0, set()
        for chunk in chunks:
            self.had_text = self.had_text or not chunk.isspace() and bool(chunk)
            ids = self.table[code_points(chunk)]
            known = ids >= 0
            if not known.all():
                self.dropped += int(len(ids) - known.sum())
                self.unknown.update(np.unique(code_points(chunk)[~known]).tolist())
                ids = ids[known]
            yield ids

    def notes(self, split):
        """The note on the characters of the last split encoded that were dropped, if any."""
        if not self.dropped:
            return []
        shown = ", ".join(repr(chr(c)) for c in sorted(self.unknown)[:10])
        return [
            f"note: {self.dropped} characters of the {split} split are not in the training vocabulary and were"
            f" dropped: {shown}"
        ]


class _Ids(dict):
    """Word → id, `<unk>`'s id for any other word."""

    def __missing__(self, word):
        return self[UNK]


class WordEncoder:
    """Words to ids in chunks: `<unk>` for words outside the vocabulary, `<eos>` at every newline and
    after the last line (training.encode_splits' rule)."""

    def __init__(self, vocabulary):
        self.ids = _Ids(vocabulary.index)
        self.eos = vocabulary.index[EOS]

    def encode(self, chunks):
        """Yield the id arrays of one split's chunks."""
        self.had_text, last = False, ""
        for piece in whole_word_pieces(chunks):
            self.had_text = self.had_text or not piece.isspace()
            last = piece[-1]
            tokens = words(piece)
            yield np.fromiter(map(self.ids.__getitem__, tokens), np.int64, len(tokens))
        if last != "\n":
            yield np.array([self.eos], np.int64)

    def notes(self, split):
        """None: unknown words are `<unk>`, as the vocabulary's rule says."""
        return []
