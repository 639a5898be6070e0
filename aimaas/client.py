"""Client classes of the SDK under their historical import path; the implementation is aimaas.sdk."""

from aimaas.sdk import AimaasError, AsyncDeployment, AsyncModelService, Deployment, ModelService

__all__ = ["AimaasError", "AsyncDeployment", "AsyncModelService", "Deployment", "ModelService"]
