"""Inference backends behind one interface: `step(tokens, state) -> (logits, state)`.

    onnx        ONNX Runtime on assets.extra/model.onnx (no TensorFlow import: fast start),
                or on model.int8.onnx, its int8-weight twin (int8=True)
    savedmodel  the SavedModel's serving_default signature (generate signature: in_graph_generate)
    keras       a run directory's model.keras
    tf-serving  a running TF Serving, REST (http://host:8501) or gRPC (grpc://host:8500)

State is a dict of float32 arrays keyed by the step's input names (`h0_in`, `c0_in`, …); each
backend turns the step's `*_out` outputs into the next call's `*_in` inputs. TensorFlow is imported
only by the backends that need it, when they are chosen.
"""

import json
import os

import numpy as np

from keraslm import serving
from keraslm.errors import UsageError, first_line
from keraslm.vocab import Vocabulary

BACKENDS = ("onnx", "savedmodel", "keras", "tf-serving")


def resolve_model(path):
    """Classify MODEL: ("export", version_dir) or ("run", run_dir).

    A version directory holds assets.extra/keraslm.json; a model base directory holds integer
    version directories (the newest is used); a run directory holds config.json and model.keras.
    """
    if not os.path.isdir(path):
        raise UsageError(f"{path} is not a directory; give an exported model (saved_models/NAME) or a run directory")
    if os.path.exists(os.path.join(path, "assets.extra", "keraslm.json")):
        return "export", path
    versions = [int(d) for d in os.listdir(path) if d.isdigit() and os.path.isdir(os.path.join(path, d))]
    if versions:
        return resolve_model(os.path.join(path, str(max(versions))))
    if os.path.exists(os.path.join(path, "config.json")) and os.path.exists(os.path.join(path, "model.keras")):
        return "run", path
    raise UsageError(f"{path} is neither a keraslm export (saved_models/NAME[/VERSION]) nor a run directory")


def load_description(version_dir):
    """keraslm.json of an export, checked against the names the step function needs."""
    path = os.path.join(version_dir, "assets.extra", "keraslm.json")
    try:
        with open(path, encoding="utf-8") as f:
            description = json.load(f)
        vocab = Vocabulary.from_dict(description["vocabulary"])
        states = description["states"]
        size = description["config"]["model"]["vocabulary_size"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{path} is damaged ({first_line(e)}); export the run again") from None
    if len(vocab) != size:
        raise UsageError(f"{path}: the vocabulary has {len(vocab)} tokens but the model {size} outputs; export again")
    return description, vocab, states


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
    """

    def __init__(self, vocab, states):
        self.vocab = vocab
        self.states = states

    def initial_state(self, batch_size):
        """Zero state for a batch."""
        return {s["input"]: np.zeros((batch_size, s["shape"][-1]), np.float32) for s in self.states}

    def step(self, tokens, state):
        """Run tokens [B, T] from `state`; return logits [B, T, V] and the state after them.

        Raises:
            UsageError: tokens not a non-empty [B, T] of ids in [0, V), or a state that is not
                [B, H] for each of the model's states: ONNX Runtime would wrap negative ids
                silently, and its LSTM and GRU kernels abort the process on an empty batch.
        """
        tokens = np.asarray(tokens)
        self._check_inputs(tokens, state)
        return self._step(tokens.astype(np.int32), state)

    def _step(self, tokens, state):
        outputs = self._run({"tokens": tokens, **state})
        return np.asarray(outputs["logits"]), {s["input"]: np.asarray(outputs[s["output"]]) for s in self.states}

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
        super().__init__(vocab, states)
        name = "model.onnx"
        if int8:
            if "onnx_int8" not in description:
                raise UsageError(f"{version_dir} has no int8 model (exported before keraslm wrote one); export again")
            name = description["onnx_int8"]["path"]
        path = os.path.join(version_dir, "assets.extra", name)
        try:
            self.session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own Fail / InvalidProtobuf types
            raise UsageError(f"{path} cannot be loaded ({first_line(e)}); export the run again") from None
        self.output_names = [o.name for o in self.session.get_outputs()]
        logits = {o.name: o.shape for o in self.session.get_outputs()}.get("logits")
        _check_output_size(path, logits[-1] if logits else None, vocab)

    def _run(self, inputs):
        return dict(zip(self.output_names, self.session.run(self.output_names, inputs), strict=True))


class SavedModelBackend(Backend):
    """The SavedModel's signatures, loaded as TF Serving loads them (see session_loader)."""

    def __init__(self, version_dir):
        _, vocab, states = load_description(version_dir)
        super().__init__(vocab, states)
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
        from keraslm.model import keras_step, state_names
        from keraslm.runs import load_run

        config, vocab, model = load_run(run_dir)
        hidden = config.model.hidden_dim
        states = [
            {"input": f"{n}_in", "output": f"{n}_out", "shape": [None, hidden]} for n in state_names(config.model)
        ]
        super().__init__(vocab, states)
        # The model's own step, traced once per shape (see keras_step).
        self._step, _ = keras_step(model, config.model, batch_size=1)


class TFServingBackend(Backend):
    """A running TF Serving: REST (http[s]://host:8501) or gRPC (grpc://host:8500).

    Args:
        version_dir: the local export, for its vocabulary and state names.
        server: the server's URL.
        model_name: the name TF Serving serves the model under.
        version: a version number, or None for the newest the server has.
        timeout: seconds per request.
    """

    def __init__(self, version_dir, server, model_name, version=None, timeout=10.0):
        _, vocab, states = load_description(version_dir)
        super().__init__(vocab, states)
        self.server, self.model_name, self.version, self.timeout = server.rstrip("/"), model_name, version, timeout
        if self.server.startswith("grpc://"):
            import grpc
            from tensorflow_serving.apis import prediction_service_pb2_grpc

            self.channel = grpc.insecure_channel(self.server[len("grpc://") :])
            self.stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        elif not self.server.startswith(("http://", "https://")):
            raise UsageError(f"--server {server!r}: give http://host:8501 (REST) or grpc://host:8500")

    def _run(self, inputs):
        if self.server.startswith("grpc://"):
            import grpc

            request = serving.grpc_request(self.model_name, serving.STEP_SIGNATURE, inputs, self.version)
            try:
                return serving.grpc_outputs(self.stub.Predict(request, timeout=self.timeout))
            except grpc.RpcError as e:
                raise UsageError(f"TF Serving at {self.server} answered {e.code().name}: {e.details()}") from None
        return serving.rest_outputs(self._post(serving.rest_body(serving.STEP_SIGNATURE, inputs)))

    def _post(self, body):
        import urllib.error
        import urllib.request

        url = self.server + serving.predict_path(self.model_name, self.version)
        request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf-8", "replace")
            try:
                detail = json.loads(detail).get("error", detail)
            except ValueError:
                pass
            raise UsageError(f"TF Serving at {url} answered {e.code}: {first_line(detail)}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            reason = getattr(e, "reason", e)
            raise UsageError(f"cannot reach TF Serving at {self.server} ({reason}); is it running?") from None


def open_backend(model, backend=None, server=None, model_name=None, version=None, timeout=10.0, int8=False):
    """The backend for MODEL (a version, model base or run directory); None picks onnx for an
    export and keras for a run directory. `int8` runs the onnx backend's int8-weight model."""
    if backend is not None and backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    kind, path = resolve_model(model)
    backend = backend or ("onnx" if kind == "export" else "keras")
    if int8 and backend != "onnx":
        raise UsageError(f"--int8 is an onnx backend model; the {backend} backend runs float32")
    if backend == "keras":
        if kind != "run":
            raise UsageError(f"the keras backend needs a run directory (with model.keras); {model} is an export")
        return KerasBackend(path)
    if kind != "export":
        raise UsageError(f"the {backend} backend needs an export (python export.py {model}); or use --backend keras")
    if backend == "onnx":
        return OnnxBackend(path, int8)
    if backend == "savedmodel":
        return SavedModelBackend(path)
    if not server:
        raise UsageError("the tf-serving backend needs --server http://host:8501 or grpc://host:8500")
    name = model_name or os.path.basename(os.path.dirname(os.path.abspath(path)))
    return TFServingBackend(path, server, name, version, timeout)
