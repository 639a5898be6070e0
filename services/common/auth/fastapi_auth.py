"""FastAPI side of auth: `Depends(require(Permission.X, authenticator))` yields the caller's Principal.

Refusals raise the domain errors Unauthenticated (401) / PermissionDenied (403); the app's error
handlers turn them into `{"error": "..."}` like every other domain error.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from fastapi import Depends, Request

from services.common.auth.authenticator import Authenticator
from services.common.auth.roles import Permission, Principal

# Path parameters that name a model (== deployment); a scoped key is checked against them.
MODEL_PATH_PARAMS: tuple[str, ...] = ("model_name", "model")


def _authenticator_of(request: Request, authenticator: Authenticator | None) -> Authenticator:
    if authenticator is not None:
        return authenticator
    found = getattr(request.app.state, "authenticator", None)
    if not isinstance(found, Authenticator):
        # A wiring bug, not the caller's fault; fail closed.
        raise RuntimeError("no Authenticator: pass one to require() or set app.state.authenticator")
    return found


def principal_dependency(
    permission: Permission,
    authenticator: Authenticator | None = None,
    *,
    model_params: Sequence[str] = MODEL_PATH_PARAMS,
) -> Callable[[Request], Awaitable[Principal]]:
    """The dependency callable behind `require` (use it where a plain callable is needed)."""

    async def dependency(request: Request) -> Principal:
        auth = _authenticator_of(request, authenticator)
        principal = await auth.authenticate(request.headers.get("authorization"))
        model = next((request.path_params[p] for p in model_params if p in request.path_params), None)
        auth.authorize(principal, permission, model)
        return principal

    return dependency


def require(
    permission: Permission,
    authenticator: Authenticator | None = None,
    *,
    model_params: Sequence[str] = MODEL_PATH_PARAMS,
):
    """`principal: Principal = require(Permission.INFER, auth)` in a route signature (or in
    `dependencies=[...]`). Without `authenticator`, `request.app.state.authenticator` is used. A model
    named by a path parameter in `model_params` must be in the key's scope; models named elsewhere
    (a request body) need `authenticator.authorize(principal, permission, model)` in the handler."""
    return Depends(principal_dependency(permission, authenticator, model_params=model_params))
