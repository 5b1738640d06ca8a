"""The gateway's shared state and the FastAPI dependencies that hand it to routes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from gateway.backend import BlocksUnavailable, InferenceBackend
from gateway.storage.file_store import FileStore
from gateway.metrics import GatewayMetrics
from gateway.inference.generation import Generation, GenerationJob
from gateway.storage.jobs import JobStore
from gateway.models import ModelRegistry
from gateway.settings import Settings
from gateway.storage.tenants import Authenticator, ConcurrencyLimiter
from gateway.fine_tuning.trainer import Trainer


@dataclass
class Gateway:
    settings: Settings
    models: ModelRegistry
    backend: InferenceBackend
    auth: Authenticator
    limiter: ConcurrencyLimiter
    metrics: GatewayMetrics
    files: FileStore
    jobs: JobStore
    trainer: Trainer

    async def start(self, job: GenerationJob, tenant: str) -> Generation:
        """Take a tenant slot and a swarm session for `job`; the caller must `close()` the result.

        Refusals (503 uncovered model, 429 tenant limit or full swarm) happen here, before any
        response has started, so streaming requests get real status codes for them too.
        """
        coverage = self.backend.coverage(job.model.swarm_id)
        if not coverage.complete:
            raise BlocksUnavailable(job.model.swarm_id, coverage)
        lease = self.limiter.acquire(tenant)

        def finished() -> None:
            lease.release()
            if generation.opened_at is not None:
                # Labelled by base model: tenants' fine-tuned ids would make unbounded label sets.
                self.metrics.observe_generation(job.model.swarm_id, generation.opened_at, generation.first_token_at,
                                                generation.usage().completion_tokens)

        generation = Generation(job, self.backend, on_close=finished)
        try:
            await generation.open()
        except BaseException:
            await generation.close()
            raise
        return generation


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
