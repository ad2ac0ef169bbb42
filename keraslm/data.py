"""Corpora in, tf.data TBPTT windows out.

Sources: `tfds:NAME` (any TFDS dataset with a text feature), a directory holding
train.txt / valid.txt / test.txt, or one text file split 90/5/5 in order.
"""

import logging
import os
import tempfile

import numpy as np

from keraslm.errors import ArgumentError, UsageError, first_line

SPLITS = ("train", "valid", "test")
# TFDS names the middle split "validation"; a few datasets have no test split.
TFDS_SPLIT_NAMES = {"train": ("train",), "valid": ("validation", "valid", "dev"), "test": ("test",)}


def load_corpus(data_config):
    """Return {"train": str, "valid": str, "test": str} for the configured source."""
    source = data_config.source
    if source.startswith("tfds:"):
        splits = _load_tfds(source[len("tfds:") :], data_config.tfds_data_dir, data_config.tfds_manual_dir)
    elif os.path.isdir(source):
        splits = {s: _read_text(os.path.join(source, f"{s}.txt"), data_config.encoding) for s in SPLITS}
    elif os.path.isfile(source):
        splits = split_text(_read_text(source, data_config.encoding))
    else:
        raise ArgumentError(
            "{source} {path}: no such file or directory; give a text file, a directory with "
            "train.txt/valid.txt/test.txt, or {dataset} tfds:NAME",
            path=source,
        )
    for name, text in splits.items():
        if not text.strip():
            raise UsageError(f"the {name} split of {source} is empty; it needs text to train or evaluate on")
    return splits


def split_text(text):
    """Split one text 90/5/5 in order, as TFDS splits tiny_shakespeare."""
    n = len(text)
    a, b = int(n * 0.9), int(n * 0.95)
    return {"train": text[:a], "valid": text[a:b], "test": text[b:]}


def _read_text(path, encoding):
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise UsageError(f"{path} not found; a data directory needs train.txt, valid.txt and test.txt") from None
    except IsADirectoryError:
        raise UsageError(f"{path} is a directory, not a text file") from None
    if b"\0" in raw[:65536]:
        raise UsageError(f"{path} looks binary (it holds NUL bytes); give a plain text file")
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ArgumentError(
            "{path} is not valid {codec} (byte {start}, line {line}); pass {encoding} with the file's encoding"
            " (e.g. latin-1)",
            path=path,
            codec=encoding,
            start=e.start,
            line=line,
        ) from None
    except LookupError:
        raise ArgumentError("unknown {encoding} {got!r}", got=encoding) from None


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
        dataset = builder.as_dataset(split=found[0])
        key = text_keys[0]
        # Examples are documents: join them as lines so one stream runs through the split.
        splits[split] = "\n".join(ex[key].decode("utf-8") for ex in tfds.as_numpy(dataset))
    return splits


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
    are dropped. Memory is two copies of the stream, never one per sliding window.
    """
    ids = np.asarray(ids, dtype=np.int32)
    block = batch_size * bptt
    n = (len(ids) - 1) // block * block
    if n == 0:
        raise ArgumentError(
            "the stream has {length} tokens; batch_size × bptt = {rows} × {columns} needs at least {needed}:"
            " use a longer corpus or smaller {batch_size} / {bptt}",
            length=len(ids),
            rows=batch_size,
            columns=bptt,
            needed=block + 1,
        )
    num_windows = n // block

    def cut(stream):
        # [batch, num_windows, bptt] → [num_windows, batch, bptt]
        return stream.reshape(batch_size, num_windows, bptt).transpose(1, 0, 2).copy()

    return cut(ids[:n]), cut(ids[1 : n + 1])


def tbptt_dataset(ids, batch_size, bptt):
    """A tf.data.Dataset of (x, y) TBPTT windows in stream order, prefetched (see tbptt_arrays)."""
    import tensorflow as tf

    x, y = tbptt_arrays(ids, batch_size, bptt)
    # Rows, batched back into windows: a batch tf.distribute can split by columns across replicas.
    # Order matters (state carries from window to window): never shuffle this dataset.
    rows = tf.data.Dataset.from_tensor_slices((x.reshape(-1, bptt), y.reshape(-1, bptt)))
    return rows.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
