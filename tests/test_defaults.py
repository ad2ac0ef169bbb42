"""Defaults are defined once, in keraslm.config: `RunConfig()` is what train.py runs without flags,
`RunConfig.for_level("word")` what it runs with `--level word`, and --help shows the same values."""

import importlib

import pytest

from keraslm.config import DEFAULT_LEVEL, LEVELS, RunConfig

# Settings with no flag of their own: the vocabulary sets vocabulary_size; --dataset and --data set source.
NO_FLAG = {"vocabulary_size", "source"}


def load_train_script():
    """The module behind train.py and keraslm-train."""
    return importlib.import_module("keraslm.commands.train")


def setting(config, name):
    return getattr(getattr(config, RunConfig.section_of(name)), name)


def settings(config):
    return {name: value for section in config.to_dict().values() for name, value in section.items()}


@pytest.mark.parametrize("level", LEVELS)
def test_run_config_is_what_train_py_runs_without_flags(level):
    train = load_train_script()
    argv = [] if level == DEFAULT_LEVEL else ["--level", level]
    built = train.new_config(train.given_settings(train.parse_args(argv)))
    assert built == RunConfig.for_level(level)
    assert RunConfig() == RunConfig.for_level(DEFAULT_LEVEL) and RunConfig().data.level == DEFAULT_LEVEL
    RunConfig.for_level(level).validate()


def test_every_setting_has_a_flag_and_its_help_shows_the_config_default():
    actions = {action.dest: action for action in load_train_script().build_parser()._actions}
    assert set(settings(RunConfig())) - NO_FLAG <= set(actions)
    defaults = {level: RunConfig.for_level(level) for level in LEVELS}
    for dest, action in actions.items():
        name = "source" if dest == "dataset" else dest
        if name not in settings(RunConfig()) or name == "level":
            continue
        values = [setting(defaults[level], name) for level in LEVELS]
        if any(value is None or value == "" or isinstance(value, bool) for value in values):
            continue  # no value to show: the help says what happens (TFDS's folder, the start token, off)
        shown = [f"{value:g}" if isinstance(value, float) else str(value) for value in values]
        expected = (
            f"default {shown[0]}"
            if len(set(shown)) == 1
            else ", ".join(f"{level} {value}" for level, value in zip(LEVELS, shown, strict=True))
        )
        assert expected in action.help, (dest, action.help)
    assert f"default {DEFAULT_LEVEL}" in actions["level"].help


def test_a_bad_level_is_an_argument_error():
    with pytest.raises(ValueError, match="unknown level 'byte'; choose one of char, word") as raised:
        RunConfig.for_level("byte")
    assert raised.value.name == "level"
