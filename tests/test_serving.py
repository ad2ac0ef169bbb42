"""TF Serving request bodies (REST columnar JSON and gRPC PredictRequest) against the real signatures.

No TF Serving binary runs on these machines: these tests check the bodies docs/export-and-serving.md
shows against the signature_defs of the SavedModel loaded as TF Serving loads it (names, dtypes,
shapes), and run them on the decoded inputs the way the server would.
"""

import json

import numpy as np
import pytest
import tensorflow as tf
from conftest import make_run

from keraslm import serving
from keraslm.export import export_run
from keraslm.session_loader import SessionModel


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    base = tmp_path_factory.mktemp("serving")
    version_dir, _ = export_run(str(make_run(base, "gru", 2, "word")), out=str(base / "models"), name="lm")
    with open(f"{version_dir}/assets.extra/keraslm.json") as f:
        description = json.load(f)
    return SessionModel(version_dir), description


def compatible(shape, array):
    """Whether an array fits a signature shape (None: any size, or unknown rank)."""
    if shape is None:
        return True
    return len(shape) == array.ndim and all(d in (None, n) for d, n in zip(shape, array.shape, strict=True))


def decode_rest_inputs(body, specs):
    """What TF Serving does with a columnar body: each input cast to the signature's dtype."""
    assert set(body["inputs"]) == set(specs)
    arrays = {}
    for name, value in body["inputs"].items():
        dtype, shape = specs[name]
        array = np.asarray(value if dtype is not object else np.char.encode(value), dtype=dtype)
        assert compatible(shape, array), (name, shape, array.shape)
        arrays[name] = array
    return arrays


@pytest.mark.parametrize("name", [serving.STEP_SIGNATURE, serving.GENERATE_SIGNATURE, serving.BEAM_SEARCH_SIGNATURE])
def test_rest_examples_match_the_signatures_and_run(export, name):
    model, description = export
    body = json.loads(json.dumps(serving.examples(description)[name]))  # as sent over the wire
    assert body["signature_name"] == name
    outputs = model.run(name, decode_rest_inputs(body, model.input_specs(name)))
    response = {
        "outputs": {
            k: (v if v.dtype != object else np.char.decode(v.astype(bytes))).tolist() for k, v in outputs.items()
        }
    }
    decoded = serving.rest_outputs(json.loads(json.dumps(response)))
    assert set(decoded) == set(model.output_specs(name))


def test_grpc_requests_match_the_signatures_and_run(export):
    model, description = export
    for name, inputs in (
        (serving.STEP_SIGNATURE, serving.step_inputs(description, [[3, 4, 5]])),
        (serving.GENERATE_SIGNATURE, serving.generate_inputs(["the <unk> of", ""], 7)),
        (serving.BEAM_SEARCH_SIGNATURE, serving.beam_search_inputs(["the <unk> of", ""], 7, 3, 2)),
    ):
        request = serving.grpc_request("lm", name, inputs, version=1)
        request = type(request).FromString(request.SerializeToString())  # over the wire
        assert request.model_spec.signature_name == name and request.model_spec.version.value == 1
        specs = model.input_specs(name)
        arrays = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
        assert set(arrays) == set(specs)
        for k, v in arrays.items():
            assert v.dtype == specs[k][0], k
            assert compatible(specs[k][1], v), k
        outputs = model.run(name, arrays)
        if name == serving.GENERATE_SIGNATURE:
            assert outputs["tokens"].shape == (2, 7)
        if name == serving.BEAM_SEARCH_SIGNATURE:
            assert outputs["tokens"].shape == (2, 2, 7) and outputs["scores"].shape == (2, 2)


def test_predict_path():
    assert serving.predict_path("lm") == "/v1/models/lm:predict"
    assert serving.predict_path("lm", 3) == "/v1/models/lm/versions/3:predict"


@pytest.mark.parametrize(
    "body, message",
    [
        ({}, 'no "outputs"'),
        ([1.0], 'no "outputs"'),
        ({"outputs": [[1.0]]}, "single unnamed output"),
        ({"outputs": {"logits": [[1.0], [1.0, 2.0]]}}, "'logits' is not a rectangular array"),
    ],
)
def test_rest_outputs_refuses_what_are_not_named_arrays(body, message):
    with pytest.raises(ValueError, match=message):
        serving.rest_outputs(body)
