"""Corpora in, tf.data TBPTT windows out.

Sources: `tfds:NAME` (any TFDS dataset with a text feature), a directory holding
train.txt / valid.txt / test.txt, or one text file split 90/5/5 in order. Each is a `Corpus`:
its text streamed in chunks, never whole in memory; keraslm.token_cache turns it into token
files once, and the windows are read from their memory map.
"""

import codecs
import itertools
import logging
import os
import tempfile

import numpy as np

from keraslm.errors import ArgumentError, UsageError, first_line
from keraslm.progress import Progress

SPLITS = ("train", "valid", "test")
# TFDS names the middle split "validation"; a few datasets have no test split.
TFDS_SPLIT_NAMES = {"train": ("train",), "valid": ("validation", "valid", "dev"), "test": ("test",)}
CHUNK_BYTES = 4 << 20  # text read, decoded and encoded at once: preparation holds a few times this
BINARY_CHECK_BYTES = 65536  # a file holding NUL bytes this early is binary


def load_corpus(data_config):
    """Return {"train": str, "valid": str, "test": str} for the configured source, whole in memory
    (training streams it instead: `open_corpus`)."""
    corpus = open_corpus(data_config)
    progress = Progress(stream=None)
    corpus.open(progress)
    splits = dict.fromkeys(SPLITS, "")
    for name, chunks in corpus.splits(progress):
        splits[name] = "".join(chunks)
    for name, text in splits.items():
        if not text.strip():
            raise corpus.empty(name)
    return splits


def open_corpus(data_config):
    """The configured source as a `Corpus` (nothing is read yet, except what TFDS prepares)."""
    source = data_config.source
    if source.startswith("tfds:"):
        return _load_tfds(source[len("tfds:") :], data_config.tfds_data_dir, data_config.tfds_manual_dir)
    if os.path.isdir(source):
        return DirectoryCorpus(source, data_config.encoding)
    if os.path.isfile(source):
        return FileCorpus(source, data_config.encoding)
    raise ArgumentError(
        "{source} {path}: no such file or directory; give a text file, a directory with "
        "train.txt/valid.txt/test.txt, or {dataset} tfds:NAME",
        path=source,
    )


def split_points(length):
    """Where one text of `length` characters is cut 90/5/5: the end of train and of valid."""
    return int(length * 0.9), int(length * 0.95)


def split_text(text):
    """Split one text 90/5/5 in order, as TFDS splits tiny_shakespeare."""
    a, b = split_points(len(text))
    return {"train": text[:a], "valid": text[a:b], "test": text[b:]}


class Corpus:
    """A corpus as streams: the text of its splits in chunks, and the bytes that identify it.

    Subclasses give `identity` and `stream`; `open` first reads what streaming needs.

    Attributes:
        kind: "file", "directory" or "tfds" (how the text is split, part of the cache key).
        source: the source as the user named it.
        nbytes: the bytes one pass reads, or None when unknown (for progress).
    """

    kind = source = nbytes = None

    def open(self, progress):
        """Read what streaming needs first (nothing, except for a single file)."""

    def identity(self, progress):
        """(split, bytes) of the content that decides the tokens, in order."""
        raise NotImplementedError

    def stream(self, progress):
        """(split, text chunk) of every split in order: train, valid, test."""
        raise NotImplementedError

    def splits(self, progress):
        """(split, iterator of its text chunks) in order, read in one pass."""
        groups = itertools.groupby(self.stream(progress), key=lambda pair: pair[0])
        return ((name, (chunk for _, chunk in group)) for name, group in groups)

    def text(self, split, progress):
        """The text chunks of one split (the passes stop reading after it)."""
        for name, chunks in self.splits(progress):
            if name == split:
                yield from chunks
                return

    def empty(self, split):
        """The UsageError for a split without text."""
        return UsageError(f"the {split} split of {self.source} is empty; it needs text to train or evaluate on")


class DirectoryCorpus(Corpus):
    """train.txt, valid.txt and test.txt of a directory (the WikiText/PTB layout)."""

    kind = "directory"

    def __init__(self, path, encoding):
        self.source, self.encoding = path, encoding
        self.paths = {s: os.path.join(path, f"{s}.txt") for s in SPLITS}
        self.nbytes = sum(os.path.getsize(p) for p in self.paths.values() if os.path.isfile(p))

    def identity(self, progress):
        for name, path in self.paths.items():
            for chunk in _file_bytes(path, progress):
                yield name, chunk

    def stream(self, progress):
        for name, path in self.paths.items():
            for chunk in _file_text(path, self.encoding, progress):
                yield name, chunk


class FileCorpus(Corpus):
    """One text file, split 90/5/5 in order by characters (`split_text`)."""

    kind = "file"

    def __init__(self, path, encoding):
        self.source, self.encoding = path, encoding
        self.nbytes = os.path.getsize(path)
        self.ends = None

    def open(self, progress):
        """Count the characters, to know where the splits are cut."""
        length = sum(len(chunk) for chunk in _file_text(self.source, self.encoding, progress))
        self.ends = split_points(length)

    def identity(self, progress):
        for chunk in _file_bytes(self.source, progress):
            yield "all", chunk

    def stream(self, progress):
        position, index = 0, 0
        for chunk in _file_text(self.source, self.encoding, progress):
            while chunk:
                # The test split takes the rest, whatever the count said.
                room = self.ends[index] - position if index < len(self.ends) else len(chunk)
                if room <= 0:
                    index += 1
                    continue
                piece, chunk = chunk[:room], chunk[room:]
                position += len(piece)
                yield SPLITS[index], piece


def _file_bytes(path, progress):
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise UsageError(f"{path} not found; a data directory needs train.txt, valid.txt and test.txt") from None
    except IsADirectoryError:
        raise UsageError(f"{path} is a directory, not a text file") from None
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from None
    with f:
        while chunk := _read(f, path):
            progress.advance(nbytes=len(chunk))
            yield chunk


def _read(f, path):
    # A read error is the corpus's, never the token cache's (whose OSErrors are write errors).
    try:
        return f.read(CHUNK_BYTES)
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from None


def file_text(path, encoding, progress):
    """The text of one file in decoded chunks, streamed: a binary file (NUL bytes near its start),
    an unreadable one or bytes that are not `encoding` end in a UsageError naming the file."""
    return _file_text(path, encoding, progress)


def _file_text(path, encoding, progress):
    # Decoded chunk by chunk: a character whose bytes straddle two chunks waits in the decoder.
    offset = 0
    decoder = None
    for raw in _file_bytes(path, progress):
        if offset == 0:
            if b"\0" in raw[:BINARY_CHECK_BYTES]:
                raise UsageError(f"{path} looks binary (it holds NUL bytes); give a plain text file")
            decoder = _decoder(encoding)
        yield _decode(decoder, raw, offset, path, encoding)
        offset += len(raw)
    if decoder:
        yield _decode(decoder, b"", offset, path, encoding, final=True)


def _decoder(encoding):
    try:
        return codecs.getincrementaldecoder(encoding)(errors="strict")
    except LookupError:
        raise ArgumentError("unknown {encoding} {got!r}", got=encoding) from None


def _decode(decoder, raw, offset, path, encoding, final=False):
    pending = len(decoder.getstate()[0])  # bytes of a split character, decoded with `raw`
    try:
        return decoder.decode(raw, final=final)
    except UnicodeDecodeError as e:
        start = offset - pending + e.start
        raise ArgumentError(
            "{path} is not valid {codec} (byte {start}, line {line}); pass {encoding} with the file's encoding"
            " (e.g. latin-1)",
            path=path,
            codec=encoding,
            start=start,
            line=_line_at(path, start),
        ) from None


def _line_at(path, position):
    """The line number (from 1) of the byte at `position` of a file."""
    newlines = 0
    with open(path, "rb") as f:
        while position > 0 and (chunk := f.read(min(CHUNK_BYTES, position))):
            newlines += chunk.count(b"\n")
            position -= len(chunk)
    return newlines + 1


def _load_tfds(name, data_dir, manual_dir):
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.download import downloader

    # TFDS retries a failed download ten times with exponential backoff, minutes of silence
    # when offline; three tries are plenty for a flaky network.
    downloader.MAX_RETRIES = 3
    logging.getLogger("urllib3").setLevel(logging.ERROR)  # one error line instead of a warning per retry
    tfds.disable_progress_bar()  # its bars are noise in a training log
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # TFDS raises its own DatasetNotFoundError and others.
        raise UsageError(
            f"TFDS has no dataset {name!r} ({first_line(e)}); check the name with tfds.list_builders()"
        ) from None
    text_keys = [k for k, f in builder.info.features.items() if isinstance(f, tfds.features.Text)]
    if not text_keys:
        raise UsageError(f"TFDS dataset {name!r} has no text feature (features: {', '.join(builder.info.features)})")
    _download_and_prepare(builder, name, manual_dir)
    splits = {}
    for split, candidates in TFDS_SPLIT_NAMES.items():
        found = [c for c in candidates if c in builder.info.splits]
        if not found:
            raise UsageError(f"TFDS dataset {name!r} has no {split} split (it has {', '.join(builder.info.splits)})")
        splits[split] = builder.as_dataset(split=found[0])
    return TFDSCorpus(f"tfds:{name}", splits, text_keys[0])


class TFDSCorpus(Corpus):
    """The text feature of a TFDS dataset's splits, streamed example by example.

    Examples are documents: they are joined as lines ("\\n" between two), so one stream runs
    through each split.
    """

    kind = "tfds"

    def __init__(self, source, datasets, feature):
        self.source, self.datasets, self.feature = source, datasets, feature

    def _examples(self, split, progress):
        import tensorflow_datasets as tfds

        for number, example in enumerate(tfds.as_numpy(self.datasets[split])):
            raw = example[self.feature]
            progress.advance(nbytes=len(raw))
            yield b"\n" + raw if number else raw

    def identity(self, progress):
        for split in SPLITS:
            for raw in self._examples(split, progress):
                yield split, raw

    def stream(self, progress):
        for split in SPLITS:
            # Examples gathered into chunks: per-chunk work stays cheap for datasets of short lines.
            chunk, size = [], 0
            for raw in self._examples(split, progress):
                chunk.append(raw)
                size += len(raw)
                if size >= CHUNK_BYTES:
                    yield split, b"".join(chunk).decode("utf-8")
                    chunk, size = [], 0
            if chunk:
                yield split, b"".join(chunk).decode("utf-8")


def _download_and_prepare(builder, name, manual_dir):
    """Have TFDS download and prepare `builder`'s dataset; offline, tiny_shakespeare comes from the
    copy bundled with keraslm."""
    import tensorflow_datasets as tfds

    try:
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    except Exception as e:
        if manual_dir or builder.name != "tiny_shakespeare":
            raise _cannot_prepare(builder, name, manual_dir, e) from None
        _prepare_from_bundled_copy(builder, name, e)


def _prepare_from_bundled_copy(builder, name, download_error):
    """Prepare tiny_shakespeare through TFDS's manual-dir mechanism from keraslm's bundled copy.

    The copy goes to a temporary folder removed afterwards, not TFDS's default manual dir: the
    prepared dataset in the data dir is all later runs read, and a folder shared with other TFDS
    users is left as it was.
    """
    import tensorflow_datasets as tfds

    from keraslm.corpora import write_tiny_shakespeare

    with tempfile.TemporaryDirectory(prefix="keraslm-tiny-shakespeare-") as folder:
        write_tiny_shakespeare(folder)
        try:
            builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=folder))
        except Exception as e:
            raise _cannot_prepare(builder, name, None, e) from None
    print(
        f"note: TFDS could not download {name} ({first_line(download_error)}); "
        "prepared it from the copy bundled with keraslm"
    )


def _cannot_prepare(builder, name, manual_dir, error):
    """The one-line error for a TFDS dataset that could not be downloaded or prepared."""
    default_manual = os.path.join(builder.data_dir_root, "downloads", "manual")
    return ArgumentError(
        "TFDS could not download or prepare {name!r} ({problem}); offline, put its source file in {folder}"
        " or pass {tfds_manual_dir} DIR (for tiny_shakespeare: the folder holding input.txt)",
        name=name,
        problem=first_line(error),
        folder=manual_dir or default_manual,
    )


def tbptt_arrays(ids, batch_size, bptt):
    """Cut a token stream into TBPTT windows: x, y of shape [num_windows, batch_size, bptt].

    The stream is laid out as `batch_size` contiguous columns; window k of row b continues
    window k-1 of row b, so the state a stateful layer carries for row b is the right one.
    The targets are the same cut of the stream shifted by one token:

        stream: a b c d e f g h i j k l m n o p q r s t u v w x y
        batch_size=4, bptt=2   window 0          window 1          window 2
        row 0: a b c d e f     x=[a b] y=[b c]   x=[c d] y=[d e]   x=[e f] y=[f g]
        row 1: g h i j k l     x=[g h] y=[h i]   x=[i j] y=[j k]   x=[k l] y=[l m]
        row 2: m n o p q r     x=[m n] y=[n o]   x=[o p] y=[p q]   x=[q r] y=[r s]
        row 3: s t u v w x     x=[s t] y=[t u]   x=[u v] y=[v w]   x=[w x] y=[x y]

    x is stream[0:n] and y stream[1:n+1] with n the largest multiple of batch_size × bptt that
    leaves one token for the last target, so every token of stream[1:n+1] is a target exactly
    once and nothing is lost at window borders. The fewer than batch_size × bptt tokens after it
    are dropped. These are int32 copies; `tbptt_dataset` reads the same windows without one.
    """
    x, y = window_views(ids, batch_size, bptt)
    # [batch, num_windows, bptt] → [num_windows, batch, bptt]
    return x.transpose(1, 0, 2).astype(np.int32), y.transpose(1, 0, 2).astype(np.int32)


def window_views(ids, batch_size, bptt):
    """The rows of `tbptt_arrays`' windows as views of `ids` (a memory map stays one): x and y of
    shape [batch_size, num_windows, bptt], window k being x[:, k] and y[:, k]."""
    ids = np.asarray(ids)
    block = batch_size * bptt
    n = (len(ids) - 1) // block * block
    if n <= 0:
        raise ArgumentError(
            "the stream has {length} tokens; batch_size × bptt = {rows} × {columns} needs at least {needed}:"
            " use a longer corpus or smaller {batch_size} / {bptt}",
            length=len(ids),
            rows=batch_size,
            columns=bptt,
            needed=block + 1,
        )
    shape = (batch_size, n // block, bptt)
    return ids[:n].reshape(shape), ids[1 : n + 1].reshape(shape)


def tbptt_dataset(ids, batch_size, bptt):
    """A tf.data.Dataset of (x, y) TBPTT windows in stream order, prefetched (see tbptt_arrays).

    Each window is gathered from `ids` when it is needed, so a memory-mapped stream is read, never
    copied whole: memory holds a few windows, not the stream.
    """
    import tensorflow as tf

    x, y = window_views(ids, batch_size, bptt)
    num_windows = x.shape[1]

    def window(k):
        return np.asarray(x[:, k], np.int32), np.asarray(y[:, k], np.int32)

    windows = tf.data.Dataset.range(num_windows).map(
        lambda k: tf.numpy_function(window, [k], (tf.int32, tf.int32), stateful=False)
    )
    # Rows, batched back into windows: a batch tf.distribute can split by columns across replicas.
    # Order matters (state carries from window to window): never shuffle this dataset.
    rows = windows.map(lambda a, b: (tf.ensure_shape(a, (batch_size, bptt)), tf.ensure_shape(b, (batch_size, bptt))))
    batches = rows.unbatch().batch(batch_size, drop_remainder=True)
    return batches.apply(tf.data.experimental.assert_cardinality(num_windows)).prefetch(tf.data.AUTOTUNE)
