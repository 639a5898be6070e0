"""The Python SDK end to end against a local mesh (`aimaas up`):

    .venv/bin/python examples/make_model.py /tmp/mlp.onnx
    .venv/bin/python examples/sdk_quickstart.py /tmp/mlp.onnx [GATEWAY_HOST:PORT]

The API key comes from AIMAAS_API_KEY (not needed while the gateway runs without auth).
"""

from __future__ import annotations

import sys

import numpy as np

from aimaas import AimaasError, ModelService


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else "/tmp/mlp.onnx"
    endpoint = sys.argv[2] if len(sys.argv) > 2 else None
    with ModelService(endpoint) as service:
        pushed = service.push(path, "mlp-quickstart", progress=lambda sent, total: print(f"\rpush {sent}/{total} bytes", end=""))
        print(f"\npushed {pushed.model} version {pushed.version} ({pushed.sha256[:12]})")
        deployment = service.deploy(pushed.model, pushed.version, min_instances=1).wait_ready(timeout=120)
        print(f"{deployment.name} is {deployment.status}: REST {deployment.endpoint}, docs {deployment.docs_url}")
        signature = service.model_metadata(deployment.name)
        [spec] = signature.inputs
        features = spec.shape[1]
        outputs = service.predict(deployment.name, np.random.rand(2, features))  # float64 -> the model's FP32
        print({name: array.shape for name, array in outputs.items()})
        batch = [np.random.rand(1, features) for _ in range(100)]
        results = service.batch_predict(deployment.name, batch, concurrency=8)
        print(f"batch_predict: {len(results)} results in input order")
        try:
            service.predict(deployment.name, [[1.0, 2.0]])
        except AimaasError as exc:  # checked before sending
            print(f"bad input: {exc.status()}: {exc.message()}")


if __name__ == "__main__":
    main()
