"""Export a run for TF Serving, ONNX Runtime and LiteRT: keraslm-export (or python export.py) RUN_DIR --help."""

from keraslm.cli import ArgumentParser, run_main
from keraslm.limits import DEFAULT_BATCH_TOKENS, LOGITS_BYTES, ServingLimits


def parse_args(argv):
    p = ArgumentParser(description="Export a trained run to saved_models/NAME/VERSION (SavedModel, ONNX, LiteRT).")
    p.add_argument("run_dir", help="a run directory written by train.py")
    p.add_argument("--out", default="saved_models", help="base folder of exported models (default %(default)s)")
    p.add_argument("--name", help="model name, the folder under --out (default: the run directory's name)")
    p.add_argument("--version", type=int, help="version number (default: the next free integer)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --version")
    p.add_argument("--check", action="store_true", help="print the parity figures of the checks")
    limits = p.add_argument_group("serving limits (per request; recorded in keraslm.json)")
    limits.add_argument(
        "--max-new-tokens",
        type=int,
        help=f"largest max_new_tokens of a generate request (default {ServingLimits.max_new_tokens})",
    )
    limits.add_argument(
        "--max-prompt-tokens",
        type=int,
        help=f"most tokens in one generate prompt (default {ServingLimits.max_prompt_tokens})",
    )
    limits.add_argument(
        "--max-batch-tokens",
        type=int,
        help=f"most rows × length in one request (default {DEFAULT_BATCH_TOKENS}, less for vocabularies over"
        f" {LOGITS_BYTES // (4 * DEFAULT_BATCH_TOKENS)} tokens so that serving_default's float32 logits stay"
        f" within {LOGITS_BYTES / 2**30:g} GiB)",
    )
    limits.add_argument(
        "--max-beam-width",
        type=int,
        help=f"widest beam of a beam_search request (default {ServingLimits.max_beam_width})",
    )
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from keraslm.export import export_run  # TensorFlow loads here, after the argument checks

    names = ("max_new_tokens", "max_prompt_tokens", "max_batch_tokens", "max_beam_width")
    limits = {name: getattr(args, name) for name in names}
    version_dir, report = export_run(args.run_dir, args.out, args.name, args.version, args.overwrite, limits)
    sizes = ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in report["sizes"].items())
    print(f"exported {version_dir} in {report['seconds']:.1f} s ({sizes})")
    print(f"ONNX operators: {', '.join(report['onnx_ops'])}")
    if args.check:
        for name, value in report["parity"].items():
            print(f"parity {name}: max |Δ| = {value:.2e}")
        for name, int8 in (("model.int8.onnx", report["int8"]), ("model.int8.tflite", report["litert_int8"])):
            print(
                f"{name}: mean KL to the float model {int8['int8_kl_vs_float']:.2e} nats,"
                f" max |Δ logit| {int8['int8_max_logit_diff']:.2e}"
            )


def run():
    """The console-script entry (keraslm-export, python export.py): main with one-line errors and clean interrupts."""
    run_main(main)
