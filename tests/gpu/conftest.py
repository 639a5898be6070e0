"""GPU checks: real CUDA and TensorRT. Without them every test here skips with the precise reason.

`TensorRTBackend.probe()` gives the reason (TensorRT missing, cuda-bindings missing, no driver, no
device), so `pytest -rs` on a machine without a GPU shows exactly why nothing ran. Tests marked
`cuda_only` need only cuda-bindings and a GPU, not TensorRT.
"""

from __future__ import annotations

import pytest

from services.inference.backends import cuda
from services.inference.backends.tensorrt import TensorRTBackend


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cuda_only: needs a CUDA GPU and cuda-bindings, but not TensorRT")


@pytest.fixture(scope="session")
def tensorrt_unavailable_reason() -> str | None:
    return TensorRTBackend.probe()


@pytest.fixture(autouse=True)
def _require_gpu_stack(request: pytest.FixtureRequest, tensorrt_unavailable_reason: str | None) -> None:
    if request.node.get_closest_marker("cuda_only"):
        if not cuda.detect_gpus():
            pytest.skip(f"no CUDA GPU: {cuda.gpu_unavailable_reason()}")
    elif tensorrt_unavailable_reason is not None:
        pytest.skip(tensorrt_unavailable_reason)
