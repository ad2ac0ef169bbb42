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
import tensorflow as tf
from keras import ops

from keraslm import cells
from keraslm.config import ModelConfig
from keraslm.keras_compat import StatefulGRU, StatefulLSTM, StatefulSimpleRNN
from keraslm.projection import bfloat16_projection
from keraslm.states import in_name, input_name, layer_state_names, output_name, state_names

# The names of the layers that hold weights: checkpoints, model.keras and the ONNX export find
# the weights by them, so they never change.
ONE_HOT_LAYER = "one_hot"
EMBEDDING_LAYER = "embedding"
PROJECTION_LAYER = "logits"


# keraslm's stateful layers for each Keras recurrent layer (--kernels keraslm).
_KERASLM_LAYERS = {"LSTM": StatefulLSTM, "GRU": StatefulGRU, "SimpleRNN": StatefulSimpleRNN}


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
        if self.compute_dtype == "bfloat16" and keras.backend.backend() == "tensorflow":
            return bfloat16_projection(inputs, self.kernel, self.bias)
        return ops.cast(super().call(inputs), "float32")

    def compute_output_spec(self, inputs):
        return keras.KerasTensor((*inputs.shape[:-1], self.units), dtype="float32")


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


def _recurrent_layer(model_config, index, stateful, use_cudnn, kernels="keraslm"):
    """Recurrent layer "rnn_{index}": stateful ones keep their state in variables between calls.

    `kernels`: stateful only: "keraslm" takes keraslm.keras_compat's layers (per-replica state,
    window kernels on a CPU); "keras" Keras' own (no private Keras API: slower, one replica).
    """
    cell = cells.CELLS[model_config.cell]
    ours = stateful and kernels == "keraslm"
    layer_class = _KERASLM_LAYERS[cell.keras_layer] if ours else getattr(keras.layers, cell.keras_layer)
    common = dict(
        units=model_config.hidden_dim,
        return_sequences=True,
        return_state=not stateful,
        stateful=stateful,
        name=recurrent_layer_name(index),
    )
    common.update(_initializers(model_config)["rnn"])
    if cell.recurrent_activation:
        common["recurrent_activation"] = cell.recurrent_activation
    if cell.reset_after:
        common["reset_after"] = True
    if cell.keras_layer != "SimpleRNN":  # SimpleRNN has no cuDNN kernel in Keras
        common["use_cudnn"] = use_cudnn
    return layer_class(activation=cell.activation, **common)


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
    def create(cls, model_config, stateful, use_cudnn="auto", kernels="keraslm"):
        """New layers; `stateful` recurrent layers (training) carry their state in variables.

        `use_cudnn` goes to LSTM and GRU; export uses False so the graph runs on any CPU.
        `kernels` picks the stateful layers' implementation (see `_recurrent_layer`).
        """
        recurrent = [
            _recurrent_layer(model_config, i, stateful, use_cudnn, kernels) for i in range(model_config.num_layers)
        ]
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


def build_training_model(model_config: ModelConfig, batch_size, use_cudnn="auto", kernels="keraslm"):
    """The training model: tokens [batch_size, T] to logits [batch_size, T, V].

    Its recurrent layers are stateful: each keeps its last state in variables and starts the next
    call from it (`reset_states` zeroes them). It holds the step model's weights in the same
    order, so `step_model.set_weights(model.get_weights())` moves a trained model over.

    Args:
        model_config: the architecture.
        batch_size: the static batch size the carried state is made for.
        use_cudnn: passed to LSTM and GRU.
        kernels: "keraslm" (per-replica state, window kernels on a CPU: keraslm.keras_compat) or
            "keras" (Keras' own stateful layers: slower, one replica). Both hold the same weights
            (get_weights / set_weights move them), but a .keras file keys a layer's weights by its
            class, so a checkpoint loads only into a model of its own kernels.

    Example:
        config = ModelConfig(vocabulary_size=65, cell="gru", hidden_dim=128, embedding_dim=128)
        model = build_training_model(config, batch_size=32)
        step_model = build_step_model(config)
        step_model.set_weights(model.get_weights())
    """
    if not batch_size:
        raise ValueError("a stateful model needs a static batch_size")
    layers = ModelLayers.create(model_config, stateful=True, use_cudnn=use_cudnn, kernels=kernels)
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

    # One traced graph per input shape instead of an eager call per token: far less Python per step.
    call = tf.function(lambda inputs: twin(inputs, training=False), reduce_retracing=True)

    def step(tokens, state):
        outputs = call({"tokens": tokens, **state})
        logits = np.asarray(outputs.pop("logits"))
        return logits, {in_name(name): np.asarray(value) for name, value in outputs.items()}

    return step, zero_state(model_config, batch_size)
