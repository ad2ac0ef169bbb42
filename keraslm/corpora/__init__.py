"""The corpus shipped inside the package: Tiny Shakespeare, xz-compressed, checked by its sha256.

It lets a clone train and test with no network and nothing beside it. The text is the public-domain
`input.txt` of karpathy/char-rnn, byte for byte the file TFDS's `tiny_shakespeare` downloads. No
TensorFlow here.
"""

import hashlib
import lzma
import os
from importlib import resources

from keraslm.errors import UsageError
from keraslm.files import atomic_path

TINY_SHAKESPEARE_FILE = "tiny_shakespeare.txt.xz"
# The sha256 of the decompressed text, as in TFDS's checksums.tsv for tiny_shakespeare.
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
# The name TFDS's tiny_shakespeare builder looks for in a manual dir.
TFDS_FILE_NAME = "input.txt"


def tiny_shakespeare_bytes():
    """The bundled Tiny Shakespeare as bytes, verified against TINY_SHAKESPEARE_SHA256.

    A missing or damaged copy raises a UsageError (one line: reinstall keraslm).
    """
    resource = resources.files(__name__).joinpath(TINY_SHAKESPEARE_FILE)
    try:
        raw = lzma.decompress(resource.read_bytes())
    except (OSError, lzma.LZMAError, EOFError) as e:
        raise UsageError(f"the bundled corpus {resource} cannot be read ({e}); reinstall keraslm") from None
    if hashlib.sha256(raw).hexdigest() != TINY_SHAKESPEARE_SHA256:
        raise UsageError(f"the bundled corpus {resource} is damaged (its sha256 differs); reinstall keraslm")
    return raw


def tiny_shakespeare_text():
    """The bundled Tiny Shakespeare as a string (1,115,394 characters).

    Example:
        text = tiny_shakespeare_text()
        text[:14]                        # "First Citizen:"
    """
    return tiny_shakespeare_bytes().decode("utf-8")


def write_tiny_shakespeare(folder):
    """Write the bundled text into `folder` as input.txt (atomically) and return that file's path.

    The folder can then serve as TFDS's manual dir for tiny_shakespeare, or as a `--data` file's home.
    """
    path = os.path.join(folder, TFDS_FILE_NAME)
    raw = tiny_shakespeare_bytes()
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(raw)
    return path
