"""keraslm: stateful recurrent language models in Keras, exported for TF Serving and ONNX Runtime.

The inference-side modules (config, vocab, sampling) import no TensorFlow, so this package
imports nothing heavy on its own.
"""

__version__ = "0.1.0"
