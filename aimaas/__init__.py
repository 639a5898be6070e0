"""AIMaaS: `from aimaas import ModelService` (the SDK; see aimaas.sdk).

The SDK is loaded on first use, so importing the generated stubs (aimaas.<domain>.v1) stays cheap.
"""

from typing import Any

_SDK_NAMES = frozenset({
    "AimaasError", "AsyncDeployment", "AsyncModelService", "ClientSettings", "Deployment", "InferResult", "ModelService",
    "ModelSignature", "PushedVersion", "TensorSpec", "Traffic",
})  # fmt: skip

__all__ = sorted(_SDK_NAMES)


def __getattr__(name: str) -> Any:
    if name in _SDK_NAMES:
        from aimaas import sdk

        return getattr(sdk, name)
    raise AttributeError(f"module 'aimaas' has no attribute {name!r}")
