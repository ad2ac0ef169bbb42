"""A client of a running TF Serving: one predict request over REST or gRPC, bounded in time and size.

The server is not trusted. Every request has a deadline for the whole exchange (connect, send,
answer), however the server paces it; a REST answer is read up to a byte limit the caller sets; and
whatever the server says reaches the user as one printable line. The request and response formats
are serving.py's; this module only carries them. gRPC (grpc://host:8500) needs the
tensorflow-serving-api package and imports it, and TensorFlow, only when such a server is chosen.
"""

import http.client
import io
import json
import time
import urllib.parse

from keraslm import serving
from keraslm.errors import ArgumentError, UsageError, first_line

# What to check when a server answers with something that is not the signature's outputs.
REMEDY = "is it TF Serving, serving this export (--model-name)?"


class TFServingClient:
    """Predict requests to one model on a running TF Serving.

    Args:
        server: http[s]://host:8501 (REST) or grpc://host:8500 (gRPC).
        model_name: the name TF Serving serves the model under.
        version: a version number, or None for the newest the server has.
        timeout: seconds for a whole request (connect, send, answer), however the server paces it.

    Attributes:
        source: the server as error messages name it ("TF Serving at URL").

    Example:
        client = TFServingClient("http://localhost:8501", "lm")
        outputs = client.predict("serving_default", serving.step_inputs(description, [[1, 2]]), 2**24)
    """

    def __init__(self, server, model_name, version=None, timeout=10.0):
        self.server, self.model_name, self.version, self.timeout = server.rstrip("/"), model_name, version, timeout
        self.source = f"TF Serving at {self.server}"
        if self.server.startswith("grpc://"):
            self._open_grpc()
        else:
            self._parse_rest_url(server)

    def predict(self, signature_name, inputs, limit):
        """Run a signature on the server: {name: NumPy array} for the request's {name: array}.

        Args:
            limit: the most bytes a REST answer may take (gRPC has its own cap on messages).

        Raises:
            UsageError: the server is unreachable, refuses the request, is too slow or too
                verbose, or answers with something that is not named arrays; one line, naming it.
        """
        if self.server.startswith("grpc://"):
            return self._predict_grpc(signature_name, inputs)
        body = self._post(serving.rest_body(signature_name, inputs), limit, _what(signature_name))
        try:
            return serving.rest_outputs(body)
        except ValueError as e:
            raise UsageError(
                f"{self.source} sent no {_what(signature_name)} outputs ({_one_line(e)}); {REMEDY}"
            ) from None

    # --- gRPC -----------------------------------------------------------------------------------

    def _open_grpc(self):
        import grpc
        from tensorflow_serving.apis import prediction_service_pb2_grpc

        self.channel = grpc.insecure_channel(self.server[len("grpc://") :])
        self.stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)

    def _predict_grpc(self, signature_name, inputs):
        import grpc

        request = serving.grpc_request(self.model_name, signature_name, inputs, self.version)
        try:
            response = self.stub.Predict(request, timeout=self.timeout)  # a deadline for the whole call
        except grpc.RpcError as e:
            raise UsageError(f"{self.source} answered {e.code().name}: {_one_line(e.details())}") from None
        try:
            return serving.grpc_outputs(response)
        except (ValueError, TypeError) as e:
            raise UsageError(f"{self.source} sent tensors keraslm cannot read ({_one_line(e)}); {REMEDY}") from None

    # --- REST -----------------------------------------------------------------------------------

    def _parse_rest_url(self, server):
        try:
            parts = urllib.parse.urlsplit(self.server)
            self.host, self.port, self.prefix = parts.hostname, parts.port, parts.path
        except ValueError:  # a port that is not a number in [0, 65535], a broken [IPv6] address
            self.host = None
        if not self.server.startswith(("http://", "https://")) or not self.host:
            raise ArgumentError("{server} {value!r}: give http://host:8501 (REST) or grpc://host:8500", value=server)

    @property
    def _url(self):
        return self.server + serving.predict_path(self.model_name, self.version)

    def _post(self, body, limit, what):
        """POST a REST predict body; the answer's JSON, read within `timeout` seconds in all and at
        most `limit` bytes (a socket timeout alone restarts with every byte that arrives)."""
        deadline = time.monotonic() + self.timeout
        connection = self._connect()
        try:
            status, data = self._exchange(connection, body, deadline, limit, what)
        except TimeoutError:
            raise UsageError(f"{self.source} sent no complete answer within {self.timeout:g} s (--timeout)") from None
        except (OSError, http.client.HTTPException) as e:
            raise UsageError(f"the request to {self._url} failed ({_one_line(e)})") from None
        finally:
            connection.close()
        return self._json_answer(status, data)

    def _connect(self):
        https = self.server.startswith("https://")
        connection = (http.client.HTTPSConnection if https else http.client.HTTPConnection)(
            self.host, self.port, timeout=self.timeout
        )
        try:
            connection.connect()
        except OSError as e:  # a connect timeout among them: the server is not there to be slow
            connection.close()
            raise UsageError(f"cannot reach {self.source} ({first_line(e)}); is it running?") from None
        return connection

    def _exchange(self, connection, body, deadline, limit, what):
        """Send the request and read the answer against the deadline: (status, the answer's bytes)."""
        connection.sock.settimeout(_time_left(deadline))  # sending, too, counts against the deadline
        path = self.prefix + serving.predict_path(self.model_name, self.version)
        connection.request("POST", path, json.dumps(body).encode(), {"Content-Type": "application/json"})
        response = http.client.HTTPResponse(_DeadlineReader(connection.sock, deadline), method="POST")
        response.begin()
        data = bytearray()
        while chunk := response.read(65536):
            data += chunk
            if len(data) > limit:
                raise UsageError(
                    f"{self.source} sent more than {limit} bytes, far more than the {what}'s outputs take; {REMEDY}"
                )
        return response.status, data

    def _json_answer(self, status, data):
        """The answer's JSON, or the server's own error (its "error" field, when it sends one)."""
        if status != 200:
            detail = data.decode("utf-8", "replace")
            try:
                answer = json.loads(detail)
                detail = answer.get("error", detail) if isinstance(answer, dict) else detail
            except (ValueError, RecursionError):
                pass
            raise UsageError(f"TF Serving at {self._url} answered {status}: {_one_line(detail)}")
        try:
            return json.loads(data)
        except (ValueError, RecursionError) as e:
            raise UsageError(
                f"{self.source} answered with something that is not JSON ({_one_line(e)}); {REMEDY}"
            ) from None


def _what(signature_name):
    """A signature as messages name its outputs: the step's, or the generate signature's."""
    return "step" if signature_name == serving.STEP_SIGNATURE else f"{signature_name} signature"


class _DeadlineReader(io.RawIOBase):
    """A socket as http.client.HTTPResponse reads it (through `makefile`), except that every read
    waits only for the time left before `deadline`: the whole answer, headers included, then has
    that long, however slowly the server drips it."""

    def __init__(self, sock, deadline):
        self.sock, self.deadline = sock, deadline

    def makefile(self, mode):
        return io.BufferedReader(self)

    def readable(self):
        return True

    def readinto(self, buffer):
        self.sock.settimeout(_time_left(self.deadline))
        return self.sock.recv_into(buffer)


def _time_left(deadline):
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left


def _one_line(text, limit=200):
    """Text a server sent, made safe for a one-line message: its first line, cut short, with
    control characters (terminal escapes among them) replaced by "?"."""
    lines = str(text).strip().splitlines()
    line = lines[0][:limit] if lines else ""
    return "".join(c if c.isprintable() else "?" for c in line) or "no details"
