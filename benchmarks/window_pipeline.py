"""TBPTT window pipeline throughput: the tf.data windows train.py feeds, alone, without a model.

    python -m benchmarks.window_pipeline [--tokens 20M] [--batch-size 64] [--bptt 100] [--repeats 3]
                                         [--repo DIR]

Each run is its own process, in a checkout (this one, or --repo's, for example the commit before the
token cache, whose windows came from one in-memory array through from_tensor_slices): it builds a
token stream of --tokens random ids (a NumPy memory map when the checkout has keraslm.token_cache,
as train.py's cached streams are; else the in-memory array that checkout's train.py used), then reads
every window of `keraslm.data.tbptt_dataset` once. Checkouts alternate, --repeats times; the table
gives the medians of tokens/s (targets delivered) and of the child's peak RSS. Compare the rate with
the training tokens/s of benchmarks.train_peers: the pipeline is prefetched, so it slows training
only if it is not far faster.
"""

import argparse
import os
import statistics
import subprocess
import sys

from benchmarks.data_prep import ROOT, parse_size

CHILD = """
import os, sys, tempfile, time
import numpy as np
from keraslm import data
tokens, batch_size, bptt = {tokens}, {batch_size}, {bptt}
ids = np.random.default_rng(0).integers(0, 65, tokens, dtype=np.uint16)
try:
    import keraslm.token_cache  # the checkout reads cached streams from a memory map
    path = os.path.join(tempfile.mkdtemp(), "train.bin")
    ids.tofile(path)
    ids, kind = np.memmap(path, np.uint16, "r"), "memory map"
except ImportError:
    ids, kind = ids.astype(np.int32), "in-memory array"
started = time.perf_counter()
targets = 0
for x, y in data.tbptt_dataset(ids, batch_size, bptt):
    targets += int(y.shape[0]) * int(y.shape[1])
seconds = time.perf_counter() - started
print("RESULT", kind, targets, seconds)
"""


def run_child(repo, tokens, batch_size, bptt):
    """One child in `repo` with its own rusage: (stream kind, targets/s, peak RSS bytes)."""
    code = CHILD.format(tokens=tokens, batch_size=batch_size, bptt=bptt)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": repo}
    with subprocess.Popen([sys.executable, "-c", code], cwd=repo, env=env, stdout=subprocess.PIPE, text=True) as child:
        output = child.stdout.read()
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        sys.exit(f"the child in {repo} failed ({child.returncode})")
    line = next(line for line in output.splitlines() if line.startswith("RESULT"))
    *kind, targets, seconds = line.split()[1:]
    return " ".join(kind), int(targets) / float(seconds), usage.ru_maxrss * 1024  # KiB on Linux


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", default="20M", help="stream length (K, M, G: powers of ten)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--bptt", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--repo", action="append", help="another checkout to compare (repeatable); this one always runs")
    args = p.parse_args()
    repos = [ROOT, *(args.repo or [])]
    figures = {repo: [] for repo in repos}
    for _ in range(args.repeats):
        for repo in repos:
            figures[repo].append(run_child(repo, parse_size(args.tokens), args.batch_size, args.bptt))
    print("| checkout | stream | tokens/s (median) | runs | peak RSS (GB, median) |")
    print("| --- | --- | --- | --- | --- |")
    for repo, runs in figures.items():
        rates = ", ".join(f"{rate:,.0f}" for _, rate, _ in runs)
        rss = statistics.median(r for _, _, r in runs) / 1e9
        print(f"| {repo} | {runs[0][0]} | {statistics.median(r for _, r, _ in runs):,.0f} | {rates} | {rss:.2f} |")


if __name__ == "__main__":
    main()
