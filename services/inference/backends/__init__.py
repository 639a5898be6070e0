"""The execution backends this process knows, and which of them this node can really run.

Backend modules are imported lazily and guarded: a missing optional runtime (TensorRT, CUDA, even
ONNX Runtime) makes its backend unavailable with a reason, never breaks the import of the service.
"""

from __future__ import annotations

import importlib
import inspect

from services.inference.backends.base import (
    Backend,
    BackendLoadError,
    BackendUnavailable,
    LoadOptions,
    TensorInfo,
)

# name → (module, class); tried in this order.
_KNOWN: dict[str, tuple[str, str]] = {
    "tensorrt": ("services.inference.backends.tensorrt", "TensorRTBackend"),
    "onnxruntime": ("services.inference.backends.onnxruntime", "OnnxRuntimeBackend"),
}


def _backend_class(name: str, module_name: str, class_name: str) -> type[Backend]:
    module = importlib.import_module(module_name)
    cls = getattr(module, class_name, None)
    if cls is None:  # tolerate a renamed class: any Backend subclass of that module with this name
        for _, candidate in inspect.getmembers(module, inspect.isclass):
            if issubclass(candidate, Backend) and candidate is not Backend and getattr(candidate, "name", None) == name:
                cls = candidate
                break
    if cls is None or not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise ImportError(f"{module_name} defines no Backend named {name!r}")
    return cls


def probe_backends() -> dict[str, type[Backend] | str]:
    """Every known backend: its class when this node can run it, else the reason it cannot.

    Probing may initialize drivers; callers probe once at start and keep the answer.
    """
    result: dict[str, type[Backend] | str] = {}
    for name, (module_name, class_name) in _KNOWN.items():
        try:
            cls = _backend_class(name, module_name, class_name)
        except Exception as exc:  # noqa: BLE001 - any import failure means "not on this node"
            result[name] = f"the {name} backend cannot be imported ({type(exc).__name__}: {exc})"
            continue
        try:
            reason = cls.probe()
        except Exception as exc:  # noqa: BLE001 - a crashing probe is a reason too
            reason = f"the {name} backend probe failed ({type(exc).__name__}: {exc})"
        result[name] = cls if reason is None else reason
    return result


def available_backends() -> dict[str, type[Backend]]:
    """name → class of the backends this node can run, in preference order."""
    return {name: found for name, found in probe_backends().items() if not isinstance(found, str)}


__all__ = [
    "Backend",
    "BackendLoadError",
    "BackendUnavailable",
    "LoadOptions",
    "TensorInfo",
    "available_backends",
    "probe_backends",
]
