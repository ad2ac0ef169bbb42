"""Generation speed of every backend, and sample.py's start-up time to the first token.

    python benchmarks/generation.py [--hidden-dim 512] [--repeats 5]

Builds (once, under benchmarks/.models/) a 2-layer char LSTM on Tiny Shakespeare with a two-window
dry run (the speed of a step does not depend on how well it is trained), exports it, then measures
in one process, side by side:

- tokens/s at batch 1 and 32 for the onnx, savedmodel and keras backends (sample.py's NumPy loop
  with temperature sampling), the SavedModel's in-graph `generate`, and the TF text-generation
  tutorial's loop (one Keras model call and one tf.random.categorical per token), and PyTorch's
  word_language_model generate.py loop on the same weights (one model call and one
  torch.multinomial per token; only where torch is installed: `pip install torch==2.13.0`);
- each as the marginal rate between a short and a long run, so start-up and priming cancel out;
- sample.py's wall time from launch to its first token (`--num-tokens 1`), per backend.

Prints a Markdown table; medians of --repeats runs.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from keraslm.runtime import open_backend  # noqa: E402
from keraslm.sampling import Sampler, generate  # noqa: E402

DATA = os.path.join(os.path.dirname(ROOT), "shared", "data", "tinyshakespeare", "input.txt")


def build_model(hidden_dim, cell="lstm"):
    """Train (dry run) and export a 2-layer char model once; return (run_dir, version_dir)."""
    base = os.path.join(ROOT, "benchmarks", ".models")
    name = f"char-{cell}-2x{hidden_dim}"
    run_dir = os.path.join(base, name)
    version_dir = os.path.join(base, "exports", name, "1")
    train = ["train.py", "--data", DATA, "--cell", cell, "--hidden-dim", str(hidden_dim), "--embedding-dim", "128"]
    train += ["--dry-run", "--epochs", "1", "--sample-tokens", "0", "--run-dir", run_dir]
    if not os.path.exists(os.path.join(run_dir, "model.keras")):
        subprocess.run([sys.executable, *train], cwd=ROOT, check=True, capture_output=True)
    if not os.path.exists(version_dir):
        export = ["export.py", run_dir, "--out", os.path.join(base, "exports"), "--version", "1"]
        subprocess.run([sys.executable, *export], cwd=ROOT, check=True, capture_output=True)
    return run_dir, version_dir


def python_loop(backend):
    """sample.py's loop: one step call and one NumPy temperature draw per token."""
    sampler = Sampler(0.8)

    def run(batch, count):
        prompt = np.repeat(backend.vocab.encode("ROMEO:")[None], batch, 0)
        generate(backend.step, prompt, backend.initial_state(batch), count, sampler, np.random.default_rng(0))

    return run


def in_graph(backend):
    """The SavedModel's generate signature (tf.while_loop inside the graph)."""

    def run(batch, count):
        backend.generate_in_graph(["ROMEO:"] * batch, count, 0.8, 0, 1.0, 0)

    return run


def tutorial_loop(run_dir):
    """The TF text-generation tutorial's OneStep: the Keras model per token, tf.random.categorical."""
    import tensorflow as tf

    from keraslm.runs import load_run

    config, vocab, model = load_run(run_dir)
    names = [name for name in model.input if name != "tokens"]

    def run(batch, count):
        ids = tf.constant(np.repeat(vocab.encode("ROMEO:")[None], batch, 0))
        states = {n: tf.zeros((batch, config.model.hidden_dim)) for n in names}
        for _ in range(count):
            out = model({"tokens": ids, **states})
            logits = out.pop("logits")[:, -1, :] / 0.8
            ids = tf.cast(tf.random.categorical(logits, 1), tf.int32)
            states = {n.replace("_out", "_in"): v for n, v in out.items()}

    return run


def pytorch_loop(run_dir):
    """pytorch/examples' generate.py: the model per token, then torch.multinomial on exp(logits / T).

    The Keras weights go into nn.Embedding / nn.LSTM / nn.Linear (the gate order i, f, g, o is the
    same; torch's second bias is zero), checked against the Keras model before timing.
    Returns None when torch is not installed.
    """
    try:
        import torch
    except ImportError:
        return None
    import torch.nn as nn

    from keraslm.model import keras_step
    from keraslm.runs import load_run

    config, vocab, model = load_run(run_dir)
    c = config.model
    embedding = nn.Embedding(c.vocabulary_size, c.embedding_dim)
    rnn = nn.LSTM(c.embedding_dim, c.hidden_dim, c.num_layers)
    decoder = nn.Linear(c.hidden_dim, c.vocabulary_size)
    with torch.no_grad():
        embedding.weight.copy_(torch.from_numpy(model.get_layer("embedding").get_weights()[0]))
        for i in range(c.num_layers):
            kernel, recurrent, bias = model.get_layer(f"rnn_{i}").get_weights()
            getattr(rnn, f"weight_ih_l{i}").copy_(torch.from_numpy(kernel.T))
            getattr(rnn, f"weight_hh_l{i}").copy_(torch.from_numpy(recurrent.T))
            getattr(rnn, f"bias_ih_l{i}").copy_(torch.from_numpy(bias))
            getattr(rnn, f"bias_hh_l{i}").zero_()
        kernel, bias = model.get_layer("logits").get_weights()
        decoder.weight.copy_(torch.from_numpy(kernel.T))
        decoder.bias.copy_(torch.from_numpy(bias))

    def forward(ids, hidden):
        output, hidden = rnn(embedding(ids), hidden)
        return decoder(output), hidden

    prompt = vocab.encode("ROMEO:")
    step, state = keras_step(model, c, batch_size=1)
    expected, _ = step(prompt[None], state)
    with torch.no_grad():
        zeros = torch.zeros(c.num_layers, 1, c.hidden_dim)
        got, _ = forward(torch.from_numpy(prompt.astype("int64"))[:, None], (zeros, zeros.clone()))
    difference = float(np.abs(got[:, 0].numpy() - np.asarray(expected)[0]).max())
    assert difference < 1e-4, f"PyTorch copy differs from the Keras model by {difference}"

    def run(batch, count):
        with torch.no_grad():
            zeros = torch.zeros(c.num_layers, batch, c.hidden_dim)
            hidden = (zeros, zeros.clone())
            ids = torch.from_numpy(np.repeat(prompt[:, None], batch, 1).astype("int64"))
            output, hidden = forward(ids, hidden)
            for _ in range(count):
                weights = output[-1].div(0.8).exp()
                ids = torch.multinomial(weights, 1).T  # [1, batch]
                output, hidden = forward(ids, hidden)

    return run


def marginal_rate(run, batch, short, long, repeats):
    """Median tokens/s of the extra (long - short) tokens over `repeats` paired runs."""
    run(batch, short)  # warm-up: graph tracing, allocations
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(batch, short)
        t1 = time.perf_counter()
        run(batch, long)
        t2 = time.perf_counter()
        rates.append(batch * (long - short) / max((t2 - t1) - (t1 - t0), 1e-9))
    return statistics.median(rates)


def startup_seconds(model, backend, repeats):
    """Median wall time of `sample.py MODEL --backend B --num-tokens 1`: launch to first token out."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, "sample.py", model, "--backend", backend, "--num-tokens", "1"],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden-dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--short", type=int, default=50)
    parser.add_argument("--long", type=int, default=300)
    args = parser.parse_args()

    run_dir, version_dir = build_model(args.hidden_dim)
    savedmodel = open_backend(version_dir, "savedmodel")
    contenders = {
        "onnx (sample.py loop)": python_loop(open_backend(version_dir, "onnx")),
        "savedmodel (sample.py loop)": python_loop(savedmodel),
        "savedmodel --in-graph (generate signature)": in_graph(savedmodel),
        "keras (sample.py loop)": python_loop(open_backend(run_dir, "keras")),
        "TF tutorial loop (Keras call + tf.random.categorical per token)": tutorial_loop(run_dir),
        "PyTorch generate.py loop (model call + torch.multinomial per token)": pytorch_loop(run_dir),
    }
    contenders = {name: run for name, run in contenders.items() if run is not None}
    print(
        f"2-layer {args.hidden_dim}-unit char LSTM, temperature 0.8, medians of {args.repeats}; "
        f"marginal rate between {args.short} and {args.long} tokens\n"
    )
    print("| generator | tokens/s, batch 1 | tokens/s, batch 32 |")
    print("| --- | --- | --- |")
    for name, run in contenders.items():
        rates = [marginal_rate(run, b, args.short, args.long, args.repeats) for b in (1, 32)]
        print(f"| {name} | {rates[0]:,.0f} | {rates[1]:,.0f} |", flush=True)

    print("\n| sample.py backend | launch to first token, s |")
    print("| --- | --- |")
    for backend, model in (("onnx", version_dir), ("savedmodel", version_dir), ("keras", run_dir)):
        print(f"| {backend} | {startup_seconds(model, backend, args.repeats):.2f} |", flush=True)


if __name__ == "__main__":
    main()
