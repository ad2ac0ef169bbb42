"""A stand-in for TF Serving: its REST and gRPC predict APIs over a session-loaded SavedModel.

    python tests/tf_serving_double.py VERSION_DIR MODEL_NAME    prints "REST_PORT GRPC_PORT", serves
                                                                 on 127.0.0.1 until stdin closes

No TF Serving binary runs on these machines. The model runs the way TF Serving runs it (graph-mode
session loader, signatures by tensor names; keraslm.session_loader), so what this proves beyond the
protocol is the model's own behaviour under TF Serving's loader: a refused request comes back as
REST 400 {"error": …} or gRPC INVALID_ARGUMENT, as TF Serving answers an InvalidArgument, and the
process goes on serving.
"""

import json
import sys
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from keraslm.session_loader import RequestError, ServingError, SessionModel


def rest_handler(model, model_name):
    """TF Serving's REST predict API (columnar inputs and outputs) for one model."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            prefix = f"/v1/models/{model_name}"
            if not self.path.startswith(prefix) or not self.path.endswith(":predict"):
                return self._reply(404, {"error": f"Servable not found for request: {self.path}"})
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            name = body.get("signature_name", "serving_default")
            try:
                specs = model.input_specs(name)
                inputs = {k: np.asarray(_bytes(v), dtype=specs[k][0]) for k, v in body["inputs"].items() if k in specs}
                outputs = model.run(name, inputs)
            except RequestError as e:
                return self._reply(400, {"error": str(e)})
            except ServingError as e:
                return self._reply(500, {"error": str(e)})
            self._reply(200, {"outputs": {k: _json(v) for k, v in outputs.items()}})

        def _reply(self, code, body):
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    return Handler


def prediction_service(model, model_name):
    """TF Serving's gRPC PredictionService.Predict for one model."""

    class Service(prediction_service_pb2_grpc.PredictionServiceServicer):
        def Predict(self, request, context):
            if request.model_spec.name != model_name:
                context.abort(grpc.StatusCode.NOT_FOUND, f"Servable not found: {request.model_spec.name}")
            inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
            try:
                outputs = model.run(request.model_spec.signature_name or "serving_default", inputs)
            except RequestError as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            except ServingError as e:
                context.abort(grpc.StatusCode.INTERNAL, str(e))
            response = predict_pb2.PredictResponse()
            for k, v in outputs.items():
                response.outputs[k].CopyFrom(tf.make_tensor_proto(v))
            return response

    return Service()


def _bytes(value):
    """JSON strings as the bytes a DT_STRING tensor holds."""
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, list):
        return [_bytes(v) for v in value]
    return value


def _json(array):
    if array.dtype == object:
        return [v.decode("utf-8", "replace") for v in array.ravel()]
    return array.tolist()


def main():
    version_dir, model_name = sys.argv[1], sys.argv[2]
    model = SessionModel(version_dir)
    http = ThreadingHTTPServer(("127.0.0.1", 0), rest_handler(model, model_name))
    threading.Thread(target=http.serve_forever, daemon=True).start()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(prediction_service(model, model_name), server)
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(http.server_port, grpc_port, flush=True)
    sys.stdin.read()  # serve until the test closes our stdin (or ends)
    http.shutdown()
    server.stop(0)


if __name__ == "__main__":
    main()
