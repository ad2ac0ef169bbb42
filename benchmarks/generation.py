"""Generation speed of every backend, and sample.py's start-up time to the first token.

    python -m benchmarks.generation [--hidden-dim 512] [--repeats 5] [--quality-run RUN_DIR]

Builds (once, under benchmarks/.models/) a 2-layer char LSTM on Tiny Shakespeare with a two-window
dry run (the speed of a step does not depend on how well it is trained), exports it, then measures
in one process, side by side:

- tokens/s at batch 1 and 32 for the onnx, savedmodel and keras backends (sample.py's NumPy loop
  with temperature sampling), the SavedModel's in-graph `generate`, and the TF text-generation
  tutorial's loop (one Keras model call and one tf.random.categorical per token), and PyTorch's
  word_language_model generate.py loop on the same weights (one model call and one
  torch.multinomial per token; only where torch is installed: `pip install torch==2.13.0`);
- each as the marginal rate between a short and a long run, so start-up and priming cancel out;
- sample.py itself at batch 1 on the onnx backend, float and --int8: the marginal rate between
  a short and a long run of the whole process;
- sample.py's wall time from launch to its first token (`--num-tokens 1`), per backend;
- with --quality-run, what int8 weights cost: validation loss (nats/char) of a trained char run's
  float and int8 ONNX models on the Tiny Shakespeare validation split, state carried throughout.

Prints Markdown tables; medians of --repeats runs.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time

import numpy as np

from keraslm.runtime import open_backend
from keraslm.sampling import Sampler, generate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

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
    if not os.path.exists(os.path.join(version_dir, "assets.extra", "model.int8.onnx")):  # none, or too old
        export = ["export.py", run_dir, "--out", os.path.join(base, "exports"), "--version", "1", "--overwrite"]
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


def sample_py_rate(version_dir, extra, short, long, repeats):
    """Median tokens/s of sample.py processes: the extra (long - short) tokens, whole process timed."""

    def run(count):
        t0 = time.perf_counter()
        command = [sys.executable, "sample.py", version_dir, "--num-tokens", str(count), "--prompt", "ROMEO:"]
        subprocess.run(command + extra, cwd=ROOT, check=True, capture_output=True)
        return time.perf_counter() - t0

    run(short)
    return statistics.median((long - short) / max(run(long) - run(short), 1e-9) for _ in range(repeats))


def validation_loss(backend, text, window=250):
    """Mean cross-entropy (nats/token) of a text under a backend, one stream with the state carried."""
    ids = backend.vocab.encode(text)
    state, total = backend.initial_state(1), 0.0
    for start in range(0, len(ids) - 1, window):
        inputs, targets = ids[start : start + window], ids[start + 1 : start + window + 1]
        logits, state = backend.step(inputs[None, : len(targets)], state)
        logits = logits[0].astype(np.float64)
        log_z = np.logaddexp.reduce(logits, axis=-1)
        total += float(np.sum(log_z - logits[np.arange(len(targets)), targets]))
    return total / (len(ids) - 1)


def int8_quality(run_dir):
    """Validation loss of a trained char run's float and int8 ONNX models (Tiny Shakespeare)."""
    from keraslm.data import split_text

    exports = os.path.join(ROOT, "benchmarks", ".models", "exports")
    name = "quality-" + os.path.basename(os.path.normpath(run_dir))
    version_dir = os.path.join(exports, name, "1")
    if not os.path.exists(version_dir):
        export = ["export.py", run_dir, "--out", exports, "--name", name, "--version", "1"]
        subprocess.run([sys.executable, *export], cwd=ROOT, check=True, capture_output=True)
    with open(DATA, encoding="utf-8") as f:
        valid = split_text(f.read())["valid"]
    print(f"\nint8 weights on a trained model: {run_dir}, Tiny Shakespeare validation split ({len(valid):,} chars)\n")
    print("| model | validation loss, nats/char |")
    print("| --- | --- |")
    for label, int8 in (("model.onnx (float32)", False), ("model.int8.onnx", True)):
        loss = validation_loss(open_backend(version_dir, "onnx", int8=int8), valid)
        print(f"| {label} | {loss:.4f} |", flush=True)


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


def startup_seconds(model, backend, repeats, extra=()):
    """Median wall time of `sample.py MODEL --backend B --num-tokens 1`: launch to first token out."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, "sample.py", model, "--backend", backend, "--num-tokens", "1", *extra],
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
    parser.add_argument("--quality-run", help="a trained char run: compare its float and int8 validation loss")
    args = parser.parse_args()

    run_dir, version_dir = build_model(args.hidden_dim)
    savedmodel = open_backend(version_dir, "savedmodel")
    contenders = {
        "onnx (sample.py loop)": python_loop(open_backend(version_dir, "onnx")),
        "onnx --int8 (sample.py loop)": python_loop(open_backend(version_dir, "onnx", int8=True)),
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

    short, long = 100, 3000
    print(f"\n| sample.py process, batch 1 | tokens/s, marginal between {short} and {long} tokens |")
    print("| --- | --- |")
    for label, extra in (("--backend onnx", []), ("--backend onnx --int8", ["--int8"])):
        rate = sample_py_rate(version_dir, extra, short, long, args.repeats)
        print(f"| {label} | {rate:,.0f} |", flush=True)

    print("\n| sample.py backend | launch to first token, s |")
    print("| --- | --- |")
    launches = (("onnx", version_dir, []), ("onnx", version_dir, ["--int8"]))
    launches += (("savedmodel", version_dir, []), ("keras", run_dir, []))
    for backend, model, extra in launches:
        seconds = startup_seconds(model, backend, args.repeats, extra)
        print(f"| {' '.join([backend, *extra])} | {seconds:.2f} |", flush=True)

    if args.quality_run:
        int8_quality(args.quality_run)


if __name__ == "__main__":
    main()
