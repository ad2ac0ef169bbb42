"""The language model: its layers, made once (`ModelLayers`), and the three models wired from them.

    tokens [B, T] ─► embedding (or one-hot) ─► dropout ─► L × recurrent layer (dropout between)
                 ─► dropout ─► logits [B, T, V]   (a Dense layer, or the embedding transposed)

`build_training_model`: stateful layers with a fixed batch size; each layer keeps its last state in
variables and starts the next window from it. `build_step_model`, the stateless twin: the same
layers and weights, with the state as explicit inputs `h{i}_in` (LSTM also `c{i}_in`) and outputs
`h{i}_out` / `c{i}_out`, which is what TF Serving and ONNX Runtime need. `build_primer_model`: the
twin's own layers with a mask input and only the states out, to prime prompts of different lengths.
"""

import keras
import numpy as np
from keras import ops
from keras.src import backend, tree  # private: the two helpers Keras' own state creation uses
from keras.src.utils import tracking

from keraslm.config import ModelConfig
from keraslm.states import in_name, input_name, layer_state_names, output_name, state_names

# The names of the layers that hold weights: checkpoints, model.keras and the ONNX export find
# the weights by them, so they never change.
ONE_HOT_LAYER = "one_hot"
EMBEDDING_LAYER = "embedding"
PROJECTION_LAYER = "logits"


def recurrent_layer_name(index):
    """The name of recurrent layer `index` (0 at the bottom): "rnn_0", "rnn_1", …"""
    return f"rnn_{index}"


@keras.saving.register_keras_serializable(package="keraslm")
class OneHot(keras.layers.Layer):
    """Token ids [B, T] to one-hot vectors [B, T, vocabulary_size], as char-rnn feeds its LSTM.

    Args:
        vocabulary_size: length of the one-hot vectors.
    """

    def __init__(self, vocabulary_size, **kwargs):
        super().__init__(**kwargs)
        self.vocabulary_size = vocabulary_size

    def call(self, tokens):
        return ops.one_hot(tokens, self.vocabulary_size, dtype=self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return (*input_shape, self.vocabulary_size)

    def get_config(self):
        return {**super().get_config(), "vocabulary_size": self.vocabulary_size}


@keras.saving.register_keras_serializable(package="keraslm")
class TiedEmbedding(keras.layers.Layer):
    """An embedding that also projects hidden states back to vocabulary logits.

    `layer(tokens)` embeds; `layer(hidden, reverse=True)` returns `hidden @ embeddings.T + bias`
    in float32. One matrix serves both (Press & Wolf 2017; pytorch/examples' `--tied`), and the
    output keeps its own bias as torch's tied `nn.Linear` does.

    Args:
        input_dim: vocabulary size.
        output_dim: embedding width, equal to the last recurrent layer's width.
    """

    def __init__(self, input_dim, output_dim, embeddings_initializer="uniform", **kwargs):
        super().__init__(**kwargs)
        self.input_dim = input_dim
        self.output_dim = output_dim
        self.embeddings_initializer = keras.initializers.get(embeddings_initializer)

    def build(self, input_shape=None):
        # "uniform" is keras.layers.Embedding's default, U(-0.05, 0.05).
        self.embeddings = self.add_weight(
            shape=(self.input_dim, self.output_dim), initializer=self.embeddings_initializer, name="embeddings"
        )
        self.bias = self.add_weight(shape=(self.input_dim,), initializer="zeros", name="bias")

    def call(self, inputs, reverse=False):
        if not reverse:
            return ops.take(self.embeddings, ops.cast(inputs, "int32"), axis=0)
        logits = ops.matmul(inputs, ops.transpose(self.embeddings))
        return ops.cast(logits, "float32") + ops.cast(self.bias, "float32")

    def compute_output_spec(self, inputs, reverse=False):
        if reverse:
            return keras.KerasTensor((*inputs.shape[:-1], self.input_dim), dtype="float32")
        return keras.KerasTensor((*inputs.shape, self.output_dim), dtype=self.compute_dtype)

    def get_config(self):
        return {
            **super().get_config(),
            "input_dim": self.input_dim,
            "output_dim": self.output_dim,
            "embeddings_initializer": keras.initializers.serialize(self.embeddings_initializer),
        }


@keras.saving.register_keras_serializable(package="keraslm")
class Projection(keras.layers.Dense):
    """The output layer: hidden states [B, T, H] to float32 logits [B, T, V].

    A Dense layer. Under the mixed_bfloat16 policy its products run in bfloat16 with float32
    accumulation and float32 logits (keraslm.projection); under any other policy it is built
    with dtype float32, so the logits and the loss are float32 whatever the policy.
    """

    def call(self, inputs, training=None):
        if self.compute_dtype == "bfloat16" and backend.backend() == "tensorflow":
            from keraslm.projection import bfloat16_projection

            return bfloat16_projection(inputs, self.kernel, self.bias)
        return ops.cast(super().call(inputs), "float32")

    def compute_output_spec(self, inputs):
        return keras.KerasTensor((*inputs.shape[:-1], self.units), dtype="float32")


class PerReplicaState:
    """Mixin for Keras' stateful RNN layers: the carried state lives in sync-on-read variables.

    Keras creates a stateful layer's state as an ordinary (under tf.distribute: mirrored)
    variable, so replicas that each carry their own batch columns overwrite one another's state.
    A sync-on-read variable keeps one copy per replica, read and assigned locally: replica r
    carries the state of its own columns from window to window. Outside a distribution
    strategy it is an ordinary variable.
    """

    @tracking.no_automatic_dependency_tracking  # as Keras does: the state is not a weight
    def _create_state_variables(self, batch_size):
        with backend.name_scope(self.name, caller=self):
            self.states = [
                backend.Variable(
                    value,
                    trainable=False,
                    dtype=self.variable_dtype,
                    name="rnn_state",
                    synchronization="on_read",
                    aggregation="only_first_replica",  # what a cross-replica read (a shape) sees
                )
                for value in tree.flatten(self.get_initial_state(batch_size))
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
        import tensorflow as tf

        cell = self.cell
        plain = mask is None and not (self.go_backwards or self.unroll or cell.dropout or cell.recurrent_dropout)
        return (
            plain
            and cell.use_bias
            and self._cell_is_covered()
            and backend.backend() == "tensorflow"
            and not tf.config.list_logical_devices("GPU")
        )


@keras.saving.register_keras_serializable(package="keraslm")
class StatefulLSTM(PerReplicaState, WindowKernel, keras.layers.LSTM):
    """keras.layers.LSTM carrying per-replica state (see PerReplicaState), WindowKernel on a CPU."""

    def _cell_is_covered(self):
        cell = self.cell
        return cell.activation is keras.activations.tanh and cell.recurrent_activation is keras.activations.sigmoid

    def _window_kernel(self, sequences, initial_state):
        from keraslm.recurrence import lstm_sequence

        cell = self.cell
        outputs, h, c = lstm_sequence(sequences, *initial_state, cell.kernel, cell.recurrent_kernel, cell.bias)
        return outputs[:, -1], outputs, [h, c]


@keras.saving.register_keras_serializable(package="keraslm")
class StatefulGRU(PerReplicaState, WindowKernel, keras.layers.GRU):
    """keras.layers.GRU carrying per-replica state (see PerReplicaState), WindowKernel on a CPU."""

    def _cell_is_covered(self):
        cell = self.cell
        return (
            cell.reset_after
            and cell.activation is keras.activations.tanh
            and cell.recurrent_activation is keras.activations.sigmoid
        )

    def _window_kernel(self, sequences, initial_state):
        from keraslm.recurrence import gru_sequence

        cell = self.cell
        outputs, h = gru_sequence(sequences, initial_state[0], cell.kernel, cell.recurrent_kernel, cell.bias)
        return outputs[:, -1], outputs, [h]


@keras.saving.register_keras_serializable(package="keraslm")
class StatefulSimpleRNN(PerReplicaState, WindowKernel, keras.layers.SimpleRNN):
    """keras.layers.SimpleRNN carrying per-replica state (see PerReplicaState), WindowKernel on a CPU."""

    def _cell_is_covered(self):
        return self.cell.activation in (keras.activations.tanh, keras.activations.relu)

    def _window_kernel(self, sequences, initial_state):
        from keraslm.recurrence import rnn_sequence

        cell = self.cell
        activation = "tanh" if cell.activation is keras.activations.tanh else "relu"
        outputs, h = rnn_sequence(
            sequences, initial_state[0], cell.kernel, cell.recurrent_kernel, cell.bias, activation
        )
        return outputs[:, -1], outputs, [h]


def _initializers(model_config):
    """Initialisers per layer kind. "keras": Keras' defaults (uniform ±0.05 embedding, Glorot and
    orthogonal kernels, forget-gate bias 1). "torch": pytorch/examples' word_language_model, i.e.
    embedding and decoder U(-0.1, 0.1), decoder bias 0, and torch's RNN default U(-1/√H, 1/√H) for
    every recurrent weight and bias."""
    if model_config.init == "keras":
        return {"embedding": {}, "rnn": {}, "dense": {}}
    bound = model_config.hidden_dim**-0.5
    rnn = {
        key: keras.initializers.RandomUniform(-bound, bound)
        for key in ("kernel_initializer", "recurrent_initializer", "bias_initializer")
    }
    if model_config.cell == "lstm":
        rnn["unit_forget_bias"] = False
    return {
        "embedding": {"embeddings_initializer": keras.initializers.RandomUniform(-0.1, 0.1)},
        "rnn": rnn,
        "dense": {"kernel_initializer": keras.initializers.RandomUniform(-0.1, 0.1)},
    }


def _embedding_layer(model_config):
    """The input layer: "one_hot", or "embedding" (a TiedEmbedding when it also projects)."""
    c = model_config
    if c.one_hot:
        return OneHot(c.vocabulary_size, name=ONE_HOT_LAYER)
    embedding = TiedEmbedding if c.tie_weights else keras.layers.Embedding
    return embedding(c.vocabulary_size, c.embedding_dim, name=EMBEDDING_LAYER, **_initializers(c)["embedding"])


def _recurrent_layer(model_config, index, stateful, use_cudnn):
    """Recurrent layer "rnn_{index}": stateful ones keep their state in variables between calls."""
    common = dict(
        units=model_config.hidden_dim,
        return_sequences=True,
        return_state=not stateful,
        stateful=stateful,
        name=recurrent_layer_name(index),
    )
    common.update(_initializers(model_config)["rnn"])
    cell = model_config.cell
    if cell == "lstm":
        return (StatefulLSTM if stateful else keras.layers.LSTM)(use_cudnn=use_cudnn, **common)
    if cell == "gru":
        return (StatefulGRU if stateful else keras.layers.GRU)(use_cudnn=use_cudnn, **common)
    # SimpleRNN has no cuDNN kernel in Keras; tanh and relu are PyTorch's RNN_TANH / RNN_RELU.
    activation = "tanh" if cell == "rnn_tanh" else "relu"
    return (StatefulSimpleRNN if stateful else keras.layers.SimpleRNN)(activation=activation, **common)


def _projection_layer(model_config):
    """The output layer "logits", or None when the tied embedding projects."""
    c = model_config
    if c.tie_weights:
        return None
    # float32 logits (and so a float32 loss) under any policy; bfloat16 products under
    # mixed_bfloat16 (see Projection).
    bfloat16 = keras.mixed_precision.global_policy().name == "mixed_bfloat16"
    return Projection(
        c.vocabulary_size, dtype=None if bfloat16 else "float32", name=PROJECTION_LAYER, **_initializers(c)["dense"]
    )


class ModelLayers:
    """The layers that hold a model's weights, made once, and how they are wired (the picture above).

    The training, step and primer models wire layers named alike, so their weights line up. The
    dropouts hold no weights: each model makes its own.

    Args:
        model_config: the architecture.
        embedding: the input layer, "one_hot" or "embedding".
        recurrent: the recurrent layers "rnn_0", "rnn_1", …, bottom first.
        projection: the output layer "logits", or None when the embedding projects (tied weights).

    Example:
        layers = ModelLayers.of(config, step_model)
        logits = layers.logits(hidden)  # [B, H] -> [B, V]
    """

    def __init__(self, model_config, embedding, recurrent, projection):
        self.model_config = model_config
        self.embedding = embedding
        self.recurrent = recurrent
        self.projection = projection

    @classmethod
    def create(cls, model_config, stateful, use_cudnn="auto"):
        """New layers; `stateful` recurrent layers (training) carry their state in variables.

        `use_cudnn` goes to LSTM and GRU; export uses False so the graph runs on any CPU.
        """
        recurrent = [_recurrent_layer(model_config, i, stateful, use_cudnn) for i in range(model_config.num_layers)]
        return cls(model_config, _embedding_layer(model_config), recurrent, _projection_layer(model_config))

    @classmethod
    def of(cls, model_config, model):
        """The layers of a model built here, to wire into another that shares their weights."""
        c = model_config
        embedding = model.get_layer(ONE_HOT_LAYER if c.one_hot else EMBEDDING_LAYER)
        recurrent = [model.get_layer(recurrent_layer_name(i)) for i in range(c.num_layers)]
        return cls(c, embedding, recurrent, None if c.tie_weights else model.get_layer(PROJECTION_LAYER))

    def embed(self, tokens):
        """Token ids [B, T] to the bottom recurrent layer's input [B, T, E] (one-hot: E = V), dropout included."""
        return keras.layers.Dropout(self.model_config.dropout, name="embedding_dropout")(self.embedding(tokens))

    def dropout_after(self, index, x):
        """Recurrent layer `index`'s output with the dropout before the next layer (none after the top)."""
        if index == self.model_config.num_layers - 1:
            return x
        return keras.layers.Dropout(self.model_config.dropout, name=f"{recurrent_layer_name(index)}_dropout")(x)

    def head(self, x):
        """The top recurrent layer's output [B, T, H] to logits [B, T, V], dropout included."""
        return self.logits(keras.layers.Dropout(self.model_config.dropout, name="output_dropout")(x))

    def logits(self, hidden):
        """Float32 logits [..., V] from hidden states [..., H], by the projection or the tied embedding."""
        if self.projection is None:
            return self.embedding(hidden, reverse=True)
        return self.projection(hidden)


def _tokens_input(batch_size):
    return keras.Input(batch_shape=(batch_size, None), dtype="int32", name="tokens")


def _state_inputs(model_config):
    """The step model's state inputs {"h0_in": [B, H], …}, bottom layer first."""
    return {
        input_name(name): keras.Input(
            batch_shape=(None, model_config.hidden_dim), dtype="float32", name=input_name(name)
        )
        for name in state_names(model_config)
    }


def _carry_states(layers, inputs, mask=None):
    """Wire stateless layers: each starts from its `{name}_in` inputs and returns `{name}_out`.

    Returns the top layer's output [B, T, H] and the dict of state outputs.
    """
    c = layers.model_config
    x = layers.embed(inputs["tokens"])
    state_outputs = {}
    for i, rnn in enumerate(layers.recurrent):
        names = layer_state_names(c.cell, i)
        x, *states = rnn(x, initial_state=[inputs[input_name(name)] for name in names], mask=mask)
        for name, state in zip(names, states, strict=True):
            # float32 states under a mixed-precision policy, as the export contract says.
            state_outputs[output_name(name)] = keras.layers.Identity(name=output_name(name), dtype="float32")(state)
        x = layers.dropout_after(i, x)
    return x, state_outputs


def build_training_model(model_config: ModelConfig, batch_size, use_cudnn="auto"):
    """The training model: tokens [batch_size, T] to logits [batch_size, T, V].

    Its recurrent layers are stateful: each keeps its last state in variables and starts the next
    call from it (`reset_states` zeroes them). It holds the step model's weights in the same
    order, so `step_model.set_weights(model.get_weights())` moves a trained model over.

    Args:
        model_config: the architecture.
        batch_size: the static batch size the carried state is made for.
        use_cudnn: passed to LSTM and GRU.

    Example:
        config = ModelConfig(vocabulary_size=65, cell="gru", hidden_dim=128, embedding_dim=128)
        model = build_training_model(config, batch_size=32)
        step_model = build_step_model(config)
        step_model.set_weights(model.get_weights())
    """
    if not batch_size:
        raise ValueError("a stateful model needs a static batch_size")
    layers = ModelLayers.create(model_config, stateful=True, use_cudnn=use_cudnn)
    tokens = _tokens_input(batch_size)
    x = layers.embed(tokens)
    for i, rnn in enumerate(layers.recurrent):
        x = layers.dropout_after(i, rnn(x))
    return keras.Model(tokens, layers.head(x), name="keraslm")


def build_step_model(model_config: ModelConfig, use_cudnn="auto"):
    """The stateless twin: {"tokens", "h0_in", …} to {"logits", "h0_out", …}, any batch size.

    The state goes in and out explicitly (LSTM layers also have `c{i}_in` / `c{i}_out`), as TF
    Serving and ONNX Runtime need; it is saved as model.keras and exported.

    Args:
        model_config: the architecture.
        use_cudnn: passed to LSTM and GRU; export uses False so the graph runs on any CPU.
    """
    layers = ModelLayers.create(model_config, stateful=False, use_cudnn=use_cudnn)
    inputs = {"tokens": _tokens_input(None), **_state_inputs(model_config)}
    x, state_outputs = _carry_states(layers, inputs)
    return keras.Model(inputs, {"logits": layers.head(x), **state_outputs}, name="keraslm_step")


def build_primer_model(model_config: ModelConfig, step_model):
    """The prompt primer over the step model's layers (one copy of the weights).

    Inputs are the step model's and a boolean "mask" [B, T]: masked steps leave the state as it
    was, so left-padded prompts of different lengths prime in one pass. Outputs are the states
    {"h0_out", …} only, without [B, T, V] logits.

    Args:
        model_config: the architecture.
        step_model: a model from `build_step_model`.
    """
    layers = ModelLayers.of(model_config, step_model)
    mask = keras.Input(batch_shape=(None, None), dtype="bool", name="mask")
    inputs = {"tokens": _tokens_input(None), **_state_inputs(model_config), "mask": mask}
    _, state_outputs = _carry_states(layers, inputs, mask=mask)
    return keras.Model(inputs, state_outputs, name="keraslm_primer")


def recurrent_layers(model):
    """The recurrent layers of a model built here, bottom first."""
    return [layer for layer in model.layers if isinstance(layer, keras.layers.RNN)]


def reset_states(model):
    """Zero the carried state of every stateful recurrent layer (Keras 3 resets per layer)."""
    for layer in recurrent_layers(model):
        layer.reset_state()


def zero_state(model_config, batch_size):
    """NumPy zeros for every `{name}_in` input of the stateless twin."""
    zeros = np.zeros((batch_size, model_config.hidden_dim), np.float32)
    return {input_name(name): zeros.copy() for name in state_names(model_config)}


def keras_step(twin, model_config, batch_size):
    """The twin as a `step(tokens, state) -> (logits, state)` on NumPy arrays, and a zero state.

    The state is the dict of `{name}_in` arrays; each call's `{name}_out` become the next inputs.
    """

    import tensorflow as tf

    # One traced graph per input shape instead of an eager call per token: ~10× faster per step.
    call = tf.function(lambda inputs: twin(inputs, training=False), reduce_retracing=True)

    def step(tokens, state):
        outputs = call({"tokens": tokens, **state})
        logits = np.asarray(outputs.pop("logits"))
        return logits, {in_name(name): np.asarray(value) for name, value in outputs.items()}

    return step, zero_state(model_config, batch_size)
