"""Train a stateful RNN language model: keraslm-train (or python train.py) --help."""

import argparse
import os
import sys

from keraslm import artifacts
from keraslm.cli import ArgumentParser, interrupted, run_main
from keraslm.config import (
    CELLS,
    DEFAULT_LEVEL,
    INITS,
    KERNELS,
    LEVEL_DEFAULTS,
    LEVELS,
    OPTIMIZERS,
    STRATEGIES,
    RunConfig,
)
from keraslm.errors import UsageError

# Flags that are not part of RunConfig.
RUN_FLAGS = ("run_dir", "resume", "dry_run", "verbose", "dataset", "data", "strategy")


def default_of(name):
    """A setting's default as --help shows it: "default 0.25", or "char 128, word 200" for a setting
    of LEVEL_DEFAULTS; both read from keraslm.config, where the defaults are defined."""
    if name in LEVEL_DEFAULTS[DEFAULT_LEVEL]:
        return ", ".join(f"{level} {_shown(LEVEL_DEFAULTS[level][name])}" for level in LEVELS)
    config = RunConfig()
    return f"default {_shown(getattr(getattr(config, config.section_of(name)), name))}"


def _shown(value):
    return f"{value:g}" if isinstance(value, float) else str(value)


def build_parser():
    """train.py's command line; every flag's default in --help is read from keraslm.config."""
    p = ArgumentParser(description="Train a word- or character-level RNN language model with TBPTT.")
    data = p.add_argument_group("data")
    source = data.add_mutually_exclusive_group()
    source.add_argument("--dataset", help=f"tfds:NAME, any TFDS dataset with a text feature ({default_of('source')})")
    source.add_argument("--data", help="a directory with train.txt/valid.txt/test.txt, or one text file (split 90/5/5)")
    data.add_argument(
        "--tfds-manual-dir", help="directory holding TFDS's already-downloaded source files (offline use)"
    )
    data.add_argument("--tfds-data-dir", help="where TFDS keeps prepared datasets (default ~/tensorflow_datasets)")
    data.add_argument("--level", choices=LEVELS, help=f"tokens are characters or words ({default_of('level')})")
    data.add_argument("--min-freq", type=int, help=f"word level: rarer words become <unk> ({default_of('min_freq')})")
    data.add_argument(
        "--max-vocab", type=int, help=f"word level: keep at most N tokens ({default_of('max_vocab')} = all)"
    )
    data.add_argument("--encoding", help=f"encoding of corpus files ({default_of('encoding')})")
    model = p.add_argument_group("model")
    model.add_argument("--cell", choices=CELLS, help=f"recurrent cell ({default_of('cell')})")
    model.add_argument("--num-layers", type=int, help=f"stacked recurrent layers ({default_of('num_layers')})")
    model.add_argument("--embedding-dim", type=int, help=f"embedding width ({default_of('embedding_dim')})")
    model.add_argument("--hidden-dim", type=int, help=f"units per recurrent layer ({default_of('hidden_dim')})")
    model.add_argument(
        "--dropout",
        type=float,
        help=f"dropout after the embedding, between layers, before the output ({default_of('dropout')})",
    )
    model.add_argument(
        "--tie-weights", action="store_true", default=None, help="share the embedding with the output projection"
    )
    model.add_argument(
        "--init",
        choices=INITS,
        help=f"initialisers: Keras' defaults or pytorch/examples' ({default_of('init')})",
    )
    model.add_argument("--one-hot", action="store_true", default=None, help="one-hot inputs instead of an embedding")
    train = p.add_argument_group("training")
    train.add_argument("--batch-size", type=int, help=f"TBPTT columns ({default_of('batch_size')})")
    train.add_argument("--bptt", type=int, help=f"window length in tokens ({default_of('bptt')})")
    train.add_argument("--epochs", type=int, help=f"epochs ({default_of('epochs')})")
    train.add_argument("--optimizer", choices=OPTIMIZERS, help=default_of("optimizer"))
    train.add_argument("--lr", type=float, help=f"initial learning rate ({default_of('lr')})")
    train.add_argument(
        "--clipnorm",
        type=float,
        help=f"clip gradients by global norm, as torch's clip_grad_norm_ ({default_of('clipnorm')}; 0 = off)",
    )
    train.add_argument("--weight-decay", type=float, help=f"AdamW weight decay ({default_of('weight_decay')})")
    train.add_argument(
        "--anneal-factor",
        type=float,
        help=f"divide lr by this when validation loss does not improve ({default_of('anneal_factor')}; 1 = off)",
    )
    train.add_argument(
        "--early-stopping",
        type=int,
        help=f"stop after N epochs without improvement ({default_of('early_stopping')} = off)",
    )
    train.add_argument("--seed", type=int, help=f"random seed ({default_of('seed')})")
    train.add_argument("--jit-compile", action="store_true", default=None, help="compile the train step with XLA")
    train.add_argument(
        "--mixed-precision",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="float16 (GPU) / bfloat16 (CPU) compute, float32 weights, logits and loss (default: on for a"
        " CPU with AMX bfloat16 units and no GPU, where it trains 1.3-1.9x faster; off otherwise)",
    )
    train.add_argument("--sample-prompt", help="prompt of the sample printed after each epoch (default: start token)")
    train.add_argument(
        "--sample-tokens", type=int, help=f"tokens sampled after each epoch ({default_of('sample_tokens')}; 0 = off)"
    )
    train.add_argument(
        "--sample-temperature", type=float, help=f"temperature of that sample ({default_of('sample_temperature')})"
    )
    train.add_argument(
        "--kernels",
        choices=KERNELS,
        help="keraslm: per-replica state and fast CPU kernels, through private Keras APIs; keras: plain Keras "
        f"layers, slower, one device, taken by itself when this Keras changed those APIs ({default_of('kernels')})",
    )
    run = p.add_argument_group("run")
    run.add_argument("--run-dir", help="run directory (default runs/<dataset>-<cell>-<timestamp>)")
    run.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its checkpoint")
    run.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default=STRATEGIES[0],
        help="tf.distribute: one device (default), every local GPU (MirroredStrategy), or every device of the "
        "workers in TF_CONFIG (MultiWorkerMirroredStrategy; run train.py on each worker)",
    )
    run.add_argument("--dry-run", action="store_true", help="two windows of each phase per epoch (smoke test)")
    run.add_argument(
        "--verbose", type=int, choices=(0, 1, 2), help="1 = progress bar (default on a terminal), 2 = a line per epoch"
    )
    return p


def parse_args(argv):
    return build_parser().parse_args(argv)


def given_settings(args):
    """The RunConfig fields set on the command line, as {(section, field): value}."""
    given = {(RunConfig.section_of(k), k): v for k, v in vars(args).items() if k not in RUN_FLAGS and v is not None}
    if args.dataset or args.data:
        given[("data", "source")] = args.dataset or args.data
    return given


def new_config(given):
    """The config of a new run: the defaults of the level asked for, and the flags given."""
    config = RunConfig.for_level(given.get(("data", "level"), DEFAULT_LEVEL))
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
    run_dir = args.run_dir or artifacts.default_run_dir(config)
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


def run():
    """The console-script entry (keraslm-train, python train.py): main with one-line errors and clean interrupts."""
    run_main(main)
