"""Generate text from an exported model or a run: keraslm-sample (or python sample.py) MODEL --help.

The default onnx backend never imports TensorFlow, so it starts fast and runs where only
onnxruntime and NumPy are installed.
"""

import contextlib
import sys

from keraslm.cli import ArgumentParser, run_main
from keraslm.errors import UsageError
from keraslm.files import OutputFile
from keraslm.generator import Generator, check_request
from keraslm.runtime import BACKENDS, open_backend
from keraslm.sampling import TOP_K_OFF, TOP_P_OFF, make_sampler


def parse_args(argv):
    p = ArgumentParser(description="Sample text from a keraslm model with temperature, top-k and top-p sampling.")
    p.add_argument("model", help="an export (saved_models/NAME or saved_models/NAME/VERSION) or a run directory")
    p.add_argument("--backend", choices=BACKENDS, help="runtime (default: onnx for an export, keras for a run)")
    p.add_argument("--prompt", default="", help="text to continue (default: the start token)")
    p.add_argument("--num-tokens", type=int, default=200, help="tokens to generate (default %(default)s)")
    p.add_argument(
        "--temperature", type=float, default=0.8, help="softmax temperature; 0 = greedy (default %(default)s)"
    )
    p.add_argument(
        "--top-k",
        type=int,
        default=TOP_K_OFF,
        help="sample among the k most likely tokens, ties with the k-th kept (%(default)s = off)",
    )
    p.add_argument(
        "--top-p",
        type=float,
        default=TOP_P_OFF,
        help="nucleus sampling mass in (0, 1] (%(default)g = off); with --top-k, the nucleus of the top k,"
        " renormalised",
    )
    p.add_argument("--greedy", action="store_true", help="always the most likely token (same as --temperature 0)")
    p.add_argument("--seed", type=int, default=0, help="random seed: one seed, one text, on every backend")
    p.add_argument("--num-samples", type=int, default=1, help="continuations drawn as one batch (default %(default)s)")
    p.add_argument("--skip-unknown", action="store_true", help="char level: drop prompt characters the model lacks")
    p.add_argument("--stream", action="store_true", help="print tokens as they come (one sample)")
    p.add_argument("--out", help="also write the samples to this file")
    p.add_argument(
        "--int8",
        action="store_true",
        help="onnx backend: the int8-weight model (about 3x faster on CPUs with int8 instructions; export checks"
        " that its next-token distributions stay within a mean KL of 0.01 nats of the float model's)",
    )
    p.add_argument(
        "--in-graph", action="store_true", help="savedmodel backend: sample inside the graph (generate signature)"
    )
    serving = p.add_argument_group("tf-serving backend")
    serving.add_argument("--server", help="http://host:8501 (REST) or grpc://host:8500 (gRPC)")
    serving.add_argument("--model-name", help="the name TF Serving serves (default: the export's folder name)")
    serving.add_argument("--model-version", type=int, help="a version the server has (default: its newest)")
    serving.add_argument(
        "--timeout", type=float, default=10.0, help="seconds for each whole request (default %(default)g)"
    )
    return p.parse_args(argv)


def check_args(args):
    """Refuse bad flags before any file is opened or any model loaded."""
    check_request(args.num_tokens, args.num_samples, args.stream)
    if args.in_graph and args.backend != "savedmodel":
        raise UsageError("--in-graph needs --backend savedmodel")
    if not args.timeout > 0:
        raise UsageError(f"--timeout must be positive, got {args.timeout}")
    make_sampler(temperature(args), args.top_k, args.top_p)


def temperature(args):
    """The temperature asked for: 0 (greedy) with --greedy."""
    return 0.0 if args.greedy else args.temperature


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    with contextlib.ExitStack() as stack:
        # --out is checked (folder, permissions, kind of file) before any work is done.
        out = stack.enter_context(OutputFile(args.out)) if args.out else None
        backend = open_backend(
            args.model, args.backend, args.server, args.model_name, args.model_version, args.timeout, args.int8
        )
        samples = Generator(backend).generate(
            args.prompt,
            args.num_tokens,
            temperature(args),
            args.top_k,
            args.top_p,
            args.seed,
            args.num_samples,
            skip_unknown=args.skip_unknown,
            in_graph=args.in_graph,
            stream=sys.stdout if args.stream else None,
        )
        if out:
            out.write("\n\n".join(samples) + "\n")
    # --out is complete before anything is printed: a reader that stops early loses nothing.
    if not args.stream:
        print(
            "\n\n".join(samples)
            if len(samples) == 1
            else "\n".join(f"--- sample {i + 1} ---\n{s}" for i, s in enumerate(samples))
        )


def run():
    """The console-script entry (keraslm-sample, python sample.py): main with one-line errors and clean interrupts."""
    run_main(main)
