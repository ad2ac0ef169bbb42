"""Random combinations of bad flag values: each command ends with exit 2 and one line, and
writes nothing (issue #14). The scripts run in-process through `run_main`, as a user's shell runs
them, so that many combinations fit in a few seconds."""

import os

import pytest
from conftest import make_run, run_command
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# flag → values that are each wrong on their own.
BAD = {
    "train.py": {
        "--hidden-dim": ["0", "-3", "2.5", "x", "1000000"],
        "--num-layers": ["0", "-1", "100000"],
        "--embedding-dim": ["0", "-1"],
        "--dropout": ["1", "1.5", "-0.1", "nan"],
        "--lr": ["0", "-1", "nan", "inf"],
        "--batch-size": ["0", "-8"],
        "--bptt": ["0", "-1"],
        "--epochs": ["0", "-2"],
        "--clipnorm": ["-1", "nan"],
        "--anneal-factor": ["0.5", "nan"],
        "--cell": ["lstmx"],
        "--level": ["byte"],
        "--min-freq": ["0"],
        "--max-vocab": ["-1"],
        "--early-stopping": ["-1"],
        "--sample-tokens": ["-5"],
        "--sample-temperature": ["-1", "nan"],
        "--optimizer": ["rmsprop"],
    },
    "export.py": {
        "--version": ["0", "-1", str(2**63), "1.5"],
        "--max-new-tokens": ["0", str(2**40)],
        "--max-prompt-tokens": ["-1"],
        "--max-batch-tokens": ["0", "x"],
    },
    "sample.py": {
        "--num-tokens": ["0", "-1", "x"],
        "--num-samples": ["0", "-3"],
        "--temperature": ["-1", "nan", "inf", "1e-320"],
        "--top-k": ["-1"],
        "--top-p": ["0", "1.5", "nan"],
        "--timeout": ["0", "-1", "nan"],
        "--backend": ["bogus"],
    },
}
# flag → a value that is fine, mixed in so that the bad ones are not always alone.
GOOD = {
    "train.py": {"--hidden-dim": "16", "--cell": "gru", "--epochs": "1", "--lr": "0.01", "--bptt": "10"},
    "export.py": {"--name": "lm", "--max-new-tokens": "64"},
    "sample.py": {"--num-tokens": "5", "--temperature": "0.5", "--seed": "3", "--top-k": "3"},
}


def flags(script):
    """Argument lists with at least one bad value, and maybe some good ones."""
    bad = st.dictionaries(st.sampled_from(sorted(BAD[script])), st.none(), min_size=1, max_size=3).flatmap(
        lambda chosen: st.tuples(*[st.sampled_from(BAD[script][flag]) for flag in chosen]).map(
            lambda values: dict(zip(chosen, values, strict=True))
        )
    )
    good = st.dictionaries(st.sampled_from(sorted(GOOD[script])), st.none(), max_size=3)
    return st.tuples(bad, good).map(lambda pair: {f: GOOD[script][f] for f in pair[1]} | pair[0])


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny run, its export, a corpus, and an empty folder every command writes into."""
    from keraslm.export import export_run

    base = tmp_path_factory.mktemp("bad-flags")
    run_dir = make_run(base, hidden_dim=8)
    version_dir, _ = export_run(str(run_dir), str(base / "models"), "lm")
    out = base / "out"
    out.mkdir()
    return {"run": run_dir, "export": version_dir, "corpus": base / "corpus.txt", "out": out}


def fixed_arguments(script, workspace):
    out = workspace["out"]
    if script == "train.py":
        return ["--data", str(workspace["corpus"]), "--run-dir", str(out / "run")]
    if script == "export.py":
        return [str(workspace["run"]), "--out", str(out)]
    return [str(workspace["export"]), "--out", str(out / "samples.txt")]


@pytest.mark.parametrize("script", sorted(BAD))
def test_bad_flag_values_end_in_one_line_and_write_nothing(script, workspace, capsys):
    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(flags(script))
    def check(chosen):
        argv = fixed_arguments(script, workspace) + [token for item in chosen.items() for token in item]
        code, stdout, stderr = run_command(script, argv, capsys)
        assert code == 2 and len(stderr) == 1 and stdout == "", (argv, stderr)
        assert "error" in stderr[0] and "Traceback" not in stderr[0]
        assert os.listdir(workspace["out"]) == [], argv

    check()
