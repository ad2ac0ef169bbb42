"""Runs, exports and outputs that no race, kill, odd path or full disk can damage (issue #14).

Each case runs the real script as a user would and checks the exit code, the one line on stderr
and the files left behind.
"""

import fcntl
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT, assert_one_line_error, error_lines, make_run, run_script, shakespeare

from keraslm import locks
from keraslm.cli import message
from keraslm.config import DataConfig, RunConfig
from keraslm.errors import UsageError
from keraslm.files import remove_stale_temporaries
from keraslm.versions import MAX_VERSION, versions

SMALL = ["--hidden-dim", "16", "--embedding-dim", "8", "--sample-tokens", "0", "--batch-size", "4", "--bptt", "10"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny run and its export: (run_dir, model base)."""
    from keraslm.export import export_run

    base = tmp_path_factory.mktemp("boundaries")
    run_dir = make_run(base, hidden_dim=16)
    export_run(str(run_dir), str(base / "models"), "lm")
    return run_dir, base / "models" / "lm"


def file_size_limit(size):
    """preexec_fn for a child whose writes past `size` bytes fail with EFBIG, as on a full disk."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))


def snapshot(directory):
    """{relative path: (size, mtime)} of every file below `directory`."""
    return {
        str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in Path(directory).rglob("*")
        if p.is_file()
    }


# --out


def test_out_writes_through_links_pipes_and_devices_and_never_replaces_them(tmp_path, exported):
    _, base = exported
    real = tmp_path / "real.txt"
    real.write_text("old")
    (tmp_path / "link").symlink_to(real)
    result = run_script("sample.py", base, "--num-tokens", "5", "--out", tmp_path / "link")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "link").is_symlink() and real.read_text() == result.stdout
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_text()))
    reader.start()
    result = run_script("sample.py", base, "--num-tokens", "5", "--out", fifo)
    reader.join(timeout=30)
    assert result.returncode == 0, result.stderr
    assert received == [result.stdout] and fifo.is_fifo()
    assert run_script("sample.py", base, "--num-tokens", "5", "--out", os.devnull).returncode == 0
    assert Path(os.devnull).is_char_device()


def test_a_bad_out_is_refused_before_any_work(tmp_path, exported):
    _, base = exported
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    cases = [
        (tmp_path / "missing" / "x.txt", "folder does not exist"),
        (tmp_path, "is a directory"),
        (tmp_path / "loop", "symbolic links"),
        ("/proc/keraslm.txt", "cannot write"),  # unwritable even for root
    ]
    for out, fragment in cases:
        # The model does not exist either: the --out error comes first, before anything is loaded.
        result = run_script("sample.py", tmp_path / "no-model", "--out", out)
        assert_one_line_error(result, "--out", fragment)
    # A device that fails when written: the sample is not half-written anywhere, and one line.
    assert_one_line_error(run_script("sample.py", base, "--out", "/dev/full"), "No space left")
    result = run_script("sample.py", base, "--out", tmp_path / "x.txt", preexec_fn=file_size_limit(100))
    assert_one_line_error(result, "File too large")
    assert sorted(os.listdir(tmp_path)) == ["loop"]


def test_a_reader_that_stops_early_loses_nothing(tmp_path, exported):
    _, base = exported
    out = tmp_path / "samples.txt"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    # More than a pipe holds (64 KiB), so that the print meets the closed pipe.
    command = [sys.executable, "sample.py", base, "--num-samples", "16", "--num-tokens", "8000", "--out", out]
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.read(10)  # `| head -c 10`
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141 and error_lines(stderr) == []
    assert len(out.read_text()) >= 16 * 8000


def start_streaming(base):
    proc = subprocess.Popen(
        [sys.executable, "sample.py", base, "--stream", "--num-tokens", "100000000"],
        cwd=ROOT,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    proc.stdout.read(50)  # generating now
    return proc


def test_interrupts_exit_130_with_a_message_however_many_arrive(exported):
    _, base = exported
    proc = start_streaming(base)
    proc.send_signal(signal.SIGINT)
    stderr = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130 and error_lines(stderr) == ["sample.py: interrupted"], stderr
    proc = start_streaming(base)
    for _ in range(3):
        proc.send_signal(signal.SIGTERM)
    stderr = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr


def test_generations_that_cannot_fit_in_memory_are_refused(exported):
    _, base = exported
    assert_one_line_error(run_script("sample.py", base, "--num-samples", str(10**9)), "memory", "fewer samples")
    assert_one_line_error(run_script("sample.py", base, "--num-tokens", str(10**12)), "memory", "fewer tokens")


# Exports


def version_watcher(version_dir, stop):
    """Poll as TF Serving's file-system source does; return the moments the version was missing."""
    missing = []

    def watch():
        while not stop.is_set():
            if not (version_dir / "saved_model.pb").exists():
                missing.append(time.monotonic())

    thread = threading.Thread(target=watch)
    thread.start()
    return thread, missing


def test_overwrite_swaps_versions_in_one_step_and_a_killed_export_is_cleaned_up(tmp_path, exported):
    run_dir, exported_base = exported
    base = tmp_path / "lm"
    shutil.copytree(exported_base, base)
    before = (base / "1" / "saved_model.pb").stat().st_mtime_ns
    stop = threading.Event()
    thread, missing = version_watcher(base / "1", stop)
    result = run_script("export.py", run_dir, "--out", tmp_path, "--name", "lm", "--version", "1", "--overwrite")
    stop.set()
    thread.join()
    assert result.returncode == 0, result.stderr
    assert missing == [] and (base / "1" / "saved_model.pb").stat().st_mtime_ns != before
    assert sorted(os.listdir(base)) == ["1"]

    # Killed mid-export: version 1 stays whole; the workspace is left behind ...
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    command = [sys.executable, "export.py", run_dir, "--out", tmp_path, "--name", "lm", "--version", "1", "--overwrite"]
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
    while not [n for n in os.listdir(base) if n.startswith(".export-")] and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(1)
    proc.kill()
    proc.wait()
    orphans = [n for n in os.listdir(base) if n.startswith(".export-")]
    assert orphans and (base / "1" / "saved_model.pb").exists()
    # ... and removed by the next export, which keeps one that a running export holds and a
    # user's folder of a similar name.
    (base / ".export-mine").mkdir()
    busy = base / ".export-busy0000"
    busy.mkdir()
    holder = os.open(busy, os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        assert run_script("export.py", run_dir, "--out", tmp_path, "--name", "lm").returncode == 0
    finally:
        os.close(holder)
    assert sorted(os.listdir(base)) == [".export-busy0000", ".export-mine", "1", "2"]


def test_a_full_disk_stops_an_export_with_one_line_and_nothing_published(tmp_path, exported):
    run_dir, _ = exported
    result = run_script("export.py", run_dir, "--out", tmp_path, "--name", "lm", preexec_fn=file_size_limit(50_000))
    assert_one_line_error(result, "cannot write the export", "File too large")
    assert os.listdir(tmp_path / "lm") == []


def test_version_numbers_are_those_tf_serving_reads(tmp_path, exported):
    from keraslm.export import export_run
    from keraslm.export.publish import next_version

    run_dir, _ = exported
    for name in ("7", "²", "99999999999999999999", "0012", "x3"):
        (tmp_path / name).mkdir()
    assert versions(tmp_path) == {7: "7", 12: "0012"} and next_version(tmp_path) == 13
    (tmp_path / str(MAX_VERSION)).mkdir()
    with pytest.raises(UsageError, match="2\\^63 - 1"):
        next_version(tmp_path)
    for version in (0, MAX_VERSION + 1):
        with pytest.raises(UsageError, match="^version must be in") as refused:
            export_run(str(run_dir), str(tmp_path), "lm", version=version)
        assert message(refused.value).startswith("--version must be in")


# Run directories


def test_one_training_per_run_directory(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(shakespeare()[:20_000])
    run_dir = tmp_path / "run"
    with locks.locked_directory(str(run_dir)):
        result = run_script("train.py", "--data", corpus, "--run-dir", run_dir, *SMALL)
    assert_one_line_error(result, "in use by pid", str(os.getpid()))
    assert not run_dir.exists()  # the holder made it, found it empty, and removed it again

    # Two trainings started together: one runs, the other is refused, and the files agree.
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    procs = []
    for cell in ("lstm", "gru"):
        args = ["train.py", "--data", corpus, "--run-dir", run_dir, "--cell", cell, "--epochs", "1", *SMALL]
        procs.append(subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, env=env, stderr=subprocess.PIPE))
        time.sleep(0.5)
    codes = [p.wait(timeout=300) for p in procs]
    assert sorted(codes) == [0, 2], codes
    winner = ("lstm", "gru")[codes.index(0)]
    assert f'"cell": "{winner}"' in (run_dir / "config.json").read_text()
    loser_stderr = procs[codes.index(2)].stderr.read().decode()
    assert any(m in loser_stderr for m in ("in use by", "already holds a run")), loser_stderr
    result = run_script("export.py", run_dir, "--out", tmp_path / "models")
    assert result.returncode == 0, result.stderr


def test_run_directories_that_cannot_be_one_are_refused(tmp_path):
    from keraslm.training import train

    (tmp_path / "file").write_text("x")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("to be or not to be\n" * 500)
    config = RunConfig(data=DataConfig(source=str(corpus)))
    for run_dir, fragment in [
        (tmp_path / "file", "is a file"),
        (tmp_path / "loop", "symbolic link"),
        ("/proc/keraslm-run", "cannot write"),
    ]:
        with pytest.raises(UsageError, match=fragment):
            train(config, str(run_dir))
    before = snapshot(tmp_path)
    # A disk that fills while the first checkpoint is written: one line; what was written stays.
    result = run_script(
        "train.py", "--data", corpus, "--run-dir", tmp_path / "run", *SMALL, preexec_fn=file_size_limit(20_000)
    )
    assert_one_line_error(result, "checkpoint.keras", "File too large")
    assert not [n for n in os.listdir(tmp_path / "run") if n.startswith(".")]
    assert all(snapshot(tmp_path)[k] == v for k, v in before.items())


def test_only_the_projects_own_temporaries_count_as_stale(tmp_path):
    mine = [".config.json.abcd_123.tmp.json", ".checkpoint.keras.0a1b2c3d.tmp.keras"]
    users = [".notes.tmp", ".config.json.tmp.bak", ".config.json.toolong12.tmp.json.bak", "a.tmp"]
    for name in mine + users:
        (tmp_path / name).write_text("x")
    (tmp_path / ".model.keras.abcdefgh.tmp.keras").mkdir()  # a folder never is a temporary file
    remove_stale_temporaries(tmp_path, ["config.json", "checkpoint.keras", "model.keras"])
    assert sorted(os.listdir(tmp_path)) == sorted(users + [".model.keras.abcdefgh.tmp.keras"])
