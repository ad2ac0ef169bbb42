import numpy as np
import pytest

from keraslm.errors import UsageError
from keraslm.vocab import EOS, UNK, Vocabulary


def test_char_round_trip():
    vocab = Vocabulary.build("hello world\n", "char")
    assert vocab.tokens == sorted(set("hello world\n"))
    ids = vocab.encode("low\nhell")
    assert ids.dtype == np.int32
    assert vocab.decode(ids) == "low\nhell"


def test_char_unknown_characters_are_named_or_skipped():
    vocab = Vocabulary.build("abc", "char")
    with pytest.raises(UsageError, match="'z'"):
        vocab.encode("abz")
    assert vocab.decode(vocab.encode("abz", skip_unknown=True)) == "ab"


def test_word_level_adds_eos_per_line_like_pytorch_corpus():
    vocab = Vocabulary.build("the cat sat\nthe dog\n\n", "word")
    assert vocab.tokens[:2] == [UNK, EOS]
    assert vocab.split("the cat sat\nthe dog\n\n") == ["the", "cat", "sat", EOS, "the", "dog", EOS, EOS]
    # Most frequent first after the specials; ties keep first appearance.
    assert vocab.tokens[2:] == ["the", "cat", "sat", "dog"]


def test_word_round_trip_and_unseen_words_become_unk():
    vocab = Vocabulary.build("the cat sat\nthe dog\n", "word")
    ids = vocab.encode("the bird sat\n")
    assert [vocab.tokens[i] for i in ids] == ["the", UNK, "sat", EOS]
    assert vocab.decode(vocab.encode("the cat\nsat")) == "the cat\nsat"


def test_min_freq_and_max_vocab():
    text = "a a a b b c\n"
    assert Vocabulary.build(text, "word", min_freq=2).tokens == [UNK, EOS, "a", "b"]
    assert Vocabulary.build(text, "word", max_vocab=3).tokens == [UNK, EOS, "a"]


def test_corpus_unk_token_is_the_vocabulary_unk():
    vocab = Vocabulary.build("an <unk> here\n", "word")
    assert vocab.tokens.count(UNK) == 1
    assert vocab.encode("<unk>")[0] == vocab.unk_id


def test_save_load(tmp_path):
    for level, text in (("char", "ab\ncd é"), ("word", "x y\nz\n")):
        vocab = Vocabulary.build(text, level)
        vocab.save(tmp_path / "vocab.json")
        loaded = Vocabulary.load(tmp_path / "vocab.json")
        assert loaded.level == level and loaded.tokens == vocab.tokens


def test_start_tokens():
    assert Vocabulary.build("a\nb", "char").start_token == "\n"
    assert Vocabulary.build("ab", "char").start_token is None
    assert Vocabulary.build("a b\n", "word").start_token == EOS
