"""Inference backends behind one interface: `step(tokens, state) -> (logits, state)`.

    onnx        ONNX Runtime on assets.extra/model.onnx (no TensorFlow import: fast start),
                or on model.int8.onnx, its int8-weight twin (int8=True)
    litert      LiteRT (ai-edge-litert's interpreter, no TensorFlow import) on model.tflite,
                or on model.int8.tflite (int8=True)
    savedmodel  the SavedModel's serving_default signature (generate signature: generate_in_graph)
    keras       a run directory's model.keras
    tf-serving  a running TF Serving, REST (http://host:8501) or gRPC (grpc://host:8500), through
                serving_client.py, which owns the requests' deadlines and size caps

State is a dict of float32 arrays keyed by the step's input names (`h0_in`, `c0_in`, …); each
backend turns the step's `*_out` outputs into the next call's `*_in` inputs. TensorFlow is imported
only by the backends that need it, when they are chosen.

Backend.step checks both sides of every call, for every backend: the inputs (ONNX Runtime aborts
the process on some bad ones) and the outputs (a server, or a damaged model, can return anything;
only finite float32 logits [B, T, V] and states [B, H] reach the sampler).
"""

import contextlib
import json
import os
import sys

import numpy as np

from keraslm import artifacts, serving, serving_client
from keraslm.errors import ArgumentError, UsageError, first_line
from keraslm.versions import versions
from keraslm.vocab import Vocabulary

BACKENDS = ("onnx", "litert", "savedmodel", "keras", "tf-serving")


def resolve_model(path):
    """Classify MODEL: ("export", version_dir) or ("run", run_dir).

    A version directory holds assets.extra/keraslm.json; a model base directory holds integer
    version directories (the newest is used); a run directory holds config.json and model.keras.
    """
    if not os.path.isdir(path):
        raise UsageError(f"{path} is not a directory; give an exported model (saved_models/NAME) or a run directory")
    if os.path.exists(os.path.join(path, artifacts.EXTRA, artifacts.DESCRIPTION)):
        return "export", path
    found = versions(path)  # as TF Serving reads them: "²" or "v2" is no version
    if found:
        return resolve_model(os.path.join(path, found[max(found)]))
    if all(os.path.exists(os.path.join(path, name)) for name in (artifacts.CONFIG, artifacts.BEST_MODEL)):
        return "run", path
    raise UsageError(f"{path} is neither a keraslm export (saved_models/NAME[/VERSION]) nor a run directory")


def load_description(version_dir):
    """keraslm.json of an export, checked against the names the step function needs.

    Returns:
        (description, Vocabulary, states): the parsed file, its vocabulary, and its `states` list
        of {"input", "output", "shape": [null, H]}, one per recurrent state tensor.

    Raises:
        UsageError: the file is missing or damaged, naming it and the fix (export again).
    """
    path = os.path.join(version_dir, artifacts.EXTRA, artifacts.DESCRIPTION)
    try:
        with open(path, encoding="utf-8") as f:
            description = json.load(f)
        vocab = Vocabulary.from_dict(description["vocabulary"])
        states = description["states"]
        size = description["config"]["model"]["vocabulary_size"]
        problem = _states_problem(states, description["config"]["model"]["hidden_dim"])
    except (OSError, ValueError, KeyError, TypeError, RecursionError, UsageError) as e:
        problem = first_line(e)
    if problem:
        raise UsageError(f"{path} is damaged ({problem}); export the run again")
    if len(vocab) != size:
        raise UsageError(f"{path}: the vocabulary has {len(vocab)} tokens but the model {size} outputs; export again")
    return description, vocab, states


def _states_problem(states, hidden_dim):
    """What is wrong with keraslm.json's `states` entry, or None. Every backend sizes and names the
    state tensors from it, so a damaged entry would surface as a KeyError or a huge allocation."""
    if not isinstance(states, list) or not states:
        return f"states must be a non-empty list, got {type(states).__name__}"
    for s in states:
        if not (isinstance(s, dict) and isinstance(s.get("input"), str) and isinstance(s.get("output"), str)):
            return "every state needs an input and an output name"
        shape = s.get("shape")
        # `type(...) is int`: JSON true is a Python bool, which isinstance(…, int) accepts.
        if not (
            isinstance(shape, list)
            and len(shape) == 2
            and (shape[0] is None or type(shape[0]) is int)
            and type(shape[1]) is int
            and shape[1] == hidden_dim
        ):
            return f"state {s['input']!r} has shape {shape!r}, not [null, {hidden_dim}] (the model's hidden_dim)"
    names = ["tokens", "logits", *(s[key] for s in states for key in ("input", "output"))]
    if len(set(names)) != len(names):
        return "state names repeat (or reuse tokens or logits)"
    return None


def _model_file(version_dir, name):
    """The path of a model file keraslm.json names, which must lie inside the export's assets.extra:
    the file is loaded and run, so a name like "../../x" must not reach outside the export."""
    extra = os.path.join(version_dir, artifacts.EXTRA)
    real_extra = os.path.realpath(extra)
    real_path = os.path.realpath(os.path.join(extra, name)) if isinstance(name, str) else real_extra
    if real_path == real_extra or os.path.commonpath([real_extra, real_path]) != real_extra:
        raise UsageError(
            f"{os.path.join(extra, 'keraslm.json')} names a model file outside the export ({name!r});"
            " export the run again"
        )
    return os.path.join(extra, name)


def _check_output_size(path, size, vocab):
    if size != len(vocab):
        raise UsageError(
            f"{path}: the model has {size} outputs but keraslm.json's vocabulary {len(vocab)} tokens; export again"
        )


class Backend:
    """One model step on NumPy arrays. Subclasses implement `_run(inputs) -> outputs dict`.

    Attributes:
        vocab: the model's Vocabulary.
        states: the state descriptions from keraslm.json ({"input", "output", "shape"}).
        source: what runs the model, as error messages name it (a model file, a server).
        remedy: what to do when the source answers with something that is not the step's outputs.
    """

    def __init__(self, vocab, states, source, remedy="export the run again"):
        self.vocab = vocab
        self.states = states
        self.source = source
        self.remedy = remedy

    def initial_state(self, batch_size):
        """Zero state for a batch."""
        return {s["input"]: np.zeros((batch_size, s["shape"][-1]), np.float32) for s in self.states}

    def step(self, tokens, state):
        """Run tokens [B, T] from `state`; return logits [B, T, V] and the state after them (float32).

        Raises:
            UsageError: tokens not a non-empty [B, T] of ids in [0, V), or a state that is not
                [B, H] for each of the model's states: ONNX Runtime would wrap negative ids
                silently, and its LSTM and GRU kernels abort the process on an empty batch. Also
                when the model (or server) returns anything but finite numbers of those shapes:
                a NaN or a short row would otherwise reach the sampler and come out as garbage.
        """
        tokens = np.asarray(tokens)
        self._check_inputs(tokens, state)
        logits, next_state = self._step(tokens.astype(np.int32), state)
        batch, length = tokens.shape
        logits = self._checked_output("logits", logits, (batch, length, len(self.vocab)))
        return logits, {
            s["input"]: self._checked_output(s["output"], next_state[s["input"]], (batch, s["shape"][-1]))
            for s in self.states
        }

    def _step(self, tokens, state):
        outputs = self._run({"tokens": tokens, **state})
        missing = [name for name in ("logits", *(s["output"] for s in self.states)) if name not in outputs]
        if missing:
            raise UsageError(f"{self.source} returned no {', '.join(missing)}; {self.remedy}")
        return outputs["logits"], {s["input"]: outputs[s["output"]] for s in self.states}

    def _checked_output(self, name, value, shape):
        # Cheap enough for every token: a shape compare, a dtype look-up and one pass of isfinite.
        value = np.asarray(value)
        if value.shape != shape:
            problem = f"{name} of shape {value.shape} instead of {shape}"
        elif value.dtype.kind not in "fiu":  # JSON integers are numbers too; strings, objects, booleans are not
            problem = f"{name} holding something other than numbers ({value.dtype})"
        else:
            value = value.astype(np.float32, copy=False)
            if np.isfinite(value).all():  # after the cast: 1e300 is no float32
                return value
            problem = f"{name} holding NaN or infinite values"
        raise UsageError(f"{self.source} returned {problem}; {self.remedy}")

    def _check_inputs(self, tokens, state):
        size = len(self.vocab)
        if tokens.ndim != 2 or 0 in tokens.shape:
            raise UsageError(f"tokens must be a non-empty [batch, length] array, got shape {tokens.shape}")
        if tokens.dtype.kind not in "iu" or tokens.min() < 0 or tokens.max() >= size:
            raise UsageError(
                f"tokens must be integer ids in [0, {size}), got {tokens.dtype} in [{tokens.min()}, {tokens.max()}]"
            )
        for s in self.states:
            shape = (len(tokens), s["shape"][-1])
            value = state.get(s["input"])
            if value is None or np.shape(value) != shape:
                got = "nothing" if value is None else np.shape(value)
                raise UsageError(f"state {s['input']} must have shape {shape}, got {got}")

    def _run(self, inputs):
        raise NotImplementedError


class OnnxBackend(Backend):
    """ONNX Runtime on an export's assets.extra/model.onnx, or model.int8.onnx with `int8`."""

    def __init__(self, version_dir, int8=False):
        import onnxruntime

        description, vocab, states = load_description(version_dir)
        name = artifacts.ONNX
        if int8:
            if "onnx_int8" not in description:
                raise UsageError(f"{version_dir} has no int8 model (exported before keraslm wrote one); export again")
            name = description["onnx_int8"].get("path") if isinstance(description["onnx_int8"], dict) else None
        path = _model_file(version_dir, name)
        super().__init__(vocab, states, path)
        try:
            self.session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own Fail / InvalidProtobuf types
            raise UsageError(f"{path} cannot be loaded ({first_line(e)}); export the run again") from None
        shapes = {"inputs": {i.name: i.shape for i in self.session.get_inputs()}}
        shapes["outputs"] = {o.name: o.shape for o in self.session.get_outputs()}
        _check_step_signature(path, shapes, states)
        self.output_names = [o.name for o in self.session.get_outputs()]
        logits = {o.name: o.shape for o in self.session.get_outputs()}["logits"]
        _check_output_size(path, logits[-1] if logits else None, vocab)

    def _run(self, inputs):
        return dict(zip(self.output_names, self.session.run(self.output_names, inputs), strict=True))


def _check_step_signature(path, shapes, states):
    """The model file must be the step keraslm.json describes: tokens and the state inputs in,
    logits and the state outputs out, each state as wide as its entry says (the runtime would
    refuse a feed it does not expect with an error of its own).

    Args:
        shapes: {"inputs": {name: shape}, "outputs": {name: shape}} as the runtime reports them.
    """
    for kind, key, first in (("inputs", "input", "tokens"), ("outputs", "output", "logits")):
        expected = {first, *(s[key] for s in states)}
        if set(shapes[kind]) != expected:
            missing, unexpected = sorted(expected - set(shapes[kind])), sorted(set(shapes[kind]) - expected)
            raise UsageError(
                f"{path} does not match keraslm.json ({kind}: missing {missing}, unexpected {unexpected});"
                " export the run again"
            )
        for s in states:
            width = (shapes[kind][s[key]] or [None])[-1]  # an int, or a name or None for a dynamic size
            if isinstance(width, int) and width != s["shape"][-1]:
                raise UsageError(
                    f"{path}: {s[key]} is {width} wide but keraslm.json says {s['shape'][-1]}; export the run again"
                )


class LiteRtBackend(Backend):
    """LiteRT on an export's assets.extra/model.tflite, or model.int8.tflite with `int8`: its
    `serving_default` signature runner, which resizes its inputs to each call's batch and length."""

    def __init__(self, version_dir, int8=False):
        from ai_edge_litert.interpreter import Interpreter

        _, vocab, states = load_description(version_dir)
        path = _model_file(version_dir, artifacts.INT8_LITERT if int8 else artifacts.LITERT)
        super().__init__(vocab, states, path)
        if not os.path.isfile(path):
            raise UsageError(
                f"{version_dir} has no {os.path.basename(path)} (exported before keraslm wrote one); export again"
            )
        try:
            self.runner = Interpreter(model_path=path).get_signature_runner(serving.STEP_SIGNATURE)
            details = {"inputs": self.runner.get_input_details(), "outputs": self.runner.get_output_details()}
        except Exception as e:  # LiteRT raises ValueError or RuntimeError on a damaged file
            raise UsageError(f"{path} cannot be loaded ({first_line(e)}); export the run again") from None
        shapes = {k: {name: [int(n) for n in d["shape_signature"]] for name, d in details[k].items()} for k in details}
        _check_step_signature(path, shapes, states)
        _check_output_size(path, (shapes["outputs"]["logits"] or [None])[-1], vocab)
        # LiteRT's native code prints "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." on
        # its first run, past Python's sys.stderr: run one token now with that stream closed, so a
        # user's output (and its pipe) holds only what keraslm says.
        with native_stderr_silenced():
            self.step(np.zeros((1, 1), np.int32), self.initial_state(1))

    def _run(self, inputs):
        try:
            return self.runner(**inputs)
        except (ValueError, RuntimeError) as e:
            raise UsageError(f"LiteRT cannot run {self.source} ({first_line(e)}); export the run again") from None


@contextlib.contextmanager
def native_stderr_silenced():
    """File descriptor 2 points at os.devnull inside the block (native libraries write to it directly)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class SavedModelBackend(Backend):
    """The SavedModel's signatures, loaded as TF Serving loads them (see session_loader)."""

    def __init__(self, version_dir):
        _, vocab, states = load_description(version_dir)
        super().__init__(vocab, states, f"the SavedModel in {version_dir}")
        from keraslm.session_loader import SessionModel

        self.model = SessionModel(version_dir)
        _check_output_size(version_dir, self.model.output_specs(serving.STEP_SIGNATURE)["logits"][1][-1], vocab)

    def _run(self, inputs):
        return self._request(serving.STEP_SIGNATURE, inputs)

    def generate_in_graph(self, prompts, max_new_tokens, temperature, top_k, top_p, seed):
        """The `generate` signature: continuation texts and tokens, sampled inside the graph."""
        inputs = serving.generate_inputs(prompts, max_new_tokens, temperature, top_k, top_p, seed)
        out = self._request(serving.GENERATE_SIGNATURE, inputs)
        return [t.decode("utf-8") for t in out["text"]], out["tokens"]

    def _request(self, signature_name, inputs):
        from keraslm.session_loader import RequestError, ServingError

        try:
            return self.model.run(signature_name, inputs)
        except RequestError as e:
            raise UsageError(f"the SavedModel refused the request: {e}") from None
        except ServingError as e:
            raise UsageError(f"the SavedModel fails under TF Serving's loader ({e}); export the run again") from None


class KerasBackend(Backend):
    """A run directory's model.keras (checks a model before it is exported)."""

    def __init__(self, run_dir):
        from keraslm.model import keras_step
        from keraslm.runs import load_run
        from keraslm.states import input_name, output_name, state_names

        config, vocab, model = load_run(run_dir)
        hidden = config.model.hidden_dim
        states = [
            {"input": input_name(n), "output": output_name(n), "shape": [None, hidden]}
            for n in state_names(config.model)
        ]
        super().__init__(vocab, states, os.path.join(run_dir, artifacts.BEST_MODEL), "train the run again")
        # The model's own step, traced once per shape (see keras_step).
        self._step, _ = keras_step(model, config.model, batch_size=1)


class TFServingBackend(Backend):
    """A running TF Serving serving this export, over REST or gRPC (see serving_client).

    Args:
        version_dir: the local export, for its vocabulary and state names.
        server: the server's URL: http[s]://host:8501 (REST) or grpc://host:8500 (gRPC).
        model_name: the name TF Serving serves the model under.
        version: a version number, or None for the newest the server has.
        timeout: seconds for a whole request (connect, send, answer), however the server paces it.
    """

    def __init__(self, version_dir, server, model_name, version=None, timeout=10.0):
        _, vocab, states = load_description(version_dir)
        self.client = serving_client.TFServingClient(server, model_name, version, timeout)
        super().__init__(vocab, states, self.client.source, serving_client.REMEDY)

    def _run(self, inputs):
        # A generous cap on the answer: a number of the step's outputs takes ~15 bytes of JSON, or
        # ~40 pretty-printed one per line as TF Serving writes them; a larger answer is not the step's.
        batch, length = inputs["tokens"].shape
        numbers = batch * length * len(self.vocab) + sum(batch * s["shape"][-1] for s in self.states)
        return self.client.predict(serving.STEP_SIGNATURE, inputs, limit=64 * numbers + 2**20)


def open_backend(model, backend=None, server=None, model_name=None, version=None, timeout=10.0, int8=False):
    """The backend for MODEL (a version, model base or run directory); None picks onnx for an
    export and keras for a run directory. `int8` runs the onnx or litert backend's int8-weight model."""
    if backend is not None and backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    kind, path = resolve_model(model)
    backend = backend or ("onnx" if kind == "export" else "keras")
    if int8 and backend not in ("onnx", "litert"):
        raise ArgumentError(
            "{int8} is an onnx or litert backend model; the {backend_name} backend runs float32",
            backend_name=backend,
        )
    if backend == "keras":
        if kind != "run":
            raise UsageError(f"the keras backend needs a run directory (with model.keras); {model} is an export")
        return KerasBackend(path)
    if kind != "export":
        raise UsageError(f"the {backend} backend needs an export (python export.py {model}); or use --backend keras")
    if backend == "onnx":
        return OnnxBackend(path, int8)
    if backend == "litert":
        return LiteRtBackend(path, int8)
    if backend == "savedmodel":
        return SavedModelBackend(path)
    if not server:
        raise UsageError("the tf-serving backend needs --server http://host:8501 or grpc://host:8500")
    name = model_name or os.path.basename(os.path.dirname(os.path.abspath(path)))
    return TFServingBackend(path, server, name, version, timeout)
