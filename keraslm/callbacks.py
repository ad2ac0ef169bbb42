"""Keras callbacks of a training run: state resets, progress-bar figures, per-epoch bookkeeping."""

import math
import time

import keras
import numpy as np

from keraslm import artifacts, cli, history
from keraslm.model import keras_step, reset_states
from keraslm.sampling import generate, make_sampler


class InterruptCheck(keras.callbacks.Callback):
    """Raises KeyboardInterrupt after every batch once Ctrl-C or SIGTERM has arrived (cli.interrupted),
    in case the first one was swallowed where Python cannot raise it (a finalizer)."""

    def on_train_batch_end(self, batch, logs=None):
        _raise_if_interrupted()

    def on_test_batch_end(self, batch, logs=None):
        _raise_if_interrupted()

    def on_epoch_end(self, epoch, logs=None):
        _raise_if_interrupted()


def _raise_if_interrupted():
    if cli.interrupted():
        raise KeyboardInterrupt


def learning_rate(model):
    """The optimizer's current learning rate as a float (also for a mirrored variable)."""
    return float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))


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


class RunRecorder(keras.callbacks.Callback):
    """Everything a run does once per epoch, in this order:

    1. record the epoch's losses, perplexities and learning rate;
    2. if validation loss improved: save the stateless twin with these weights as model.keras;
       otherwise divide the learning rate by `anneal_factor` and, after `early_stopping` such
       epochs, stop;
    3. write the resumable checkpoint (through `save_checkpoint`), then history.csv and curves.png;
    4. print a line of figures and a short temperature-sampled text.

    A loss that is NaN or infinite stops training before anything is written, so the last good
    checkpoint and the best model stay as they were.

    Args:
        run: the `training.Run` being trained (paths, config, vocabulary, twin, state).
        save_checkpoint: called with the run after each epoch.
    """

    def __init__(self, run, save_checkpoint):
        super().__init__()
        self.run = run
        self.save_checkpoint = save_checkpoint
        self.epoch_start = self.train_end = None
        self.train_tokens = 0
        self.diverged = False

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_start, self.train_end, self.train_tokens = time.perf_counter(), None, 0

    def on_train_batch_end(self, batch, logs=None):
        self.train_tokens = (batch + 1) * self.run.config.train.batch_size * self.run.config.train.bptt
        if logs and not math.isfinite(logs.get("loss", 0.0)):
            self.model.stop_training = True  # no use finishing the epoch; on_epoch_end reports it

    def on_test_begin(self, logs=None):
        if self.train_end is None:
            self.train_end = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        run, train = self.run, self.run.config.train
        loss, val_loss = logs["loss"], logs.get("val_loss", float("nan"))
        if not (math.isfinite(loss) and math.isfinite(val_loss)):
            print(
                f"\nepoch {epoch + 1}: loss is {loss}, validation loss {val_loss}: training diverged; "
                "try a lower --lr or --clipnorm. The last checkpoint and model.keras are unchanged."
            )
            self.diverged = True
            self.model.stop_training = True
            return
        lr = learning_rate(self.model)
        now = time.perf_counter()
        tokens_per_second = self.train_tokens / ((self.train_end or now) - self.epoch_start)
        row = history.epoch_row(epoch + 1, loss, val_loss, lr, tokens_per_second, now - self.epoch_start)
        run.history.append(row)
        run.epoch = epoch + 1

        run.twin.set_weights(self.model.get_weights())
        improved = val_loss < run.best_val_loss
        if improved:
            run.best_val_loss, run.best_epoch, run.wait = val_loss, epoch + 1, 0
            run.save_best_model()
        else:
            run.wait += 1
            if train.anneal_factor > 1:
                self.model.optimizer.learning_rate.assign(lr / train.anneal_factor)
            if train.early_stopping and run.wait >= train.early_stopping:
                print(f"\nno improvement for {run.wait} epochs: stopping early")
                self.model.stop_training = True

        # Checkpoint first: history.csv never runs ahead of what --resume can continue from.
        self.save_checkpoint(run)
        history.write_csv(run.path(artifacts.HISTORY), run.history, run.vocab.level)
        history.plot_curves(run.path(artifacts.CURVES), run.history, run.title)
        self._report(row, improved)

    def _report(self, row, improved):
        figures = f"loss {row['loss']:.4f} ppl {row['perplexity']:.2f}"
        val = f"loss {row['val_loss']:.4f} ppl {row['val_perplexity']:.2f}"
        if self.run.vocab.level == "char":
            figures += f" bpc {row['bpc']:.3f}"
            val += f" bpc {row['val_bpc']:.3f}"
        note = "best so far, saved model.keras" if improved else f"lr now {learning_rate(self.model):g}"
        speed = f"{row['seconds']:.0f} s, {row['tokens_per_second']:,.0f} tokens/s"
        print(f"epoch {row['epoch']} ({speed}) | train {figures} | valid {val} | {note}")
        sample = self.sample()
        if sample is not None:
            print(f"--- sample, temperature {self.run.config.train.sample_temperature} ---\n{sample}\n---")

    def sample(self):
        """A short temperature-sampled continuation of the configured prompt, from the twin."""
        run, train = self.run, self.run.config.train
        if not train.sample_tokens:
            return None
        rng = np.random.default_rng(train.seed + run.epoch)
        ids = run.vocab.encode_prompt(train.sample_prompt, rng, skip_unknown=True)
        prompt = run.vocab.decode(ids)
        sampler = make_sampler(temperature=train.sample_temperature)
        step, state = keras_step(run.twin, run.config.model, batch_size=1)
        tokens = generate(step, ids[None, :], state, train.sample_tokens, sampler, rng)
        return run.vocab.join(prompt, run.vocab.decode(tokens[0]))
