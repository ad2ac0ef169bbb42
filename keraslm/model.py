"""The language model and its stateless twin.

    tokens [B, T] ─► embedding (or one-hot) ─► dropout ─► L × recurrent layer (dropout between)
                 ─► dropout ─► logits [B, T, V]   (a Dense layer, or the embedding transposed)

Training uses `stateful=True` layers with a fixed batch size: each layer keeps its last state in
variables and starts the next window from it. Inference uses the stateless twin: the same layers
and weights, with the state as explicit inputs `h{i}_in` (LSTM also `c{i}_in`) and outputs
`h{i}_out` / `c{i}_out`, which is what TF Serving and ONNX Runtime need.
"""

import keras
import numpy as np
from keras import ops

from keraslm.config import ModelConfig
from keraslm.keras_compat import StatefulGRU, StatefulLSTM, StatefulSimpleRNN
from keraslm.states import in_name, input_name, layer_state_names, output_name, state_names


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
            from keraslm.projection import bfloat16_projection

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


def _recurrent_layer(model_config, name, stateful, use_cudnn, kernels="keraslm"):
    # --kernels keras: Keras' own stateful layers, no private Keras API (keraslm.keras_compat).
    lstm, gru, simple_rnn = (
        (StatefulLSTM, StatefulGRU, StatefulSimpleRNN)
        if stateful and kernels == "keraslm"
        else (keras.layers.LSTM, keras.layers.GRU, keras.layers.SimpleRNN)
    )
    common = dict(
        units=model_config.hidden_dim,
        return_sequences=True,
        return_state=not stateful,
        stateful=stateful,
        name=name,
    )
    common.update(_initializers(model_config)["rnn"])
    cell = model_config.cell
    if cell == "lstm":
        return lstm(use_cudnn=use_cudnn, **common)
    if cell == "gru":
        return gru(use_cudnn=use_cudnn, **common)
    # SimpleRNN has no cuDNN kernel in Keras; tanh and relu are PyTorch's RNN_TANH / RNN_RELU.
    activation = "tanh" if cell == "rnn_tanh" else "relu"
    return simple_rnn(activation=activation, **common)


def build_model(
    model_config: ModelConfig,
    batch_size=None,
    stateful=False,
    use_cudnn="auto",
    with_mask=False,
    layers_of=None,
    kernels="keraslm",
):
    """Build the language model.

    Args:
        model_config: the architecture.
        batch_size: static batch size; required when `stateful`.
        stateful: True for training (state kept in layer variables, carried between calls).
            False builds the stateless twin: inputs {"tokens", "h0_in", ...}, outputs
            {"logits", "h0_out", ...}.
        use_cudnn: passed to LSTM and GRU; export uses False so the graph runs on any CPU.
        with_mask: stateless only: add a boolean input "mask" [B, T], where masked steps leave the
            state as it was, and return only the states (no logits): the prompt primer export
            runs over prompts of different lengths, left-padded.
        layers_of: a stateless model built by this function whose layers (and so weights) the new
            model reuses instead of making its own.
        kernels: stateful only: "keraslm" (per-replica state, window kernels on a CPU: see
            keraslm.keras_compat) or "keras" (Keras' own stateful layers: slower, one replica).
            Both hold the same weights (get_weights / set_weights move them), but a .keras
            file keys a layer's weights by its class, so a checkpoint loads only into its own.

    Returns:
        A functional `keras.Model`. The stateful model takes tokens and returns logits. Both
        variants name their layers alike and hold the same weights in the same order, so
        `twin.set_weights(model.get_weights())` moves a trained model over.

    Example:
        config = ModelConfig(vocabulary_size=65, cell="gru", hidden_dim=128, embedding_dim=128)
        train_model = build_model(config, batch_size=32, stateful=True)
        twin = build_model(config)
        twin.set_weights(train_model.get_weights())
    """
    if stateful and not batch_size:
        raise ValueError("a stateful model needs a static batch_size")
    c = model_config
    tokens = keras.Input(batch_shape=(batch_size, None), dtype="int32", name="tokens")
    state_inputs = {
        input_name(name): keras.Input(batch_shape=(batch_size, c.hidden_dim), dtype="float32", name=input_name(name))
        for name in ([] if stateful else state_names(c))
    }
    if with_mask:
        state_inputs["mask"] = keras.Input(batch_shape=(batch_size, None), dtype="bool", name="mask")

    initializers = _initializers(c)

    def layer(name, make):
        return layers_of.get_layer(name) if layers_of is not None else make(name=name)

    if c.one_hot:
        x = layer("one_hot", lambda name: OneHot(c.vocabulary_size, name=name))(tokens)
    elif c.tie_weights:
        embedding = layer(
            "embedding",
            lambda name: TiedEmbedding(c.vocabulary_size, c.embedding_dim, name=name, **initializers["embedding"]),
        )
        x = embedding(tokens)
    else:
        embedding = layer(
            "embedding",
            lambda name: keras.layers.Embedding(
                c.vocabulary_size, c.embedding_dim, name=name, **initializers["embedding"]
            ),
        )
        x = embedding(tokens)
    x = keras.layers.Dropout(c.dropout, name="embedding_dropout")(x)

    state_outputs = {}
    for i in range(c.num_layers):
        rnn = layer(f"rnn_{i}", lambda name: _recurrent_layer(c, name, stateful, use_cudnn, kernels))
        if stateful:
            x = rnn(x)
        else:
            names = layer_state_names(c.cell, i)
            initial_state = [state_inputs[input_name(name)] for name in names]
            x, *states = rnn(x, initial_state=initial_state, mask=state_inputs.get("mask"))
            for name, state in zip(names, states, strict=True):
                # float32 states under a mixed-precision policy, as the export contract says.
                out = output_name(name)
                state_outputs[out] = keras.layers.Identity(name=out, dtype="float32")(state)
        if i < c.num_layers - 1:
            x = keras.layers.Dropout(c.dropout, name=f"rnn_{i}_dropout")(x)
    x = keras.layers.Dropout(c.dropout, name="output_dropout")(x)

    if c.tie_weights:
        logits = embedding(x, reverse=True)
    else:
        # float32 logits (and so a float32 loss) under any policy; bfloat16 products under
        # mixed_bfloat16 (see Projection).
        bfloat16 = keras.mixed_precision.global_policy().name == "mixed_bfloat16"
        dense = layer(
            "logits",
            lambda name: Projection(
                c.vocabulary_size, dtype=None if bfloat16 else "float32", name=name, **initializers["dense"]
            ),
        )
        logits = dense(x)  # (B, T, V)

    if stateful:
        return keras.Model(tokens, logits, name="keraslm")
    inputs = {"tokens": tokens, **state_inputs}
    if with_mask:
        return keras.Model(inputs, state_outputs, name="keraslm_primer")
    return keras.Model(inputs, {"logits": logits, **state_outputs}, name="keraslm_step")


def recurrent_layers(model):
    """The recurrent layers of a model built by `build_model`, bottom first."""
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
