"""Training throughput, quality and the compute bound: keraslm against the PyTorch loop its users
would otherwise run, side by side in one command.

    pip install torch==2.13.0          # optional, benchmark-only
    python -m benchmarks.train_peers [--config word|char|all] [--cells lstm,gru,...] [--repeats N]
                                     [--both-precisions] [--repo DIR]

Configs:
- word: pytorch/examples' word_language_model (embedding 200, hidden 200, 2 layers, dropout 0.2,
  batch 20, bptt 35, SGD lr 20, clip 0.25) on ../shared/data/wikitext-2-mini, one epoch, then
  validation and the test evaluation, as its main.py does. keraslm runs `python train.py --data …
  --level word` (its word defaults are that config); the peer is the reference's model, `batchify`,
  `get_batch`, `repackage_hidden`, `train()` and `evaluate()`, written here in its style on the same
  token stream. Reported: training tokens/s, validation perplexity, whole-process wall time.
  SimpleRNN cells diverge at lr 20 (NaN within the first epoch, in both trainers), so for them
  both use lr 1.
- char: embedding 128, 2 × 512 units, dropout 0.1, batch 64, bptt 100, Adam 2e-3, clip 0.25, on the
  first 256,000 characters of Tiny Shakespeare (valid and test: the next 64,000 each), two epochs;
  tokens/s of the second (after warm-up: tracing, first allocations).

keraslm runs `train.py` as it is (bfloat16 mixed precision where the CPU has AMX units, else float32);
with --both-precisions it runs twice instead, `--no-mixed-precision` (float32) and `--mixed-precision`
(bfloat16 products, float32 weights and loss), each its own row.

Each trainer runs as its own process, one after the other, alternating, `--repeats` times; the
table gives medians. The compute bound: each config's matmuls per window (forward and backward,
shape by shape, as keraslm runs them), timed on this machine with tf.matmul, once in float32 and
once in bfloat16 (on AMX units several times faster); the sum is the time a step could take if it
did nothing but those matmuls at the measured rates. Utilisation = that time / the measured step
time, against the bound of the precision the run multiplied in (the PyTorch peer: float32). The last
column sets the run's GFLOP/s against the rate of the per-step recurrent products alone (h·R and
dZ·Rᵀ, the shapes that run once per time step), in the same precision.
"""

import argparse
import csv
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

from keraslm.vocab import Vocabulary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")
CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu")
GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
CONFIGS = {
    "word": dict(embedding=200, hidden=200, layers=2, dropout=0.2, batch=20, bptt=35, epochs=1),
    "char": dict(embedding=128, hidden=512, layers=2, dropout=0.1, batch=64, bptt=100, epochs=2),
}
CHAR_TRAIN, CHAR_HELD_OUT = 256_000, 64_000


def char_data():
    """A directory with train/valid/test.txt cut from Tiny Shakespeare (shared by both trainers)."""
    text = open(os.path.join(DATA, "tinyshakespeare", "input.txt"), encoding="utf-8").read()
    directory = tempfile.mkdtemp(prefix="keraslm-bench-char-")
    cuts = {"train": (0, CHAR_TRAIN), "valid": (CHAR_TRAIN, CHAR_TRAIN + CHAR_HELD_OUT)}
    cuts["test"] = (CHAR_TRAIN + CHAR_HELD_OUT, CHAR_TRAIN + 2 * CHAR_HELD_OUT)
    for split, (start, end) in cuts.items():
        with open(os.path.join(directory, f"{split}.txt"), "w", encoding="utf-8") as f:
            f.write(text[start:end])
    return directory


def run_keraslm(config, cell, data, extra=(), repo=ROOT):
    run_dir = os.path.join(tempfile.mkdtemp(prefix="keraslm-bench-"), "run")
    c = CONFIGS[config]
    command = [sys.executable, "train.py", "--data", data, "--level", config, "--cell", cell, "--run-dir", run_dir]
    command += ["--epochs", str(c["epochs"]), "--sample-tokens", "0", "--verbose", "0", *extra]
    if config == "char":
        command += ["--hidden-dim", "512", "--batch-size", "64"]  # the rest are the char defaults
    else:
        command += ["--lr", str(word_lr(cell))]
    start = time.perf_counter()
    subprocess.run(command, cwd=repo, check=True, capture_output=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    wall = time.perf_counter() - start
    with open(os.path.join(run_dir, "history.csv")) as f:
        last = list(csv.DictReader(f))[-1]
    with open(os.path.join(run_dir, "config.json")) as f:
        mixed = json.load(f)["train"]["mixed_precision"]  # what the default resolved to on this machine
    return float(last["tokens_per_second"]), float(last["val_loss"]), wall, "bfloat16" if mixed else "float32"


def run_pytorch(config, cell, data):
    start = time.perf_counter()
    # As a module from the repository root (cwd), as this benchmark runs, so that keraslm imports.
    command = [sys.executable, "-m", "benchmarks.train_peers", "--pytorch-child", config, cell, data]
    out = subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True).stdout.split()
    return float(out[-2]), float(out[-1]), time.perf_counter() - start, "float32"


def word_lr(cell):
    return 20.0 if cell in ("lstm", "gru") else 1.0


def pytorch_child(config, cell, data):
    """pytorch/examples' word_language_model main.py (and char-rnn's setup), reduced to one config."""
    import torch
    import torch.nn as nn

    c = CONFIGS[config]
    torch.manual_seed(1111)
    texts = {s: open(os.path.join(data, f"{s}.txt"), encoding="utf-8").read() for s in ("train", "valid", "test")}
    if config == "word":
        texts = {s: t if t.endswith("\n") else t + "\n" for s, t in texts.items()}
    vocab = Vocabulary.build(texts["train"], config)
    ids = {s: torch.from_numpy(vocab.encode(t, skip_unknown=True).astype("int64")) for s, t in texts.items()}
    ntokens, bptt, eval_batch = len(vocab), c["bptt"], 10 if config == "word" else c["batch"]

    def batchify(data, bsz):
        nbatch = data.size(0) // bsz
        return data.narrow(0, 0, nbatch * bsz).view(bsz, -1).t().contiguous()

    class RNNModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.drop = nn.Dropout(c["dropout"])
            self.encoder = nn.Embedding(ntokens, c["embedding"])
            kinds = {"lstm": nn.LSTM, "gru": nn.GRU}
            if cell in kinds:
                self.rnn = kinds[cell](c["embedding"], c["hidden"], c["layers"], dropout=c["dropout"])
            else:
                nonlinearity = "tanh" if cell == "rnn_tanh" else "relu"
                self.rnn = nn.RNN(
                    c["embedding"], c["hidden"], c["layers"], nonlinearity=nonlinearity, dropout=c["dropout"]
                )
            self.decoder = nn.Linear(c["hidden"], ntokens)
            nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
            nn.init.zeros_(self.decoder.bias)
            nn.init.uniform_(self.decoder.weight, -0.1, 0.1)

        def forward(self, x, hidden):
            output, hidden = self.rnn(self.drop(self.encoder(x)), hidden)
            return self.decoder(self.drop(output)), hidden

        def init_hidden(self, bsz):
            weight = next(self.parameters())
            zeros = weight.new_zeros(c["layers"], bsz, c["hidden"])
            return (zeros, zeros.clone()) if cell == "lstm" else zeros

    model = RNNModel()
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3) if config == "char" else None
    train_data = batchify(ids["train"], c["batch"])
    val_data, test_data = batchify(ids["valid"], eval_batch), batchify(ids["test"], eval_batch)

    def get_batch(source, i):
        seq_len = min(bptt, len(source) - 1 - i)
        return source[i : i + seq_len], source[i + 1 : i + 1 + seq_len].reshape(-1)

    def repackage_hidden(h):
        return h.detach() if isinstance(h, torch.Tensor) else tuple(v.detach() for v in h)

    def evaluate(data_source):
        model.eval()
        total, hidden = 0.0, model.init_hidden(eval_batch)
        with torch.no_grad():
            for i in range(0, data_source.size(0) - 1, bptt):
                data, targets = get_batch(data_source, i)
                output, hidden = model(data, hidden)
                hidden = repackage_hidden(hidden)
                total += len(data) * criterion(output.view(-1, ntokens), targets).item()
        return total / (len(data_source) - 1)

    for _ in range(c["epochs"]):
        model.train()
        hidden, tokens, begin = model.init_hidden(c["batch"]), 0, time.perf_counter()
        for i in range(0, train_data.size(0) - 1, bptt):
            data, targets = get_batch(train_data, i)
            hidden = repackage_hidden(hidden)
            model.zero_grad()
            output, hidden = model(data, hidden)
            loss = criterion(output.view(-1, ntokens), targets)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
            if optimizer:
                optimizer.step()
            else:
                for p in model.parameters():
                    p.data.add_(p.grad, alpha=-word_lr(cell))
            tokens += targets.numel()
        speed = tokens / (time.perf_counter() - begin)
        val_loss = evaluate(val_data)
    evaluate(test_data)  # main.py ends with the test evaluation; its figure is not compared here
    print(speed, val_loss)


def matmul_shapes(config, cell, vocabulary):
    """(m, k, n, count) of every float32 matmul of one training window, forward and backward, as
    keraslm.recurrence runs them (and cuDNN and PyTorch's CPU kernels): per time step only h·R and
    the state's gradient; the input projection and all weight gradients as one matmul per window."""
    c = CONFIGS[config]
    B, T, H, g = c["batch"], c["bptt"], c["hidden"], GATES[cell]
    N = B * T
    shapes = []
    for layer in range(c["layers"]):
        k = c["embedding"] if layer == 0 else H
        shapes += [(B, H, g * H, T), (B, g * H, H, T)]  # each step: h_{t-1}·R, and dZ_t·Rᵀ
        shapes += [(N, k, g * H, 1), (N, g * H, k, 1), (k, N, g * H, 1), (H, N, g * H, 1)]  # X·W, dX, dW, dR
    V = vocabulary
    shapes += [(N, H, V, 1), (N, V, H, 1), (H, N, V, 1)]  # projection: forward, d hidden, d weight
    return shapes


def matmul_seconds(shapes, dtype, repeats=50):
    """Median seconds of each distinct shape's tf.matmul in `dtype` on this machine: `repeats`
    products in one traced while loop (as Keras runs its time steps), so that per-call dispatch is
    not counted."""
    import numpy as np
    import tensorflow as tf

    @tf.function
    def repeated(a, b):
        def body(i, a, total):  # `a` is a loop variable, so the product cannot be hoisted out
            return i + 1, a, total + tf.cast(tf.matmul(a, b)[0, 0], tf.float32)

        return tf.while_loop(lambda i, a, total: i < repeats, body, (0, a, 0.0))[2]

    seconds = {}
    for m, k, n, _ in shapes:
        if (m, k, n) in seconds:
            continue
        a, b = tf.cast(tf.random.normal([m, k]), dtype), tf.cast(tf.random.normal([k, n]), dtype)
        repeated(a, b)
        runs = []
        for _ in range(5):
            start = time.perf_counter()
            repeated(a, b).numpy()
            runs.append((time.perf_counter() - start) / repeats)
        seconds[(m, k, n)] = float(np.median(runs))
    return seconds


def compute_bound(config, cell, vocabulary, dtype):
    """FLOPs per token and the matmul-only tokens/s bound of one training window in `dtype`."""
    c = CONFIGS[config]
    shapes = matmul_shapes(config, cell, vocabulary)
    seconds = matmul_seconds(shapes, dtype)
    flops = sum(2 * m * k * n * count for m, k, n, count in shapes)
    window_seconds = sum(seconds[(m, k, n)] * count for m, k, n, count in shapes)
    tokens = c["batch"] * c["bptt"]
    # The per-step products (h·R, dZ·Rᵀ: the shapes run bptt times a window) on their own: the
    # issue's "matmul rate on the model's own recurrent shapes", far below the large shapes' rate.
    recurrent = [(m, k, n) for m, k, n, count in shapes if count == c["bptt"]]
    recurrent_rate = sum(2 * m * k * n for m, k, n in recurrent) / sum(seconds[shape] for shape in recurrent)
    return flops / tokens, tokens / window_seconds, flops / window_seconds, recurrent_rate


def vocabulary_size(config, data):
    return len(Vocabulary.build(open(os.path.join(data, "train.txt"), encoding="utf-8").read(), config))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=("word", "char", "all"), default="all")
    parser.add_argument("--cells", default="lstm", help=f"comma-separated, from {', '.join(CELLS)} (or all)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--both-precisions", action="store_true", help="run keraslm with --no-mixed-precision and --mixed-precision"
    )
    parser.add_argument(
        "--repo", help="also run this checkout's train.py (for example an earlier commit), its own row, taking turns"
    )
    parser.add_argument("--pytorch-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pytorch_child:
        return pytorch_child(*args.pytorch_child)
    cells = CELLS if args.cells == "all" else args.cells.split(",")
    configs = ("word", "char") if args.config == "all" else (args.config,)
    peer = importlib.util.find_spec("torch") is not None
    if not peer:
        print("torch is not installed: no PyTorch rows (pip install torch==2.13.0 adds them)")
    print(
        "| config | cell | trainer | training tokens/s | validation loss (perplexity) | whole process, s "
        "| GFLOP/s | utilisation | of the recurrent-shape rate |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for config in configs:
        data = os.path.join(DATA, "wikitext-2-mini") if config == "word" else char_data()
        vocabulary = vocabulary_size(config, data)
        for cell in cells:
            bounds = {dtype: compute_bound(config, cell, vocabulary, dtype) for dtype in ("float32", "bfloat16")}
            keraslm = {"keraslm train.py": ()}
            if args.both_precisions:
                flags = ("--no-mixed-precision", "--mixed-precision")
                keraslm = {f"keraslm train.py {flag}": (flag,) for flag in flags}
            trainers = {name: (extra, ROOT) for name, extra in keraslm.items()}
            if args.repo:
                trainers |= {f"{name} in {args.repo}": (extra, args.repo) for name, extra in keraslm.items()}
            results = {name: [] for name in [*trainers, *(["PyTorch loop"] if peer else [])]}
            for _ in range(args.repeats):
                for name, (extra, repo) in trainers.items():
                    results[name].append(run_keraslm(config, cell, data, extra, repo))
                if peer:
                    results["PyTorch loop"].append(run_pytorch(config, cell, data))
            for trainer, runs in results.items():
                speed, val_loss, wall = (statistics.median(column) for column in list(zip(*runs, strict=True))[:3])
                dtype = runs[0][3]
                flops_per_token, bound, _, recurrent_rate = bounds[dtype]
                print(
                    f"| {config} | {cell} | {trainer} ({dtype}) | {speed:,.0f} | {val_loss:.4f} "
                    f"({math.exp(val_loss):.1f}) | {wall:.0f} | {speed * flops_per_token / 1e9:.0f} "
                    f"| {speed / bound:.0%} | {speed * flops_per_token / recurrent_rate:.0%} |",
                    flush=True,
                )
            for dtype, (flops_per_token, bound, rate, recurrent_rate) in bounds.items():
                print(
                    f"| {config} | {cell} | compute bound in {dtype}: {flops_per_token / 1e6:.1f} MFLOP/token, "
                    f"matmuls at {rate / 1e9:.0f} GFLOP/s, recurrent shapes at {recurrent_rate / 1e9:.0f} "
                    f"| {bound:,.0f} | | | | 100% | |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
