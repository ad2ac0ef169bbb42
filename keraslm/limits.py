"""The limits an export serves within, fixed at export time and recorded in keraslm.json.

A TF Serving process shares its memory among all requests, so no single request may ask for an
unbounded amount of work: the exported signatures check these limits before they allocate
anything and refuse a request beyond them with InvalidArgument naming the argument and the range.

    max_new_tokens      tokens one `generate` request may ask for
    max_prompt_tokens   tokens in one prompt of `generate`
    max_batch_tokens    rows × length of one request: `serving_default`'s tokens [B, T],
                        `generate`'s padded prompts [B, longest] and its output [B, max_new_tokens],
                        and `beam_search`'s beams [B × beam_width, max_new_tokens]
    max_beam_width      the widest beam of one `beam_search` request

Prompts arrive as bytes, so before tokenising, `generate` also bounds their bytes by
BYTES_PER_TOKEN per token (see `max_prompt_bytes`): the tokeniser's own allocation stays bounded.
"""

import dataclasses

from keraslm.errors import ArgumentError

# Bytes a prompt may spend per token before it is tokenised: a word of seven letters and its
# space, or two 4-byte UTF-8 characters.
BYTES_PER_TOKEN = 8
# Every limit, times BYTES_PER_TOKEN, must fit the graph's int32 arithmetic.
LARGEST_LIMIT = 2**28
# serving_default returns logits [B, T, V] in float32: by default a request may produce at most
# this many bytes of them (and never more than DEFAULT_BATCH_TOKENS tokens).
LOGITS_BYTES = 2**30
DEFAULT_BATCH_TOKENS = 65536


@dataclasses.dataclass(frozen=True)
class ServingLimits:
    """Per-request limits of an export (see the module docstring).

    Args:
        max_new_tokens: the largest `max_new_tokens` of a `generate` request.
        max_prompt_tokens: the most tokens in one prompt.
        max_batch_tokens: the most rows × length in one request.
        max_beam_width: the largest `beam_width` of a `beam_search` request.

    Example:
        limits = ServingLimits.default(vocabulary_size=65)   # 4096, 4096, 65536, 64
    """

    max_new_tokens: int = 4096
    max_prompt_tokens: int = 4096
    max_batch_tokens: int = DEFAULT_BATCH_TOKENS
    max_beam_width: int = 64

    @classmethod
    def default(cls, vocabulary_size, **overrides):
        """The defaults for a vocabulary size; `overrides` that are None keep the default."""
        batch = min(DEFAULT_BATCH_TOKENS, max(1, LOGITS_BYTES // (4 * vocabulary_size)))
        chosen = {k: v for k, v in overrides.items() if v is not None}
        limits = cls(**({"max_batch_tokens": batch} | chosen))
        limits.validate()
        return limits

    @property
    def max_prompt_bytes(self):
        """The most bytes in one prompt, checked before it is tokenised."""
        return BYTES_PER_TOKEN * self.max_prompt_tokens

    @property
    def max_request_bytes(self):
        """The most bytes of all prompts of one request together, checked before tokenising."""
        return BYTES_PER_TOKEN * self.max_batch_tokens

    def validate(self):
        """Raise ArgumentError naming the limit that is not an integer in [1, LARGEST_LIMIT]."""
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not (isinstance(value, int) and 1 <= value <= LARGEST_LIMIT):
                raise ArgumentError.about(field.name, f"must be an integer in [1, {LARGEST_LIMIT}], got {value}")

    def to_dict(self):
        """keraslm.json's `limits`: the limits and the two byte bounds they imply."""
        return dataclasses.asdict(self) | {
            "max_prompt_bytes": self.max_prompt_bytes,
            "max_request_bytes": self.max_request_bytes,
        }
