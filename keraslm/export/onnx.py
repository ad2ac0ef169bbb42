"""model.onnx: the step function written as ONNX (the graph itself is built in onnx_step)."""

import onnx

from keraslm.export.onnx_step import build_step_graph


def write_onnx(twin, model_config, path):
    """Write the step function as ONNX with fused LSTM / GRU / RNN ops (see onnx_step)."""
    model_proto = build_step_graph(twin, model_config)
    onnx.save(model_proto, path)
    return model_proto
