"""The benchmark model: the 64→256→10 FP32 MLP of examples/make_model.py, dynamic batch dimension.

The graph is the example's (same builder, same weights: seed 0), so figures here describe the model
users are told to try. Input "input" [batch, 64] FP32 → output "output" [batch, 10] FP32.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import shutil

import numpy as np
import onnx

from examples.make_model import build

MODEL_NAME = "mlp"
MODEL_VERSION = "1"
INPUT_NAME = "input"
OUTPUT_NAME = "output"
FEATURES = 64
CLASSES = 10

RUNTIME_DIR = pathlib.Path(__file__).resolve().parent / "mlserver_runtime"


DEFAULT_HIDDEN = 256

# (b) measures what batching is for: a model whose weights do not fit in cache, so one execution
# costs about the same for 1 row as for 32 (32 MiB of weights read per execution either way).
BATCHING_MODEL_NAME = "mlp-wide"
DEFAULT_BATCHING_FEATURES = 1024
DEFAULT_BATCHING_HIDDEN = 8192


def build_model(hidden: int = DEFAULT_HIDDEN, features: int = FEATURES) -> onnx.ModelProto:
    return build(inputs=features, hidden=hidden, outputs=CLASSES)


def model_bytes(hidden: int = DEFAULT_HIDDEN, features: int = FEATURES) -> bytes:
    return build_model(hidden, features).SerializeToString()


def describe(data: bytes, hidden: int = DEFAULT_HIDDEN, features: int = FEATURES, name: str = MODEL_NAME) -> dict:
    return {
        "name": name,
        "version": MODEL_VERSION,
        "architecture": f"MLP {features}→{hidden}→{CLASSES} (Gemm, Relu, Gemm), FP32, dynamic batch",
        "input": {"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, features]},
        "output": {"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, CLASSES]},
        "onnx_bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def sample_input(batch: int, seed: int = 0, features: int = FEATURES) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, features)).astype(np.float32)


def write_aimaas_repository(root: pathlib.Path, data: bytes, extra: dict[str, bytes] | None = None) -> pathlib.Path:
    """`<root>/mlp/1/model.onnx` (+ `<root>/<name>/1/model.onnx` per extra model): the standalone
    layout the AIMaaS node serves."""
    for name, content in {MODEL_NAME: data, **(extra or {})}.items():
        target = root / name / MODEL_VERSION / "model.onnx"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
    return root


def mlserver_settings(grpc_port: int, http_port: int) -> dict:
    """settings.json for MLServer: the kept template with this run's free loopback ports."""
    settings = json.loads((RUNTIME_DIR / "settings.json").read_text())
    settings.update({"host": "127.0.0.1", "grpc_port": grpc_port, "http_port": http_port})
    return settings


def model_settings() -> dict:
    return json.loads((RUNTIME_DIR / "model-settings.json").read_text())


def write_mlserver_repository(root: pathlib.Path, data: bytes, grpc_port: int, http_port: int) -> pathlib.Path:
    """`<root>/settings.json` + `<root>/mlp/{model-settings.json, model.onnx, onnx_runtime.py}`.

    The runtime module is copied next to model-settings.json: MLServer puts the model folder on
    `sys.path` while it imports the `implementation`.
    """
    (root / MODEL_NAME).mkdir(parents=True, exist_ok=True)
    (root / "settings.json").write_text(json.dumps(mlserver_settings(grpc_port, http_port), indent=2))
    (root / MODEL_NAME / "model-settings.json").write_text(json.dumps(model_settings(), indent=2))
    (root / MODEL_NAME / "model.onnx").write_bytes(data)
    shutil.copy(RUNTIME_DIR / "onnx_runtime.py", root / MODEL_NAME / "onnx_runtime.py")
    return root
