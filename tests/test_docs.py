"""Every command in README.md and docs/*.md is checked, so the docs cannot go stale.

Each command of a ```bash block falls in a group, or test_every_command_is_checked fails (so a new
command nobody checks fails too):

- keraslm's own commands (train.py, export.py, sample.py, score.py, keraslm-train/-export/-sample/-score) are parsed
  by the real parser of keraslm.commands.X, every flag spelled in full: a renamed or removed flag
  fails;
- pip lines name requirement files that exist;
- the README's train → export → sample block runs for real, on a tiny model, in a temporary folder;
- commands that talk to TF Serving on localhost run for real against tests/tf_serving_double.py (the
  export served the way TF Serving loads it), with its address put in place of localhost's;
- a few commands run for real on the README block's export (RUN_ON_THE_EXPORT);
- commands that cannot run here are listed in COVERED_ELSEWHERE with the test that covers what
  they do.

Paths in commands that name repository files must exist, and so must the files the docs link to.
Python blocks run too (docs/python-api.md's own test runs that page's example).
"""

import importlib
import json
import os
import re
import shlex
import subprocess
import sys

import pytest
from conftest import ROOT, tf_serving_double

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SCRIPTS = {"train.py": "train", "export.py": "export", "sample.py": "sample", "score.py": "score"}
CONSOLE_SCRIPTS = {f"keraslm-{module}": module for module in SCRIPTS.values()}
OPERATORS = {"&&", "||", ";", "|"}
# Folders the commands write into: paths under them are outputs, not repository files.
OUTPUT_FOLDERS = {"runs", "saved_models"}

# Appended to the README's train command when this test runs it: a tiny model on two windows, so the
# block runs in seconds; everything else in the block runs as written.
SMALL_MODEL = [
    "--dry-run", "--epochs", "1", "--num-layers", "1", "--embedding-dim", "8", "--hidden-dim", "16",
    "--batch-size", "4", "--bptt", "16", "--sample-tokens", "10",
]  # fmt: skip

# Commands that run for real on the export the README block made (they are quick).
RUN_ON_THE_EXPORT = [("python", "-m", "keraslm.serving")]

# Commands this file does not run, each with why and the test that covers what it does.
COVERED_ELSEWHERE = {
    ("docker", "run"): (
        "no Docker engine and no TF Serving binary here; the export is served the way TF Serving loads"
        " it by tests/tf_serving_double.py, which this file's stand-in tests use too",
        "tests/test_sample.py::test_tf_serving_rest_and_grpc_against_a_session_loaded_double",
    ),
    ("saved_model_cli", "run"): (
        "TensorFlow's own CLI, run on test exports of every cell",
        "tests/test_serving_loader.py::test_saved_model_cli_runs_every_signature",
    ),
    ("saved_model_cli", "show"): (
        "lists what saved_model_cli run reads; every signature is run through it",
        "tests/test_serving_loader.py::test_saved_model_cli_runs_every_signature",
    ),
    ("npm", "install", "--prefix", "tests/node"): (
        "installs onnxruntime-node from the npm registry; the slow test runs npm install --ignore-scripts"
        " in a copy of tests/node",
        "tests/test_node_client.py::test_node_greedy_text_matches_sample_py",
    ),
    ("node", "tests/node/greedy.mjs"): (
        "needs the npm install above; the slow test runs it on char and word exports against sample.py",
        "tests/test_node_client.py::test_node_greedy_text_matches_sample_py",
    ),
    ("python", "-m", "pytest"): ("the test suite itself: CI runs the README's test command as written", ".ci/run"),
}


def bash_blocks(path):
    """The ```bash blocks of a markdown file."""
    return re.findall(r"^```bash\n(.*?)^```", path.read_text(encoding="utf-8"), re.M | re.S)


def python_blocks(path):
    """The ```python blocks of a markdown file."""
    return re.findall(r"^```python\n(.*?)^```", path.read_text(encoding="utf-8"), re.M | re.S)


def logical_lines(block):
    """A bash block's lines as bash reads them: `\\` continuations joined, and a line whose quote is
    still open continued by the next."""
    lines, pending = [], ""
    for line in block.replace("\\\n", " ").splitlines():
        pending = f"{pending}\n{line}" if pending else line
        try:
            shlex.split(pending, comments=True)
        except ValueError:  # no closing quotation yet
            continue
        lines.append(pending)
        pending = ""
    assert not pending, f"unclosed quote in a bash block: {pending!r}"
    return lines


def commands(block):
    """The simple commands of a bash block, as word lists: `#` comments dropped, split at `&&`,
    `||`, `;` and `|`, leading `VAR=value` assignments removed."""
    found = []
    for line in logical_lines(block):
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words = []
        for token in [*lexer, ";"]:
            if token in OPERATORS:
                while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0], re.S):
                    words.pop(0)
                if words:
                    found.append(words)
                words = []
            else:
                words.append(token)
    return found


def all_commands():
    """(file name, command) for every command of every bash block in the docs."""
    return [(doc_name(path), c) for path in DOCS for block in bash_blocks(path) for c in commands(block)]


def doc_name(path):
    return path.relative_to(ROOT).as_posix()


def keraslm_command(words):
    """(module name, argv) if `words` is one of keraslm's commands, else None."""
    if words[0] in CONSOLE_SCRIPTS:
        return CONSOLE_SCRIPTS[words[0]], words[1:]
    if words[0] == "python" and len(words) > 1 and words[1] in SCRIPTS:
        return SCRIPTS[words[1]], words[2:]
    return None


def talks_to_localhost(words):
    return any("localhost:85" in word for word in words)


def starts_with(words, prefix):
    return tuple(words[: len(prefix)]) == prefix


def group(words):
    """The group a command is checked by, or None if nothing checks it."""
    if talks_to_localhost(words):
        return "stand-in"
    if keraslm_command(words):
        return "parser"
    if words[:2] == ["pip", "install"]:
        return "pip"
    if any(starts_with(words, prefix) for prefix in RUN_ON_THE_EXPORT):
        return "on the export"
    if any(starts_with(words, prefix) for prefix in COVERED_ELSEWHERE):
        return "covered elsewhere"
    return None


def ids(cases):
    return [f"{name}: {' '.join(words)[:60]}" for name, words in cases]


COMMANDS = all_commands()


def test_the_docs_have_commands_to_check():
    assert len(DOCS) > 1 and COMMANDS, "README.md and docs/*.md should hold bash blocks"


@pytest.mark.parametrize("name, words", COMMANDS, ids=ids(COMMANDS))
def test_every_command_is_checked(name, words):
    assert group(words), f"{name}: nothing checks {' '.join(words)!r}: give it a group in tests/test_docs.py"


PARSED = [(name, words) for name, words in COMMANDS if keraslm_command(words)]


@pytest.mark.parametrize("name, words", PARSED, ids=ids(PARSED))
def test_keraslm_commands_parse(name, words, capsys):
    module, argv = keraslm_command(words)
    parse_args = importlib.import_module(f"keraslm.commands.{module}").parse_args
    try:
        parse_args(argv)
    except SystemExit:
        pytest.fail(f"{name}: {' '.join(words)!r} does not parse: {capsys.readouterr().err.strip()}")
    # argparse takes an unambiguous prefix of a flag, so the docs must spell each flag in full.
    flags = options(module, capsys)
    shortened = [w for w in argv if w.startswith("--") and w.split("=")[0] not in flags]
    assert not shortened, f"{name}: {' '.join(words)!r} abbreviates {shortened}; spell the flags as --help does"


def options(module, capsys):
    """The flags keraslm.commands.<module>'s parser defines, read from its --help."""
    with pytest.raises(SystemExit):
        importlib.import_module(f"keraslm.commands.{module}").parse_args(["--help"])
    return set(re.findall(r"--[a-z0-9][a-z0-9-]*", capsys.readouterr().out))


def repository_path(word):
    """The repository file a word names (the part after `=` or `,` too), or None: a path is one when
    its first folder is a top-level entry of the repository other than an output folder."""
    for piece in re.split(r"[=,]", word):
        first = piece.split("/")[0]
        if first and first not in OUTPUT_FOLDERS and first not in (".", "..") and (ROOT / first).exists():
            return piece
    return None


@pytest.mark.parametrize("name, words", COMMANDS, ids=ids(COMMANDS))
def test_paths_to_repository_files_exist(name, words):
    missing = [p for p in map(repository_path, words) if p and not (ROOT / p).exists()]
    assert not missing, f"{name}: {' '.join(words)!r} names files the repository lacks: {missing}"


PIP = [(name, words) for name, words in COMMANDS if group(words) == "pip"]


@pytest.mark.parametrize("name, words", PIP, ids=ids(PIP))
def test_pip_lines_install_files_that_exist(name, words):
    arguments = words[2:]
    for i, word in enumerate(arguments):
        if word == "-r":
            assert (ROOT / arguments[i + 1]).is_file(), f"{name}: {arguments[i + 1]} does not exist"
        elif not word.startswith("-") and arguments[i - 1 : i] != ["-r"]:
            assert word == ".", f"{name}: pip installs {word!r}; the docs install the repository or its requirements"


@pytest.mark.parametrize("prefix", list(COVERED_ELSEWHERE), ids=[" ".join(p) for p in COVERED_ELSEWHERE])
def test_the_covering_tests_exist(prefix):
    _, test = COVERED_ELSEWHERE[prefix]
    path, _, function = test.partition("::")
    assert (ROOT / path).is_file(), f"{path} does not exist"
    if function:
        assert f"def {function}(" in (ROOT / path).read_text(encoding="utf-8"), f"{test} does not exist"


FENCE_LANGUAGES = {"", "bash", "python", "text"}


@pytest.mark.parametrize("path", DOCS, ids=[p.name for p in DOCS])
def test_code_blocks_are_bash_python_or_text(path):
    """A command in a ```sh or ```console block would escape this check."""
    languages = set(re.findall(r"^```(\S*)", path.read_text(encoding="utf-8"), re.M))
    assert languages <= FENCE_LANGUAGES, f"{path.name}: code blocks in {languages - FENCE_LANGUAGES}"


def links(path):
    """The relative link targets of a markdown file (no URLs, no anchors)."""
    targets = re.findall(r"\]\(([^)\s]+)\)", path.read_text(encoding="utf-8"))
    return [t.split("#")[0] for t in targets if not re.match(r"[a-z]+:", t) and not t.startswith("#")]


@pytest.mark.parametrize("path", DOCS, ids=[p.name for p in DOCS])
def test_links_point_at_files(path):
    missing = [t for t in links(path) if not (path.parent / t).exists()]
    assert not missing, f"{path.name} links to missing files: {missing}"


# --- what runs for real ----------------------------------------------------------------------


def the_readme_block():
    """The README's bash block that trains, exports and samples."""
    for block in bash_blocks(ROOT / "README.md"):
        found = commands(block)
        if any(keraslm_command(c) and keraslm_command(c)[0] == "export" for c in found):
            return found
    pytest.fail("README.md has no bash block with an export command")


def environment(folder):
    """The environment the docs' commands run in: the repository importable, TFDS's data in
    `folder` (so the default corpus is prepared as on a fresh machine), TensorFlow quiet."""
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "TFDS_DATA_DIR": str(folder / "tensorflow_datasets"),
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "PYTHONUNBUFFERED": "1",
    }


def as_run_here(words):
    """A docs command as this test runs it: this Python, the repository's scripts."""
    if words[0] == "python":
        words = [sys.executable, *[str(ROOT / w) if w in SCRIPTS else w for w in words[1:]]]
    return words


def run(words, folder, timeout=600):
    result = subprocess.run(
        as_run_here(words), cwd=folder, env=environment(folder), capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"{' '.join(words)!r} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def readme_folder(tmp_path_factory):
    """A folder in which the README's train → export → sample block has run (the train command with
    SMALL_MODEL appended; commands that need a server are run by the stand-in tests instead)."""
    folder = tmp_path_factory.mktemp("readme")
    for words in the_readme_block():
        if group(words) != "parser":
            continue
        module, _ = keraslm_command(words)
        run(words + SMALL_MODEL if module == "train" else words, folder)
    return folder


def test_the_readme_block_trains_exports_and_samples(readme_folder):
    exports = list((readme_folder / "saved_models").glob("*/1/assets.extra/model.onnx"))
    assert exports, "the README block made no export"


ON_THE_EXPORT = [(name, words) for name, words in COMMANDS if group(words) == "on the export"]


@pytest.mark.parametrize("name, words", ON_THE_EXPORT, ids=ids(ON_THE_EXPORT))
def test_commands_run_on_the_readme_export(name, words, readme_folder):
    run(words, readme_folder)


@pytest.fixture(scope="module")
def stand_in(readme_folder):
    """The README's export served by the TF Serving stand-in, under the name the docs give it."""
    (version_dir,) = (readme_folder / "saved_models").glob("*/1")
    with tf_serving_double(version_dir, model_name=version_dir.parent.name) as (rest, grpc, _):
        yield {"http://localhost:8501": rest, "localhost:8501": rest, "grpc://localhost:8500": grpc}, grpc


def served_here(text, addresses):
    """`text` with localhost's TF Serving ports replaced by the stand-in's."""
    for local, here in addresses.items():
        text = text.replace(local, here)
    return text.replace("localhost:8500", addresses["grpc://localhost:8500"].removeprefix("grpc://"))


STAND_IN = [(name, words) for name, words in COMMANDS if group(words) == "stand-in"]


@pytest.mark.parametrize("name, words", STAND_IN, ids=ids(STAND_IN))
def test_commands_against_tf_serving_run_against_the_stand_in(name, words, readme_folder, stand_in):
    addresses, _ = stand_in
    result = run([served_here(w, addresses) for w in words], readme_folder, timeout=120)
    if words[0] == "curl":
        assert "error" not in json.loads(result.stdout), result.stdout


PYTHON = [(doc_name(path), block) for path in DOCS for block in python_blocks(path)]
PYTHON = [(name, block) for name, block in PYTHON if name != "docs/python-api.md"]


@pytest.mark.parametrize("name, block", PYTHON, ids=[f"{n}: {b.splitlines()[0]}" for n, b in PYTHON])
def test_python_blocks_run(name, block, readme_folder, stand_in):
    addresses, _ = stand_in
    script = readme_folder / "block.py"
    script.write_text(served_here(block, addresses), encoding="utf-8")
    result = run(["python", str(script)], readme_folder, timeout=120)
    assert result.stdout.strip(), f"{name}: the block printed nothing"
