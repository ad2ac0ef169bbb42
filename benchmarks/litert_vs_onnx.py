"""LiteRT against ONNX Runtime at batch 1: the 2×512 char LSTM's tokens/s, float and int8, and file sizes.

    python -m benchmarks.litert_vs_onnx [--hidden-dim 512] [--num-tokens 500] [--repeats 3]

Builds (once, under benchmarks/.models/, as benchmarks.generation does) a 2-layer char LSTM with a
two-window dry run (a step's speed does not depend on how well it is trained) and exports it, then
in one process, on the same export:

- checks that the litert backend's greedy text is the onnx backend's;
- times generating --num-tokens tokens at batch 1 from "ROMEO:" with sample.py's loop (one step
  call and one NumPy temperature draw per token), for model.onnx, model.int8.onnx, model.tflite and
  model.int8.tflite, each runtime with its default threads; the four take turns in every repeat, so
  a busy neighbour on the machine slows them alike;
- the same with step calls only (greedy argmax in NumPy, no draw), which isolates the runtime;
- ONNX Runtime again on one thread, as LiteRT's interpreter runs by default.

Prints a Markdown table: medians of --repeats, and each file's size.
"""

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

from benchmarks.generation import ROOT, build_model, python_loop
from keraslm import artifacts
from keraslm.generator import Generator
from keraslm.runtime import open_backend

MODELS = (  # (label, backend, int8)
    ("ONNX Runtime, model.onnx", "onnx", False),
    ("ONNX Runtime, model.int8.onnx", "onnx", True),
    ("LiteRT, model.tflite", "litert", False),
    ("LiteRT, model.int8.tflite", "litert", True),
)
# LiteRT's interpreter runs one thread unless told otherwise, ONNX Runtime one per core: these rows
# run ONNX Runtime on one thread too, so the runtimes compare like for like.
ONE_THREAD = {f"{label} (1 thread)": (name, int8) for label, name, int8 in MODELS[:2]}
FILES = {"onnx": (artifacts.ONNX, artifacts.INT8_ONNX), "litert": (artifacts.LITERT, artifacts.INT8_LITERT)}


def build_export(hidden_dim):
    """benchmarks.generation's model and export, exported again if it predates model.int8.tflite."""
    run_dir, version_dir = build_model(hidden_dim)
    if not os.path.exists(os.path.join(version_dir, artifacts.EXTRA, artifacts.INT8_LITERT)):
        out = os.path.join(ROOT, "benchmarks", ".models", "exports")
        export = ["export.py", run_dir, "--out", out, "--version", "1", "--overwrite"]
        subprocess.run([sys.executable, *export], cwd=ROOT, check=True, capture_output=True)
    return version_dir


def one_thread_onnx(version_dir, int8):
    """The onnx backend with its session rebuilt on one intra-op thread (the backend has no option for it)."""
    import onnxruntime

    backend = open_backend(version_dir, "onnx", int8=int8)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    backend.session = onnxruntime.InferenceSession(backend.source, options, providers=["CPUExecutionProvider"])
    return backend


def step_loop(backend):
    """Step calls only: the prompt, then one token per call, the argmax fed back."""

    def run(batch, count):
        logits, state = backend.step(
            np.repeat(backend.vocab.encode("ROMEO:")[None], batch, 0), backend.initial_state(batch)
        )
        for _ in range(count):
            logits, state = backend.step(np.argmax(logits[:, -1:], -1).astype(np.int32), state)

    return run


def tokens_per_second(run, count):
    """Tokens/s of one batch-1 run generating `count` tokens (priming the prompt included)."""
    started = time.perf_counter()
    run(1, count)
    return count / (time.perf_counter() - started)


def measure(backends, num_tokens, repeats):
    """{(label, loop): [tokens/s per repeat]}; the models take turns within each repeat."""
    loops = {
        label: {"sample.py loop": python_loop(b), "step calls only": step_loop(b)} for label, b in backends.items()
    }
    for runs in loops.values():  # warm-up: allocations, the runners' first resize
        for run in runs.values():
            run(1, 20)
    rates = {}
    for _ in range(repeats):
        for label, runs in loops.items():
            for loop, run in runs.items():
                rates.setdefault((label, loop), []).append(tokens_per_second(run, num_tokens))
    return rates


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden-dim", type=int, default=512)
    parser.add_argument("--num-tokens", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    version_dir = build_export(args.hidden_dim)
    backends = {label: open_backend(version_dir, name, int8=int8) for label, name, int8 in MODELS}
    backends |= {label: one_thread_onnx(version_dir, int8) for label, (_, int8) in ONE_THREAD.items()}
    load_before = os.getloadavg()[0]
    greedy = {label: Generator(b).generate("ROMEO:", 200, temperature=0)[0] for label, b in backends.items()}
    assert greedy[MODELS[2][0]] == greedy[MODELS[0][0]], "litert's greedy text differs from onnx's"
    rates = measure(backends, args.num_tokens, args.repeats)
    load_after = os.getloadavg()[0]

    import ai_edge_litert
    import onnxruntime

    print(f"export: {version_dir}; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    print(f"onnxruntime {onnxruntime.__version__}, ai-edge-litert {ai_edge_litert.__version__}, numpy {np.__version__}")
    print(f"batch 1, {args.num_tokens} tokens from 'ROMEO:', medians of {args.repeats}")
    print(f"1-minute load average before / after: {load_before:.2f} / {load_after:.2f}")
    print("litert greedy text == onnx greedy text (200 tokens): yes")
    print("int8 greedy text == float greedy text (200 tokens):", end=" ")
    print(
        ", ".join(
            f"{name} {'yes' if greedy[MODELS[i + 1][0]] == greedy[MODELS[i][0]] else 'no'}"
            for i, name in ((0, "onnx"), (2, "litert"))
        )
    )
    print()
    print("| model | file size, MB | tokens/s, sample.py loop | tokens/s, step calls only |")
    print("| --- | --- | --- | --- |")
    for label, name, int8 in (*MODELS, *((label, name, int8) for label, (name, int8) in ONE_THREAD.items())):
        size = os.path.getsize(os.path.join(version_dir, artifacts.EXTRA, FILES[name][int8])) / 1e6
        sample, steps = (statistics.median(rates[(label, loop)]) for loop in ("sample.py loop", "step calls only"))
        print(f"| {label} | {size:.2f} | {sample:,.0f} | {steps:,.0f} |")


if __name__ == "__main__":
    main()
