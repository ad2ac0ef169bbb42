"""sample.py against what it cannot trust: a hostile TF Serving, a damaged keraslm.json, odd folders.

Every case runs sample.py as a user would and expects one error line, exit code 2, no traceback and
no text on stdout. The hostile server is a real HTTP server in a thread of this process; which way
it misbehaves is chosen by the model name in the request path (--model-name).
"""

import json
import os
import shutil
import ssl
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from conftest import error_lines, make_run, run_script

from keraslm.errors import UsageError
from keraslm.export import export_run
from keraslm.runtime import open_backend


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    base = tmp_path_factory.mktemp("hardening")
    version_dir, _ = export_run(str(make_run(base)), str(base / "models"), "lm")
    with open(os.path.join(version_dir, "assets.extra", "keraslm.json"), encoding="utf-8") as f:
        return version_dir, json.load(f)


def refused(result, message):
    """One error line holding `message`, exit code 2, no traceback and nothing on stdout."""
    lines = error_lines(result.stderr)
    assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr and "\x1b" not in result.stderr and result.stdout == ""


# --- a hostile TF Serving ---------------------------------------------------------------------------


def hostile_handler(description):
    """REST predict answers that are wrong in one way each, named by the model name in the path."""
    vocabulary_size = description["config"]["model"]["vocabulary_size"]
    states = description["states"]

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            batch, length = np.shape(request["inputs"]["tokens"])
            logits = np.zeros((batch, length, vocabulary_size))
            outputs = {s["output"]: np.zeros((batch, s["shape"][-1])).tolist() for s in states}
            case = self.path.removeprefix("/v1/models/").removesuffix(":predict")
            try:
                self.answer(case, logits, outputs, length)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up, as it should

        def answer(self, case, logits, outputs, length):
            if case == "missing":
                outputs.pop(states[0]["output"])
            elif case == "wide":
                logits = np.zeros(logits.shape[:2] + (logits.shape[2] + 1,))
            elif case == "nan" or (case == "nan-later" and length == 1):  # later: fine for the prompt
                logits[..., 3] = np.nan
            elif case == "infinite":
                logits[..., 3] = np.inf
            good = json.dumps({"outputs": {"logits": logits.tolist(), **outputs}}).encode()
            bodies = {
                "not-json": b"<html>\x1b[31mnot a model server</html>",
                "empty": b"{}",
                "unnamed": json.dumps({"outputs": logits.tolist()}).encode(),
                "strings": json.dumps({"outputs": {"logits": logits.astype(str).tolist(), **outputs}}).encode(),
                "ragged": json.dumps({"outputs": {"logits": [[[0.0], [0.0, 1.0]]], **outputs}}).encode(),
            }
            if case == "error":
                return self.send(500, json.dumps({"error": "\x1b[2Jwiped your terminal\nand a second line"}).encode())
            if case == "drip-headers":  # the status line and headers, one byte at a time
                for byte in f"HTTP/1.1 200 OK\r\nContent-Length: {len(good)}\r\n\r\n".encode():
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(0.1)
                return self.wfile.write(good)
            if case == "drip":  # a valid answer, one byte every 0.1 s: no single read ever waits 2 s
                self.send(200, b"", length=len(good))
                for byte in good:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(0.1)
            if case == "huge":  # gigabytes announced, and sent as fast as the client reads them
                self.send(200, b"", length=10**10)
                while True:
                    self.wfile.write(b" " * 65536)
            self.send(200, bodies.get(case, good))

        def send(self, status, data, length=None):
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data) if length is None else length))
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()

        def log_message(self, *args):
            pass

    return Handler


@pytest.fixture(scope="module")
def hostile_server(export):
    _, description = export
    server = ThreadingHTTPServer(("127.0.0.1", 0), hostile_handler(description))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def sample_from(version_dir, server, case, *args, env=None):
    return run_script(
        *("sample.py", version_dir, "--backend", "tf-serving", "--server", server, "--model-name", case),
        *("--prompt", "ROMEO:", "--num-tokens", "5", *args),
        env=env,
        timeout=60,
    )


@pytest.mark.parametrize("case", ["drip", "drip-headers"])
def test_a_server_that_drips_its_answer_is_cut_off_at_the_timeout(export, hostile_server, case):
    version_dir, _ = export
    start = time.monotonic()
    result = sample_from(version_dir, hostile_server, case, "--timeout", "2")
    elapsed = time.monotonic() - start
    refused(result, "sent no complete answer within 2 s (--timeout)")
    assert elapsed < 15, elapsed


@pytest.mark.parametrize(
    "case, message",
    [
        ("not-json", "not JSON"),
        ("empty", 'no "outputs"'),
        ("unnamed", "single unnamed output"),
        ("missing", "returned no h0_out"),
        ("wide", "returned logits of shape (1, 6, "),
        ("nan", "logits holding NaN"),
        ("infinite", "logits holding NaN or infinite"),
        ("nan-later", "logits holding NaN"),  # the check runs on every generated token, not just the prompt
        ("strings", "returned logits holding something other than numbers (<U"),
        ("ragged", "not a rectangular array"),
        ("huge", "sent more than"),
        ("error", "answered 500: ?[2Jwiped your terminal"),
    ],
)
def test_a_bad_answer_is_one_line_naming_the_server(export, hostile_server, case, message):
    version_dir, _ = export
    result = sample_from(version_dir, hostile_server, case)
    refused(result, message)
    assert "TF Serving at http://127.0.0.1:" in result.stderr


def test_https_checks_the_certificate_and_keeps_the_deadline(export, tmp_path):
    version_dir, description = export
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        + ["-keyout", key, "-out", cert, "-days", "1", "-subj", "/CN=127.0.0.1"]
        + ["-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )
    server = ThreadingHTTPServer(("127.0.0.1", 0), hostile_handler(description))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"https://127.0.0.1:{server.server_port}"
    try:
        refused(sample_from(version_dir, url, "lm"), "CERTIFICATE_VERIFY_FAILED")  # a self-signed certificate
        trusted = {"SSL_CERT_FILE": str(cert)}
        good = sample_from(version_dir, url, "lm", env=trusted)
        assert good.returncode == 0 and good.stdout.startswith("ROMEO:"), good.stderr
        refused(sample_from(version_dir, url, "drip", "--timeout", "2", env=trusted), "no complete answer within 2 s")
    finally:
        server.shutdown()
        server.server_close()


def test_a_local_model_returning_nan_is_one_error_naming_the_model_file(export):
    version_dir, _ = export
    backend = open_backend(version_dir)
    state = {name: np.full_like(value, np.nan) for name, value in backend.initial_state(1).items()}
    with pytest.raises(UsageError, match="model.onnx returned logits holding NaN"):
        backend.step([[1, 2]], state)


# --- a damaged export -----------------------------------------------------------------------------


def damaged_copy(export, tmp_path, edit):
    """A copy of the export whose keraslm.json `edit(description)` has changed."""
    version_dir, description = export
    copy = tmp_path / "lm" / "1"
    shutil.copytree(version_dir, copy)
    description = json.loads(json.dumps(description))
    edit(description)
    (copy / "assets.extra" / "keraslm.json").write_text(json.dumps(description), encoding="utf-8")
    return copy


def set_states(states):
    return lambda description: description.update(states=states)


def set_shape(shape):
    return lambda description: description["states"][0].update(shape=shape)


def rename_first_state(description):
    description["states"][0]["input"] = "h9_in"


def widen(description):
    description["config"]["model"]["hidden_dim"] = 17
    for s in description["states"]:
        s["shape"] = [None, 17]


@pytest.mark.parametrize(
    "edit, message",
    [
        (set_states(5), "is damaged (states must be a non-empty list"),
        (set_states([]), "is damaged (states must be a non-empty list"),
        (set_states([{}]), "is damaged (every state needs an input and an output name"),
        (set_shape(["x"]), "is damaged (state 'h0_in' has shape ['x']"),
        (set_shape([None, 10**12]), "is damaged (state 'h0_in' has shape [None, 1000000000000]"),
        (set_shape([None, True]), "is damaged (state 'h0_in' has shape"),
        (lambda d: d["states"][1].update(input="h0_in"), "is damaged (state names repeat"),
        (lambda d: d.pop("states"), "is damaged ('states')"),
        (rename_first_state, "model.onnx does not match keraslm.json (inputs: missing ['h9_in']"),
        (widen, "model.onnx: h0_in is 16 wide but keraslm.json says 17"),
    ],
)
def test_a_damaged_states_entry_is_one_line(export, tmp_path, edit, message):
    result = run_script("sample.py", damaged_copy(export, tmp_path, edit), "--num-tokens", "5", timeout=60)
    refused(result, message)
    assert "export the run again" in result.stderr


@pytest.mark.parametrize("path", ["../../../../etc/passwd", "..", "", 5, "/etc/passwd"])
def test_an_int8_path_outside_the_export_is_refused(export, tmp_path, path):
    copy = damaged_copy(export, tmp_path, lambda d: d["onnx_int8"].update(path=path))
    result = run_script("sample.py", copy, "--int8", "--num-tokens", "5", timeout=60)
    refused(result, "keraslm.json names a model file outside the export")


def test_an_int8_model_that_links_outside_the_export_is_refused(export, tmp_path):
    copy = damaged_copy(export, tmp_path, lambda d: None)
    outside = tmp_path / "outside.onnx"
    os.replace(copy / "assets.extra" / "model.int8.onnx", outside)
    os.symlink(outside, copy / "assets.extra" / "model.int8.onnx")
    refused(run_script("sample.py", copy, "--int8", timeout=60), "names a model file outside the export")


# --- a model base with folders that are no versions -----------------------------------------------


def test_the_newest_real_version_is_used_beside_folders_that_are_no_versions(export, tmp_path):
    version_dir, _ = export
    base = tmp_path / "lm"
    shutil.copytree(version_dir, base / "10")
    for name in ("2", "²", "99999999999999999999", "v11"):  # "2" is older and empty: used, it would fail
        (base / name).mkdir()
    result = run_script("sample.py", base, "--num-tokens", "5", "--prompt", "A", timeout=60)
    assert result.returncode == 0 and result.stdout.startswith("A"), result.stderr

    only_odd = tmp_path / "odd"
    (only_odd / "²").mkdir(parents=True)
    refused(run_script("sample.py", only_odd, timeout=60), "neither a keraslm export")
