"""model.tflite and model.int8.tflite: the step function for LiteRT, converted by TensorFlow's converter.

The step is a tf.function over the stateless twin's weights, frozen as constants, with the step
signature's names; TFLiteConverter turns it into one `serving_default` signature runner:

    tokens [B, T] ─Gather─► [B, T, E] ─WHILE t < T: L × cell step (keraslm.token_step)─► [B, T, H]
                  ─FullyConnected─► logits [B, T, V]          h{i}_in / c{i}_in ─► h{i}_out / c{i}_out

Batch and time stay dynamic (the runner resizes its inputs to each call's shapes).

Why not the twin's Keras layers: Keras 3 runs a recurrent layer as a loop over a TensorList whose
element shape [B, H] is not static when the batch is dynamic, and the converter refuses that
without TensorFlow ops (the Flex delegate, which ai-edge-litert does not have). The cell equations
here are keraslm.token_step's, the same the `generate` signature runs.

Why no fused recurrent op: LiteRT's UNIDIRECTIONAL_SEQUENCE_LSTM and UNIDIRECTIONAL_SEQUENCE_RNN
keep their state in variable tensors inside the interpreter and return only the output sequence,
so an LSTM's last cell state cannot leave the model, as the step contract needs; the converter
makes them only from functions annotated as Keras 2's LSTM did (Keras 3's layers carry no such
annotation: even a plain Keras 3 LSTM converts to a WHILE loop), and LiteRT has no builtin GRU op.
So no cell fuses; each step is FULLY_CONNECTED ops and the gates' element-wise ops in a WHILE
body (docs/export-and-serving.md). keraslm.export checks the result against model.onnx.
"""

import numpy as np
import tensorflow as tf

from keraslm.errors import UsageError, first_line
from keraslm.model import EMBEDDING_LAYER, PROJECTION_LAYER, ModelLayers
from keraslm.runtime import native_stderr_silenced
from keraslm.serving import STEP_SIGNATURE
from keraslm.states import input_name, output_name, state_names
from keraslm.token_step import TokenStep


class _StepWeights:
    """The twin's weights as NumPy arrays, read once: the converter freezes them as constants."""

    def __init__(self, twin, model_config):
        c = model_config

        def weights(layer):  # float32 whatever the policy the model was trained under
            return [np.asarray(w, np.float32) for w in layer.get_weights()]

        self.recurrent = [weights(layer) for layer in ModelLayers.of(c, twin).recurrent]
        self.table = None if c.one_hot else weights(twin.get_layer(EMBEDDING_LAYER))[0]
        if c.tie_weights:
            self.kernel, self.bias = self.table.T, weights(twin.get_layer(EMBEDDING_LAYER))[1]
        else:
            self.kernel, self.bias = weights(twin.get_layer(PROJECTION_LAYER))


def _step_function(twin, model_config):
    """The step as a tf.function: (tokens [B, T], h0_in, …) → {"logits", "h0_out", …}."""
    c = model_config
    weights = _StepWeights(twin, c)
    token_step = TokenStep(ModelLayers.of(c, twin).recurrent, c)
    names = [input_name(state) for state in state_names(c)]
    signature = [tf.TensorSpec([None, None], tf.int32, name="tokens")]
    signature += [tf.TensorSpec([None, c.hidden_dim], tf.float32, name=name) for name in names]

    def step(tokens, *states):
        # One block per weight matrix: LiteRT runs a FULLY_CONNECTED at a time, so splitting buys nothing.
        layer_weights = [([tf.constant(k)], [tf.constant(r)], tf.constant(b)) for k, r, b in weights.recurrent]
        if c.one_hot:
            x = tf.one_hot(tokens, c.vocabulary_size)
        else:
            x = tf.gather(tf.constant(weights.table), tokens)  # [B, T, E]
        batch, length = tf.shape(tokens)[0], tf.shape(tokens)[1]

        def body(t, carried, hidden):
            h, new_states = token_step(x[:, t], dict(zip(names, carried, strict=True)), layer_weights)
            return t + 1, [new_states[name] for name in names], tf.concat([hidden, h[:, None]], 1)

        # The top layer's outputs grow by concatenation, not in a TensorArray: a TensorList of
        # [B, H] elements with a dynamic B is what the converter cannot lower (above).
        invariants = [tf.TensorShape([]), [tf.TensorShape([None, c.hidden_dim])] * len(names)]
        _, final, hidden = tf.while_loop(
            lambda t, *_: t < length,
            body,
            [tf.constant(0), list(states), tf.zeros([batch, 0, c.hidden_dim])],
            shape_invariants=[*invariants, tf.TensorShape([None, None, c.hidden_dim])],
        )
        logits = tf.matmul(hidden, tf.constant(weights.kernel)) + tf.constant(weights.bias)  # [B, T, V]
        return {"logits": logits} | {output_name(s): v for s, v in zip(state_names(c), final, strict=True)}

    return tf.function(step, input_signature=signature)


def _convert(concrete_function, owner, int8):
    """The LiteRT flatbuffer of `concrete_function`; `int8`: dynamic-range quantisation (int8
    weights, activations quantised per call, no calibration data). `owner`, the object holding
    the function, puts the converter on its signature path (without, the model has no signature)."""
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete_function], owner)
    if int8:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    try:
        return converter.convert()
    except Exception as e:  # the converter raises its own ConverterError
        raise UsageError(f"LiteRT conversion failed ({first_line(e)})") from None


def write_litert(twin, model_config, path, int8_path):
    """Write the step function as LiteRT: float32 weights at `path`, int8 weights at `int8_path`.

    Weight matrices of fewer than 1,024 numbers stay float32 in the int8 model (the converter's
    own rule), so a tiny model's int8 file is its float file.
    """
    owner = tf.Module()
    owner.step = _step_function(twin, model_config)
    concrete = owner.step.get_concrete_function()
    for target, int8 in ((path, False), (int8_path, True)):
        with open(target, "wb") as f:
            f.write(_convert(concrete, owner, int8))


def run_litert(path, feed):
    """{output name: value} of the LiteRT model at `path` on `feed` (its signature runner)."""
    from ai_edge_litert.interpreter import Interpreter

    try:
        # TFLiteConverter names a model's one signature serving_default, as the SavedModel's step is named.
        runner = Interpreter(model_path=path).get_signature_runner(STEP_SIGNATURE)
        with native_stderr_silenced():  # LiteRT's "Created ... XNNPACK delegate" line on a first run
            return {name: np.asarray(value) for name, value in runner(**feed).items()}
    except (ValueError, RuntimeError) as e:  # LiteRT's errors on a damaged or foreign model
        raise UsageError(f"{path} cannot be run by LiteRT ({first_line(e)})") from None
