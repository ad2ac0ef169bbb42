"""TF Serving's PredictionService requests and responses for the exported signatures.

REST (`POST /v1/models/NAME[/versions/V]:predict`) uses the columnar `inputs` format: the row
format (`instances`) needs every input to share a batch dimension, which the scalar inputs of
`generate` (max_new_tokens, temperature, …) do not have. gRPC builds a `PredictRequest` with one
TensorProto per input. The same functions serve sample.py's tf-serving backend (sent by
serving_client.py), docs/export-and-serving.md's examples (`python -m keraslm.serving VERSION_DIR`
prints them) and the tests.
"""

import json
import sys

import numpy as np

from keraslm import artifacts

STEP_SIGNATURE = "serving_default"
GENERATE_SIGNATURE = "generate"
BEAM_SEARCH_SIGNATURE = "beam_search"


def predict_path(model_name, version=None):
    """The REST path of the predict API for a model (and optionally one version)."""
    version_part = f"/versions/{int(version)}" if version is not None else ""
    return f"/v1/models/{model_name}{version_part}:predict"


def rest_body(signature_name, inputs):
    """A REST predict body in the columnar format: {"signature_name", "inputs": {name: list}}."""
    return {"signature_name": signature_name, "inputs": {k: _to_json(v) for k, v in inputs.items()}}


def rest_outputs(body):
    """The outputs of a columnar REST response as NumPy arrays (a lone output comes unnamed).

    Raises:
        ValueError: the body is not {"outputs": {name: array}} with rectangular arrays. What the
            arrays hold (numbers, strings) and their shapes are the caller's to check.
    """
    outputs = body.get("outputs") if isinstance(body, dict) else None
    if outputs is None:
        raise ValueError('the response has no "outputs"')
    if not isinstance(outputs, dict):
        raise ValueError("the response has a single unnamed output; keraslm signatures name all of theirs")
    arrays = {}
    for name, value in outputs.items():
        try:
            arrays[name] = np.asarray(value)
        except ValueError:  # NumPy refuses ragged nesting, [[1, 2], [3]]
            raise ValueError(f"output {name!r} is not a rectangular array") from None
    return arrays


def grpc_request(model_name, signature_name, inputs, version=None):
    """A tensorflow_serving PredictRequest (needs the tensorflow-serving-api package)."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = signature_name
    if version is not None:
        request.model_spec.version.value = int(version)
    for name, value in inputs.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
    return request


def grpc_outputs(response):
    """The outputs of a PredictResponse as NumPy arrays (strings as bytes)."""
    import tensorflow as tf

    return {name: tf.make_ndarray(proto) for name, proto in response.outputs.items()}


def step_inputs(description, tokens, state=None):
    """Inputs of the step signature: tokens [B, T] and each state (zeros when not given)."""
    tokens = np.asarray(tokens, np.int32)
    inputs = {"tokens": tokens}
    for s in description["states"]:
        shape = (len(tokens), s["shape"][-1])
        inputs[s["input"]] = np.zeros(shape, np.float32) if state is None else np.asarray(state[s["input"]], np.float32)
    return inputs


def generate_inputs(prompts, max_new_tokens=50, temperature=0.8, top_k=0, top_p=1.0, seed=0):
    """Inputs of the generate signature, typed as the signature declares them."""
    return {
        "prompt": np.asarray(prompts, dtype=object),
        "max_new_tokens": np.int32(max_new_tokens),
        "temperature": np.float32(temperature),
        "top_k": np.int32(top_k),
        "top_p": np.float32(top_p),
        "seed": np.int64(seed),
    }


def beam_search_inputs(prompts, max_new_tokens=20, beam_width=4, num_return=1):
    """Inputs of the beam_search signature, typed as the signature declares them."""
    return {
        "prompt": np.asarray(prompts, dtype=object),
        "max_new_tokens": np.int32(max_new_tokens),
        "beam_width": np.int32(beam_width),
        "num_return": np.int32(num_return),
    }


def examples(description, prompts=("ROMEO:",), tokens=((0, 1, 2),)):
    """The request examples of docs/export-and-serving.md for an export: {signature: REST body} for every
    signature."""
    return {
        STEP_SIGNATURE: rest_body(STEP_SIGNATURE, step_inputs(description, tokens)),
        GENERATE_SIGNATURE: rest_body(GENERATE_SIGNATURE, generate_inputs(list(prompts))),
        BEAM_SEARCH_SIGNATURE: rest_body(BEAM_SEARCH_SIGNATURE, beam_search_inputs(list(prompts))),
    }


def _to_json(value):
    value = np.asarray(value)
    if value.dtype == object or value.dtype.kind in "SU":
        return [v.decode() if isinstance(v, bytes) else str(v) for v in value.ravel()] if value.ndim else str(value)
    if value.ndim == 0 and value.dtype.kind == "f":
        return float(str(value))  # the shortest decimal that reads back as the same float32: 0.8
    return value.tolist()


if __name__ == "__main__":
    import os

    with open(os.path.join(sys.argv[1], artifacts.EXTRA, artifacts.DESCRIPTION), encoding="utf-8") as f:
        for name, body in examples(json.load(f)).items():
            print(f"# {name}\n{json.dumps(body)}")
