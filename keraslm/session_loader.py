"""A SavedModel loaded the way TF Serving loads it: into a graph-mode Session, run by tensor names.

TF Serving's C++ loader imports the MetaGraph into a Session, runs the saver's restore op and
the init op, and then runs a signature_def by the tensor names it lists. `tf.saved_model.load`
restores TF2 objects instead, so an export it runs can still fail in TF Serving (Keras 3
variables tracked through a plain `tf.Module` restore into copies the graph never reads). This
module is that loading path in Python: export checks every version with it before publishing,
the savedmodel backend runs it, and the tests' REST and gRPC servers serve through it.
"""

import tensorflow as tf

from keraslm.errors import UsageError, first_line

SERVE_TAG = "serve"


class RequestError(ValueError):
    """A request the model refused (TF's InvalidArgument); TF Serving returns it to the client."""


class ServingError(RuntimeError):
    """The model itself failed under TF Serving's loader (say, a variable that was never restored)."""


class SessionModel:
    """A SavedModel in a `tf.compat.v1.Session`, as TF Serving runs it.

    Args:
        version_dir: the SavedModel directory.

    Example:
        model = SessionModel("saved_models/shakespeare/1")
        outputs = model.run("serving_default", {"tokens": tokens, "h0_in": h0, "c0_in": c0})
    """

    def __init__(self, version_dir):
        self.version_dir = version_dir
        self.graph = tf.Graph()
        self.session = tf.compat.v1.Session(graph=self.graph)
        logger, level = tf.get_logger(), tf.get_logger().level
        logger.setLevel("ERROR")  # the TF1 loader is deprecated in favour of what TF Serving does not run
        try:
            with self.graph.as_default():
                meta_graph = tf.compat.v1.saved_model.loader.load(self.session, [SERVE_TAG], version_dir)
        except Exception as e:  # TF raises OSError, RuntimeError, DecodeError, … on a damaged export
            self.session.close()
            raise UsageError(
                f"{version_dir}: TF Serving's loader cannot load the SavedModel ({first_line(e)})"
            ) from None
        finally:
            logger.setLevel(level)
        self.signatures = dict(meta_graph.signature_def)

    def input_specs(self, signature_name):
        """{input name: (numpy dtype, shape with None for unknown dims)} of a signature."""
        return {name: _spec(info) for name, info in self._signature(signature_name).inputs.items()}

    def output_specs(self, signature_name):
        """{output name: (numpy dtype, shape with None for unknown dims)} of a signature."""
        return {name: _spec(info) for name, info in self._signature(signature_name).outputs.items()}

    def run(self, signature_name, inputs):
        """Run a signature on {input name: array}; return {output name: array}.

        Raises:
            RequestError: the inputs do not match the signature, or the model refused them
                (an InvalidArgument from its argument checks), with TF's message.
            ServingError: any other failure of the model, which TF Serving would meet too.
        """
        signature = self._signature(signature_name)
        if set(inputs) != set(signature.inputs):
            raise RequestError(
                f"signature {signature_name} takes inputs {sorted(signature.inputs)}, got {sorted(inputs)}"
            )
        feed = {signature.inputs[name].name: value for name, value in inputs.items()}
        fetches = {name: info.name for name, info in signature.outputs.items()}
        try:
            return self.session.run(fetches, feed)
        except (tf.errors.InvalidArgumentError, ValueError) as e:
            raise RequestError(_message(e)) from None
        except tf.errors.OpError as e:  # the model's fault, not the request's: TF Serving fails too
            raise ServingError(f"{type(e).__name__}: {_message(e)}") from None

    def close(self):
        """Release the session's resources."""
        self.session.close()

    def _signature(self, name):
        if name not in self.signatures:
            raise RequestError(f"no signature {name!r}; the model has {sorted(self.signatures)}")
        return self.signatures[name]


def _spec(info):
    shape = None if info.tensor_shape.unknown_rank else [d.size if d.size >= 0 else None for d in info.tensor_shape.dim]
    return tf.dtypes.as_dtype(info.dtype).as_numpy_dtype, shape


def _message(error):
    """The line of TF's error text that says what failed, without the graph-execution preamble,
    the op traceback and the node annotations."""
    text = getattr(error, "message", str(error))
    noise = ("Graph execution error", "Detected at node", "File ", "[[", "Debug info")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith(noise)]
    return next((line for line in lines if "assertion failed:" in line), lines[0] if lines else type(error).__name__)
