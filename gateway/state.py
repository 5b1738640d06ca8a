"""What every route shares (settings, models, backend, tenancy, metrics) and its FastAPI dependencies.

Features keep their own state beside it: fine-tuning's stores and trainer are in
`fine_tuning.service`, so the inference routes never import them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from gateway.backend import InferenceBackend
from gateway.metrics import GatewayMetrics
from gateway.models import ModelRegistry
from gateway.settings import Settings
from gateway.tenancy import Authenticator, ConcurrencyLimiter


@dataclass
class Gateway:
    settings: Settings
    models: ModelRegistry
    backend: InferenceBackend
    auth: Authenticator
    limiter: ConcurrencyLimiter
    metrics: GatewayMetrics


def _gateway(request: Request) -> Gateway:
    return request.app.state.gateway


_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer sk-...`")


def _tenant(
    gateway: Annotated[Gateway, Depends(_gateway)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    return gateway.auth.tenant(credentials.credentials if credentials else None)


GatewayDep = Annotated[Gateway, Depends(_gateway)]
TenantDep = Annotated[str, Depends(_tenant)]
