"""The token cache: keys, damaged entries, concurrent builders, and ids equal to the whole-text rules."""

import io
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, assert_one_line_error, run_script

from keraslm import data, progress, token_cache
from keraslm.config import DataConfig
from keraslm.data import load_corpus, open_corpus, tbptt_arrays, tbptt_dataset
from keraslm.errors import ArgumentError, UsageError
from keraslm.vocab import Vocabulary

# Tabs, CRLF, blank lines, Unicode whitespace that splits words but is no newline, multi-byte
# characters, and no final newline.
TRICKY = "Ünïcode wörds\tand tabs\r\n\nend of line  \n€uro x\u2028y z\x85w\n  lead ing\n" * 30 + "last line"


def reference_ids(splits, vocab):
    """The ids the whole-text rules give (training.encode_splits before the token cache)."""
    ids = {}
    for name, text in splits.items():
        if vocab.level == "word" and not text.endswith("\n"):
            text += "\n"
        ids[name] = vocab.encode(text, skip_unknown=True)
    return ids


@pytest.fixture(scope="module")
def shakespeare_file(tiny_shakespeare_dir):
    """The bundled Tiny Shakespeare as a file, as TFDS downloads it."""
    return tiny_shakespeare_dir / "input.txt"


def prepare(source, folder, vocabulary=None, **settings):
    config = DataConfig(source=str(source), **settings)
    return token_cache.prepare(open_corpus(config), config, str(folder), vocabulary, progress.Progress(None))


def assert_same_as_the_whole_text_rules(entry, source, **settings):
    splits = load_corpus(DataConfig(source=str(source), **settings))
    config = DataConfig(**settings)
    vocab = Vocabulary.build(splits["train"], config.level, config.min_freq, config.max_vocab)
    assert entry.vocabulary.tokens == vocab.tokens
    for name, ids in reference_ids(splits, vocab).items():
        np.testing.assert_array_equal(entry.streams[name], ids)


@pytest.mark.parametrize("level", ["char", "word"])
@pytest.mark.parametrize("chunk_bytes", [5, 64, 4 << 20])
def test_streamed_ids_equal_the_whole_text_rules(tmp_path, monkeypatch, level, chunk_bytes):
    # Small chunks cut multi-byte characters, words and lines at every possible place.
    monkeypatch.setattr(data, "CHUNK_BYTES", chunk_bytes)
    corpus = tmp_path / "tricky.txt"
    corpus.write_text(TRICKY, encoding="utf-8")
    entry = prepare(corpus, tmp_path / "cache", level=level)
    assert entry.status == "built"
    assert_same_as_the_whole_text_rules(entry, corpus, level=level)


def test_word_cut_keeps_the_order_of_ties(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "CHUNK_BYTES", 16)
    corpus = tmp_path / "ties.txt"
    corpus.write_text("b a c b a d e f g\n" * 20 + "c d\n" * 3, encoding="utf-8")
    settings = {"level": "word", "min_freq": 21, "max_vocab": 5}
    entry = prepare(corpus, tmp_path / "cache", **settings)
    assert entry.vocabulary.tokens[:2] == ["<unk>", "<eos>"]
    assert_same_as_the_whole_text_rules(entry, corpus, **settings)


@pytest.mark.parametrize("level", ["char", "word"])
@pytest.mark.parametrize("source_fixture", ["shakespeare_file", "wikitext_dir"])
def test_real_corpora_encode_as_the_whole_text_rules(tmp_path, request, source_fixture, level):
    source = request.getfixturevalue(source_fixture)
    entry = prepare(source, tmp_path, level=level)
    assert entry.streams["train"].dtype == np.uint16
    assert_same_as_the_whole_text_rules(entry, source, level=level)


def test_dropped_characters_are_noted_on_every_run(tmp_path):
    corpus = tmp_path / "d"
    corpus.mkdir()
    for name, text in {"train": "abc\n" * 10, "valid": "abz\n" * 5, "test": "ab€\n" * 5}.items():
        (corpus / f"{name}.txt").write_text(text, encoding="utf-8")
    built, hit = prepare(corpus, tmp_path / "cache"), prepare(corpus, tmp_path / "cache")
    assert hit.status == "hit" and hit.notes == built.notes
    assert built.notes == [
        "note: 5 characters of the valid split are not in the training vocabulary and were dropped: 'z'",
        "note: 5 characters of the test split are not in the training vocabulary and were dropped: '€'",
    ]
    np.testing.assert_array_equal(hit.streams["valid"], [1, 2, 0] * 5)  # a b \\n, z dropped


def test_changed_content_or_setting_makes_a_new_entry(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("to be or not to be\n" * 40, encoding="utf-8")
    cache = tmp_path / "cache"
    first = prepare(corpus, cache, level="word")
    assert prepare(corpus, cache, level="word").path == first.path
    copy = tmp_path / "elsewhere.txt"
    copy.write_bytes(corpus.read_bytes())
    assert prepare(copy, cache, level="word").status == "hit"  # the content decides, not the path
    changed = [
        prepare(corpus, cache, level="char"),
        prepare(corpus, cache, level="word", min_freq=2),
        prepare(corpus, cache, level="word", max_vocab=3),
        prepare(corpus, cache, level="word", encoding="latin-1"),
    ]
    corpus.write_text("to be or not to bee\n" + "to be or not to be\n" * 39, encoding="utf-8")
    changed.append(prepare(corpus, cache, level="word"))
    assert all(entry.status == "built" for entry in changed)
    assert len({first.path, *(entry.path for entry in changed)}) == 6
    assert "bee" in changed[-1].vocabulary.index
    # Settings that do not change a char-level stream do not make a needless entry.
    assert prepare(corpus, cache, level="char", min_freq=5).status == "built"
    assert prepare(corpus, cache, level="char", min_freq=7, max_vocab=2).status == "hit"


def test_same_bytes_in_another_layout_is_another_entry(tmp_path):
    text = "abcdefghij\n" * 30
    (tmp_path / "one.txt").write_text(text)
    directory = tmp_path / "d"
    directory.mkdir()
    for name in ("train", "valid", "test"):
        (directory / f"{name}.txt").write_text(text)
    assert prepare(tmp_path / "one.txt", tmp_path / "c").path != prepare(directory, tmp_path / "c").path


@pytest.mark.parametrize(
    "damage",
    [
        lambda path: truncate(path / "train.bin", 2),
        lambda path: truncate(path / "test.bin", 1),
        lambda path: (path / "valid.bin").unlink(),
        lambda path: (path / "meta.json").write_text("{not json"),
        lambda path: (path / "meta.json").unlink(),
        lambda path: (path / "vocab.json").write_text('{"level": "char", "tokens": ["a"]}'),
    ],
)
def test_a_damaged_entry_is_rebuilt_never_used(tmp_path, damage, shakespeare_file):
    corpus = shakespeare_file
    whole = prepare(corpus, tmp_path)
    expected = {name: np.array(stream) for name, stream in whole.streams.items()}
    del whole
    path = tmp_path / os.listdir(tmp_path)[0]
    damage(path)
    rebuilt = prepare(corpus, tmp_path)
    assert rebuilt.status == "built"
    assert len(rebuilt.notes) == 1 and rebuilt.notes[0].startswith(f"note: token cache entry {path} is damaged (")
    for name, stream in expected.items():
        np.testing.assert_array_equal(rebuilt.streams[name], stream)
    assert os.listdir(tmp_path) == [path.name]  # the damaged copy is gone, no temporary is left
    assert prepare(corpus, tmp_path).status == "hit"


def truncate(path, tokens):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - tokens)


# One preparation in a process of its own, worded as the scripts word errors: CORPUS CACHE LEVEL.
BUILD = """
import sys
from keraslm import progress, token_cache
from keraslm.cli import run_main
from keraslm.config import DataConfig
from keraslm.data import open_corpus


def main(argv):
    config = DataConfig(source=sys.argv[1], level=sys.argv[3])
    entry = token_cache.prepare(open_corpus(config), config, sys.argv[2], progress=progress.Progress(None))
    print(entry.status, entry.path, int(entry.streams["train"].sum()))


run_main(main)
"""


def build_in_a_process(corpus, cache, level):
    return [sys.executable, "-c", BUILD, str(corpus), str(cache), level]


def test_two_processes_building_one_entry_both_end_with_the_whole_entry(tmp_path, wikitext_dir):
    corpus, cache = tmp_path / "corpus.txt", tmp_path / "cache"
    corpus.write_text((wikitext_dir / "train.txt").read_text(encoding="utf-8") * 4, encoding="utf-8")
    builders = [
        subprocess.Popen(build_in_a_process(corpus, cache, "word"), cwd=ROOT, stdout=subprocess.PIPE) for _ in range(2)
    ]
    outputs = [builder.communicate(timeout=300)[0].decode().split() for builder in builders]
    assert [builder.returncode for builder in builders] == [0, 0]
    assert {tuple(output[1:]) for output in outputs} == {tuple(outputs[0][1:])}  # the same entry and ids
    assert os.listdir(cache) == [os.path.basename(outputs[0][1])]  # and no temporary left


def test_a_resumed_runs_other_vocabulary_gets_its_own_entry(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("abcabc\n" * 30, encoding="utf-8")
    plain = prepare(corpus, tmp_path / "cache")
    assert prepare(corpus, tmp_path / "cache", vocabulary=plain.vocabulary).path == plain.path
    older = Vocabulary("char", ["\n", "a", "b", "x"])
    entry = prepare(corpus, tmp_path / "cache", vocabulary=older)
    assert entry.path != plain.path and entry.vocabulary.tokens == older.tokens
    assert entry.notes[-1] == "note: the run's vocab.json differs from the corpus's; its ids have their own entry"
    splits = load_corpus(DataConfig(source=str(corpus)))
    np.testing.assert_array_equal(entry.streams["train"], reference_ids(splits, older)["train"])


def test_a_killed_builds_old_temporary_is_removed_a_running_ones_kept(tmp_path, shakespeare_file):
    cache = tmp_path / "cache"
    killed, running = cache / ".0123abcd.x1y2z3w4.tmp", cache / ".4567cdef.a1b2c3d4.tmp"
    for folder in (killed, running):
        folder.mkdir(parents=True)
        (folder / "train.bin").write_bytes(b"\0" * 10)
    os.utime(killed, (0, 0))
    entry = prepare(shakespeare_file, cache)
    assert sorted(os.listdir(cache)) == sorted([running.name, os.path.basename(entry.path)])


def test_a_bad_split_leaves_no_entry(tmp_path):
    corpus = tmp_path / "d"
    corpus.mkdir()
    for name, text in {"train": "abc\n" * 10, "valid": " \n\n", "test": "abc\n"}.items():
        (corpus / f"{name}.txt").write_text(text)
    with pytest.raises(UsageError, match="the valid split of .* is empty"):
        prepare(corpus, tmp_path / "cache")
    assert os.listdir(tmp_path / "cache") == []


def test_decoding_errors_name_the_byte_and_line_across_chunk_borders(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "CHUNK_BYTES", 3)
    corpus = tmp_path / "latin.txt"
    corpus.write_bytes(b"ab\n\xc3\xa9\ncaf\xe9\n" * 3)  # "é" in UTF-8 across a border, then latin-1
    with pytest.raises(UsageError, match=r"is not valid utf-8 \(byte 9, line 3\)"):
        prepare(corpus, tmp_path / "cache")
    corpus.write_bytes(b"ab\n\xc3")  # a character cut by the end of the file
    with pytest.raises(UsageError, match=r"is not valid utf-8 \(byte 3, line 2\)"):
        prepare(corpus, tmp_path / "cache")
    assert os.listdir(tmp_path / "cache") == []


def test_a_cache_folder_that_is_a_file_is_one_line(tmp_path, shakespeare_file):
    (tmp_path / "file").write_text("")
    with pytest.raises(ArgumentError, match="token_cache_dir .* is a file, not a folder"):
        prepare(shakespeare_file, tmp_path / "file")
    corpus = tmp_path / "c.txt"
    corpus.write_text("abc\n" * 100)
    result = run_script("train.py", "--data", corpus, "--token-cache", tmp_path / "file", "--run-dir", tmp_path / "r")
    assert_one_line_error(result, "--token-cache", "is a file, not a folder")


def test_train_builds_the_entry_once_then_maps_it_and_records_no_cache(tmp_path, shakespeare_file):
    corpus, cache = tmp_path / "corpus.txt", tmp_path / "tokens"
    corpus.write_text((shakespeare_file).read_text(encoding="utf-8")[:50_000], encoding="utf-8")
    small = ["--hidden-dim", "8", "--embedding-dim", "4", "--batch-size", "4", "--bptt", "10", "--sample-tokens", "0"]
    common = ["--dry-run", "--epochs", "1", "--token-cache", cache, "--verbose", "2", *small]
    first = run_script("train.py", "--data", corpus, "--run-dir", tmp_path / "a", *common)
    second = run_script("train.py", "--data", corpus, "--run-dir", tmp_path / "b", *common)
    resumed = run_script("train.py", "--resume", "--run-dir", tmp_path / "a", "--epochs", "2", *common[3:5])
    assert [result.returncode for result in (first, second, resumed)] == [0, 0, 0], resumed.stderr
    (key,) = os.listdir(cache)
    for result, status in ((first, "built"), (second, "hit"), (resumed, "hit")):
        (line,) = [line for line in result.stdout.splitlines() if line.startswith("token cache: ")]
        assert line.startswith(f"token cache: {status} {key[:12]} in {cache}, tokens train/valid/test 45,000/")
        assert ", uint16, 0.1 MB, " in line
    assert str(cache) not in (tmp_path / "a" / "config.json").read_text()


def _file_size_limit(limit):
    def limit_in_child():
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return limit_in_child


def test_a_full_disk_leaves_nothing_half_written(tmp_path, shakespeare_file):
    # A file size limit stands in for a full disk: the write fails part-way through train.bin.
    cache = tmp_path / "cache"
    cache.mkdir()
    result = subprocess.run(
        build_in_a_process(shakespeare_file, cache, "char"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        preexec_fn=_file_size_limit(100_000),
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "cannot write the --token-cache entry" in result.stderr and "File too large" in result.stderr
    assert os.listdir(cache) == []


def test_default_folder_is_inside_tfds_data_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("KERASLM_TOKEN_CACHE")
    monkeypatch.delenv("TFDS_DATA_DIR", raising=False)
    assert token_cache.default_folder(str(tmp_path)) == str(tmp_path / "keraslm-tokens")
    assert token_cache.default_folder() == os.path.expanduser("~/tensorflow_datasets/keraslm-tokens")
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    assert token_cache.default_folder() == str(tmp_path / "keraslm-tokens")
    monkeypatch.setenv("KERASLM_TOKEN_CACHE", "/somewhere")
    assert token_cache.default_folder(str(tmp_path)) == "/somewhere"


def test_tfds_examples_stream_into_the_cache(tmp_path, shakespeare_text, tiny_shakespeare_dir):
    config = DataConfig(tfds_manual_dir=str(tiny_shakespeare_dir), tfds_data_dir=str(tmp_path))
    entry = token_cache.prepare(open_corpus(config), config, str(tmp_path / "cache"), progress=progress.Progress(None))
    assert [len(entry.streams[s]) for s in ("train", "valid", "test")] == [1_003_854, 55_770, 55_770]
    assert entry.vocabulary.decode(entry.streams["train"][:1000]) == shakespeare_text[:1000]


@pytest.mark.parametrize("level", ["char", "word"])
@pytest.mark.parametrize("source_fixture", ["shakespeare_file", "wikitext_dir"])
def test_windows_from_the_map_equal_tbptt_arrays(tmp_path, request, source_fixture, level):
    source = request.getfixturevalue(source_fixture)
    entry = prepare(source, tmp_path, level=level)
    for split, batch_size, bptt in [("train", 64, 100), ("train", 20, 35), ("valid", 7, 13), ("test", 1, 128)]:
        stream = entry.streams[split]
        assert isinstance(stream, np.memmap)
        x, y = tbptt_arrays(np.array(stream), batch_size, bptt)
        dataset = tbptt_dataset(stream, batch_size, bptt)
        assert int(dataset.cardinality()) == len(x)
        assert dataset.element_spec[0].shape == (batch_size, bptt)
        windows = list(dataset.as_numpy_iterator())
        assert len(windows) == len(x)
        for k, (wx, wy) in enumerate(windows):
            assert wx.dtype == np.int32
            np.testing.assert_array_equal(wx, x[k])
            np.testing.assert_array_equal(wy, y[k])


def test_progress_is_quiet_for_short_work_and_reports_rates_in_a_log(monkeypatch):
    log = io.StringIO()
    report = progress.Progress(log)
    report.phase("encoding", total_bytes=2_000_000)
    report.advance(nbytes=1_000_000, tokens=500_000)
    assert log.getvalue() == ""
    monkeypatch.setattr(progress, "LOG_EVERY", 0.0)
    report.advance(nbytes=0)
    line = log.getvalue()
    assert line.startswith("token cache: encoding 1.0/2.0 MB (50%), ") and line.endswith(" M/s)\n")
    assert "MB/s, 0.5 M tokens (" in line
