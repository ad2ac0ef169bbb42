import keras
import numpy as np
import pytest

from keraslm.config import CELLS, ModelConfig
from keraslm.data import tbptt_arrays
from keraslm.errors import UsageError
from keraslm.model import build_primer_model, build_step_model, build_training_model, keras_step, reset_states
from keraslm.states import state_names
from keraslm.vocab import Vocabulary


def tiny_config(cell, **kwargs):
    return ModelConfig(
        **{
            "vocabulary_size": 10,
            "cell": cell,
            "num_layers": 2,
            "embedding_dim": 6,
            "hidden_dim": 5,
            "dropout": 0.1,
            "init": "keras",
            **kwargs,
        }
    )


@pytest.mark.parametrize("cell", CELLS)
def test_each_cell_trains_and_lowers_its_loss(cell, shakespeare_text):
    keras.utils.set_random_seed(0)
    vocab = Vocabulary.build(shakespeare_text[:20_000], "char")
    x, y = tbptt_arrays(vocab.encode(shakespeare_text[:20_000]), batch_size=8, bptt=25)
    config = ModelConfig(vocabulary_size=len(vocab), cell=cell, embedding_dim=32, hidden_dim=64, num_layers=1)
    model = build_training_model(config, batch_size=8)
    model.compile(
        keras.optimizers.Adam(1e-2, global_clipnorm=1.0), keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    before = model.evaluate(x[0], y[0], batch_size=8, verbose=0)
    reset_states(model)
    for _ in range(3):
        for k in range(len(x)):  # windows in stream order, state carried between them
            model.train_on_batch(x[k], y[k])
        reset_states(model)
    after = model.evaluate(x[0], y[0], batch_size=8, verbose=0)
    assert after < before - 0.5, (before, after)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("tie_weights", [False, True])
def test_stateless_twin_matches_stateful_model_window_by_window(cell, tie_weights):
    config = tiny_config(cell, tie_weights=tie_weights, embedding_dim=5)
    stateful = build_training_model(config, batch_size=3)
    twin = build_step_model(config)
    twin.set_weights(stateful.get_weights())
    tokens = np.random.default_rng(0).integers(0, 10, (3, 12)).astype(np.int32)

    reset_states(stateful)
    windows = [np.asarray(stateful(tokens[:, k : k + 4])) for k in range(0, 12, 4)]
    step, state = keras_step(twin, config, batch_size=3)
    steps = []
    for k in range(12):  # token by token, the state carried explicitly
        logits, state = step(tokens[:, k : k + 1], state)
        steps.append(logits)
    np.testing.assert_allclose(np.concatenate(windows, 1), np.concatenate(steps, 1), atol=1e-5)


def test_twin_names_its_state_inputs_and_outputs():
    twin = build_step_model(tiny_config("lstm"))
    assert sorted(twin.input) == ["c0_in", "c1_in", "h0_in", "h1_in", "tokens"]
    assert sorted(twin.output) == ["c0_out", "c1_out", "h0_out", "h1_out", "logits"]
    assert state_names(tiny_config("gru")) == ["h0", "h1"]


def test_training_and_step_models_name_their_weights_alike():
    config = tiny_config("lstm")
    training = build_training_model(config, batch_size=2)
    step = build_step_model(config)
    assert [w.path for w in training.weights] == [w.path for w in step.weights]
    assert [layer.name for layer in training.layers if layer.weights] == ["embedding", "rnn_0", "rnn_1", "logits"]
    with pytest.raises(ValueError, match="static batch_size"):
        build_training_model(config, batch_size=None)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_primer_shares_the_step_models_layers_and_skips_masked_steps(cell):
    config = tiny_config(cell)
    step = build_step_model(config)
    primer = build_primer_model(config, step)
    assert all(layer is step.get_layer(layer.name) for layer in primer.layers if layer.weights)
    assert sorted(primer.output) == sorted(name for name in step.output if name != "logits")

    rng = np.random.default_rng(2)
    tokens = rng.integers(0, 10, (2, 5)).astype(np.int32)
    states = {f"{n}_in": rng.normal(0, 1, (2, 5)).astype(np.float32) for n in state_names(config)}
    mask = np.array([[True] * 5, [False, False, True, True, True]])
    primed = primer({"tokens": tokens, "mask": mask, **states})
    whole = step({"tokens": tokens, **states})
    suffix = step({"tokens": tokens[1:, 2:], **{k: v[1:] for k, v in states.items()}})
    for name, value in primed.items():  # row 0 unmasked; row 1 as if it started at its first kept step
        np.testing.assert_allclose(np.asarray(value)[0], np.asarray(whole[name])[0], atol=1e-6)
        np.testing.assert_allclose(np.asarray(value)[1], np.asarray(suffix[name])[0], atol=1e-6)


def test_tied_weights_are_one_variable():
    config = tiny_config("gru", tie_weights=True, embedding_dim=5)
    model = build_training_model(config, batch_size=2)
    matrices = [w for w in model.weights if w.shape == (10, 5)]
    assert len(matrices) == 1 and "embedding" in matrices[0].path
    assert not any(layer.name == "logits" for layer in model.layers)
    # The projection really is that matrix: changing it changes the logits as h @ E.T would.
    twin = build_step_model(config)
    twin.set_weights(model.get_weights())
    step, state = keras_step(twin, config, batch_size=1)
    tokens = np.array([[3]], np.int32)
    before, after_state = step(tokens, state)
    embedding = twin.get_layer("embedding")
    embedding.embeddings.assign(embedding.embeddings.numpy() * 2)
    twin_logits = np.asarray(twin({"tokens": tokens, **state})["logits"])
    assert not np.allclose(before, twin_logits)


def test_tie_weights_needs_equal_sizes():
    with pytest.raises(UsageError, match="embedding_dim equal to hidden_dim"):
        tiny_config("lstm", tie_weights=True, embedding_dim=6, hidden_dim=5).validate()


def test_one_hot_input():
    config = tiny_config("rnn_relu", one_hot=True)
    model = build_training_model(config, batch_size=2)
    assert not any(layer.name == "embedding" for layer in model.layers)
    assert model(np.zeros((2, 3), np.int32)).shape == (2, 3, 10)


def test_model_keras_round_trip_in_safe_mode(tmp_path):
    config = tiny_config("lstm", tie_weights=True, embedding_dim=5)
    twin = build_step_model(config)
    twin.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras", safe_mode=True)
    inputs = {
        "tokens": np.array([[1, 2, 3]], np.int32),
        **{f"{n}_in": np.full((1, 5), 0.1, np.float32) for n in state_names(config)},
    }
    for name, value in twin(inputs).items():
        np.testing.assert_allclose(np.asarray(loaded(inputs)[name]), np.asarray(value), atol=1e-6)


def test_torch_initialisation_follows_pytorch_examples():
    config = tiny_config("lstm", init="torch", hidden_dim=16)
    weights = {w.path: w.numpy() for w in build_step_model(config).weights}
    assert abs(weights["embedding/embeddings"]).max() <= 0.1
    assert abs(weights["logits/kernel"]).max() <= 0.1 and not weights["logits/bias"].any()
    for name in ("kernel", "recurrent_kernel", "bias"):  # U(-1/sqrt(H), 1/sqrt(H)), no forget-gate 1s
        values = weights[f"rnn_0/lstm_cell/{name}"]
        assert abs(values).max() <= 0.25 and values.std() > 0.1
    with pytest.raises(UsageError, match="unknown init 'xavier'"):
        tiny_config("lstm", init="xavier").validate()


def test_bfloat16_projection_gives_float32_logits_close_to_float32():
    """Under mixed_bfloat16 the output layer multiplies in bfloat16 but returns float32 logits, and
    its value and gradients stay within bfloat16 rounding of the float32 layer's."""
    import tensorflow as tf

    config = ModelConfig(vocabulary_size=50, cell="lstm", num_layers=1, embedding_dim=8, hidden_dim=8)
    reference = build_training_model(config, batch_size=2)
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        mixed = build_training_model(config, batch_size=2)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    mixed.set_weights(reference.get_weights())
    projection = mixed.get_layer("logits")
    assert projection.compute_dtype == "bfloat16" and projection.variable_dtype == "float32"

    hidden = tf.random.stateless_normal([2, 5, 8], [1, 2])
    results = []
    for layer in (reference.get_layer("logits"), projection):
        with tf.GradientTape() as tape:
            tape.watch(hidden)
            logits = layer(hidden)
            loss = tf.reduce_sum(tf.sin(logits))
        results.append([logits, *tape.gradient(loss, [hidden, layer.kernel, layer.bias])])
    assert results[1][0].dtype == tf.float32
    assert not np.array_equal(results[1][0].numpy(), results[0][0].numpy())  # bfloat16 products did run
    for expected, got in zip(*results, strict=True):
        scale = float(tf.reduce_max(tf.abs(expected)))
        np.testing.assert_allclose(tf.cast(got, tf.float32).numpy(), expected.numpy(), atol=2e-2 * scale)
