"""Write a small ONNX model (a 64→256→10 MLP) to use with `aimaas models push`.

Usage: python examples/make_model.py OUT.onnx
"""

from __future__ import annotations

import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def build(inputs: int = 64, hidden: int = 256, outputs: int = 10) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array(rng.standard_normal((inputs, hidden)).astype(np.float32) * 0.1, "W1"),
        numpy_helper.from_array(np.zeros(hidden, dtype=np.float32), "b1"),
        numpy_helper.from_array(rng.standard_normal((hidden, outputs)).astype(np.float32) * 0.1, "W2"),
        numpy_helper.from_array(np.zeros(outputs, dtype=np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("Gemm", ["input", "W1", "b1"], ["hidden"]),
        helper.make_node("Relu", ["hidden"], ["activation"]),
        helper.make_node("Gemm", ["activation", "W2", "b2"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", inputs])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", outputs])],
        weights,
    )
    model = helper.make_model(graph, producer_name="aimaas-example", opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    onnx.save(build(), sys.argv[1])
    print(f"wrote {sys.argv[1]}")
