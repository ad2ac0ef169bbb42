"""ONNX step graphs per cell: keraslm's fused graph against tf2onnx's conversion, side by side.

    python -m benchmarks.onnx_cells [--hidden-dim 512] [--repeats 5]

For each cell a 2-layer char model (dry-run weights) is exported; its model.onnx (fused LSTM / GRU /
RNN operators) and tf2onnx's conversion of the same step function (GRU and SimpleRNN become a
Loop) run one token at batch 1 and batch 32 in ONNX Runtime. Prints operator types, max |Δ logits|
against Keras, and median microseconds per step.
"""

import argparse
import os
import statistics
import time

import numpy as np
import onnxruntime
import tf2onnx

from benchmarks.generation import build_model
from keraslm.export.signatures import ServingFunctions
from keraslm.limits import ServingLimits
from keraslm.runs import load_run
from keraslm.states import state_names


def microseconds_per_step(session, feed, repeats, calls=200):
    names = [o.name for o in session.get_outputs()]
    for _ in range(20):
        session.run(names, feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            session.run(names, feed)
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden-dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"2-layer {args.hidden_dim}-unit char models, one token per call, medians of {args.repeats}\n")
    print("| cell | graph | RNN operators | max abs diff vs Keras | µs/step batch 1 | µs/step batch 32 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for cell in ("lstm", "gru", "rnn_tanh", "rnn_relu"):
        run_dir, version_dir = build_model(args.hidden_dim, cell)
        config, vocab, twin = load_run(run_dir, use_cudnn=False)
        module = ServingFunctions(config, vocab, twin, ServingLimits.default(len(vocab)))
        reference, _ = tf2onnx.convert.from_function(module.step, input_signature=module.step.input_signature, opset=17)
        graphs = {
            "keraslm model.onnx": open(os.path.join(version_dir, "assets.extra", "model.onnx"), "rb").read(),
            "tf2onnx": reference.SerializeToString(),
        }
        ops = {"keraslm model.onnx": None, "tf2onnx": reference}
        rng = np.random.default_rng(0)
        for name, graph in graphs.items():
            session = onnxruntime.InferenceSession(graph, providers=["CPUExecutionProvider"])
            row = []
            for batch in (1, 32):
                feed = {"tokens": rng.integers(0, len(vocab), (batch, 1)).astype(np.int32)}
                feed |= {
                    f"{n}_in": rng.normal(0, 0.5, (batch, args.hidden_dim)).astype(np.float32)
                    for n in state_names(config.model)
                }
                if batch == 1:
                    logits = session.run(["logits"], feed)[0]
                    diff = float(np.abs(logits - np.asarray(twin(feed)["logits"])).max())
                row.append(microseconds_per_step(session, feed, args.repeats))
            import onnx

            proto = ops[name] or onnx.load_from_string(graph)
            rnn_ops = sorted({n.op_type for n in proto.graph.node} & {"LSTM", "GRU", "RNN", "Loop"})
            print(
                f"| {cell} | {name} | {', '.join(rnn_ops)} | {diff:.1e} | {row[0]:,.0f} | {row[1]:,.0f} |", flush=True
            )


if __name__ == "__main__":
    main()
