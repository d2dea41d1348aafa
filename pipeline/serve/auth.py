"""Bearer-token auth for ``/v1/*`` (and ``/metrics`` with ``metrics_auth``): one FastAPI dependency.

The token is compared in constant time; without a configured token every request passes.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

from pipeline.serve.errors import ApiError

bearer = HTTPBearer(auto_error=False, description="required on /v1/* when DETFLOW_SERVE_TOKEN is set (and on "
                    "/metrics with DETFLOW_SERVE_METRICS_AUTH=1)")


def check_token(expected: SecretStr | None, creds: HTTPAuthorizationCredentials | None) -> None:
    """Pass when no token is configured or the bearer credentials equal it; else 401 with a hint."""
    if expected is None:
        return
    given = creds.credentials.encode() if creds is not None else b""
    if not hmac.compare_digest(given, expected.get_secret_value().encode()):
        raise ApiError(401, "unauthorized", "missing or invalid bearer token" if creds else
                       "this endpoint needs an 'Authorization: Bearer <token>' header",
                       headers={"WWW-Authenticate": "Bearer"})


def token_guard(expected: SecretStr | None) -> Callable[..., None]:
    """The dependency to put on protected routes (``dependencies=[Depends(token_guard(settings.token))]``)."""

    def require_token(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:  # noqa: B008
        check_token(expected, creds)

    return require_token
