"""The callbacks of a training run, one job each, in the order training.make_callbacks lists them.

Keras' own are used where they do exactly what a run needs: ProgbarLogger, TensorBoard, and
(subclassed only to resume their counters from the checkpoint) ReduceLROnPlateau and
EarlyStopping. The rest are our own, each saying why Keras' does not fit. At the end of an
epoch their effects come in this order: history row, model.keras, learning rate, early stop,
checkpoint, history.csv and curves.png, the printed line, the sample. An epoch whose loss is NaN
or infinite (see `diverged`) changes nothing on disk: every callback that writes skips it.
"""

import math
import time

import keras
import numpy as np

from keraslm import artifacts, history
from keraslm.model import keras_step, reset_states
from keraslm.sampling import generate, make_sampler


def diverged(logs):
    """Whether an epoch's logs hold a NaN or infinite training or validation loss (or none of the latter)."""
    return not (math.isfinite(logs["loss"]) and math.isfinite(logs.get("val_loss", math.nan)))


def learning_rate(model):
    """The optimizer's current learning rate as a float (also for a mirrored variable)."""
    return float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))


class InterruptCheck(keras.callbacks.Callback):
    """Raises KeyboardInterrupt after every batch and epoch once `should_stop()` is true.

    The command-line layer passes its "a signal has arrived" flag, so an interrupt swallowed where
    Python cannot raise it (a finalizer) still stops training at the next batch. Keras has no
    callback that polls a condition.

    Args:
        should_stop: a function of no arguments.
    """

    def __init__(self, should_stop):
        super().__init__()
        self.should_stop = should_stop

    def _check(self):
        if self.should_stop():
            raise KeyboardInterrupt

    def on_train_batch_end(self, batch, logs=None):
        self._check()

    def on_test_batch_end(self, batch, logs=None):
        self._check()

    def on_epoch_end(self, epoch, logs=None):
        self._check()


class StateResetter(keras.callbacks.Callback):
    """Zero the carried RNN state at every epoch start and around every evaluation.

    Never between windows: window k+1 of a row continues window k of that row.
    """

    def on_epoch_begin(self, epoch, logs=None):
        reset_states(self.model)

    def on_test_begin(self, logs=None):
        reset_states(self.model)

    def on_test_end(self, logs=None):
        reset_states(self.model)


class PerplexityLogger(keras.callbacks.Callback):
    """Add perplexity (and bits per character) and the learning rate to the logs.

    Keras' running `loss` is the mean over the epoch's windows so far, all of equal size, so
    exp(loss) is the epoch's perplexity: no second softmax over the vocabulary is computed. The
    same logs dict reaches the progress bar and TensorBoard, which come after this callback.

    Args:
        char_level: also log bits per character.
    """

    def __init__(self, char_level):
        super().__init__()
        self.char_level = char_level

    def _add(self, logs, prefix=""):
        loss = logs.get(prefix + "loss")
        if loss is None:
            return
        logs[prefix + "perplexity"] = history.perplexity(loss)
        if self.char_level:
            logs[prefix + "bpc"] = loss / math.log(2)

    def on_train_batch_end(self, batch, logs=None):
        if logs is not None:
            self._add(logs)
            logs["lr"] = learning_rate(self.model)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            self._add(logs)
            self._add(logs, "val_")
            logs["lr"] = learning_rate(self.model)


class DivergenceGuard(keras.callbacks.Callback):
    """Stop training at the first NaN or infinite loss and say so; `diverged` tells the caller.

    Not keras.callbacks.TerminateOnNaN: that one prints a line per batch and checks no validation
    loss, and training must know afterwards that the run diverged.
    """

    def __init__(self):
        super().__init__()
        self.diverged = False

    def on_train_batch_end(self, batch, logs=None):
        if logs and not math.isfinite(logs.get("loss", 0.0)):
            self.model.stop_training = True  # no use finishing the epoch; on_epoch_end reports it

    def on_epoch_end(self, epoch, logs=None):
        if not diverged(logs):
            return
        print(
            f"\nepoch {epoch + 1}: loss is {logs['loss']}, validation loss {logs.get('val_loss', float('nan'))}: "
            "training diverged; try a lower --lr or --clipnorm. The last checkpoint and model.keras are unchanged."
        )
        self.diverged = True
        self.model.stop_training = True


class RunCallback(keras.callbacks.Callback):
    """A callback of a run that acts once per finished epoch (`after_epoch`), never after a diverged one,
    so a NaN epoch writes and prints nothing.

    Args:
        run: the `checkpoint.Run` being trained.
    """

    def __init__(self, run):
        super().__init__()
        self.run = run

    def on_epoch_end(self, epoch, logs=None):
        if not diverged(logs):
            self.after_epoch(epoch, logs)

    def after_epoch(self, epoch, logs):
        """The callback's work at the end of epoch `epoch` (0-based), whose logs are finite."""
        raise NotImplementedError


class EpochRecorder(RunCallback):
    """Append the epoch's history row (losses, perplexities, lr, speed) to the run; count the epoch.

    Not keras.callbacks.History: the row also holds the throughput and the learning rate the epoch
    ran with, and it travels inside the checkpoint.

    Args:
        run: the `checkpoint.Run` being trained.
    """

    def __init__(self, run):
        super().__init__(run)
        self.epoch_start = self.train_end = None
        self.train_tokens = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_start, self.train_end, self.train_tokens = time.perf_counter(), None, 0

    def on_train_batch_end(self, batch, logs=None):
        self.train_tokens = (batch + 1) * self.run.config.train.batch_size * self.run.config.train.bptt

    def on_test_begin(self, logs=None):
        if self.train_end is None:
            self.train_end = time.perf_counter()

    def after_epoch(self, epoch, logs):
        now = time.perf_counter()
        tokens_per_second = self.train_tokens / ((self.train_end or now) - self.epoch_start)
        lr = learning_rate(self.model)  # the one this epoch ran with: the annealer comes after
        row = history.epoch_row(
            epoch + 1, logs["loss"], logs["val_loss"], lr, tokens_per_second, now - self.epoch_start
        )
        self.run.history.append(row)
        self.run.epoch = epoch + 1


class BestModelSaver(RunCallback):
    """When validation loss improves, save the stateless twin with these weights as model.keras;
    keep the run's best loss, best epoch and epochs since (the checkpoint carries them).

    Not keras.callbacks.ModelCheckpoint(save_best_only=True): that saves the training model
    (stateful, with optimizer) in place; model.keras is the stateless twin, written atomically.

    Args:
        run: the `checkpoint.Run` being trained.
    """

    def after_epoch(self, epoch, logs):
        run = self.run
        if logs["val_loss"] < run.best_val_loss:
            run.best_val_loss, run.best_epoch, run.wait = logs["val_loss"], epoch + 1, 0
            run.twin.set_weights(self.model.get_weights())
            run.save_best_model()
        else:
            run.wait += 1


class LearningRateAnnealer(keras.callbacks.ReduceLROnPlateau):
    """Divide the learning rate by `anneal_factor` after every epoch whose validation loss does not
    improve on the best (pytorch/examples' `lr /= 4`).

    Keras' ReduceLROnPlateau with patience 0 and min_delta 0, subclassed because it forgets the
    best loss at the start of fit, where a resumed run takes it from the checkpoint.

    Args:
        run: the `checkpoint.Run` being trained.
        anneal_factor: greater than 1.
    """

    def __init__(self, run, anneal_factor):
        # lr * (1 / f) rounds to the same float32 as lr / f (checked for f in 1.1 … 10).
        super().__init__(monitor="val_loss", mode="min", factor=1 / anneal_factor, patience=0, min_delta=0)
        self.run = run

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self.best = self.run.best_val_loss

    def on_epoch_end(self, epoch, logs=None):
        if not diverged(logs):
            # A copy: Keras adds a learning_rate key, which TensorBoard would log beside our lr.
            super().on_epoch_end(epoch, dict(logs))


class EarlyStopper(keras.callbacks.EarlyStopping):
    """Stop after `patience` epochs in a row without improvement in validation loss, and say so.

    Keras' EarlyStopping, subclassed because it forgets the best loss and its count at the start
    of fit, where a resumed run takes them from the checkpoint.

    Args:
        run: the `checkpoint.Run` being trained.
        patience: at least 1.
    """

    def __init__(self, run, patience):
        super().__init__(monitor="val_loss", mode="min", patience=patience, min_delta=0)
        self.run = run

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self.best, self.wait = self.run.best_val_loss, self.run.wait

    def on_epoch_end(self, epoch, logs=None):
        if diverged(logs):
            return
        super().on_epoch_end(epoch, logs)
        if self.stopped_epoch == epoch > 0:  # 0 is Keras' "not stopped"; it never stops after epoch 0
            print(f"\nno improvement for {self.wait} epochs: stopping early")


class Checkpointer(RunCallback):
    """Write the resumable checkpoint after every epoch.

    Not keras.callbacks.ModelCheckpoint: that writes in place and cannot carry the dropout RNG
    state and the run's bookkeeping that an exact resume needs.

    Args:
        run: the `checkpoint.Run` being trained.
        save_checkpoint: called with the run; writes the checkpoint atomically.
    """

    def __init__(self, run, save_checkpoint):
        super().__init__(run)
        self.save_checkpoint = save_checkpoint

    def after_epoch(self, epoch, logs):
        self.save_checkpoint(self.run)


class HistoryWriter(RunCallback):
    """Rewrite history.csv and curves.png from the run's history after every epoch.

    Not keras.callbacks.CSVLogger: that appends in place, so after a kill history.csv could run
    ahead of the checkpoint; these files are rewritten atomically, after the checkpoint.

    Args:
        run: the `checkpoint.Run` being trained.
    """

    def after_epoch(self, epoch, logs):
        run = self.run
        history.write_csv(run.path(artifacts.HISTORY), run.history, run.vocab.level)
        history.plot_curves(run.path(artifacts.CURVES), run.history, run.title)


class EpochReport(RunCallback):
    """Print one line of the epoch's figures and what became of model.keras or the learning rate.

    Args:
        run: the `checkpoint.Run` being trained.
    """

    def after_epoch(self, epoch, logs):
        print(self.line(self.run.history[-1]))

    def line(self, row):
        """The report of one history row."""
        figures = f"loss {row['loss']:.4f} ppl {row['perplexity']:.2f}"
        val = f"loss {row['val_loss']:.4f} ppl {row['val_perplexity']:.2f}"
        if self.run.vocab.level == "char":
            figures += f" bpc {row['bpc']:.3f}"
            val += f" bpc {row['val_bpc']:.3f}"
        improved = self.run.best_epoch == row["epoch"]
        note = "best so far, saved model.keras" if improved else f"lr now {learning_rate(self.model):g}"
        speed = f"{row['seconds']:.0f} s, {row['tokens_per_second']:,.0f} tokens/s"
        return f"epoch {row['epoch']} ({speed}) | train {figures} | valid {val} | {note}"


class Sampler(RunCallback):
    """Print a short temperature-sampled continuation of the configured prompt after every epoch.

    Args:
        run: the `checkpoint.Run` being trained; its `sample_tokens` is more than 0.
    """

    def after_epoch(self, epoch, logs):
        self.run.twin.set_weights(self.model.get_weights())
        print(f"--- sample, temperature {self.run.config.train.sample_temperature} ---\n{self.sample()}\n---")

    def sample(self):
        """The continuation, from the twin (which holds the training model's weights)."""
        run, train = self.run, self.run.config.train
        rng = np.random.default_rng(train.seed + run.epoch)
        ids = run.vocab.encode_prompt(train.sample_prompt, rng, skip_unknown=True)
        prompt = run.vocab.decode(ids)
        sampler = make_sampler(temperature=train.sample_temperature)
        step, state = keras_step(run.twin, run.config.model, batch_size=1)
        tokens = generate(step, ids[None, :], state, train.sample_tokens, sampler, rng)
        return run.vocab.join(prompt, run.vocab.decode(tokens[0]))
