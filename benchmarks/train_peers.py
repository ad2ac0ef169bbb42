"""Training throughput and quality, keraslm against the PyTorch loop its users would otherwise run.

    pip install torch==2.13.0          # optional, benchmark-only
    python benchmarks/train_peers.py [--epochs 1]

The PyTorch-reference word config (pytorch/examples' word_language_model: embedding 200, hidden 200,
2-layer LSTM, dropout 0.2, batch 20, bptt 35, SGD lr 20, clip 0.25, eval batch 10) on
../shared/data/wikitext-2-mini, run side by side in one command:

- keraslm: `python train.py --data … --level word` (its word-level defaults are that config);
- PyTorch: the reference's model, `batchify`, `get_batch`, `repackage_hidden` and `train()` loop,
  written here in its own style, on the same token stream (keraslm's Vocabulary tokenises as the
  reference's `Corpus` does).

Each runs as its own process; the table gives training tokens/s (validation excluded), the
validation perplexity after the last epoch, and the whole process's wall time.
"""

import argparse
import csv
import math
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(os.path.dirname(ROOT), "shared", "data", "wikitext-2-mini")


def run_keraslm(epochs):
    run_dir = tempfile.mkdtemp(prefix="keraslm-bench-")
    start = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "train.py",
            "--data",
            DATA,
            "--level",
            "word",
            "--epochs",
            str(epochs),
            "--sample-tokens",
            "0",
            "--run-dir",
            os.path.join(run_dir, "run"),
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    wall = time.perf_counter() - start
    with open(os.path.join(run_dir, "run", "history.csv")) as f:
        last = list(csv.DictReader(f))[-1]
    return float(last["tokens_per_second"]), float(last["val_perplexity"]), wall


def run_pytorch(epochs):
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, __file__, "--pytorch-child", str(epochs)], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.split()
    return float(out[-2]), float(out[-1]), time.perf_counter() - start


def pytorch_child(epochs):
    """pytorch/examples' word_language_model main.py, reduced to what one config needs."""
    import torch
    import torch.nn as nn

    sys.path.insert(0, ROOT)
    from keraslm.vocab import Vocabulary

    torch.manual_seed(1111)
    texts = {s: open(os.path.join(DATA, f"{s}.txt"), encoding="utf-8").read() for s in ("train", "valid")}
    vocab = Vocabulary.build(texts["train"], "word")
    ids = {s: torch.from_numpy(vocab.encode(t).astype("int64")) for s, t in texts.items()}

    def batchify(data, bsz):
        nbatch = data.size(0) // bsz
        return data.narrow(0, 0, nbatch * bsz).view(bsz, -1).t().contiguous()

    class RNNModel(nn.Module):
        def __init__(self, ntoken, ninp, nhid, nlayers, dropout):
            super().__init__()
            self.drop = nn.Dropout(dropout)
            self.encoder = nn.Embedding(ntoken, ninp)
            self.rnn = nn.LSTM(ninp, nhid, nlayers, dropout=dropout)
            self.decoder = nn.Linear(nhid, ntoken)
            self.nhid, self.nlayers = nhid, nlayers
            nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
            nn.init.zeros_(self.decoder.bias)
            nn.init.uniform_(self.decoder.weight, -0.1, 0.1)

        def forward(self, x, hidden):
            output, hidden = self.rnn(self.drop(self.encoder(x)), hidden)
            return self.decoder(self.drop(output)), hidden

        def init_hidden(self, bsz):
            weight = next(self.parameters())
            return (weight.new_zeros(self.nlayers, bsz, self.nhid), weight.new_zeros(self.nlayers, bsz, self.nhid))

    bptt, lr, clip = 35, 20.0, 0.25
    train_data, val_data = batchify(ids["train"], 20), batchify(ids["valid"], 10)
    model = RNNModel(len(vocab), 200, 200, 2, 0.2)
    criterion = nn.CrossEntropyLoss()

    def get_batch(source, i):
        seq_len = min(bptt, len(source) - 1 - i)
        return source[i : i + seq_len], source[i + 1 : i + 1 + seq_len].reshape(-1)

    def repackage_hidden(h):
        return tuple(v.detach() for v in h)

    def evaluate(data_source):
        model.eval()
        total, hidden = 0.0, model.init_hidden(10)
        with torch.no_grad():
            for i in range(0, data_source.size(0) - 1, bptt):
                data, targets = get_batch(data_source, i)
                output, hidden = model(data, hidden)
                hidden = repackage_hidden(hidden)
                total += len(data) * criterion(output.view(-1, len(vocab)), targets).item()
        return total / (len(data_source) - 1)

    for _ in range(epochs):
        model.train()
        hidden, tokens, begin = model.init_hidden(20), 0, time.perf_counter()
        for i in range(0, train_data.size(0) - 1, bptt):
            data, targets = get_batch(train_data, i)
            hidden = repackage_hidden(hidden)
            model.zero_grad()
            output, hidden = model(data, hidden)
            loss = criterion(output.view(-1, len(vocab)), targets)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            for p in model.parameters():
                p.data.add_(p.grad, alpha=-lr)
            tokens += targets.numel()
        speed = tokens / (time.perf_counter() - begin)
        val_loss = evaluate(val_data)
    print(speed, math.exp(val_loss))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--pytorch-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pytorch_child:
        return pytorch_child(args.pytorch_child)
    print(f"PyTorch-reference word config on wikitext-2-mini, {args.epochs} epoch(s), each in its own process\n")
    print("| trainer | training tokens/s | validation perplexity | whole process, s |")
    print("| --- | --- | --- | --- |")
    for name, run in (("keraslm train.py", run_keraslm), ("PyTorch word_language_model loop", run_pytorch)):
        speed, perplexity, wall = run(args.epochs)
        print(f"| {name} | {speed:,.0f} | {perplexity:.1f} | {wall:.0f} |", flush=True)


if __name__ == "__main__":
    main()
