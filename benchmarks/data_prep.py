"""Data preparation at scale: first-run and cached-run time and peak memory of a dry run.

    python -m benchmarks.data_prep [--sizes 10M,100M,1G] [--levels char,word] [--work-dir DIR]
                                   [--repo DIR]

Makes text corpora of about each size by concatenating the corpora in ../shared/data (whole lines,
repeated), then for each size and level runs, as a user would,

    python train.py --data FILE --level LEVEL --dry-run --epochs 1 (a small model) --token-cache DIR

twice on a fresh token cache: the first run tokenizes the corpus into the cache, the second maps
it. Each run's wall time and peak RSS (its own rusage, from os.wait4) are measured, and the
preparation time is read from train.py's "token cache: ..." line. Prints a Markdown table.

--repo runs another checkout's train.py (for example the commit before the token cache, for a
"before" row: `git worktree add /tmp/before COMMIT`); one without --token-cache runs once per cell.
"""

import argparse
import itertools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")
UNITS = {"K": 10**3, "M": 10**6, "G": 10**9}
MODEL = ["--hidden-dim", "32", "--embedding-dim", "16", "--num-layers", "1", "--sample-tokens", "0"]
SUMMARY = re.compile(r"token cache: (\w+) .*, (\w+), ([\d,.]+) MB, ([\d.]+) s$")
TOKENS = re.compile(r"^run .*tokens train/valid/test ([\d,]+)/")  # the run's line, before and after the cache


def parse_size(text):
    """'100M' → 100_000_000."""
    text = text.strip().upper()
    return int(float(text[:-1]) * UNITS[text[-1]]) if text[-1] in UNITS else int(text)


def source_texts():
    """The bytes of every text file of ../shared/data, in a fixed order."""
    texts = []
    for folder, _, files in sorted(os.walk(SHARED_DATA)):
        for name in sorted(files):
            if name.endswith(".txt"):
                with open(os.path.join(folder, name), "rb") as f:
                    texts.append(f.read())
    if not texts:
        sys.exit(f"no .txt corpora under {SHARED_DATA}")
    return texts


def make_corpus(path, size):
    """A text file of about `size` bytes: the shared corpora repeated, whole lines only (kept)."""
    if os.path.exists(path) and abs(os.path.getsize(path) - size) < size // 100 + 10_000:
        return path
    written = 0
    with open(path + ".tmp", "wb") as f:
        for text in itertools.cycle(source_texts()):
            room = size - written
            if len(text) >= room:
                f.write(text[: text.rfind(b"\n", 0, room) + 1])  # whole lines
                break
            f.write(text)
            written += len(text)
    os.replace(path + ".tmp", path)
    return path


def run(repo, corpus, level, cache, scratch):
    """One dry run: wall seconds, peak RSS bytes, train tokens, the token cache line's match (or None)."""
    run_dir = tempfile.mkdtemp(prefix="run-", dir=scratch)
    shutil.rmtree(run_dir)
    command = [sys.executable, "train.py", "--data", corpus, "--level", level, "--dry-run", "--epochs", "1"]
    command += [*MODEL, "--run-dir", run_dir, "--verbose", "2"]
    if cache:
        command += ["--token-cache", cache]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    output = tempfile.TemporaryFile(mode="w+")
    started = time.monotonic()
    child = subprocess.Popen(command, cwd=repo, env=env, stdout=output, stderr=subprocess.STDOUT, text=True)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.monotonic() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    output.seek(0)
    text = output.read()
    if child.returncode:
        sys.exit(f"{' '.join(command)} failed ({child.returncode}):\n{text[-2000:]}")
    shutil.rmtree(run_dir, ignore_errors=True)
    lines = text.splitlines()
    summary = next((SUMMARY.search(line) for line in lines if SUMMARY.search(line)), None)
    tokens = next((TOKENS.search(line).group(1) for line in lines if TOKENS.search(line)), "?")
    return seconds, usage.ru_maxrss * 1024, tokens, summary  # ru_maxrss is in KiB on Linux


def takes_token_cache(repo):
    """Whether the checkout's train.py has --token-cache (asked through --help: since the package
    layout, train.py is a thin entry point and its flags live in keraslm/commands/train.py)."""
    shown = subprocess.run([sys.executable, "train.py", "--help"], cwd=repo, capture_output=True, text=True)
    return "--token-cache" in shown.stdout


def row(size, level, kind, measured):
    """A table row from run()'s figures."""
    seconds, rss, tokens, summary = measured
    if summary:
        status, dtype, megabytes, prep = summary.groups()
        entry = f"{status}, {prep} s | {dtype}, {megabytes} MB"
    else:
        entry = "no token cache |"
    return f"| {size} | {level} | {kind} | {seconds:.1f} | {rss / 1e9:.2f} | {tokens} | {entry} |"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="10M,100M,1G", help="corpus sizes in bytes (K, M, G: powers of ten)")
    p.add_argument("--levels", default="char,word")
    p.add_argument("--work-dir", help="where the corpora (kept) and caches (removed) go (default: a temporary one)")
    p.add_argument("--repo", default=ROOT, help="the checkout whose train.py runs (default: this one)")
    args = p.parse_args()
    work = args.work_dir or os.path.join(tempfile.gettempdir(), "keraslm-data-prep")
    os.makedirs(work, exist_ok=True)
    has_cache = takes_token_cache(args.repo)
    print("| text | level | run | whole run (s) | peak RSS (GB) | train tokens | preparation | token files |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for size in args.sizes.split(","):
        corpus = make_corpus(os.path.join(work, f"corpus-{size}.txt"), parse_size(size))
        for level in args.levels.split(","):
            cache = tempfile.mkdtemp(prefix="cache-", dir=work) if has_cache else None
            try:
                print(row(size, level, "first", run(args.repo, corpus, level, cache, work)), flush=True)
                if has_cache:
                    print(row(size, level, "cached", run(args.repo, corpus, level, cache, work)), flush=True)
            finally:
                if cache:
                    shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
