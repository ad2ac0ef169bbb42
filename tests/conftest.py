"""Shared fixtures: paths to the corpora in ../shared/data and a runner for the scripts."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
TINY_SHAKESPEARE_DIR = SHARED_DATA / "tinyshakespeare"
WIKITEXT_DIR = SHARED_DATA / "wikitext-2-mini"


@pytest.fixture(scope="session")
def shakespeare_text():
    """The full Tiny Shakespeare corpus."""
    return (TINY_SHAKESPEARE_DIR / "input.txt").read_text(encoding="utf-8")


def run_script(*args, timeout=600, **kwargs):
    """Run one of the project's scripts as a user would; return the CompletedProcess."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, **kwargs
    )


def error_lines(stderr):
    """stderr without TensorFlow's C++ start-up log lines, which no flag silences."""
    return [
        line
        for line in stderr.splitlines()
        if line.strip() and not line.startswith(("I0000", "W0000", "E0000", "WARNING: All log messages"))
    ]
