"""Generate text from an exported model or a run: keraslm-sample (or python sample.py) MODEL --help.

The default onnx backend never imports TensorFlow, so it starts fast and runs where only
onnxruntime and NumPy are installed.
"""

import contextlib
import sys

import numpy as np

from keraslm.cli import ArgumentParser, run_main
from keraslm.errors import UsageError
from keraslm.files import OutputFile
from keraslm.runtime import BACKENDS, open_backend
from keraslm.sampling import TOP_K_OFF, TOP_P_OFF, check_memory, generate, make_sampler


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
    if args.num_tokens <= 0:
        raise UsageError(f"--num-tokens must be positive, got {args.num_tokens}")
    if args.num_samples <= 0:
        raise UsageError(f"--num-samples must be positive, got {args.num_samples}")
    if args.stream and args.num_samples > 1:
        raise UsageError("--stream prints one sample; drop --num-samples or --stream")
    if args.in_graph and args.backend != "savedmodel":
        raise UsageError("--in-graph needs --backend savedmodel")
    if not args.timeout > 0:
        raise UsageError(f"--timeout must be positive, got {args.timeout}")
    temperature = 0.0 if args.greedy else args.temperature
    return make_sampler(temperature, args.top_k, args.top_p)


def sample_texts(backend, args, sampler):
    """Continuations of the prompt, one per sample, and the prompt as the model sees it."""
    vocab = backend.vocab
    rng = np.random.default_rng(args.seed)
    ids = vocab.encode_prompt(args.prompt, rng, skip_unknown=args.skip_unknown)
    prompt = args.prompt if args.prompt else vocab.decode(ids)
    if args.in_graph:
        temperature = 0.0 if args.greedy else args.temperature
        texts, _ = backend.generate_in_graph(
            [args.prompt] * args.num_samples, args.num_tokens, temperature, args.top_k, args.top_p, args.seed
        )
        return prompt, texts
    on_token = None
    if args.stream:
        separator = " " if vocab.level == "word" and prompt and not prompt.endswith(("\n", " ")) else ""
        sys.stdout.write(prompt + separator)
        sys.stdout.flush()

        def on_token(column):
            piece = vocab.decode(column[:1])
            sys.stdout.write(piece if vocab.level == "char" or piece.endswith("\n") else piece + " ")
            sys.stdout.flush()

    check_memory(args.num_samples, len(ids), args.num_tokens, len(vocab))
    batch = np.repeat(ids[None, :], args.num_samples, axis=0)
    tokens = generate(
        backend.step, batch, backend.initial_state(args.num_samples), args.num_tokens, sampler, rng, on_token
    )
    if args.stream:
        print()
    return prompt, [vocab.decode(row) for row in tokens]


def main(argv=None):
    args = parse_args(argv)
    sampler = check_args(args)
    with contextlib.ExitStack() as stack:
        # --out is checked (folder, permissions, kind of file) before any work is done.
        out = stack.enter_context(OutputFile(args.out)) if args.out else None
        backend = open_backend(
            args.model, args.backend, args.server, args.model_name, args.model_version, args.timeout, args.int8
        )
        prompt, texts = sample_texts(backend, args, sampler)
        samples = [backend.vocab.join(prompt, text) for text in texts]
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
