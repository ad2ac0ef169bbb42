"""TF Serving request bodies (REST columnar JSON and gRPC PredictRequest) against the real signatures.

No TF Serving binary runs on these machines: these tests check the bodies the README shows against
the loaded SavedModel's signatures (names, dtypes, shapes), and run the signatures on the decoded
inputs the way the server would.
"""

import json

import pytest
import tensorflow as tf
from conftest import make_run

from keraslm import serving
from keraslm.export import export_run


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    base = tmp_path_factory.mktemp("serving")
    version_dir, _ = export_run(str(make_run(base, "gru", 2, "word")), out=str(base / "models"), name="lm")
    with open(f"{version_dir}/assets.extra/keraslm.json") as f:
        description = json.load(f)
    return tf.saved_model.load(version_dir), description


def decode_rest_inputs(body, signature):
    """What TF Serving does with a columnar body: each input cast to the signature's dtype."""
    specs = signature.structured_input_signature[1]
    assert set(body["inputs"]) == set(specs)
    tensors = {}
    for name, value in body["inputs"].items():
        spec = specs[name]
        tensor = tf.constant(value, dtype=spec.dtype)
        assert spec.shape.is_compatible_with(tensor.shape), (name, spec.shape, tensor.shape)
        tensors[name] = tensor
    return tensors


@pytest.mark.parametrize("name", [serving.STEP_SIGNATURE, serving.GENERATE_SIGNATURE])
def test_rest_examples_match_the_signatures_and_run(export, name):
    model, description = export
    body = json.loads(json.dumps(serving.examples(description)[name]))  # as sent over the wire
    assert body["signature_name"] == name
    signature = model.signatures[name]
    outputs = signature(**decode_rest_inputs(body, signature))
    response = {
        "outputs": {
            k: v.numpy().tolist() if v.dtype != tf.string else [s.decode() for s in v.numpy()]
            for k, v in outputs.items()
        }
    }
    decoded = serving.rest_outputs(json.loads(json.dumps(response)))
    assert set(decoded) == set(signature.structured_outputs)


def test_grpc_requests_match_the_signatures_and_run(export):
    model, description = export
    for name, inputs in (
        (serving.STEP_SIGNATURE, serving.step_inputs(description, [[3, 4, 5]])),
        (serving.GENERATE_SIGNATURE, serving.generate_inputs(["the <unk> of", ""], 7)),
    ):
        request = serving.grpc_request("lm", name, inputs, version=1)
        request = type(request).FromString(request.SerializeToString())  # over the wire
        assert request.model_spec.signature_name == name and request.model_spec.version.value == 1
        signature = model.signatures[name]
        specs = signature.structured_input_signature[1]
        tensors = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
        assert set(tensors) == set(specs)
        for k, v in tensors.items():
            assert tf.as_dtype(v.dtype if v.dtype != object else tf.string) == specs[k].dtype, k
            assert specs[k].shape.is_compatible_with(v.shape), k
        outputs = signature(**{k: tf.constant(v) for k, v in tensors.items()})
        if name == serving.GENERATE_SIGNATURE:
            assert outputs["tokens"].shape == (2, 7)


def test_predict_path():
    assert serving.predict_path("lm") == "/v1/models/lm:predict"
    assert serving.predict_path("lm", 3) == "/v1/models/lm/versions/3:predict"
