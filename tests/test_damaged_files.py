"""Damaged run files and absurd settings: one line, exit code 2, and the run's files left as they were.

Each case damages a copy of one tiny run: config.json (wrong types, sizes no machine holds),
checkpoint.keras (bit rot, a broken keraslm_state.json) and model.keras (truncated, bit rot).
"""

import dataclasses
import json
import math
import shutil
import struct
import typing
import zipfile

import pytest
from conftest import assert_one_line_error, make_run, run_script
from hypothesis import given, settings
from hypothesis import strategies as st

from keraslm.config import MAX_PARAMETERS, DataConfig, ModelConfig, RunConfig, TrainConfig
from keraslm.errors import UsageError


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("damaged"), num_layers=2, model_overrides={"dropout": 0.1})


def files(directory):
    """Every file under `directory` and its bytes."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def damaged_copy(run_dir, tmp_path, damage):
    """A copy of the run with `damage(copy)` done to it, and its files once damaged."""
    copy = shutil.copytree(run_dir, tmp_path / "run")
    damage(copy)
    return copy, files(copy)


def assert_refused(result, run, damaged_files, *fragments):
    """Exit code 2, one line holding every fragment, no traceback, and no file of the run rewritten."""
    assert_one_line_error(result, *fragments)
    assert files(run) == damaged_files


def edit_config(section, key, value):
    def damage(run):
        config = json.loads((run / "config.json").read_text())
        config[section][key] = value
        (run / "config.json").write_text(json.dumps(config))

    return damage


def flip_bytes(name, member="model.weights.h5"):
    """Bit rot: invert 16 bytes in the middle of one member's data inside the zip file `name`."""

    def damage(run):
        path = run / name
        with zipfile.ZipFile(path) as archive:
            info = archive.getinfo(member)
        data = bytearray(path.read_bytes())
        # The member's data follows its 30-byte local header, its name and its extra field.
        name_length, extra_length = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
        middle = info.header_offset + 30 + name_length + extra_length + info.compress_size // 2
        data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
        path.write_bytes(data)

    return damage


def edit_state(change):
    """Rewrite checkpoint.keras with its keraslm_state.json replaced by `change(state)`."""

    def damage(run):
        path = run / "checkpoint.keras"
        with zipfile.ZipFile(path) as archive:
            members = {name: archive.read(name) for name in archive.namelist()}
        members["keraslm_state.json"] = json.dumps(change(json.loads(members["keraslm_state.json"])))
        with zipfile.ZipFile(path, "w") as archive:
            for name, data in members.items():
                archive.writestr(name, data)

    return damage


def without(key):
    return lambda state: {k: v for k, v in state.items() if k != key}


def with_state(**changes):
    return lambda state: {**state, **changes}


# 1. config.json: through train.py --resume, which reads it before TensorFlow loads (fast).

CONFIG_CASES = [
    ("model", "hidden_dim", "32", "model.hidden_dim must be an integer, got '32'"),
    ("model", "hidden_dim", 32.5, "model.hidden_dim must be an integer, got 32.5"),
    ("model", "num_layers", True, "model.num_layers must be an integer, got True"),
    ("train", "lr", None, "train.lr must be a finite number, got None"),
    ("data", "tfds_data_dir", 7, "data.tfds_data_dir must be a string or null, got 7"),
    ("model", "hidden_dim", 10**6, "limit of 2^31"),
    ("model", "num_layers", 10**7, "limit of 2^31"),
    ("model", "vocabulary_size", 10**9, "limit of 2^31"),
    ("model", "vocabulary_size", 0, "model.vocabulary_size must be positive, got 0"),
]


@pytest.mark.parametrize(
    "section, key, value, fragment", CONFIG_CASES, ids=[f"{key}={str(value)[:12]}" for _, key, value, _ in CONFIG_CASES]
)
def test_damaged_config_is_refused_on_resume(run_dir, tmp_path, section, key, value, fragment):
    run, damaged = damaged_copy(run_dir, tmp_path, edit_config(section, key, value))
    result = run_script("train.py", "--resume", "--run-dir", run)
    assert_refused(result, run, damaged, f"{run}/config.json: ", fragment, "the run directory is damaged")


def test_damaged_config_is_refused_by_export(run_dir, tmp_path):
    run, damaged = damaged_copy(run_dir, tmp_path, edit_config("model", "hidden_dim", "32"))
    result = run_script("export.py", run, "--out", tmp_path / "models")
    assert_refused(result, run, damaged, "config.json: model.hidden_dim must be an integer, got '32'")
    assert not (tmp_path / "models").exists()


def test_config_describing_another_model_is_refused_before_it_is_built(run_dir, tmp_path):
    # 10^4 layers of 16 units fit the limit (21 M parameters) but would take minutes to build;
    # model.keras holds 2 layers, and the parameter counts disagree before anything is built.
    run, damaged = damaged_copy(run_dir, tmp_path, edit_config("model", "num_layers", 10**4))
    result = run_script("export.py", run, "--out", tmp_path / "models", timeout=60)
    assert_refused(result, run, damaged, "model.keras does not match config.json", "the run directory is damaged")


def test_an_absurd_model_size_on_the_command_line_is_refused_before_anything_is_built(tmp_path):
    result = run_script("train.py", "--hidden-dim", "1000000", "--run-dir", tmp_path / "r")
    assert_refused(result, tmp_path, {}, "--hidden-dim 1000000", "limit of 2^31")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("[]", "the config must be a JSON object"),
        ('{"model": 1, "data": {}, "train": {}}', "model must be a JSON object, got 1"),
        ('{"model": {}}', "no section data, train"),
        ('{"model": {"hidden\\ndim": 3}, "data": {}, "train": {}}', "unknown setting 'model.hidden\\ndim'"),
        ('{"model": {"hidden_dim": 1' + "0" * 5000 + "}}", "is not valid JSON"),
        ("[" * 100_000 + "]" * 100_000, "is not valid JSON"),
        ('{"model": {"dropout": NaN}, "data": {}, "train": {}}', "model.dropout must be a finite number, got nan"),
    ],
    ids=["list", "section-type", "no-sections", "unknown-key", "huge-integer", "deep", "nan"],
)
def test_malformed_config_json_is_one_usage_error(tmp_path, text, fragment):
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(UsageError) as raised:
        RunConfig.load(path)
    message = str(raised.value)
    assert message.startswith(f"{path}") and fragment in message and "\n" not in message, message


# The wrong-type property: any field, any JSON value of a kind its annotation does not allow.
SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}
FIELDS = [(section, f.name) for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)]
JSON_KINDS = {
    int: st.integers(),
    float: st.floats(allow_nan=False, allow_infinity=False),
    bool: st.booleans(),
    str: st.text(max_size=8),
    type(None): st.none(),
    list: st.lists(st.integers(), max_size=3),
    dict: st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
}
# The JSON kinds a field of each annotated type takes: a float field takes integers too, an int field no bool.
ACCEPTED = {int: {int}, float: {int, float}, bool: {bool}, str: {str}, type(None): {type(None)}}


def wrong_values(annotation):
    accepted = set().union(*(ACCEPTED[kind] for kind in typing.get_args(annotation) or (annotation,)))
    wrong = [strategy for kind, strategy in JSON_KINDS.items() if kind not in accepted]
    if float in accepted:
        wrong += [st.sampled_from([math.nan, math.inf, -math.inf]), st.just(10**400)]
    return st.one_of(wrong)


def valid_config_dict():
    config = RunConfig()
    config.model.vocabulary_size = 65
    return config.to_dict()


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(FIELDS), st.data())
def test_a_wrong_typed_field_is_a_usage_error_naming_it(field, data):
    section, key = field
    value = data.draw(wrong_values(typing.get_type_hints(SECTIONS[section])[key]))
    d = valid_config_dict()
    d[section][key] = value
    with pytest.raises(UsageError) as raised:
        RunConfig.from_dict(d)
    assert str(raised.value).startswith(f"{section}.{key} must be "), raised.value
    assert "\n" not in str(raised.value)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=3), children, max_size=3),
    max_leaves=6,
)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(FIELDS + [(section, None) for section in SECTIONS]), JSON_VALUES)
def test_any_json_value_anywhere_is_accepted_or_one_usage_error(field, value):
    section, key = field
    d = valid_config_dict()
    if key is None:
        d[section] = value  # a whole section
    else:
        d[section][key] = value
    try:
        config = RunConfig.from_dict(d).validate()
    except UsageError as e:
        assert "\n" not in str(e)
    else:
        assert config.model.num_parameters() <= MAX_PARAMETERS


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh", "rnn_relu"])
@pytest.mark.parametrize("inputs", [{}, {"tie_weights": True, "embedding_dim": 5}, {"one_hot": True}])
def test_num_parameters_is_keras_count(cell, inputs):
    from keraslm.model import build_step_model, build_training_model

    config = ModelConfig(
        **{"vocabulary_size": 11, "cell": cell, "num_layers": 3, "embedding_dim": 6, "hidden_dim": 5, **inputs}
    )
    assert config.num_parameters() == build_step_model(config).count_params()
    assert config.num_parameters() == build_training_model(config, batch_size=2).count_params()


# 2. checkpoint.keras: through train.py --resume, and in-process for every key of keraslm_state.json.


@pytest.mark.parametrize(
    "damage, fragment",
    [
        (flip_bytes("checkpoint.keras"), "(model.weights.h5 fails its CRC check)"),
        (edit_state(without("epoch")), "(keraslm_state.json: epoch is missing"),
        (edit_state(with_state(seed_states="x")), "(keraslm_state.json: seed_states is missing or"),
    ],
    ids=["bit-rot", "no-epoch", "seed-states-type"],
)
def test_damaged_checkpoint_is_refused_on_resume(run_dir, tmp_path, damage, fragment):
    run, damaged = damaged_copy(run_dir, tmp_path, damage)
    result = run_script("train.py", "--resume", "--run-dir", run)
    assert_refused(result, run, damaged, f"--resume: {run}/checkpoint.keras is damaged ", fragment, "start a new run")


def resume_in_process(run):
    """What train.py --resume does up to load_checkpoint: the compiled stateful model, then the checkpoint."""
    from keraslm.losses import SparseCrossEntropy
    from keraslm.model import build_training_model
    from keraslm.training import Run, load_checkpoint, make_optimizer
    from keraslm.vocab import Vocabulary

    config = RunConfig.load(run / "config.json")
    model = build_training_model(config.model, batch_size=config.train.batch_size)
    model.compile(optimizer=make_optimizer(config.train), loss=SparseCrossEntropy())
    model.optimizer.build(model.trainable_variables)
    load_checkpoint(Run(str(run), config, Vocabulary.load(run / "vocab.json")), model)


STATE_KEYS = ["epoch", "history", "best_val_loss", "best_epoch", "wait", "config", "vocabulary_sha256", "seed_states"]
WRONG_STATES = {
    **{f"no-{key}": without(key) for key in STATE_KEYS},
    "epoch-string": with_state(epoch="1"),
    "epoch-bool": with_state(epoch=True),
    "epoch-negative": with_state(epoch=-1),
    "best-val-loss-null": with_state(best_val_loss=None),
    "history-rows": with_state(history=[1, 2]),
    "config-type": lambda s: {**s, "config": {**s["config"], "model": {**s["config"]["model"], "hidden_dim": "16"}}},
    "config-list": with_state(config=[]),
    "sha-number": with_state(vocabulary_sha256=5),
    "seed-states-length": lambda s: {**s, "seed_states": [*s["seed_states"], [0, 0]]},
    "not-an-object": lambda s: [],
}


@pytest.mark.parametrize("change", WRONG_STATES.values(), ids=WRONG_STATES.keys())
def test_every_damaged_checkpoint_state_is_one_usage_error(run_dir, tmp_path, change):
    run, damaged = damaged_copy(run_dir, tmp_path, edit_state(change))
    with pytest.raises(UsageError, match=r"checkpoint\.keras is damaged \(keraslm_state\.json"):
        resume_in_process(run)
    assert files(run) == damaged


def test_an_intact_checkpoint_still_resumes(run_dir, tmp_path):
    run, intact = damaged_copy(run_dir, tmp_path, lambda run: None)
    resume_in_process(run)
    assert files(run) == intact


# 3. model.keras: export.py and sample.py's keras backend.


def test_truncated_model_is_refused_by_export(run_dir, tmp_path):
    def truncate(run):
        (run / "model.keras").write_bytes((run / "model.keras").read_bytes()[:1000])

    run, damaged = damaged_copy(run_dir, tmp_path, truncate)
    result = run_script("export.py", run, "--out", tmp_path / "models")
    fragments = ("model.keras cannot be loaded: it is damaged (truncated or not a Keras archive)", "train again")
    assert_refused(result, run, damaged, f"{run}/", *fragments)
    assert not (tmp_path / "models").exists()


def test_bit_rotted_model_is_refused_by_sample(run_dir, tmp_path):
    run, damaged = damaged_copy(run_dir, tmp_path, flip_bytes("model.keras"))
    result = run_script("sample.py", run, "--backend", "keras", "--num-tokens", "5")
    assert_refused(result, run, damaged, "model.keras cannot be loaded: it is damaged (model.weights.h5 fails its CRC")
