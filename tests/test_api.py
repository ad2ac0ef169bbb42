"""The public Python API: docs/python-api.md's example runs as written, `generate` gives sample.py's
text, errors are raised (not exits), and `import keraslm` stays free of TensorFlow."""

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, make_run, run_script

import keraslm
from keraslm.config import DataConfig, ModelConfig, RunConfig, TrainConfig

DOC = ROOT / "docs" / "python-api.md"
HEAVY = ("tensorflow", "keras", "tensorflow_datasets", "matplotlib", "onnx")


def fenced_blocks(text, language):
    """The code blocks of a Markdown text fenced as `language`, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```$", text, flags=re.MULTILINE | re.DOTALL)


def test_the_documented_example_runs_and_prints_what_the_doc_shows(tmp_path):
    text = DOC.read_text(encoding="utf-8")
    example, shown = fenced_blocks(text, "python")[0], fenced_blocks(text, "text")[0]
    (tmp_path / "example.py").write_text(example)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run(
        [sys.executable, "example.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith(shown), result.stdout
    assert (tmp_path / "saved_models" / "fox" / "1" / "assets.extra" / "model.onnx").is_file()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny char run and its export, made through the API."""
    base = tmp_path_factory.mktemp("api")
    run_dir = make_run(base)
    version_dir = keraslm.export_run(run_dir, base / "models", name="lm")
    return run_dir, version_dir


def test_export_returns_the_version_directory(model):
    run_dir, version_dir = model
    assert version_dir == run_dir.parent / "models" / "lm" / "1"
    assert (version_dir / "saved_model.pb").is_file()


@pytest.mark.parametrize(
    "settings",
    [
        {"prompt": "First", "num_tokens": 30, "temperature": 0.0},
        {"prompt": "A", "num_tokens": 25, "seed": 3},
        {"prompt": "", "num_tokens": 20, "seed": 7, "top_k": 5, "top_p": 0.9, "temperature": 1.2},
        {"prompt": "ROMEO:", "num_tokens": 15, "seed": 2, "num_samples": 3},
    ],
)
def test_generate_gives_the_text_sample_py_prints(model, settings):
    _, version_dir = model
    samples = keraslm.load(version_dir).generate(**settings)
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in settings.items()]
    printed = run_script("sample.py", version_dir, *flags)
    assert printed.returncode == 0, printed.stderr
    assert len(samples) == settings.get("num_samples", 1)
    expected = (
        samples[0] if len(samples) == 1 else "\n".join(f"--- sample {i + 1} ---\n{s}" for i, s in enumerate(samples))
    )
    assert printed.stdout == expected + "\n"


def test_load_of_a_run_directory_uses_the_keras_backend_as_sample_py_does(model):
    run_dir, _ = model
    samples = keraslm.load(run_dir).generate("First", num_tokens=20, seed=4)
    printed = run_script("sample.py", run_dir, "--prompt", "First", "--num-tokens", "20", "--seed", "4")
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout == samples[0] + "\n"


def test_train_without_a_run_directory_writes_under_runs_as_train_py_does(tmp_path, monkeypatch):
    corpus = tmp_path / "lines.txt"
    corpus.write_text("to be or not to be, that is the question.\n" * 300)
    config = RunConfig(
        model=ModelConfig(cell="gru", num_layers=1, embedding_dim=8, hidden_dim=8),
        data=DataConfig(source=str(corpus)),
        train=TrainConfig(batch_size=4, bptt=10, epochs=1, sample_tokens=0),
    )
    monkeypatch.chdir(tmp_path)
    run_dir = keraslm.train(config, dry_run=True, verbose=0)
    assert run_dir.parent == Path("runs") and run_dir.name.startswith("lines-gru-")
    assert (tmp_path / run_dir / "model.keras").is_file()


def test_errors_are_raised_naming_the_argument(model, tmp_path):
    _, version_dir = model
    generator = keraslm.load(version_dir)
    with pytest.raises(keraslm.ArgumentError, match=r"^num_tokens must be positive, got 0$") as error:
        generator.generate(num_tokens=0)
    assert isinstance(error.value, ValueError)
    with pytest.raises(keraslm.ArgumentError, match="top_p"):
        generator.generate(top_p=1.5)
    with pytest.raises(keraslm.ArgumentError, match="in_graph needs the savedmodel backend"):
        generator.generate(in_graph=True)
    with pytest.raises(keraslm.UsageError, match="neither a keraslm export"):
        keraslm.load(tmp_path)
    with pytest.raises(keraslm.ArgumentError, match="resume needs run_dir"):
        keraslm.train(resume=True)
    with pytest.raises(keraslm.UsageError, match="not a directory"):
        keraslm.export_run(tmp_path / "nope", tmp_path / "models")


def test_the_api_names_and_their_classes():
    assert (keraslm.RunConfig, keraslm.ModelConfig, keraslm.DataConfig, keraslm.TrainConfig) == (
        RunConfig,
        ModelConfig,
        DataConfig,
        TrainConfig,
    )
    assert {"train", "export_run", "load", "Generator", "RunConfig"} <= set(dir(keraslm))
    # The API's export_run is not shadowed once the keraslm.export subpackage is imported.
    importlib.import_module("keraslm.export")
    assert keraslm.export_run is keraslm.api.export_run
    with pytest.raises(AttributeError):
        keraslm.no_such_name  # noqa: B018


def test_import_keraslm_loads_no_tensorflow():
    probe = (
        "import sys, keraslm\n"
        "keraslm.load, keraslm.Generator, keraslm.RunConfig, keraslm.train\n"
        f"print([m for m in {HEAVY!r} if m in sys.modules])\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
