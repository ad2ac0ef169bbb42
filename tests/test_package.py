"""keraslm as users install it: the wheel (its commands, console scripts and bundled corpus), a full
install whose commands work from any folder, and the inference-only install (NumPy, ONNX Runtime and
LiteRT, no TensorFlow) that samples from an export as sample.py does, on the onnx and litert backends.

The default run stays offline: the wheel is built without build isolation and installed with
--no-index; the inference venv borrows the host's NumPy, ONNX Runtime and LiteRT through a .pth file. The
slow test installs requirements-inference.txt from the package registry, as a deploy machine would.
"""

import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT, make_run, run_script, shakespeare

import keraslm

COMMANDS = ("train", "export", "sample", "score")
# What a wheel is built from: the package and the files pyproject.toml names.
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "keraslm")
# What keraslm-sample's onnx and litert backends may import beside the standard library.
INFERENCE_DISTRIBUTIONS = ("numpy", "onnxruntime", "ai-edge-litert")
HEAVY = ("tensorflow", "keras", "tensorflow_datasets", "matplotlib", "onnx")
SAMPLE_ARGS = (("--prompt", "First", "--greedy", "--num-tokens", "40"), ("--prompt", "A", "--seed", "3"))


def copy_sources(destination):
    """A copy of what the wheel is built from, so that building leaves nothing in the checkout."""
    destination.mkdir()
    for name in SOURCES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, destination / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, destination / name)
    return destination


def run(command, cwd, timeout=600):
    """Run a command outside the checkout (no PYTHONPATH), as a user's shell would."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env |= {"TF_CPP_MIN_LOG_LEVEL": "2", "COLUMNS": "100"}
    return subprocess.run(list(map(str, command)), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def make_venv(path, *options):
    result = run([sys.executable, "-m", "venv", *options, path], cwd=path.parent)
    assert result.returncode == 0, result.stderr
    return path


def pip_install(venv, *args):
    result = run([venv / "bin" / "python", "-m", "pip", "install", "--disable-pip-version-check", *args], venv.parent)
    assert result.returncode == 0, result.stdout + result.stderr


def site_packages(venv):
    (site,) = venv.glob("lib/python*/site-packages")
    return site


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel of this checkout, built offline."""
    base = tmp_path_factory.mktemp("wheel")
    source = copy_sources(base / "source")
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index"]
    result = run([*command, "--disable-pip-version-check", "-w", base / "dist", source], cwd=base)
    assert result.returncode == 0, result.stdout + result.stderr
    (built,) = (base / "dist").glob("keraslm-*.whl")
    return built


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A tiny char model's export (saved_models/lm/1)."""
    from keraslm.export import export_run

    base = tmp_path_factory.mktemp("package-export")
    version_dir, _ = export_run(str(make_run(base)), str(base / "models"), "lm")
    return Path(version_dir)


def test_the_wheel_holds_the_package_its_commands_and_the_corpus(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        info = f"keraslm-{keraslm.__version__}.dist-info"
        entry_points = archive.read(f"{info}/entry_points.txt").decode()
        metadata = archive.read(f"{info}/METADATA").decode()
    assert {f"keraslm/commands/{name}.py" for name in COMMANDS} <= names
    assert {
        "keraslm/export/__init__.py",
        "keraslm/corpora/__init__.py",
        "keraslm/corpora/tiny_shakespeare.txt.xz",
    } <= names
    assert f"{info}/LICENSE" in names
    assert not {name for name in names if name.split("/")[0] in ("tests", "benchmarks", "train.py", "sample.py")}
    scripts = [line.replace(" ", "") for line in entry_points.splitlines()]
    for name in COMMANDS:
        assert f"keraslm-{name}=keraslm.commands.{name}:run" in scripts
    assert "Requires-Python: >=3.11" in metadata
    assert "Requires-Dist: tensorflow==2.21.*" in metadata


@pytest.fixture(scope="module")
def full_venv(tmp_path_factory, wheel):
    """A fresh venv holding the wheel; its dependencies come from the host (installed, not downloaded)."""
    venv = make_venv(tmp_path_factory.mktemp("full") / "venv", "--system-site-packages")
    pip_install(venv, "--no-deps", "--no-index", wheel)
    return venv


@pytest.mark.parametrize("name", COMMANDS)
def test_console_scripts_work_from_any_folder_as_the_scripts_do(name, full_venv, tmp_path):
    installed = run([full_venv / "bin" / f"keraslm-{name}", "--help"], cwd=tmp_path)
    script = run([sys.executable, ROOT / f"{name}.py", "--help"], cwd=ROOT)
    assert installed.returncode == 0, installed.stderr
    assert installed.stdout.startswith(f"usage: keraslm-{name} ")
    # The same flags and words; only the usage block (prog's name and its wrapping) differs.
    assert installed.stdout.split("\n\n", 1)[1] == script.stdout.split("\n\n", 1)[1]
    refused = run([full_venv / "bin" / f"keraslm-{name}", "--no-such-flag"], cwd=tmp_path)
    assert refused.returncode == 2 and refused.stderr.startswith(f"keraslm-{name}: error: ")
    assert len(refused.stderr.splitlines()) == 1, refused.stderr


def test_the_full_venv_runs_the_installed_package(full_venv, tmp_path):
    where = run([full_venv / "bin" / "python", "-c", "import keraslm; print(keraslm.__file__)"], cwd=tmp_path)
    assert where.stdout.startswith(str(site_packages(full_venv))), where.stdout


def host_folders(distribution):
    """The top-level folders of an installed distribution (its packages, bundled libraries, dist-info)."""
    dist = importlib.metadata.distribution(distribution)
    tops = {file.parts[0] for file in dist.files if file.parts[0] != ".."}  # ".." holds its console scripts
    return [Path(dist.locate_file(top)) for top in sorted(tops)]


@pytest.fixture(scope="module")
def inference_venv(tmp_path_factory, wheel):
    """A fresh venv (no system site-packages) where only NumPy, ONNX Runtime and LiteRT are importable, borrowed
    from the host through a .pth file, and keraslm installed from the wheel with --no-deps."""
    base = tmp_path_factory.mktemp("inference")
    venv = make_venv(base / "venv")
    shelf = base / "host-packages"
    shelf.mkdir()
    for distribution in INFERENCE_DISTRIBUTIONS:
        for folder in host_folders(distribution):
            (shelf / folder.name).symlink_to(folder)
    (site_packages(venv) / "inference-packages.pth").write_text(f"{shelf}\n")
    pip_install(venv, "--no-deps", "--no-index", wheel)
    return venv


def assert_samples_without_tensorflow(venv, export, cwd):
    """TensorFlow and the other training-side packages are absent from `venv`, and its keraslm-sample
    and keraslm.load print what the checkout's sample.py prints on the same export and settings, on
    the onnx backend and on the litert backend (which must give the onnx backend's text)."""
    for module in HEAVY:
        absent = run([venv / "bin" / "python", "-c", f"import {module}"], cwd=cwd)
        assert absent.returncode != 0 and f"No module named '{module}'" in absent.stderr, module
    for args in SAMPLE_ARGS:
        installed = run([venv / "bin" / "keraslm-sample", export, *args], cwd=cwd)
        host = run_script("sample.py", export, *args)
        assert installed.returncode == 0, installed.stderr
        assert host.returncode == 0, host.stderr
        assert installed.stdout == host.stdout and installed.stdout.startswith(args[1])
        litert = run([venv / "bin" / "keraslm-sample", export, "--backend", "litert", *args], cwd=cwd)
        assert litert.returncode == 0, litert.stderr
        assert litert.stdout == host.stdout
    # The Python API too: the same text as sample.py for the first flags (greedy, 40 tokens after "First").
    probe = "import sys, keraslm; print(keraslm.load(sys.argv[1]).generate('First', 40, temperature=0)[0])"
    api = run([venv / "bin" / "python", "-c", probe, export], cwd=cwd)
    assert api.returncode == 0, api.stderr
    assert api.stdout == run_script("sample.py", export, *SAMPLE_ARGS[0]).stdout
    probe = probe.replace("keraslm.load(sys.argv[1])", "keraslm.load(sys.argv[1], backend='litert')")
    api = run([venv / "bin" / "python", "-c", probe, export], cwd=cwd)
    assert api.returncode == 0, api.stderr
    assert api.stdout == run_script("sample.py", export, *SAMPLE_ARGS[0]).stdout


def assert_scores_without_tensorflow(venv, export, cwd):
    """The venv's keraslm-score prints what the checkout's score.py prints on a text file (onnx),
    and the same loss to 1e-5 on the litert backend."""
    text = cwd / "scored.txt"
    text.write_text(shakespeare()[:3000], encoding="utf-8")
    args = ("--text", text, "--batch-size", "2", "--bptt", "50")
    installed = run([venv / "bin" / "keraslm-score", export, *args], cwd=cwd)
    host = run_script("score.py", export, *args)
    assert installed.returncode == 0 and host.returncode == 0, installed.stderr + host.stderr
    assert installed.stdout == host.stdout and "loss " in installed.stdout
    litert = run([venv / "bin" / "keraslm-score", export, "--backend", "litert", *args], cwd=cwd)
    assert litert.returncode == 0, litert.stderr

    def loss(output):
        return float(next(line for line in output.splitlines() if line.startswith("loss ")).split()[1])

    assert abs(loss(litert.stdout) - loss(host.stdout)) <= 1e-5


def test_the_inference_only_venv_samples_as_sample_py_does(inference_venv, export, tmp_path):
    assert_samples_without_tensorflow(inference_venv, export, tmp_path)
    assert_scores_without_tensorflow(inference_venv, export, tmp_path)


@pytest.mark.slow
def test_the_documented_inference_install_from_the_registry(export, tmp_path):
    """requirements-inference.txt and `pip install --no-deps .`, as on a deploy machine; prints the venv's size."""
    venv = make_venv(tmp_path / "venv")
    pip_install(venv, "-r", ROOT / "requirements-inference.txt")
    pip_install(venv, "--no-deps", copy_sources(tmp_path / "source"))
    assert_samples_without_tensorflow(venv, export, tmp_path)
    assert_scores_without_tensorflow(venv, export, tmp_path)
    megabytes = int(run(["du", "-sm", venv], cwd=tmp_path).stdout.split()[0])
    print(f"inference-only venv: {megabytes} MB")
    # RESULTS.md "Install sizes" (182 MB before LiteRT), ai-edge-litert's 59 MB, and room for newer wheels.
    assert megabytes < 300
