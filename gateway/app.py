"""The FastAPI application: OpenAI-compatible routes over an `InferenceBackend`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field

from adapters import AdapterStore
from blocks.head import ModelHead
from gateway.backend import InferenceBackend
from gateway.dashboard import routes as dashboard_routes
from gateway.embeddings import routes as embeddings_routes
from gateway.fine_tuning import files
from gateway.fine_tuning import routes as fine_tuning_routes
from gateway.fine_tuning.service import FineTuning
from gateway.fine_tuning.trainer import Trainer
from gateway.inference import chat, completions
from gateway.responses import routes as responses_routes
from gateway.metrics import GatewayMetrics, RequestCounter
from gateway.models import HeadLoader, ModelCard, ModelRegistry, SwarmCoverage
from gateway.protocol.errors import install_error_handlers
from gateway.protocol.schemas import ErrorResponse, Health, Model
from gateway.settings import Settings
from gateway.state import Gateway, GatewayDep, TenantDep
from gateway.storage.database import Database
from gateway.storage.file_store import FileStore
from gateway.storage.fine_tuned import FineTunedModels
from gateway.storage.jobs import JobStore
from gateway.storage.responses import ResponseStore
from gateway.storage.tenants import KeyStore
from gateway.tenancy import Authenticator, ConcurrencyLimiter
from swarm.node_options import set_thread_load

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 404, 429, 500, 503)
}


class ModelCoverage(BaseModel):
    id: str
    num_blocks: int
    missing_blocks: list[int]
    complete: bool


class ModelSwarmCoverage(BaseModel):
    """swarmgate extension of a base model's card: its blocks in the swarm, from the servers' records."""

    num_blocks: int
    missing_blocks: list[int]
    complete: bool
    servers: int
    checkpoints: list[str]


class ListedModel(Model):
    """OpenAI's model object plus vLLM's `parent` and swarmgate's `servable`, `note` and `coverage`."""

    max_model_len: int | None = Field(None, description="Context length in tokens (vLLM's extension); "
                                                         "null for a swarm model this gateway has no folder of.")
    parent: str | None = Field(None, description="A fine-tuned model's base model.")
    servable: bool = Field(True, description="Whether this gateway answers requests for the model.")
    note: str | None = Field(None, description="Why the model is not servable here.")
    coverage: ModelSwarmCoverage | None = Field(
        None, description="Base models: the swarm's servers for the model (null: no server announces it).")


class ListedModels(BaseModel):
    object: Literal["list"] = "list"
    data: list[ListedModel]


class SwarmView(BaseModel):
    """What `GET /v1/swarm` returns; the page at `GET /dashboard` draws it."""

    models: list[ModelCoverage] = Field(description="This gateway's models and whether it can serve them now.")
    swarm: dict[str, Any] = Field(description=(
        "The backend's own view of the swarm. Over a real swarm: `models` (per model name: `num_blocks`, "
        "`covered`, `missing_blocks`, `checkpoints`, `blocks` (each block's `servers` and summed `throughput`) and "
        "`servers` (each one's `peer_id`, span `start`-`end`, `throughput` in tokens/s, `sessions`, `free_tokens` "
        "of KV cache, `quant`, `version`, `addrs`, and `rtt_ms`: the round trip this gateway measured, null if it "
        "has not talked to that server)), `replays` (failed hops replayed), `verification` (spot checks, "
        "mismatches, undecided, bans) and `banned` (`peer_id`, `reason`, `since` in unix seconds: servers this "
        "gateway caught returning wrong outputs and never chooses again)."
    ))


def create_app(settings: Settings, backend: InferenceBackend, *, head_loader: HeadLoader | None = None) -> FastAPI:
    """Read each served model's config, load the first `settings.max_loaded_models` heads and
    tokenizers (the others on first use), and wire the routes to `backend`.

    `head_loader` builds a model's head from its checkpoint folder; by default
    `blocks.head.ModelHead` on `settings.head_device` in `settings.head_dtype`.
    """
    database = Database(settings.data_dir)
    fine_tuned = FineTunedModels(database, AdapterStore(settings.data_dir / "adapters"))
    models = ModelRegistry.load(
        settings.models, head_loader or _model_head_loader(settings), fine_tuned,
        max_loaded=settings.max_loaded_models, swarm_models=lambda: backend.swarm_state().get("models", {}),
    )
    file_store = FileStore(database, settings.data_dir / "files")
    jobs = JobStore(database)
    limiter = ConcurrencyLimiter(settings.max_concurrent_requests)
    set_thread_load(limiter.total)  # a lone generation's head work may use every core (swarm/node_options.py)
    metrics = GatewayMetrics(
        coverage=lambda: [(model.id, backend.coverage(model.id)) for model in models],
        swarm_state=backend.swarm_state,
        active_generations=limiter.total,
    )
    gateway = Gateway(
        settings=settings,
        models=models,
        backend=backend,
        auth=_authenticator(settings, database),
        limiter=limiter,
        metrics=metrics,
    )
    trainer = Trainer(settings=settings, jobs=jobs, files=file_store, fine_tuned=fine_tuned, models=models,
                      backend=backend)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        """The fine-tuning worker runs while the app does."""
        await trainer.start()
        try:
            yield
        finally:
            await trainer.stop()

    app = FastAPI(title="swarmgate", summary="OpenAI-compatible API over a swarm of block servers", lifespan=lifespan)
    app.state.gateway = gateway
    app.state.responses = ResponseStore(database)
    app.state.fine_tuning = FineTuning(files=file_store, jobs=jobs, fine_tuned=fine_tuned, trainer=trainer)
    install_error_handlers(app)
    app.add_middleware(RequestCounter, metrics=metrics)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        """Prometheus exposition; unauthenticated like /health (bind the gateway privately)."""
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/health")
    async def health() -> Health:
        return Health()

    @app.get("/v1/models", responses=ERROR_RESPONSES)
    async def list_models(gateway: GatewayDep, tenant: TenantDep) -> ListedModels:
        """This gateway's base models, the swarm's other base models (`servable: false`), then the
        caller's own fine-tuned models; base models with their coverage in the swarm."""
        return ListedModels(data=[_model(card) for card in gateway.models.cards(tenant)])

    @app.get("/v1/models/{model_id:path}", responses=ERROR_RESPONSES)
    async def retrieve_model(model_id: str, gateway: GatewayDep, tenant: TenantDep) -> ListedModel:
        return _model(gateway.models.card(model_id, tenant))

    @app.get("/v1/swarm", responses=ERROR_RESPONSES)
    async def swarm(gateway: GatewayDep, _: TenantDep) -> SwarmView:
        """Block coverage of every served model and the backend's own view of the swarm."""
        coverage = [(model.id, gateway.backend.coverage(model.id)) for model in gateway.models]
        return SwarmView(
            models=[
                ModelCoverage(id=id, num_blocks=c.num_blocks, missing_blocks=sorted(c.missing), complete=c.complete)
                for id, c in coverage
            ],
            swarm=gateway.backend.swarm_state(),
        )

    app.include_router(chat.router, responses=ERROR_RESPONSES)
    app.include_router(completions.router, responses=ERROR_RESPONSES)
    app.include_router(responses_routes.router, responses=ERROR_RESPONSES)
    app.include_router(embeddings_routes.router, responses=ERROR_RESPONSES)
    upload_errors = ERROR_RESPONSES | {status: {"model": ErrorResponse} for status in (411, 413)}
    app.include_router(files.router, responses=upload_errors)
    app.include_router(fine_tuning_routes.router, responses=upload_errors)
    app.include_router(dashboard_routes.router)
    return app


def _model(card: ModelCard) -> ListedModel:
    return ListedModel(id=card.id, created=card.created, owned_by=card.owned_by, max_model_len=card.context_length,
                       parent=card.parent, servable=card.servable, note=card.note, coverage=_coverage(card.coverage))


def _coverage(coverage: SwarmCoverage | None) -> ModelSwarmCoverage | None:
    if coverage is None:
        return None
    return ModelSwarmCoverage(num_blocks=coverage.num_blocks, missing_blocks=list(coverage.missing_blocks),
                              complete=coverage.complete, servers=coverage.servers,
                              checkpoints=list(coverage.checkpoints))


def _authenticator(settings: Settings, database: Database) -> Authenticator:
    if settings.api_key is not None:
        return Authenticator(static_key=settings.api_key)
    if settings.require_auth:
        return Authenticator(keys=KeyStore(database))
    return Authenticator()


def _model_head_loader(settings: Settings) -> HeadLoader:
    def load(path: Path) -> ModelHead:
        return ModelHead(path, dtype=settings.torch_dtype, device=settings.head_device)

    return load
