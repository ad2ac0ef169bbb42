"""Train a stateful RNN language model: python train.py --help."""

import argparse
import dataclasses
import datetime
import os
import sys

from keraslm import artifacts
from keraslm.cli import ArgumentParser, interrupted, run_main
from keraslm.config import CELLS, LEVEL_DEFAULTS, LEVELS, OPTIMIZERS, RunConfig
from keraslm.errors import UsageError

# Flags that are not part of RunConfig.
RUN_FLAGS = ("run_dir", "resume", "dry_run", "verbose", "dataset", "data", "strategy")


def parse_args(argv):
    p = ArgumentParser(description="Train a word- or character-level RNN language model with TBPTT.")
    data = p.add_argument_group("data")
    source = data.add_mutually_exclusive_group()
    source.add_argument(
        "--dataset", help="tfds:NAME, any TFDS dataset with a text feature (default tfds:tiny_shakespeare)"
    )
    source.add_argument("--data", help="a directory with train.txt/valid.txt/test.txt, or one text file (split 90/5/5)")
    data.add_argument(
        "--tfds-manual-dir", help="directory holding TFDS's already-downloaded source files (offline use)"
    )
    data.add_argument("--tfds-data-dir", help="where TFDS keeps prepared datasets (default ~/tensorflow_datasets)")
    data.add_argument("--level", choices=LEVELS, help="tokens are characters or words (default char)")
    data.add_argument("--min-freq", type=int, help="word level: rarer words become <unk> (default 1)")
    data.add_argument("--max-vocab", type=int, help="word level: keep at most N tokens (default 0 = all)")
    data.add_argument("--encoding", help="encoding of corpus files (default utf-8)")
    model = p.add_argument_group("model")
    model.add_argument("--cell", choices=CELLS, help="recurrent cell (default lstm)")
    model.add_argument("--num-layers", type=int, help="stacked recurrent layers (default 2)")
    model.add_argument("--embedding-dim", type=int, help="embedding width (char 128, word 200)")
    model.add_argument("--hidden-dim", type=int, help="units per recurrent layer (char 256, word 200)")
    model.add_argument(
        "--dropout",
        type=float,
        help="dropout after the embedding, between layers, before the output (char 0.1, word 0.2)",
    )
    model.add_argument(
        "--tie-weights", action="store_true", default=None, help="share the embedding with the output projection"
    )
    model.add_argument(
        "--init", choices=("keras", "torch"), help="initialisers: pytorch/examples' (the default) or Keras' defaults"
    )
    model.add_argument("--one-hot", action="store_true", default=None, help="one-hot inputs instead of an embedding")
    train = p.add_argument_group("training")
    train.add_argument("--batch-size", type=int, help="TBPTT columns (char 32, word 20)")
    train.add_argument("--bptt", type=int, help="window length in tokens (char 100, word 35)")
    train.add_argument("--epochs", type=int, help="epochs (char 12, word 40)")
    train.add_argument("--optimizer", choices=OPTIMIZERS, help="char adam, word sgd")
    train.add_argument("--lr", type=float, help="initial learning rate (char 0.002, word 20)")
    train.add_argument(
        "--clipnorm",
        type=float,
        help="clip gradients by global norm, as torch's clip_grad_norm_ (default 0.25; 0 = off)",
    )
    train.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0.01)")
    train.add_argument(
        "--anneal-factor",
        type=float,
        help="divide lr by this when validation loss does not improve (default 4; 1 = off)",
    )
    train.add_argument("--early-stopping", type=int, help="stop after N epochs without improvement (default 0 = off)")
    train.add_argument("--seed", type=int, help="random seed (default 1111)")
    train.add_argument("--jit-compile", action="store_true", default=None, help="compile the train step with XLA")
    train.add_argument(
        "--mixed-precision",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="float16 (GPU) / bfloat16 (CPU) compute, float32 weights, logits and loss (default: on for a"
        " CPU with AMX bfloat16 units and no GPU, where it trains 1.3-1.9x faster; off otherwise)",
    )
    train.add_argument("--sample-prompt", help="prompt of the sample printed after each epoch (default: start token)")
    train.add_argument("--sample-tokens", type=int, help="tokens sampled after each epoch (default 200; 0 = off)")
    train.add_argument("--sample-temperature", type=float, help="temperature of that sample (default 0.8)")
    run = p.add_argument_group("run")
    run.add_argument("--run-dir", help="run directory (default runs/<dataset>-<cell>-<timestamp>)")
    run.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its checkpoint")
    run.add_argument(
        "--strategy",
        choices=("default", "mirrored", "multi-worker"),
        default="default",
        help="tf.distribute: one device (default), every local GPU (MirroredStrategy), or every device of the "
        "workers in TF_CONFIG (MultiWorkerMirroredStrategy; run train.py on each worker)",
    )
    run.add_argument("--dry-run", action="store_true", help="two windows of each phase per epoch (smoke test)")
    run.add_argument(
        "--verbose", type=int, choices=(0, 1, 2), help="1 = progress bar (default on a terminal), 2 = a line per epoch"
    )
    return p.parse_args(argv)


def given_settings(args):
    """The RunConfig fields set on the command line, as {(section, field): value}."""
    sections = {
        f.name: section
        for section in ("model", "data", "train")
        for f in dataclasses.fields(getattr(RunConfig(), section))
    }
    given = {(sections[k], k): v for k, v in vars(args).items() if k not in RUN_FLAGS and v is not None}
    if args.dataset or args.data:
        given[("data", "source")] = args.dataset or args.data
    return given


def new_config(given):
    config = RunConfig()
    level = given.get(("data", "level"), config.data.level)
    for key, value in LEVEL_DEFAULTS[level].items():
        section = "model" if hasattr(config.model, key) else "train"
        setattr(getattr(config, section), key, value)
    for (section, key), value in given.items():
        setattr(getattr(config, section), key, value)
    if not config.data.source.startswith("tfds:") and config.data.source.startswith("tfds"):
        raise UsageError(f"--dataset {config.data.source!r}: write it as tfds:NAME")
    return config


def resumed_config(run_dir, given):
    config = RunConfig.load(os.path.join(run_dir, artifacts.CONFIG))
    for (section, key), value in given.items():
        if key == "epochs":
            config.train.epochs = value
        elif getattr(getattr(config, section), key) != value:
            saved = getattr(getattr(config, section), key)
            raise UsageError(f"--resume: the run was made with {key}={saved!r}, not {value!r}; drop that flag")
    return config


def default_run_dir(config):
    source = config.data.source
    name = (
        source[len("tfds:") :]
        if source.startswith("tfds:")
        else os.path.splitext(os.path.basename(os.path.normpath(source)))[0]
    )
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join("runs", f"{name}-{config.model.cell}-{stamp}")


def main(argv=None):
    args = parse_args(argv)
    given = given_settings(args)
    if args.resume:
        if not args.run_dir:
            raise UsageError("--resume needs --run-dir, the run to continue")
        if not os.path.isdir(args.run_dir):
            raise UsageError(f"--resume: {args.run_dir} is not a directory; give an existing run directory")
        config = resumed_config(args.run_dir, given)
    else:
        config = new_config(given).validate()
        if args.run_dir and os.path.exists(os.path.join(args.run_dir, artifacts.CONFIG)):
            raise UsageError(
                f"{args.run_dir} already holds a run; add --resume to continue it or choose another --run-dir"
            )
    run_dir = args.run_dir or default_run_dir(config)
    verbose = args.verbose if args.verbose is not None else (1 if sys.stdout.isatty() else 2)

    from keraslm.training import Interrupted, train  # TensorFlow loads here, after the checks

    try:
        train(
            config,
            run_dir,
            resume=args.resume,
            dry_run=args.dry_run,
            verbose=verbose,
            strategy=args.strategy,
            should_stop=interrupted,  # a signal swallowed in a finalizer still stops training
        )
    except Interrupted as e:
        raise KeyboardInterrupt(str(e)) from None


if __name__ == "__main__":
    run_main(main)
