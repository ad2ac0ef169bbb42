import string

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keraslm.config import DataConfig
from keraslm.data import load_corpus, split_text, tbptt_arrays, tbptt_dataset
from keraslm.errors import UsageError


def letters(windows):
    return [["".join(string.ascii_lowercase[i] for i in row) for row in w] for w in windows]


def test_windows_match_the_design_picture():
    stream = np.arange(25)  # a … y
    x, y = tbptt_arrays(stream, batch_size=4, bptt=2)
    assert x.shape == y.shape == (3, 4, 2)
    assert letters(x) == [["ab", "gh", "mn", "st"], ["cd", "ij", "op", "uv"], ["ef", "kl", "qr", "wx"]]
    assert letters(y) == [["bc", "hi", "no", "tu"], ["de", "jk", "pq", "vw"], ["fg", "lm", "rs", "xy"]]


def test_dataset_yields_the_windows_in_stream_order():
    x, y = tbptt_arrays(np.arange(25), 4, 2)
    got = list(tbptt_dataset(np.arange(25), 4, 2).as_numpy_iterator())
    assert len(got) == 3
    for k, (gx, gy) in enumerate(got):
        np.testing.assert_array_equal(gx, x[k])
        np.testing.assert_array_equal(gy, y[k])


def test_remainder_is_dropped():
    # 30 tokens, block 8: n = 24 (one token left for the last target), 5 tokens dropped.
    x, y = tbptt_arrays(np.arange(30), batch_size=2, bptt=4)
    assert x.size == 24 and y.max() == 24 and x.max() == 23


def test_too_short_stream_says_how_many_tokens_are_needed():
    with pytest.raises(UsageError, match="at least 9"):
        tbptt_arrays(np.arange(8), batch_size=2, bptt=4)


@settings(max_examples=200, deadline=None)
@given(length=st.integers(2, 400), batch_size=st.integers(1, 9), bptt=st.integers(1, 12))
def test_every_target_exactly_once_and_state_rows_continue(length, batch_size, bptt):
    stream = np.arange(length)
    block = batch_size * bptt
    if length - 1 < block:
        with pytest.raises(UsageError):
            tbptt_arrays(stream, batch_size, bptt)
        return
    x, y = tbptt_arrays(stream, batch_size, bptt)
    n = (length - 1) // block * block
    np.testing.assert_array_equal(np.sort(y.ravel()), np.arange(1, n + 1))  # each target once
    np.testing.assert_array_equal(y, x + 1)  # targets are the stream shifted by one
    # Row b of window k+1 starts where row b of window k ended: the carried state is right.
    np.testing.assert_array_equal(x[1:, :, 0], x[:-1, :, -1] + 1)


def test_single_file_splits_90_5_5_in_order():
    splits = split_text("x" * 90 + "y" * 5 + "z" * 5)
    assert splits == {"train": "x" * 90, "valid": "y" * 5, "test": "z" * 5}


def test_directory_source_reads_train_valid_test(wikitext_dir):
    splits = load_corpus(DataConfig(source=str(wikitext_dir)))
    assert set(splits) == {"train", "valid", "test"}
    assert splits["valid"] == (wikitext_dir / "valid.txt").read_text(encoding="utf-8")


def test_tfds_tiny_shakespeare_offline_through_the_manual_dir(tmp_path, shakespeare_text, tiny_shakespeare_dir):
    config = DataConfig(tfds_manual_dir=str(tiny_shakespeare_dir), tfds_data_dir=str(tmp_path))
    splits = load_corpus(config)
    assert [len(splits[s]) for s in ("train", "valid", "test")] == [1_003_854, 55_770, 55_770]
    assert splits["train"] == shakespeare_text[:1_003_854]


def test_bad_sources(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        load_corpus(DataConfig(source=str(tmp_path / "missing.txt")))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(UsageError, match="empty"):
        load_corpus(DataConfig(source=str(tmp_path / "empty.txt")))
    (tmp_path / "latin.txt").write_bytes("caf\xe9\n".encode("latin-1") * 50)
    with pytest.raises(UsageError, match="pass encoding with the file's encoding"):
        load_corpus(DataConfig(source=str(tmp_path / "latin.txt")))
    assert "café" in load_corpus(DataConfig(source=str(tmp_path / "latin.txt"), encoding="latin-1"))["train"]
    with pytest.raises(UsageError, match="no dataset"):
        load_corpus(DataConfig(source="tfds:no_such_dataset_xyz", tfds_data_dir=str(tmp_path)))
