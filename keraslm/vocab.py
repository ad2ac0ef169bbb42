"""Vocabulary: text ↔ token ids at character or word level, saved as vocab.json.

No TensorFlow here: the inference side uses this module where TensorFlow is absent.
"""

import collections
import hashlib
import json

import numpy as np

from keraslm.errors import ArgumentError, UsageError
from keraslm.files import write_text_atomic

UNK = "<unk>"
EOS = "<eos>"


class Vocabulary:
    """Tokens in id order, and the rules that turn text into them.

    Char level: every character is a token; there is no `<unk>` (a character the training split
    lacks is reported, not silently mapped). Word level: whitespace split, `<eos>` after every line
    (as pytorch/examples' `Corpus.tokenize`), `<unk>` for words outside the vocabulary.

    Args:
        level: "char" or "word".
        tokens: the tokens in id order.

    Example:
        vocab = Vocabulary.build("to be or not\\nto be\\n", level="word")
        ids = vocab.encode("to be or\\n")          # array([... , <eos> id])
        vocab.decode(ids)                          # "to be or\\n"
    """

    def __init__(self, level, tokens):
        if level not in ("char", "word"):
            raise ArgumentError("unknown vocabulary {level} {got!r}; expected 'char' or 'word'", got=level)
        self.level = level
        self.tokens = list(tokens)
        self.index = {t: i for i, t in enumerate(self.tokens)}
        if len(self.index) != len(self.tokens):
            raise UsageError("vocabulary has duplicate tokens; vocab.json is damaged")
        if level == "word" and (UNK not in self.index or EOS not in self.index):
            raise UsageError(f"a word vocabulary needs {UNK} and {EOS}; vocab.json is damaged")

    def __len__(self):
        return len(self.tokens)

    @classmethod
    def build(cls, text, level, min_freq=1, max_vocab=0):
        """Build from the training text.

        Char level: the distinct characters, sorted. Word level: `<unk>`, `<eos>`, then the
        words seen at least `min_freq` times by falling count (ties: first appearance), cut to
        `max_vocab` tokens in all when it is positive.
        """
        if level == "char":
            return cls("char", sorted(set(text)))
        return cls.from_word_counts(collections.Counter(words(text)), min_freq, max_vocab)

    @classmethod
    def from_word_counts(cls, counts, min_freq=1, max_vocab=0):
        """A word vocabulary from a Counter of the training words, counted in text order (as
        `build` counts them; keraslm.token_cache counts a corpus too large to hold in chunks)."""
        # Counter.most_common keeps first-appearance order among equal counts.
        kept = [w for w, n in counts.most_common() if n >= min_freq and w not in (UNK, EOS)]
        if max_vocab:
            kept = kept[: max(max_vocab - 2, 0)]
        return cls("word", [UNK, EOS, *kept])

    @property
    def unk_id(self):
        """Id of `<unk>` (word level), else None."""
        return self.index.get(UNK) if self.level == "word" else None

    @property
    def start_token(self):
        """Token that begins generation from an empty prompt: `<eos>`, or a newline if known."""
        if self.level == "word":
            return EOS
        return "\n" if "\n" in self.index else None

    def split(self, text):
        """Text to tokens (strings), `<eos>` at each line end at word level."""
        return list(text) if self.level == "char" else words(text)

    def encode(self, text, skip_unknown=False):
        """Text to an int32 id array.

        Word level maps unknown words to `<unk>`. Char level raises UsageError naming unknown
        characters, or drops them with `skip_unknown=True`.
        """
        tokens = self.split(text)
        if self.level == "word":
            unk = self.index[UNK]
            return np.fromiter((self.index.get(t, unk) for t in tokens), np.int32, len(tokens))
        unknown = {t for t in set(tokens) if t not in self.index}
        if unknown and not skip_unknown:
            shown = ", ".join(repr(c) for c in sorted(unknown)[:10])
            raise UsageError(f"characters not in the vocabulary: {shown}; remove them or skip them")
        return np.array([self.index[t] for t in tokens if t in self.index], np.int32)

    def decode(self, ids):
        """Ids to text: characters joined, or words joined by spaces with `<eos>` as a newline."""
        tokens = [self.tokens[int(i)] for i in ids]
        if self.level == "char":
            return "".join(tokens)
        lines, line = [], []
        for t in tokens:
            if t == EOS:
                lines.append(" ".join(line) + "\n")
                line = []
            else:
                line.append(t)
        return "".join(lines) + " ".join(line)

    def encode_prompt(self, prompt, rng, skip_unknown=False):
        """A prompt's ids, never empty: an empty prompt is the start token, or without one a
        token drawn with `rng` (as pytorch/examples' generate.py starts)."""
        ids = self.encode(prompt, skip_unknown=skip_unknown)
        if len(ids):
            return ids
        start = self.start_token
        return np.array([self.index[start] if start is not None else rng.integers(len(self))], np.int32)

    def join(self, prompt, continuation):
        """Prompt and decoded continuation as one text (a space between words at word level)."""
        if self.level == "word" and prompt and continuation and not prompt.endswith(("\n", " ")):
            return prompt + " " + continuation
        return prompt + continuation

    def sha256(self):
        """A fingerprint of level and tokens, to tell whether two vocabularies are the same."""
        return hashlib.sha256(json.dumps([self.level, self.tokens]).encode()).hexdigest()

    def to_dict(self):
        """A JSON-ready dict: level, tokens in id order, special tokens."""
        specials = {"unk": UNK, "eos": EOS} if self.level == "word" else {}
        return {"level": self.level, "tokens": self.tokens, "special_tokens": specials}

    @classmethod
    def from_dict(cls, d):
        """Inverse of `to_dict`; malformed input is a UsageError."""
        if not isinstance(d, dict) or not isinstance(d.get("tokens"), list) or not d["tokens"]:
            raise UsageError("vocabulary must be an object with a non-empty 'tokens' list")
        if not all(isinstance(t, str) for t in d["tokens"]):
            raise UsageError("vocabulary tokens must all be strings")
        try:
            return cls(d.get("level"), d["tokens"])
        except ArgumentError as e:  # the level came from a file, not a flag: keep its field name
            raise UsageError(str(e)) from None

    def save(self, path):
        """Write vocab.json atomically."""
        write_text_atomic(path, json.dumps(self.to_dict(), ensure_ascii=False, indent=1) + "\n")

    @classmethod
    def load(cls, path):
        """Read vocab.json."""
        try:
            with open(path, encoding="utf-8") as f:
                return cls.from_dict(json.load(f))
        except FileNotFoundError:
            raise UsageError(f"{path} not found: is this a keraslm run directory?") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UsageError(f"{path} is not valid JSON ({e}); the run directory is damaged") from None


def words(text):
    """Text to word tokens: whitespace split, `<eos>` for every newline.

    Text cut after any space or newline tokenizes piece by piece as it does whole, which lets
    keraslm.token_cache stream a corpus through this rule.
    """
    # pytorch/examples' Corpus: every line ends with <eos>, empty lines included. Here <eos>
    # stands for the newline itself, so text without a final newline (a prompt) ends without it.
    words = []
    lines = text.split("\n")
    for line in lines[:-1]:
        words.extend(line.split())
        words.append(EOS)
    words.extend(lines[-1].split())
    return words
