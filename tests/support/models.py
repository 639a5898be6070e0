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


def _finish(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, producer_name="aimaas-tests", opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def identity_model(elem_type: int, shape: list, *, input_name: str = "x", output_name: str = "y") -> onnx.ModelProto:
    """y = x for any ONNX element type (STRING included): exercises one protocol datatype end to end."""
    graph = helper.make_graph(
        [helper.make_node("Identity", [input_name], [output_name])],
        "identity",
        [helper.make_tensor_value_info(input_name, elem_type, shape)],
        [helper.make_tensor_value_info(output_name, elem_type, shape)],
    )
    return _finish(graph)


def add_model(elem_type: int, shape: list) -> onnx.ModelProto:
    """sum = a + b (two inputs of the same type and shape)."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["sum"])],
        "add",
        [helper.make_tensor_value_info("a", elem_type, shape), helper.make_tensor_value_info("b", elem_type, shape)],
        [helper.make_tensor_value_info("sum", elem_type, shape)],
    )
    return _finish(graph)


def two_output_model(features: int = 4) -> onnx.ModelProto:
    """x[batch, features] FP32 → doubled = x + x, plus_one = x + 1 (for requested-output selection)."""
    one = numpy_helper.from_array(np.ones(features, dtype=np.float32), "one")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "x"], ["doubled"]), helper.make_node("Add", ["x", "one"], ["plus_one"])],
        "two_outputs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])],
        [
            helper.make_tensor_value_info("doubled", TensorProto.FLOAT, ["batch", features]),
            helper.make_tensor_value_info("plus_one", TensorProto.FLOAT, ["batch", features]),
        ],
        [one],
    )
    return _finish(graph)


def scale_model(shape: list, factor: float = 2.0) -> onnx.ModelProto:
    """y = x * factor (FP32) for any shape, e.g. ["batch", "n"] (a dynamic second dimension)."""
    scale = numpy_helper.from_array(np.array(factor, dtype=np.float32), "factor")
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "factor"], ["y"])],
        "scale",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        [scale],
    )
    return _finish(graph)
