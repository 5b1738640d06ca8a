"""The fine-tuning API: `/v1/fine_tuning/jobs` as OpenAI's, plus adapter export and import.

Jobs are created here and trained by `trainer.Trainer`; every lookup is by (tenant, id), so
another tenant's job, checkpoint or model answers 404, as a missing one does. The two swarmgate
extensions move adapters in PEFT's own folder format (`adapter_config.json` +
`adapter_model.safetensors`), so they load in plain `peft` and come from it:
`GET /v1/fine_tuning/models/{model}/adapter` (a .tar.gz) and
`POST /v1/fine_tuning/models/import` (a .tar.gz or .zip, for a served base model).
"""

from __future__ import annotations

import re
import secrets
from typing import Annotated

from anyio.to_thread import run_sync
from fastapi import APIRouter, File, Form, Query, Response, UploadFile

from adapters import AdapterError, import_adapter
from blocks.checkpoint import load_config
from gateway.protocol.errors import InvalidRequest, ModelNotFound, NotFound, RateLimited
from gateway.fine_tuning.files import file_not_found
from gateway.storage.fine_tuned import model_id
from gateway.protocol.fine_tuning_schemas import (
    MAX_SUFFIX,
    SUFFIX_PATTERN,
    CheckpointMetrics,
    CreateFineTuningJob,
    FineTuningJob,
    FineTuningJobCheckpoint,
    FineTuningJobCheckpointList,
    FineTuningJobEventList,
    FineTuningJobList,
)
from gateway.protocol.schemas import Model
from gateway.fine_tuning.service import FineTuning, FineTuningDep
from gateway.state import GatewayDep, TenantDep
from gateway.fine_tuning.uploads import LimitedUploadRoute, read_upload

IMPORT_EXPANSION = 4  # an imported adapter's archive may unpack to this many times the upload limit

router = APIRouter(route_class=LimitedUploadRoute)

Limit = Annotated[int, Query(ge=1, le=100)]


def _job(fine_tuning: FineTuning, tenant: str, job_id: str) -> FineTuningJob:
    if (job := fine_tuning.jobs.get(tenant, job_id)) is None:
        raise NotFound(
            f"No fine-tuning job found with id '{job_id}'.", param="fine_tuning_job_id", code="job_not_found"
        )
    return job


@router.post("/v1/fine_tuning/jobs")
async def create_job(
    body: CreateFineTuningJob, gateway: GatewayDep, fine_tuning: FineTuningDep, tenant: TenantDep
) -> FineTuningJob:
    """Checks what can be checked at once; the files' contents are validated by the trainer."""
    try:
        base = await run_sync(gateway.models.get, body.model)  # may load it: not on the event loop
    except ModelNotFound:
        if fine_tuning.fine_tuned.find(body.model, tenant) is not None:
            raise InvalidRequest(
                "Fine-tuning a fine-tuned model is not supported; fine-tune its base model.", param="model"
            ) from None
        raise
    if base.tokenizer.chat_template is None:
        raise InvalidRequest(f"Model '{base.id}' has no chat template to fine-tune with.", param="model")
    for param, file_id in (("training_file", body.training_file), ("validation_file", body.validation_file)):
        if file_id is None:
            continue
        if (file := fine_tuning.files.get(tenant, file_id)) is None:
            raise file_not_found(file_id, param)
        if file.purpose != "fine-tune":
            raise InvalidRequest(f"File {file_id} has purpose '{file.purpose}', not 'fine-tune'.", param=param)
    if (active := fine_tuning.jobs.active(tenant)) >= (limit := gateway.settings.max_fine_tuning_jobs):
        raise RateLimited(f"This organization has {active} fine-tuning jobs validating, queued or running (limit "
                          f"{limit}); create more when one finishes or is cancelled.")
    seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
    job = fine_tuning.jobs.create(tenant, body, seed)
    fine_tuning.trainer.submit(job)
    return job


@router.get("/v1/fine_tuning/jobs")
async def list_jobs(
    fine_tuning: FineTuningDep, tenant: TenantDep, after: str | None = None, limit: Limit = 20
) -> FineTuningJobList:
    jobs, has_more = fine_tuning.jobs.list(tenant, limit=limit, after=after)
    return FineTuningJobList(data=jobs, has_more=has_more)


@router.get("/v1/fine_tuning/jobs/{fine_tuning_job_id}")
async def retrieve_job(fine_tuning_job_id: str, fine_tuning: FineTuningDep, tenant: TenantDep) -> FineTuningJob:
    return _job(fine_tuning, tenant, fine_tuning_job_id)


@router.post("/v1/fine_tuning/jobs/{fine_tuning_job_id}/cancel")
async def cancel_job(fine_tuning_job_id: str, fine_tuning: FineTuningDep, tenant: TenantDep) -> FineTuningJob:
    """Immediate for the job's status; a running job stops before its next step."""
    job = _job(fine_tuning, tenant, fine_tuning_job_id)
    if job.status in ("succeeded", "failed"):
        raise InvalidRequest(f"The job has already {job.status}; only active jobs can be cancelled.",
                             param="fine_tuning_job_id", code="job_not_cancellable")
    if fine_tuning.jobs.finish(job.id, "cancelled"):
        fine_tuning.jobs.add_event(job.id, "Fine-tuning job cancelled")
    return _job(fine_tuning, tenant, job.id)


@router.get("/v1/fine_tuning/jobs/{fine_tuning_job_id}/events")
async def list_events(
    fine_tuning_job_id: str, fine_tuning: FineTuningDep, tenant: TenantDep, after: str | None = None,
    limit: Limit = 20,
) -> FineTuningJobEventList:
    """Newest first: step metrics (`type: metrics`, `data.train_loss`), epoch validation, messages."""
    job = _job(fine_tuning, tenant, fine_tuning_job_id)
    events, has_more = fine_tuning.jobs.events(job.id, limit=limit, after=after)
    return FineTuningJobEventList(data=events, has_more=has_more)


@router.get("/v1/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints")
async def list_checkpoints(
    fine_tuning_job_id: str, fine_tuning: FineTuningDep, tenant: TenantDep, after: str | None = None,
    limit: Limit = 10,
) -> FineTuningJobCheckpointList:
    """One per epoch (the last three are kept), newest first; each id works as a model."""
    job = _job(fine_tuning, tenant, fine_tuning_job_id)
    models, has_more = fine_tuning.fine_tuned.checkpoints(job.id, limit=limit, after=after)
    checkpoints = [
        FineTuningJobCheckpoint(
            id=model.adapter, created_at=model.created_at, fine_tuned_model_checkpoint=model.id,
            fine_tuning_job_id=job.id, metrics=CheckpointMetrics.model_validate(model.metrics or {"step": model.step}),
            step_number=model.step or 0,
        )
        for model in models
    ]
    return FineTuningJobCheckpointList(
        data=checkpoints,
        first_id=checkpoints[0].id if checkpoints else None,
        last_id=checkpoints[-1].id if checkpoints else None,
        has_more=has_more,
    )


@router.get(
    "/v1/fine_tuning/models/{model:path}/adapter",
    response_class=Response,
    responses={200: {"content": {"application/gzip": {}}, "description": "The adapter's PEFT folder as a .tar.gz."}},
)
async def export_adapter(model: str, fine_tuning: FineTuningDep, tenant: TenantDep) -> Response:
    """swarmgate extension: a fine-tuned model's (or checkpoint's) adapter, loadable by `peft`."""
    fine_tuned = fine_tuning.fine_tuned
    if (found := fine_tuned.find(model, tenant)) is None:
        raise ModelNotFound(model)
    try:
        archive = await run_sync(fine_tuned.store.export, tenant, found.adapter)
    except FileNotFoundError:  # a checkpoint pruned meanwhile
        raise ModelNotFound(model) from None
    filename = re.sub(r"[^A-Za-z0-9_.-]", "_", found.id) + ".tar.gz"
    return Response(archive, media_type="application/gzip",
                    headers={"Content-Disposition": f'attachment; filename="{filename}"'})


@router.post("/v1/fine_tuning/models/import")
async def import_model(
    file: Annotated[UploadFile, File(description="A PEFT LoRA adapter folder as .tar.gz or .zip.")],
    model: Annotated[str, Form(description="The served base model the adapter was trained on.",
                               json_schema_extra={"minLength": 1})],
    gateway: GatewayDep,
    fine_tuning: FineTuningDep,
    tenant: TenantDep,
    suffix: Annotated[str | None, Form(min_length=1, max_length=MAX_SUFFIX, pattern=SUFFIX_PATTERN)] = None,
) -> Model:
    """swarmgate extension: serve an existing PEFT LoRA adapter as a new model of this tenant."""
    base = await run_sync(gateway.models.get, model)  # may load it: not on the event loop
    data = await read_upload(file, gateway.settings.max_upload_bytes)
    config = await run_sync(load_config, gateway.settings.models[base.id])
    try:
        # unpacked, at most a few times the upload (adapters' float weights hardly compress)
        adapter = await run_sync(lambda: import_adapter(data, config, base.id,
                                                        max_bytes=IMPORT_EXPANSION * gateway.settings.max_upload_bytes))
    except AdapterError as error:
        raise InvalidRequest(f"Not an adapter this swarm can serve: {error}", param="file",
                             code="invalid_adapter") from None
    name = f"ftimport-{secrets.token_hex(12)}"
    imported = await run_sync(lambda: fine_tuning.fine_tuned.add(
        tenant, model_id(base.id, tenant, suffix, name), base.id, adapter, name=name, kind="import"
    ))
    return Model(id=imported.id, created=imported.created_at, owned_by=tenant, max_model_len=base.context_length)
