"""The Tiny Shakespeare bundled in the package: the exact text TFDS downloads, refused when damaged."""

import hashlib
import lzma
import shutil
import subprocess
import sys

from conftest import ROOT

from keraslm.corpora import TINY_SHAKESPEARE_FILE, tiny_shakespeare_bytes, tiny_shakespeare_text, write_tiny_shakespeare

# TFDS's checksums.tsv for tiny_shakespeare (karpathy/char-rnn's input.txt).
TFDS_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def test_bundled_copy_is_the_text_tfds_downloads():
    raw = tiny_shakespeare_bytes()
    assert hashlib.sha256(raw).hexdigest() == TFDS_SHA256
    assert len(raw) == 1_115_394
    text = tiny_shakespeare_text()
    assert len(text) == 1_115_394 and len(set(text)) == 65 and text.startswith("First Citizen:\n")
    # Compressed to about a third of the text.
    assert (ROOT / "keraslm" / "corpora" / TINY_SHAKESPEARE_FILE).stat().st_size < 400_000


def test_written_copy_is_byte_identical(tmp_path):
    path = write_tiny_shakespeare(tmp_path)
    assert path == str(tmp_path / "input.txt")
    assert hashlib.sha256((tmp_path / "input.txt").read_bytes()).hexdigest() == TFDS_SHA256
    assert [p.name for p in tmp_path.iterdir()] == ["input.txt"]  # no temporary left beside it


def test_a_damaged_copy_is_refused(tmp_path):
    # A copy of the package whose bundled file is damaged: decompressible, wrong bytes; then truncated.
    shutil.copytree(ROOT / "keraslm", tmp_path / "keraslm", ignore=shutil.ignore_patterns("__pycache__"))
    bundled = tmp_path / "keraslm" / "corpora" / TINY_SHAKESPEARE_FILE
    intact = bundled.read_bytes()
    probe = "\n".join(
        [
            "from keraslm.corpora import tiny_shakespeare_text",
            "try:",
            "    tiny_shakespeare_text()",
            "except Exception as e:",
            "    print(type(e).__name__, e)",
        ]
    )
    for damaged, message in (
        (lzma.compress(tiny_shakespeare_bytes().replace(b"Citizen", b"Citizan", 1)), "is damaged (its sha256 differs)"),
        (intact[:1000], "cannot be read"),
    ):
        bundled.write_bytes(damaged)
        result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert result.stdout.startswith("UsageError the bundled corpus "), result.stdout + result.stderr
        assert message in result.stdout and result.stdout.rstrip().endswith("reinstall keraslm")
        assert result.stdout.count("\n") == 1
