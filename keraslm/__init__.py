"""keraslm: stateful recurrent language models in Keras, exported for TF Serving and ONNX Runtime.

The public API (keraslm.api) is imported on first use of its names: `keraslm.train`,
`keraslm.export_run`, `keraslm.load`, `keraslm.score` and the config classes. `import keraslm`
alone imports nothing heavy, so an inference-only install (NumPy and ONNX Runtime) imports it as
fast as sample.py starts.
"""

import importlib

__version__ = "0.1.0"

_API = (
    "train",
    "export_run",
    "load",
    "score",
    "Generator",
    "Score",
    "RunConfig",
    "ModelConfig",
    "DataConfig",
    "TrainConfig",
    "ArgumentError",
    "UsageError",
)


def __getattr__(name):
    """The API's names, imported from keraslm.api when first asked for."""
    if name in _API:
        return getattr(importlib.import_module("keraslm.api"), name)
    raise AttributeError(f"module 'keraslm' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_API])
