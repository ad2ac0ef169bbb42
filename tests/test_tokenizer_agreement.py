"""The two tokenizers agree: generate's in-graph PromptTokenizer gives exactly the ids of
Vocabulary.encode (char level with skip_unknown, as a server cannot ask) on arbitrary text.

The text mixes the vocabulary's own tokens with every kind of whitespace Python knows, newlines,
combining marks, characters outside the vocabulary, the special tokens spelled out, and nothing.
"""

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

from keraslm.export.signatures import PromptTokenizer
from keraslm.vocab import Vocabulary

CORPUS = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
# Every character str.split() splits on, so both tokenizers meet each one.
WHITESPACE = "".join(c for c in map(chr, range(0x110000)) if c.isspace())
ODD = ["\u0301", "\u0308", "é", "e\u0301", "\x00", "\ufeff", "\u200b", "😀", "<eos>", "<unk>", "<", ">"]

VOCABULARIES = {
    "char": Vocabulary.build(CORPUS, "char"),
    "char without a newline": Vocabulary.build(CORPUS.replace("\n", " "), "char"),
    "word": Vocabulary.build(CORPUS, "word"),
}
TOKENIZERS = {
    name: tf.function(PromptTokenizer(vocab), input_signature=[tf.TensorSpec([None], tf.string)])
    for name, vocab in VOCABULARIES.items()
}

pieces = st.one_of(
    st.sampled_from(sorted(set(CORPUS))),
    st.sampled_from(CORPUS.split()),
    st.sampled_from(WHITESPACE),
    st.sampled_from(ODD),
    st.characters(exclude_categories=["Cs"]),  # any code point UTF-8 can carry
)
texts = st.lists(pieces, max_size=30).map("".join)


@pytest.mark.parametrize("name", VOCABULARIES)
@settings(max_examples=200, deadline=None)
@given(text=texts)
def test_in_graph_ids_are_vocabulary_ids(name, text):
    vocab = VOCABULARIES[name]
    in_graph = TOKENIZERS[name](tf.constant([text])).numpy()[0]
    np.testing.assert_array_equal(in_graph, vocab.encode(text, skip_unknown=True), err_msg=repr(text))


@pytest.mark.parametrize("name", VOCABULARIES)
@settings(max_examples=50, deadline=None)
@given(batch=st.lists(texts, min_size=1, max_size=4))
def test_a_batch_is_tokenised_row_by_row(name, batch):
    vocab = VOCABULARIES[name]
    rows = TOKENIZERS[name](tf.constant(batch)).to_list()
    assert rows == [vocab.encode(text, skip_unknown=True).tolist() for text in batch]


@pytest.mark.parametrize("name", ["char", "word"])
def test_a_prompt_with_no_known_token_starts_where_encode_prompt_starts(name):
    vocab = VOCABULARIES[name]
    tokenizer = PromptTokenizer(vocab)
    empty = "" if name == "word" else "\u2603"  # nothing, or only characters the vocabulary lacks
    assert TOKENIZERS[name](tf.constant([empty])).to_list() == [[]]
    rng = np.random.default_rng(0)
    assert vocab.encode_prompt(empty, rng, skip_unknown=True).tolist() == [tokenizer.start_id]
