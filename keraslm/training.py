"""A training run: corpus → vocabulary → TBPTT windows → stateful model.fit → run directory.

Run directory:
    config.json       RunConfig, enough to rebuild the model without the corpus
    vocab.json        the vocabulary
    model.keras       the stateless twin with the best weights by validation loss
    checkpoint.keras  weights + optimizer state, with epoch, lr and history inside (resumable)
    history.csv       per-epoch figures; curves.png their plot
    results.json      best epoch, its validation loss and the test figures
    tensorboard/      TensorBoard logs
"""

import contextlib
import json
import math
import os
import shutil
import tempfile

import keras
import tensorflow as tf

from keraslm import artifacts, distribute, history, keras_compat, loop
from keraslm import callbacks as run_callbacks
from keraslm.checkpoint import Run, load_checkpoint, save_checkpoint
from keraslm.config import RunConfig
from keraslm.data import load_corpus, tbptt_dataset
from keraslm.errors import ArgumentError, UsageError
from keraslm.files import remove_stale_temporaries, write_text_atomic
from keraslm.locks import locked_directory
from keraslm.losses import SparseCrossEntropy
from keraslm.model import build_training_model, reset_states
from keraslm.vocab import Vocabulary


class Interrupted(Exception):
    """Training stopped by Ctrl-C or SIGTERM; the last checkpoint is intact."""


def bfloat16_is_native():
    """True on a machine without a GPU whose CPU has AMX bfloat16 units (Intel Sapphire Rapids and
    later): there bfloat16 matmuls run much faster than float32, and mixed precision trains the
    benchmark configs faster at about the same validation loss (benchmarks/RESULTS.md, "Training
    against the PyTorch peer: window kernels and bfloat16").
    Without AMX, bfloat16 is emulated or narrower and not known to win, so float32 stays."""
    if tf.config.list_physical_devices("GPU"):
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return any(line.startswith("flags") and "amx_bf16" in line.split() for line in f)
    except OSError:  # not Linux
        return False


def make_optimizer(train_config):
    """SGD, Adam or AdamW with torch-style gradient clipping.

    `clip_grad_norm_(params, max_norm)` rescales all gradients together when their global L2
    norm exceeds max_norm: that is Keras' `global_clipnorm`. (Keras' `clipnorm` clips each
    variable's gradient on its own, a different rule.) Across replicas, the clipping sees the
    gradient of the whole global batch (keras_compat.ClipAcrossReplicas). With --kernels keras,
    Keras' own optimizers: one replica, but an embedding's gradient measured by occurrence.
    """
    clip = {"global_clipnorm": train_config.clipnorm} if train_config.clipnorm else {}
    lr = train_config.lr
    optimizers = distribute if train_config.kernels == "keraslm" else keras.optimizers
    if train_config.optimizer == "sgd":
        return optimizers.SGD(lr, **clip)
    if train_config.optimizer == "adam":
        return optimizers.Adam(lr, **clip)
    return optimizers.AdamW(lr, weight_decay=train_config.weight_decay, **clip)


def encode_splits(splits, vocab):
    """Token id streams of every split. Unknown characters outside training are dropped, with a note."""
    ids = {}
    for name, text in splits.items():
        if vocab.level == "word" and not text.endswith("\n"):
            text += "\n"  # the last line ends with <eos> too, as in pytorch/examples
        ids[name] = vocab.encode(text, skip_unknown=True)
        if vocab.level == "char" and len(ids[name]) < len(text):
            unknown = sorted(set(text) - set(vocab.index))
            print(
                f"note: {len(text) - len(ids[name])} characters of the {name} split are not in the "
                f"training vocabulary and were dropped: {', '.join(map(repr, unknown[:10]))}"
            )
    return ids


def train(config: RunConfig, run_dir, resume=False, dry_run=False, verbose=1, strategy="default", should_stop=None):
    """Train (or resume) a run and evaluate its best model on the test split.

    Args:
        config: the run's configuration (validated here).
        run_dir: the run directory, created if needed.
        resume: continue from the run directory's checkpoint.
        dry_run: two windows of each phase per epoch, a smoke test.
        verbose: Keras' fit verbosity (1 = progress bar, 2 = a line per epoch).
        strategy: "default", "mirrored" or "multi-worker" (tf.distribute); checkpoints move freely
            between them. Under multi-worker only worker 0 writes run_dir.
        should_stop: a function of no arguments, polled after every batch; once it returns true,
            training stops as at Ctrl-C (the command line passes "a signal has arrived").

    Returns:
        The dict written to results.json.

    Raises:
        UsageError: bad configuration or data.
        Interrupted: Ctrl-C or SIGTERM; the checkpoint of the last finished epoch is intact.
    """
    config.validate()
    if resume and not os.path.exists(os.path.join(run_dir, artifacts.CHECKPOINT)):  # on every worker, before any work
        raise ArgumentError("{resume}: no checkpoint in {path}; start a new run without {resume}", path=run_dir)
    strategy = distribute.make_strategy(strategy)
    config.train.kernels = keras_compat.choose_kernels(config.train.kernels, strategy.num_replicas_in_sync, resume)
    if config.train.jit_compile and distribute.is_multi_worker(strategy):
        raise ArgumentError("{jit_compile} does not combine with {strategy} multi-worker; leave one out")
    previous_policy = keras.mixed_precision.global_policy()
    try:
        with writable_run_dir(run_dir, strategy, resume) as work_dir:
            return _train(
                config,
                work_dir,
                strategy,
                resume=resume,
                dry_run=dry_run,
                verbose=verbose,
                shown_run_dir=run_dir,
                should_stop=should_stop or (lambda: False),
            )
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)  # --mixed-precision is per run


@contextlib.contextmanager
def writable_run_dir(run_dir, strategy, resume):
    """The directory this process writes: the run directory, locked for this process (see
    locks.locked_directory), except on multi-worker workers other than 0, which write a scratch
    copy removed at the end (TF's multi-worker convention: every worker saves, because saving may
    involve all of them, and only the chief's files are kept).
    On --resume every worker reads the run directory, which must therefore be shared or copied.
    """
    if distribute.is_chief(strategy):
        with locked_directory(run_dir):
            # Checked again under the lock: two trainings started together both pass train.py's check.
            if not resume and os.path.exists(os.path.join(run_dir, artifacts.CONFIG)):
                raise ArgumentError(
                    "{path} already holds a run; add {resume} to continue it or choose another {run_dir}", path=run_dir
                )
            yield run_dir
        return
    scratch = tempfile.mkdtemp(prefix="keraslm-worker-")
    try:
        if resume:
            for name in (artifacts.CONFIG, artifacts.VOCAB, artifacts.CHECKPOINT):
                shutil.copy(os.path.join(run_dir, name), scratch)
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _train(config, run_dir, strategy, *, resume, dry_run, verbose, shown_run_dir, should_stop):
    # The steps of train(), in order; shown_run_dir is run_dir as the user named it (see writable_run_dir).
    keras.utils.set_random_seed(config.train.seed)
    replica_batch_size = distribute.per_replica_batch_size(strategy, config.train.batch_size)  # may refuse: early
    set_precision_policy(config.train)
    splits = load_corpus(config.data)
    vocab = load_or_build_vocabulary(config, splits, run_dir, resume)
    ids = encode_splits(splits, vocab)
    datasets = make_datasets(ids, config.train, dry_run)
    remove_stale_temporaries(run_dir, artifacts.RUN_FILES)
    run = Run(run_dir, config, vocab)
    model = compile_model(config, strategy, replica_batch_size)
    start_or_resume(run, model, resume)
    print(describe(run, ids, model))
    guard = run_callbacks.DivergenceGuard()
    callbacks = make_callbacks(run, model, guard, should_stop)
    fit(run, model, datasets, callbacks, verbose, shown_run_dir)
    if guard.diverged:
        raise ArgumentError("training diverged (NaN or infinite loss); lower {lr} or {clipnorm} and start again")
    return evaluate_best(run, model, datasets["test"], verbose)


def set_precision_policy(train_config):
    """Keras' global dtype policy for --mixed-precision; auto (None) becomes what the machine runs
    fastest, which config.json then records."""
    if train_config.mixed_precision is None:
        train_config.mixed_precision = bfloat16_is_native()
    if train_config.mixed_precision:
        # float16 with loss scaling where a GPU runs it; bfloat16 is the CPU's fast half type.
        keras.mixed_precision.set_global_policy(
            "mixed_float16" if tf.config.list_physical_devices("GPU") else "mixed_bfloat16"
        )


def load_or_build_vocabulary(config, splits, run_dir, resume):
    """The run's vocab.json on resume, else a new one from the training split; sizes the model by it."""
    if resume:
        vocab = Vocabulary.load(os.path.join(run_dir, artifacts.VOCAB))
    else:
        vocab = Vocabulary.build(splits["train"], config.data.level, config.data.min_freq, config.data.max_vocab)
    config.model.vocabulary_size = len(vocab)
    config.model.validate()  # again, now that the vocabulary sizes the embedding and the output
    return vocab


def make_datasets(ids, train_config, dry_run):
    """TBPTT window datasets of every split; two windows each under --dry-run."""
    datasets = {}
    for name, stream in ids.items():
        try:
            datasets[name] = tbptt_dataset(stream, train_config.batch_size, train_config.bptt)
        except UsageError as e:
            raise e.within(f"{name} split") from None
        if dry_run:
            datasets[name] = datasets[name].take(2)
    return datasets


def compile_model(config, strategy, replica_batch_size):
    """The stateful training model, compiled, its optimizer built, under the strategy's scope."""
    with strategy.scope():
        # Each replica's layers carry the state of its own batch_size / replicas columns.
        model = build_training_model(config.model, batch_size=replica_batch_size, kernels=config.train.kernels)
        model.compile(
            optimizer=make_optimizer(config.train),
            loss=SparseCrossEntropy(),  # Keras' sparse cross-entropy, faster on a CPU (losses.py)
            jit_compile=config.train.jit_compile,
        )
        # Build the optimizer's slots now, so that even the epoch-0 checkpoint holds all of them.
        model.optimizer.build(model.trainable_variables)
    return model


def start_or_resume(run, model, resume):
    """Resume `run` and `model` from the checkpoint, or write a new run's config, vocabulary and
    epoch-0 checkpoint."""
    if resume:
        load_checkpoint(run, model)
        print(f"resuming {run.run_dir} after epoch {run.epoch} (lr {run_callbacks.learning_rate(model):g})")
    else:
        run.config.save(run.path(artifacts.CONFIG))
        run.vocab.save(run.path(artifacts.VOCAB))
        save_checkpoint(run, model)


def describe(run, ids, model):
    """One line: the run directory, vocabulary, tokens per split and parameter count."""
    tokens = "/".join(f"{len(ids[name]):,}" for name in ("train", "valid", "test"))
    return (
        f"run {run.run_dir}: vocabulary {len(run.vocab)} ({run.vocab.level}), tokens train/valid/test "
        f"{tokens}, {model.count_params():,} parameters"
    )


def make_callbacks(run, model, guard, should_stop):
    """The run's callbacks, in the order their effects must come (see keraslm/callbacks.py)."""
    train_config = run.config.train
    callbacks = [
        run_callbacks.InterruptCheck(should_stop),
        run_callbacks.StateResetter(),
        run_callbacks.PerplexityLogger(char_level=run.vocab.level == "char"),
        # Our own progress bar, so that the epoch's report prints after its last line.
        keras.callbacks.ProgbarLogger(),
        guard,
        run_callbacks.EpochRecorder(run),
        run_callbacks.BestModelSaver(run),
    ]
    if train_config.anneal_factor > 1:  # 1 = off
        callbacks.append(run_callbacks.LearningRateAnnealer(run, train_config.anneal_factor))
    if train_config.early_stopping:  # 0 = off
        callbacks.append(run_callbacks.EarlyStopper(run, train_config.early_stopping))
    # Checkpoint first: history.csv never runs ahead of what --resume can continue from.
    callbacks += [
        run_callbacks.Checkpointer(run, lambda r: save_checkpoint(r, model)),
        run_callbacks.HistoryWriter(run),
        run_callbacks.EpochReport(run),
    ]
    if train_config.sample_tokens:
        callbacks.append(run_callbacks.Sampler(run))
    callbacks.append(keras.callbacks.TensorBoard(run.path(artifacts.TENSORBOARD), write_graph=False))
    return callbacks


def fit(run, model, datasets, callbacks, verbose, shown_run_dir):
    """Train from the run's epoch to the configured count; Ctrl-C becomes `Interrupted`."""
    if run.epoch >= run.config.train.epochs:
        return
    try:
        loop.fit(model, datasets["train"], datasets["valid"], run.config.train.epochs, run.epoch, callbacks, verbose)
    except KeyboardInterrupt:
        raise Interrupted(
            f"interrupted; {os.path.join(shown_run_dir, artifacts.CHECKPOINT)} holds epoch {run.checkpoint_epoch}: "
            f"continue with python train.py --resume --run-dir {shown_run_dir}"
        ) from None


def evaluate_best(run, model, test_dataset, verbose):
    """Load model.keras into the training model, evaluate on the test split, write results.json."""
    best = keras.models.load_model(run.path(artifacts.BEST_MODEL))  # safe mode: no code from the file
    model.set_weights(best.get_weights())
    reset_states(model)
    test_loss = float(loop.evaluate(model, test_dataset, verbose)["loss"])
    reset_states(model)
    results = {
        "best_epoch": run.best_epoch,
        "best_val_loss": run.best_val_loss,
        "best_val_perplexity": history.perplexity(run.best_val_loss),
        "test_loss": test_loss,
        "test_perplexity": history.perplexity(test_loss),
    }
    if run.vocab.level == "char":
        results["best_val_bpc"] = run.best_val_loss / math.log(2)
        results["test_bpc"] = test_loss / math.log(2)
    write_text_atomic(run.path(artifacts.RESULTS), json.dumps(results, indent=2) + "\n")
    figures = ", ".join(f"{k} {v:.4f}" for k, v in results.items() if k != "best_epoch")
    print(f"best epoch {run.best_epoch}: {figures}")
    return results
