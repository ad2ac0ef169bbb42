"""Library errors name the argument; only the command-line layer words them as flags (issue #15)."""

import pytest

from keraslm.cli import flag, message
from keraslm.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from keraslm.errors import ArgumentError, UsageError
from keraslm.files import OutputFile
from keraslm.limits import ServingLimits


def test_an_argument_error_names_the_argument_and_the_command_line_the_flag():
    error = ArgumentError("{tie_weights} needs {embedding_dim} equal to {hidden_dim} (got {got})", got="{1} and 2")
    assert isinstance(error, UsageError) and isinstance(error, ValueError)
    assert error.names == ("tie_weights", "embedding_dim", "hidden_dim") and error.name == "tie_weights"
    assert str(error) == "tie_weights needs embedding_dim equal to hidden_dim (got {1} and 2)"
    assert message(error) == "--tie-weights needs --embedding-dim equal to --hidden-dim (got {1} and 2)"
    assert message(error.within("train {split}")) == (
        "train {split}: --tie-weights needs --embedding-dim equal to --hidden-dim (got {1} and 2)"
    )
    assert message(UsageError("no flag here").within("train split")) == "train split: no flag here"
    assert flag("source") == "--data" and flag("max_new_tokens") == "--max-new-tokens"


@pytest.mark.parametrize(
    "config, name, library, command_line",
    [
        (RunConfig(model=ModelConfig(dropout=1.5)), "dropout", "dropout must be in [0, 1)", "--dropout must be in"),
        (RunConfig(model=ModelConfig(cell="lstmx")), "cell", "unknown cell 'lstmx'; choose one of", "unknown --cell"),
        (RunConfig(data=DataConfig(min_freq=0)), "min_freq", "min_freq must be a positive", "--min-freq must be a"),
        (RunConfig(train=TrainConfig(batch_size=0)), "batch_size", "batch_size must be a", "--batch-size must be a"),
        (
            RunConfig(train=TrainConfig(sample_temperature=1e-4)),
            "sample_temperature",
            "sample_temperature must be 0",
            "--sample-temperature must be 0",
        ),
        (
            ModelConfig(hidden_dim=10**6),
            "num_layers",
            "num_layers 2, hidden_dim 1000000, embedding_dim",
            "--num-layers 2, --hidden-dim 1000000, --embedding-dim",
        ),
        (
            ServingLimits(max_new_tokens=0),
            "max_new_tokens",
            "max_new_tokens must be an integer",
            "--max-new-tokens must be",
        ),
    ],
)
def test_settings_are_refused_by_name(config, name, library, command_line):
    with pytest.raises(ArgumentError) as raised:
        config.validate()
    assert raised.value.name == name
    assert str(raised.value).startswith(library) and message(raised.value).startswith(command_line)


def test_an_output_file_is_named_by_its_argument(tmp_path):
    with pytest.raises(ArgumentError) as raised:
        OutputFile(str(tmp_path)).__enter__()
    assert str(raised.value) == f"out {tmp_path} is a directory; give a file name"
    assert message(raised.value) == f"--out {tmp_path} is a directory; give a file name"
