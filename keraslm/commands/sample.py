"""Generate text from an exported model or a run: keraslm-sample (or python sample.py) MODEL --help.

The default onnx backend never imports TensorFlow, so it starts fast and runs where only
onnxruntime and NumPy are installed.
"""

import contextlib
import json
import sys

from keraslm.beam import check_beam_settings
from keraslm.cli import ArgumentParser, flag, run_main
from keraslm.errors import UsageError
from keraslm.files import OutputFile
from keraslm.generator import Generator, check_request
from keraslm.runtime import BACKENDS, open_backend
from keraslm.sampling import TOP_K_OFF, TOP_P_OFF, make_sampler


def parse_args(argv):
    p = ArgumentParser(
        description="Sample text from a keraslm model with temperature, top-k and top-p sampling, or find its most"
        " likely continuations by beam search (--beam-width)."
    )
    p.add_argument("model", help="an export (saved_models/NAME or saved_models/NAME/VERSION) or a run directory")
    p.add_argument("--backend", choices=BACKENDS, help="runtime (default: onnx for an export, keras for a run)")
    p.add_argument("--prompt", default="", help="text to continue (default: the start token)")
    p.add_argument("--num-tokens", type=int, default=200, help="tokens to generate (default %(default)s)")
    p.add_argument(
        "--temperature", type=float, help=f"softmax temperature; 0 = greedy (default {SAMPLING['temperature']})"
    )
    p.add_argument(
        "--top-k",
        type=int,
        help=f"sample among the k most likely tokens, ties with the k-th kept ({TOP_K_OFF} = off, the default)",
    )
    p.add_argument(
        "--top-p",
        type=float,
        help=f"nucleus sampling mass in (0, 1] ({TOP_P_OFF:g} = off, the default); with --top-k, the nucleus of"
        " the top k, renormalised",
    )
    p.add_argument("--greedy", action="store_true", help="always the most likely token (same as --temperature 0)")
    p.add_argument("--seed", type=int, default=0, help="random seed: one seed, one text, on every backend")
    p.add_argument("--num-samples", type=int, help="continuations drawn as one batch (default 1)")
    p.add_argument("--skip-unknown", action="store_true", help="char level: drop prompt characters the model lacks")
    p.add_argument("--stream", action="store_true", help="print tokens as they come (one sample)")
    p.add_argument("--out", help="also write the samples to this file (with --beam-width: JSON lines)")
    p.add_argument(
        "--int8",
        action="store_true",
        help="onnx and litert backends: the int8-weight model (model.int8.onnx, model.int8.tflite; export"
        " checks that its next-token distributions stay within a mean KL of 0.01 nats of the float model's)",
    )
    p.add_argument(
        "--in-graph", action="store_true", help="savedmodel backend: sample inside the graph (generate signature)"
    )
    beam = p.add_argument_group("beam search (instead of sampling)")
    beam.add_argument(
        "--beam-width",
        type=int,
        metavar="K",
        help="keep the K most likely hypotheses at each step (1 = greedy decoding)",
    )
    beam.add_argument(
        "--num-return",
        type=int,
        default=1,
        metavar="N",
        help="print the N best, N <= --beam-width (default %(default)s)",
    )
    beam.add_argument(
        "--length-penalty",
        type=float,
        default=0.0,
        metavar="A",
        help="rank hypotheses by log-probability / ((5 + length) / 6) ** A, GNMT's penalty (default %(default)g = off)",
    )
    beam.add_argument("--stop-at-eos", action="store_true", help="word level: a hypothesis ends at <eos>")
    serving = p.add_argument_group("tf-serving backend")
    serving.add_argument("--server", help="http://host:8501 (REST) or grpc://host:8500 (gRPC)")
    serving.add_argument("--model-name", help="the name TF Serving serves (default: the export's folder name)")
    serving.add_argument("--model-version", type=int, help="a version the server has (default: its newest)")
    serving.add_argument(
        "--timeout", type=float, default=10.0, help="seconds for each whole request (default %(default)g)"
    )
    return p.parse_args(argv)


# Sampling flags and their defaults: None in the parser, so that beam search can tell them given.
SAMPLING = {"temperature": 0.8, "top_k": TOP_K_OFF, "top_p": TOP_P_OFF, "num_samples": 1}
# Flags that only mean something to one of sampling and beam search.
SAMPLING_ONLY = (*SAMPLING, "greedy", "stream", "in_graph")
BEAM_ONLY = {"num_return": 1, "length_penalty": 0.0, "stop_at_eos": False}


def check_args(args):
    """Refuse bad flags before any file is opened or any model loaded; fill in the sampling defaults."""
    if args.beam_width is not None:
        check_beam_args(args)
    else:
        given = [name for name, default in BEAM_ONLY.items() if getattr(args, name) != default]
        if given:
            raise UsageError(f"{flag(given[0])} is a beam search flag; add --beam-width K")
    for name, default in SAMPLING.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    check_request(args.num_tokens, args.num_samples, args.stream)
    if args.in_graph and args.backend != "savedmodel":
        raise UsageError("--in-graph needs --backend savedmodel")
    if not args.timeout > 0:
        raise UsageError(f"--timeout must be positive, got {args.timeout}")
    make_sampler(temperature(args), args.top_k, args.top_p)


def temperature(args):
    """The temperature asked for: 0 (greedy) with --greedy."""
    return 0.0 if args.greedy else args.temperature


def check_beam_args(args):
    """Beam search ranks continuations by likelihood: refuse every sampling flag beside it, and
    beam settings out of range."""
    given = [name for name in SAMPLING_ONLY if getattr(args, name) not in (None, False)]
    if given:
        raise UsageError(f"{flag(given[0])} is a sampling flag; beam search (--beam-width) draws nothing: drop one")
    check_beam_settings(args.num_tokens, args.beam_width, args.num_return, args.length_penalty)


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    with contextlib.ExitStack() as stack:
        # --out is checked (folder, permissions, kind of file) before any work is done.
        out = stack.enter_context(OutputFile(args.out)) if args.out else None
        generator = Generator(
            open_backend(
                args.model, args.backend, args.server, args.model_name, args.model_version, args.timeout, args.int8
            )
        )
        if args.beam_width is not None:
            found = beam_search(generator, args)
            text = "".join(json.dumps({"rank": i + 1, **h}, ensure_ascii=False) + "\n" for i, h in enumerate(found))
        else:
            samples = sample(generator, args)
            text = "\n\n".join(samples) + "\n"
        if out:
            out.write(text)
    # --out is complete before anything is printed: a reader that stops early loses nothing.
    if args.beam_width is not None:
        print_beams(found, args.length_penalty)
    elif not args.stream:
        print(
            "\n\n".join(samples)
            if len(samples) == 1
            else "\n".join(f"--- sample {i + 1} ---\n{s}" for i, s in enumerate(samples))
        )


def sample(generator, args):
    """Generator.generate with the command line's settings (streamed to stdout with --stream)."""
    return generator.generate(
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


def beam_search(generator, args):
    """Generator.beam_search with the command line's settings."""
    return generator.beam_search(
        args.prompt,
        args.num_tokens,
        args.beam_width,
        args.num_return,
        args.length_penalty,
        stop_at_eos=args.stop_at_eos,
        seed=args.seed,
        skip_unknown=args.skip_unknown,
    )


def print_beams(found, length_penalty):
    """Each continuation under a line with its rank and total log-probability (and what it is
    ranked by, with a length penalty)."""
    for rank, h in enumerate(found, 1):
        ranked = f", ranked by {h['ranking_score']:.4f}" if length_penalty else ""
        print(f"--- {rank} of {len(found)}: log-probability {h['score']:.4f}{ranked} ---\n{h['text']}")


def run():
    """The console-script entry (keraslm-sample, python sample.py): main with one-line errors and clean interrupts."""
    run_main(main)
