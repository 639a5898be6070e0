"""The AIMaaS Python SDK: one async core (`AsyncModelService`) and a thin sync wrapper (`ModelService`)."""

from aimaas.sdk.errors import AimaasError
from aimaas.sdk.service import AsyncDeployment, AsyncModelService, InferResult, PushedVersion, Traffic
from aimaas.sdk.settings import ClientSettings
from aimaas.sdk.sync import Deployment, ModelService
from aimaas.sdk.tensors import ModelSignature, TensorSpec

__all__ = [
    "AimaasError",
    "AsyncDeployment",
    "AsyncModelService",
    "ClientSettings",
    "Deployment",
    "InferResult",
    "ModelService",
    "ModelSignature",
    "PushedVersion",
    "TensorSpec",
    "Traffic",
]
