"""Variants of tests.support.models' MLP for the TensorRT backend's precision paths."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.support.models import mlp_model


def fp16_mlp_bytes(**kwargs) -> bytes:
    """The MLP with every tensor in FP16 (what a mixed-precision conversion such as ModelOpt AutoCast gives)."""
    model = mlp_model(**kwargs)
    for init in model.graph.initializer:
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name))
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.elem_type = TensorProto.FLOAT16
    onnx.checker.check_model(model)
    return model.SerializeToString()


def qdq_mlp_bytes(scale: float = 0.05, **kwargs) -> bytes:
    """The MLP with its input quantized to INT8 and dequantized again (explicit quantization)."""
    model = mlp_model(**kwargs)
    graph = model.graph
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array(scale, dtype=np.float32), "x_scale"),
            numpy_helper.from_array(np.array(0, dtype=np.int8), "x_zero"),
        ]
    )
    graph.node[0].input[0] = "x_dq"
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["x_q"]),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zero"], ["x_dq"]),
    ]
    for node in reversed(nodes):
        graph.node.insert(0, node)
    onnx.checker.check_model(model)
    return model.SerializeToString()
