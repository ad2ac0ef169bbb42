"""fit and evaluate for every strategy: Keras' own, except under MultiWorkerMirroredStrategy.

Keras 3.15's `Model.fit` and `Model.evaluate` fail under MultiWorkerMirroredStrategy before their
first step: `_maybe_symbolic_build` averages the integer token batch across workers, and
`reduce_per_replica` averages each scalar metric over an axis 0 it does not have. This module
runs the loop fit runs, with the documented custom-loop pieces: `model.train_step` and
`model.test_step` inside `strategy.run`, one window per call, metrics averaged across every
replica of every worker by `strategy.reduce`, and the run's callbacks called at the same points.

Batch columns reach replicas as under MirroredStrategy: the dataset is sharded by data, so of
each global window of B rows, replica r of R gets rows r·B/R … (r+1)·B/R - 1, every time.
"""

import keras
import tensorflow as tf

from keraslm.distribute import is_multi_worker


def distribute(dataset, strategy):
    """The dataset split across the strategy's replicas by rows of each window (no file sharding)."""
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return strategy.experimental_distribute_dataset(dataset.with_options(options))


def _step_function(step, strategy):
    """A traced function running `step` on one distributed batch and averaging its metrics."""

    @tf.function
    def run(batch):
        outputs = strategy.run(step, args=(batch,))
        # Every replica's batch has the same size, so the mean of their running means is the mean
        # over the global batch, as on one device.
        return {name: strategy.reduce("MEAN", value, axis=None) for name, value in outputs.items()}

    return run


def _floats(logs):
    return {name: float(value) for name, value in logs.items()}


def _run_test(model, batches, callbacks, test_function):
    model.reset_metrics()
    callbacks.on_test_begin()
    logs = {}
    for step, batch in enumerate(batches):
        callbacks.on_test_batch_begin(step)
        logs = _floats(test_function(batch))
        callbacks.on_test_batch_end(step, logs)
    callbacks.on_test_end(logs)
    return logs


def _callback_list(model, callbacks, verbose, epochs=1):
    return keras.callbacks.CallbackList(
        callbacks, add_history=False, add_progbar=False, model=model, verbose=verbose, epochs=epochs, steps=None
    )


def fit(model, train_data, validation_data, epochs, initial_epoch, callbacks, verbose):
    """`model.fit(train_data, validation_data=..., epochs=..., initial_epoch=..., callbacks=...)`,
    run by this module's loop under MultiWorkerMirroredStrategy.

    Args:
        model: a compiled model built under the strategy's scope.
        train_data, validation_data: global-batch `tf.data` datasets, identical on every worker.
        epochs, initial_epoch: as for fit.
        callbacks: Keras callbacks; they see the same hooks and logs as under fit.
        verbose: 0 silent, 1 or 2 as for the callbacks' progress bar.
    """
    strategy = model.distribute_strategy
    if not is_multi_worker(strategy):
        model.fit(
            train_data,
            validation_data=validation_data,
            epochs=epochs,
            initial_epoch=initial_epoch,
            shuffle=False,  # windows must stay in stream order: state carries between them
            callbacks=callbacks,
            verbose=verbose,
        )
        return
    train_function = _step_function(model.train_step, strategy)
    test_function = _step_function(model.test_step, strategy)
    train_batches, validation_batches = distribute(train_data, strategy), distribute(validation_data, strategy)
    callbacks = _callback_list(model, callbacks, verbose, epochs)
    model.stop_training = False
    callbacks.on_train_begin()
    logs = {}
    for epoch in range(initial_epoch, epochs):
        model.reset_metrics()
        callbacks.on_epoch_begin(epoch)
        for step, batch in enumerate(train_batches):
            callbacks.on_train_batch_begin(step)
            logs = _floats(train_function(batch))
            callbacks.on_train_batch_end(step, logs)
            if model.stop_training:
                break
        if not model.stop_training:
            val_logs = _run_test(model, validation_batches, callbacks, test_function)
            logs.update({f"val_{name}": value for name, value in val_logs.items()})
        callbacks.on_epoch_end(epoch, logs)
        if model.stop_training:
            break
    callbacks.on_train_end(logs)


def evaluate(model, dataset, verbose):
    """`model.evaluate(dataset, return_dict=True)`, run by this module's loop under
    MultiWorkerMirroredStrategy."""
    strategy = model.distribute_strategy
    if not is_multi_worker(strategy):
        return model.evaluate(dataset, verbose=verbose, return_dict=True)
    test_function = _step_function(model.test_step, strategy)
    return _run_test(model, distribute(dataset, strategy), _callback_list(model, [], verbose), test_function)
