"""Small real ONNX models built with onnx.helper (tests never download models)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def mlp_model(inputs: int = 4, hidden: int = 8, outputs: int = 3, seed: int = 0) -> onnx.ModelProto:
    """x[batch, inputs] → relu(x·W1 + b1)·W2 + b2 → y[batch, outputs]."""
    rng = np.random.default_rng(seed)
    initializers = [
        numpy_helper.from_array(rng.standard_normal((inputs, hidden)).astype(np.float32), "W1"),
        numpy_helper.from_array(rng.standard_normal(hidden).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.standard_normal((hidden, outputs)).astype(np.float32), "W2"),
        numpy_helper.from_array(rng.standard_normal(outputs).astype(np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "W2"], ["h3"]),
        helper.make_node("Add", ["h3", "b2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", inputs])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", outputs])],
        initializers,
    )
    model = helper.make_model(graph, producer_name="aimaas-tests", opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def mlp_bytes(**kwargs) -> bytes:
    return mlp_model(**kwargs).SerializeToString()


def large_model_bytes(size_bytes: int) -> bytes:
    """A valid ONNX model of about `size_bytes`, almost all of it one weight initializer."""
    columns = 256
    rows = max(1, size_bytes // (4 * columns))
    weight = numpy_helper.from_array(np.zeros((rows, columns), dtype=np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["W", "idx"], ["y"], axis=0)],
        "large",
        [helper.make_tensor_value_info("idx", TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", columns])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()
