"""The ONNX Runtime backend's direct call into the binding behaves like InferenceSession.run."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from services.inference.backends.base import LoadOptions
from services.inference.backends.onnxruntime import OnnxRuntimeBackend
from tests.support.models import mlp_bytes


@pytest.fixture
def loaded(tmp_path):
    artifact = tmp_path / "model.onnx"
    artifact.write_bytes(mlp_bytes())
    backend = OnnxRuntimeBackend()
    backend.load(artifact, LoadOptions(intra_op_threads=1))
    reference = ort.InferenceSession(str(artifact), providers=["CPUExecutionProvider"])
    yield backend, reference
    backend.unload()


def test_results_match_the_session_wrapper(loaded):
    backend, reference = loaded
    assert backend._required == frozenset({"x"})  # the direct path is taken
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    (expected,) = reference.run(["y"], {"x": x})
    outputs = backend.infer({"x": x}, ["y"])
    assert list(outputs) == ["y"]
    np.testing.assert_array_equal(outputs["y"], expected)
    assert backend.infer({"x": x}, []) == {}


def test_errors_are_the_session_wrappers(loaded):
    backend, reference = loaded
    x = np.ones((1, 4), np.float32)
    cases = [
        ({}, ["y"]),  # missing input: the wrapper's own check
        ({"x": x.astype(np.float64)}, ["y"]),  # wrong element type
        ({"x": np.ones((1, 5), np.float32)}, ["y"]),  # wrong shape
        ({"x": x}, ["nope"]),  # unknown output
    ]
    for feeds, names in cases:
        with pytest.raises(Exception) as wrapper_error:
            reference.run(names, feeds)
        with pytest.raises(type(wrapper_error.value)) as backend_error:
            backend.infer(feeds, names)
        assert str(backend_error.value) == str(wrapper_error.value)
