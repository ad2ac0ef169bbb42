"""Every private Keras API keraslm relies on, behind one door, and the check that they still hold.

keraslm's own training path (`--kernels keraslm`, the default) reaches into Keras in four places,
each listed in `PRIVATE_APIS` with what it relies on, the Keras version it was checked against
and why it is needed:

    PerReplicaState   overrides RNN._create_state_variables (under tracking's
                      no_automatic_dependency_tracking): the carried state per replica
    WindowKernel      overrides RNN/LSTM/GRU.inner_loop: a window through keraslm.recurrence on a CPU
    ClipAcrossReplicas overrides Optimizer._clip_gradients: torch's global norm over all replicas

`check()` tells whether this Keras still has them as checked. When it does not, training takes
`--kernels keras` instead (`choose_kernels`): plain `keras.layers.LSTM/GRU/SimpleRNN(stateful=True)`
and Keras' own optimizers, which train the same model more slowly on one replica, so a Keras
upgrade never blocks a new run (nor export or sampling, whose stateless twin uses no private API;
only resuming a run written by keraslm's kernels needs them). Nothing else in keraslm imports
`keras.src` or overrides a Keras method whose name starts with an underscore: keraslm.loop, the
loop that replaces Keras 3.15's fit under MultiWorkerMirroredStrategy, uses public APIs only.
"""

import dataclasses
import importlib
import inspect

import keras
import tensorflow as tf

from keraslm import cells
from keraslm.errors import ArgumentError, UsageError
from keraslm.recurrence import gru_sequence, lstm_sequence, rnn_sequence

try:
    from keras.src.utils.tracking import no_automatic_dependency_tracking
except ImportError:  # a Keras without it: check() says so, and training takes --kernels keras

    def no_automatic_dependency_tracking(method):
        """Stand-in for the missing decorator: check() reports it missing, so training takes
        --kernels keras and never builds the layers that use it."""
        return method


CHECKED_KERAS = "3.15.1"  # the Keras version every entry of PRIVATE_APIS was checked against
KERNELS = ("keraslm", "keras")


@dataclasses.dataclass(frozen=True)
class PrivateAPI:
    """One private Keras API keraslm uses.

    Args:
        target: "module:Class.attribute" (or "module:function") that keraslm imports or overrides.
        parameters: the parameter names it must take, as checked; None to check only presence.
        caller: "module:Class.method" in Keras that must call the target: if Keras stops calling
            it, keraslm's override would be skipped without an error, and this catches that.
        used_by: what in keraslm relies on it.
        reason: why keraslm needs it, with the upstream issue where there is one.
    """

    target: str
    parameters: tuple | None
    caller: str | None
    used_by: str
    reason: str

    def problem(self):
        """What is wrong with this API in the installed Keras, in a few words; None if nothing."""
        found = _resolve(self.target)
        if found is None:
            return "is gone"
        if self.parameters is not None:
            actual = tuple(inspect.signature(found).parameters)
            if actual != self.parameters:
                return f"takes ({', '.join(actual)}) instead of ({', '.join(self.parameters)})"
        if self.caller is not None:
            caller = _resolve(self.caller)
            if caller is None:
                return f"is no longer called ({self.caller.replace(':', '.')} is gone)"
            name = self.target.replace(":", ".").rsplit(".", 1)[-1]
            if name not in inspect.getsource(caller):
                return f"is no longer called by {self.caller.replace(':', '.')}"
        return None


# Checked against Keras 3.15.1 (CHECKED_KERAS), TensorFlow 2.21.
PRIVATE_APIS = (
    PrivateAPI(
        target="keras.layers:RNN._create_state_variables",
        parameters=("self", "batch_size"),
        caller="keras.layers:RNN.build",
        used_by="PerReplicaState (StatefulLSTM, StatefulGRU, StatefulSimpleRNN)",
        reason="Keras keeps a stateful layer's state in one variable, mirrored under tf.distribute, "
        "so replicas overwrite each other's state (stateful RNNs and tf.distribute: "
        "tensorflow/tensorflow#39098, tensorflow/tensorflow#28837; keras-team/keras#8397). No public hook creates it.",
    ),
    PrivateAPI(
        target="keras.src.utils.tracking:no_automatic_dependency_tracking",
        parameters=("fn",),
        caller="keras.layers:RNN._create_state_variables",
        used_by="PerReplicaState._create_state_variables",
        reason="Keras wraps its own state creation in it so that the state variables are not the "
        "layer's weights; without it they would join model.weights and the twin's set_weights.",
    ),
    *(
        PrivateAPI(
            target=f"keras.layers:{keras_layer}.inner_loop",
            parameters=("self", "sequences", "initial_state", "mask", "training"),
            caller="keras.layers:RNN.call",
            used_by=f"WindowKernel ({ours})",
            reason="speed, not a bug: on a CPU the window runs through keraslm.recurrence's kernels "
            "(benchmarks/RESULTS.md). No public hook replaces the time loop.",
        )
        for keras_layer, ours in (("RNN", "StatefulSimpleRNN"), ("LSTM", "StatefulLSTM"), ("GRU", "StatefulGRU"))
    ),
    PrivateAPI(
        target="keras.optimizers:Optimizer._clip_gradients",
        parameters=("self", "grads"),
        caller="keras.optimizers:Optimizer._backend_apply_gradients",
        used_by="ClipAcrossReplicas (keraslm>SGD, Adam, AdamW in keraslm.distribute)",
        reason="Keras clips each replica's gradient before they are summed (tensorflow/tensorflow#33929, "
        "tensorflow/tensorflow#25806) and measures an embedding's IndexedSlices gradient by occurrence, "
        "not as torch's dense one.",
    ),
)


def _resolve(path):
    """The object at "module:attribute.attribute", or None if any part of it is missing."""
    module_name, _, attributes = path.partition(":")
    try:
        found = importlib.import_module(module_name)
    except ImportError:
        return None
    for attribute in attributes.split("."):
        found = getattr(found, attribute, None)
        if found is None:
            return None
    return found


def check():
    """The first private Keras API of `PRIVATE_APIS` this Keras lacks or changed, as one line;
    None when all are as checked (the default `--kernels keraslm` can run)."""
    for api in PRIVATE_APIS:
        problem = api.problem()
        if problem:
            target = api.target.replace(":", ".")
            return (
                f"Keras {keras.__version__} changed a private API keraslm relies on: {target} {problem} "
                f"(checked against Keras {CHECKED_KERAS}; see keraslm/keras_compat.py)"
            )
    return None


def choose_kernels(requested, replicas, resume=False):
    """The kernels a training run uses: `requested`, or "keras" when `check()` finds a problem.

    Args:
        requested: --kernels, one of `KERNELS`.
        replicas: the strategy's replicas in sync.
        resume: the run continues from a checkpoint written with `requested`.

    Raises:
        UsageError: "keras" with several replicas. Plain Keras layers keep their state in one
            variable that every replica would overwrite (see PerReplicaState): refused rather
            than trained wrong. Also a resumed run that would need to switch: a checkpoint
            names its layers' weights by their class (stateful_lstm/..., lstm/...), so it loads
            only into the kernels that wrote it.
    """
    problem = check() if requested == "keraslm" else None
    if problem and resume:
        raise UsageError(
            f"{problem}; this run's checkpoint needs it: resume with Keras {CHECKED_KERAS}, or start a new run"
        )
    if problem and replicas > 1:
        raise ArgumentError(
            "{problem}; {count} replicas need it; train on one device ({strategy} default)",
            problem=problem,
            count=replicas,
        )
    if problem:
        print(f"note: {problem}; training with --kernels keras (plain Keras layers: the same model, slower)")
        return "keras"
    if requested == "keras" and replicas > 1:
        raise ArgumentError(
            "{kernels} keras carries each layer's state in one variable, which {count} replicas would "
            "overwrite; use {kernels} keraslm or {strategy} default",
            count=replicas,
        )
    return requested


class PerReplicaState:
    """Mixin for Keras' stateful RNN layers: the carried state lives in sync-on-read variables.

    Keras creates a stateful layer's state as an ordinary (under tf.distribute: mirrored)
    variable, so replicas that each carry their own batch columns overwrite one another's state.
    A sync-on-read variable keeps one copy per replica, read and assigned locally: replica r
    carries the state of its own columns from window to window. Outside a distribution
    strategy it is an ordinary variable.
    """

    @no_automatic_dependency_tracking  # as Keras does: the state is not a weight
    def _create_state_variables(self, batch_size):
        with keras.name_scope(self.name, caller=self):
            self.states = [
                keras.Variable(
                    value,
                    trainable=False,
                    dtype=self.variable_dtype,
                    name="rnn_state",
                    synchronization="on_read",
                    aggregation="only_first_replica",  # what a cross-replica read (a shape) sees
                )
                for value in keras.tree.flatten(self.get_initial_state(batch_size))
            ]


class WindowKernel:
    """Mixin for Keras' recurrent layers: on a CPU, run the window through keraslm.recurrence.

    The kernels there compute Keras' own cells with a hand-written backward pass that takes the
    weight gradients out of the time loop (faster on a CPU: benchmarks/RESULTS.md), so weights,
    checkpoints and exports are unchanged. Anything they do not cover (a mask, dropout inside the
    cell, other activations) and any GPU (where cuDNN serves LSTM and GRU) keeps Keras' path.
    """

    def inner_loop(self, sequences, initial_state, mask, training=False):
        if self._window_kernel_applies(mask):
            return self._window_kernel(sequences, initial_state)
        return super().inner_loop(sequences, initial_state, mask, training=training)

    def _window_kernel_applies(self, mask):
        cell = self.cell
        plain = mask is None and not (self.go_backwards or self.unroll or cell.dropout or cell.recurrent_dropout)
        return (
            plain
            and cell.use_bias
            and self._cell_is_covered()
            and keras.backend.backend() == "tensorflow"
            and not tf.config.list_logical_devices("GPU")
        )

    def _cell_is_covered(self):
        """The cell is one keraslm.cells lays out (so the kernels compute it): same Keras layer,
        activations and reset_after; Keras' other options (hard_sigmoid gates, reset_after=False …) are not."""
        cell = self.cell
        recurrent = getattr(cell, "recurrent_activation", None)
        layout = (
            keras.activations.serialize(cell.activation),
            recurrent and keras.activations.serialize(recurrent),
            getattr(cell, "reset_after", False),
        )
        return any(
            isinstance(self, getattr(keras.layers, spec.keras_layer))
            and layout == (spec.activation, spec.recurrent_activation, spec.reset_after)
            for spec in cells.CELLS.values()
        )


@keras.saving.register_keras_serializable(package="keraslm")
class StatefulLSTM(PerReplicaState, WindowKernel, keras.layers.LSTM):
    """keras.layers.LSTM carrying per-replica state (see PerReplicaState), WindowKernel on a CPU."""

    def _window_kernel(self, sequences, initial_state):
        cell = self.cell
        outputs, h, c = lstm_sequence(sequences, *initial_state, cell.kernel, cell.recurrent_kernel, cell.bias)
        return outputs[:, -1], outputs, [h, c]


@keras.saving.register_keras_serializable(package="keraslm")
class StatefulGRU(PerReplicaState, WindowKernel, keras.layers.GRU):
    """keras.layers.GRU carrying per-replica state (see PerReplicaState), WindowKernel on a CPU."""

    def _window_kernel(self, sequences, initial_state):
        cell = self.cell
        outputs, h = gru_sequence(sequences, initial_state[0], cell.kernel, cell.recurrent_kernel, cell.bias)
        return outputs[:, -1], outputs, [h]


@keras.saving.register_keras_serializable(package="keraslm")
class StatefulSimpleRNN(PerReplicaState, WindowKernel, keras.layers.SimpleRNN):
    """keras.layers.SimpleRNN carrying per-replica state (see PerReplicaState), WindowKernel on a CPU."""

    def _window_kernel(self, sequences, initial_state):
        cell = self.cell
        activation = keras.activations.serialize(cell.activation)  # "tanh" or "relu": _cell_is_covered
        outputs, h = rnn_sequence(
            sequences, initial_state[0], cell.kernel, cell.recurrent_kernel, cell.bias, activation
        )
        return outputs[:, -1], outputs, [h]


class ClipAcrossReplicas:
    """Optimizer mixin: `global_clipnorm` exactly as `torch.nn.utils.clip_grad_norm_` on one device.

    Two differences from Keras' own global_clipnorm:
    - Keras measures an embedding's IndexedSlices gradient row by occurrence; torch's (dense)
      embedding gradient adds up the rows of a repeated token first. The norm here is torch's.
    - Keras clips each replica's gradient before summing them. Here every replica scales its
      gradient by min(1, clipnorm / ‖Σ_r g_r‖), so the sum is clipped as on a single device.
    """

    def _clip_gradients(self, grads):
        if not self.global_clipnorm:
            return super()._clip_gradients(grads)
        context = tf.distribute.get_replica_context()
        total = grads
        if context is not None and context.num_replicas_in_sync > 1:
            total = context.all_reduce(tf.distribute.ReduceOp.SUM, grads)
        norm = tf.sqrt(tf.add_n([_squared_norm(g) for g in total if g is not None]))
        scale = self.global_clipnorm / tf.maximum(norm, self.global_clipnorm)
        return [g if g is None else g * tf.cast(scale, g.dtype) for g in grads]


def _squared_norm(gradient):
    if isinstance(gradient, tf.IndexedSlices):
        # Sum the rows of each token before squaring: the dense gradient's norm. A segment sum
        # into the full vocabulary keeps the shape static, which XLA needs (tf.unique is not).
        rows = tf.math.unsorted_segment_sum(gradient.values, gradient.indices, gradient.dense_shape[0])
        return tf.reduce_sum(tf.square(tf.cast(rows, tf.float32)))
    return tf.reduce_sum(tf.square(tf.cast(gradient, tf.float32)))
