"""tf.distribute for TBPTT training: strategies, and gradient clipping that sees all replicas.

With R replicas the batch's `batch_size` columns are split R ways: replica r always gets columns
r·B/R … (r+1)·B/R - 1 of every window (tf.distribute splits each global batch in order), and its
recurrent layers carry those columns' state in per-replica variables (see keras_compat.PerReplicaState).
"""

import json
import os

import keras
import tensorflow as tf

from keraslm.config import STRATEGIES
from keraslm.errors import ArgumentError, UsageError
from keraslm.keras_compat import ClipAcrossReplicas


def make_strategy(name, device=None):
    """The tf.distribute strategy for --strategy (a name, or a Strategy passed through): one
    device, every local device mirrored, or every device of every worker that TF_CONFIG lists
    (MultiWorkerMirroredStrategy).

    "default" on a machine with a GPU (or given `device`) is OneDeviceStrategy on it: Keras then
    feeds fit a distributed dataset, which copies the next windows to the device while the
    current one trains. MirroredStrategy's datasets prefetch to each replica's device alike.
    """
    if isinstance(name, tf.distribute.Strategy):
        return name
    if name == "default":
        gpus = tf.config.list_logical_devices("GPU")
        device = device or (gpus[0].name if gpus else None)
        return tf.distribute.OneDeviceStrategy(device) if device else tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi-worker":
        check_tf_config()
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ArgumentError.unknown("strategy", name, STRATEGIES)


def check_tf_config():
    """TF_CONFIG must name the workers and this process's place among them (one line if not)."""
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        raise ArgumentError(
            "{strategy} multi-worker needs TF_CONFIG, e.g. {example}",
            example='{"cluster": {"worker": ["host1:port", "host2:port"]}, "task": {"type": "worker", "index": 0}}',
        )
    try:
        config = json.loads(raw)
        workers, task = config["cluster"]["worker"], config["task"]
        if task["type"] != "worker" or not 0 <= int(task["index"]) < len(workers):
            raise ValueError("task must be a worker listed in the cluster")
    except (ValueError, KeyError, TypeError) as e:
        raise UsageError(
            f"TF_CONFIG is not a worker cluster description ({e!s}); see docs/distributed-and-gpu.md"
        ) from None


def is_multi_worker(strategy):
    """True for MultiWorkerMirroredStrategy, which needs keraslm.loop instead of Model.fit."""
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def is_chief(strategy):
    """Whether this process writes the run directory: always, except on workers other than 0."""
    if not is_multi_worker(strategy):
        return True
    return strategy.cluster_resolver.task_id == 0


def per_replica_batch_size(strategy, batch_size):
    """Columns each replica carries; the global batch must split evenly."""
    replicas = strategy.num_replicas_in_sync
    if batch_size % replicas:
        raise ArgumentError(
            "{batch_size} {got} does not split over {replicas} replicas; use a multiple",
            got=batch_size,
            replicas=replicas,
        )
    return batch_size // replicas


@keras.saving.register_keras_serializable(package="keraslm")
class SGD(ClipAcrossReplicas, keras.optimizers.SGD):
    """keras.optimizers.SGD with ClipAcrossReplicas."""


@keras.saving.register_keras_serializable(package="keraslm")
class Adam(ClipAcrossReplicas, keras.optimizers.Adam):
    """keras.optimizers.Adam with ClipAcrossReplicas."""


@keras.saving.register_keras_serializable(package="keraslm")
class AdamW(ClipAcrossReplicas, keras.optimizers.AdamW):
    """keras.optimizers.AdamW with ClipAcrossReplicas."""
