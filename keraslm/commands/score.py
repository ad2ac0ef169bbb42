"""Score a model on a text: keraslm-score (or python score.py) MODEL --help.

Prints the loss (nats per token), the perplexity and at char level the bits per character of an
export or a run on a text file or on a split of its own corpus, computed as training evaluates a
split. The default onnx backend never imports TensorFlow.
"""

import math

from keraslm.cli import ArgumentParser, run_main
from keraslm.data import SPLITS
from keraslm.errors import UsageError
from keraslm.runtime import BACKENDS
from keraslm.scoring import model_config, score_model


def parse_args(argv):
    p = ArgumentParser(
        description="Score a keraslm model on a text: loss (nats/token), perplexity and bits per character,"
        " with the state carried through the text in TBPTT windows as training evaluates."
    )
    p.add_argument("model", help="an export (saved_models/NAME or saved_models/NAME/VERSION) or a run directory")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", metavar="FILE", help="a text file to score (streamed: any size)")
    source.add_argument(
        "--split",
        choices=SPLITS,
        help="a split of the corpus the model was trained on (its config names the corpus); with the"
        " model's batch size and bptt, --split test gives results.json's test loss",
    )
    p.add_argument("--data", metavar="PATH", help="--split: the corpus's path, if it moved since training")
    p.add_argument("--backend", choices=BACKENDS, help="runtime (default: onnx for an export, keras for a run)")
    p.add_argument("--batch-size", type=int, metavar="N", help="columns the text is cut into (default: the model's)")
    p.add_argument("--bptt", type=int, metavar="N", help="tokens per window (default: the model's)")
    p.add_argument(
        "--skip-unknown",
        action="store_true",
        help="char level: drop characters the model lacks (default: refuse the text; --split drops them,"
        " as training did); at word level they are <unk>",
    )
    p.add_argument("--encoding", default="utf-8", help="of the --text file (default %(default)s)")
    p.add_argument("--per-token", metavar="FILE", help="write each scored token's log-probability as JSON lines")
    p.add_argument("--int8", action="store_true", help="onnx and litert backends: the int8-weight model")
    serving = p.add_argument_group("tf-serving backend")
    serving.add_argument("--server", help="http://host:8501 (REST) or grpc://host:8500 (gRPC)")
    serving.add_argument("--model-name", help="the name TF Serving serves (default: the export's folder name)")
    serving.add_argument("--model-version", type=int, help="a version the server has (default: its newest)")
    serving.add_argument(
        "--timeout", type=float, default=10.0, help="seconds for each whole request (default %(default)g)"
    )
    return p.parse_args(argv)


def describe(args, score):
    """The lines score.py prints: what was scored, then one figure a line."""
    what = args.text if args.text is not None else f"the {args.split} split"
    lines = [f"{args.model}, {what}: {score.tokens:,} tokens scored ({score.level} level)"]
    if score.unscored:
        lines.append(
            f"note: the last {score.unscored:,} tokens fill no window and are not scored, as training's evaluation"
            " drops them (--batch-size 1 scores all but fewer than --bptt)"
        )
    if score.unknown:
        unknown = "tokens were <unk>" if score.level == "word" else "characters the model lacks were dropped"
        lines.append(f"note: {score.unknown:,} {unknown}")
    lines += [f"loss {score.loss:.6f} nats/token", f"perplexity {score.perplexity:.4f}"]
    if score.bits_per_char is not None:
        lines.append(f"bpc {score.bits_per_char:.6f}")
    return lines


def main(argv=None):
    args = parse_args(argv)
    if not (args.timeout > 0 and math.isfinite(args.timeout)):
        raise UsageError(f"--timeout must be a positive number of seconds, got {args.timeout}")
    if args.data is not None and args.split is None:
        raise UsageError("--data names the corpus of --split; drop it, or score a split")
    score = score_model(
        args.model,
        text=args.text,
        split=args.split,
        data=args.data,
        encoding=args.encoding,
        batch_size=args.batch_size,
        bptt=args.bptt,
        skip_unknown=args.skip_unknown,
        per_token=args.per_token,
        backend=args.backend,
        server=args.server,
        model_name=args.model_name,
        version=args.model_version,
        timeout=args.timeout,
        int8=args.int8,
    )
    if model_config(args.model).train.mixed_precision:
        print("note: the model trained and evaluated in mixed precision; scoring runs float32")
    print("\n".join(describe(args, score)))


def run():
    """The console-script entry (keraslm-score, python score.py): main with one-line errors and clean interrupts."""
    run_main(main)
