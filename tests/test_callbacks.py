"""The per-epoch callbacks against the rules they implement, and their resume from a checkpoint."""

import math
import types

import keras
import pytest

from keraslm import callbacks

# Validation losses of a made-up run; float32 numbers, as Keras logs them.
VAL_LOSSES = [5.0, 4.0, 4.0, 4.5, 3.0, 3.5, 3.75, 3.25, 3.5, 2.5]


def reference(val_losses, anneal_factor, early_stopping, lr=1.0):
    """pytorch/examples' rule: save model.keras when validation loss improves on the best, else
    lr /= anneal_factor; stop after `early_stopping` such epochs in a row. The lr after each epoch,
    the epoch (1-based) that stopped, if any, and the epochs that saved model.keras."""
    best, wait, lrs, saved = math.inf, 0, [], []
    for epoch, val_loss in enumerate(val_losses, 1):
        if val_loss < best:
            best, wait = val_loss, 0
            saved.append(epoch)
        else:
            wait += 1
            lr /= anneal_factor
        lrs.append(lr)
        if early_stopping and wait >= early_stopping:
            return lrs, epoch, saved
    return lrs, None, saved


def fake_run():
    run = types.SimpleNamespace(best_val_loss=math.inf, best_epoch=0, wait=0, saved=[])
    run.twin = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    run.save_best_model = lambda: run.saved.append(run.best_epoch)
    return run


def tiny_model(lr=1.0):
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(lr), loss="mse")
    return model


def epochs(run, model, anneal_factor, early_stopping, val_losses, first_epoch=0):
    """Drive the run's improvement callbacks through one fit that starts at `first_epoch`, as
    training.make_callbacks orders them. The lr after each epoch, and the 1-based stopping epoch."""
    chain = [callbacks.BestModelSaver(run), callbacks.LearningRateAnnealer(run, anneal_factor)]
    if early_stopping:
        chain.append(callbacks.EarlyStopper(run, early_stopping))
    for callback in chain:
        callback.set_model(model)
        callback.on_train_begin()
    lrs = []
    for epoch, val_loss in enumerate(val_losses, first_epoch):
        for callback in chain:
            callback.on_epoch_end(epoch, {"loss": 1.0, "val_loss": val_loss})
        lrs.append(callbacks.learning_rate(model))
        if model.stop_training:
            return lrs, epoch + 1
    return lrs, None


@pytest.mark.parametrize("anneal_factor", [4.0, 3.0])
@pytest.mark.parametrize("early_stopping", [0, 2, 3])
def test_annealing_and_early_stopping_follow_the_rule(anneal_factor, early_stopping):
    run, model = fake_run(), tiny_model()
    lrs, stopped = epochs(run, model, anneal_factor, early_stopping, VAL_LOSSES)
    want_lrs, want_stopped, want_saved = reference(VAL_LOSSES, anneal_factor, early_stopping)
    assert stopped == want_stopped and run.saved == want_saved
    assert lrs == pytest.approx(want_lrs, rel=1e-6)  # the optimizer keeps lr in float32


@pytest.mark.parametrize("split", range(1, len(VAL_LOSSES)))
def test_a_resumed_run_anneals_and_stops_as_one_never_stopped(split):
    """--resume builds new callbacks; they take best loss and count from the run (the checkpoint)."""
    whole_lrs, whole_stopped = epochs(fake_run(), tiny_model(), 4.0, 3, VAL_LOSSES)

    run, model = fake_run(), tiny_model()
    lrs, stopped = epochs(run, model, 4.0, 3, VAL_LOSSES[:split])
    if stopped is None:
        resumed = tiny_model(lr=lrs[-1])  # the checkpoint holds the optimizer's lr
        more, stopped = epochs(run, resumed, 4.0, 3, VAL_LOSSES[split:], first_epoch=split)
        lrs += more
    assert (lrs, stopped) == (whole_lrs, whole_stopped)


def test_a_diverged_epoch_changes_nothing():
    run, model = fake_run(), tiny_model()
    written = []
    chain = [
        callbacks.EpochRecorder(run),
        callbacks.BestModelSaver(run),
        callbacks.LearningRateAnnealer(run, 4.0),
        callbacks.EarlyStopper(run, 1),
        callbacks.Checkpointer(run, written.append),
        callbacks.HistoryWriter(run),
        callbacks.EpochReport(run),
        callbacks.Sampler(run),
    ]
    for callback in chain:
        callback.set_model(model)
        callback.on_train_begin()
    before = dict(vars(run))
    for logs in ({"loss": math.nan, "val_loss": 3.0}, {"loss": 2.0, "val_loss": math.inf}, {"loss": 2.0}):
        for callback in chain:
            callback.on_epoch_end(0, dict(logs))
    assert vars(run) == before and written == [] and callbacks.learning_rate(model) == 1.0
    assert not model.stop_training


def test_the_divergence_guard_stops_and_remembers(capsys):
    guard, model = callbacks.DivergenceGuard(), tiny_model()
    guard.set_model(model)
    guard.on_train_batch_end(0, {"loss": 2.0})
    guard.on_epoch_end(0, {"loss": 2.0, "val_loss": 2.5})
    assert not model.stop_training and not guard.diverged
    guard.on_train_batch_end(1, {"loss": math.inf})
    assert model.stop_training and not guard.diverged  # the epoch's end says so
    guard.on_epoch_end(1, {"loss": math.inf, "val_loss": math.nan})
    assert guard.diverged and "training diverged" in capsys.readouterr().out


def test_the_annealer_leaves_the_logs_as_they_were():
    """Keras' ReduceLROnPlateau adds learning_rate to the logs; TensorBoard, after it, logs only lr."""
    run, model = fake_run(), tiny_model()
    annealer = callbacks.LearningRateAnnealer(run, 4.0)
    annealer.set_model(model)
    annealer.on_train_begin()
    logs = {"loss": 1.0, "val_loss": 2.0}
    annealer.on_epoch_end(0, logs)
    assert logs == {"loss": 1.0, "val_loss": 2.0}


def test_interrupt_check_polls_what_it_is_given():
    stop = False
    check = callbacks.InterruptCheck(lambda: stop)
    check.on_train_batch_end(0)
    stop = True
    for hook in (check.on_train_batch_end, check.on_test_batch_end, check.on_epoch_end):
        with pytest.raises(KeyboardInterrupt):
            hook(1, logs={})
