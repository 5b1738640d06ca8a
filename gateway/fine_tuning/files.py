"""The Files API: `/v1/files` upload, list, retrieve, content, delete; a tenant's own files only.

Only `purpose=fine-tune` is accepted for now, and such a file is checked whole as chat training
data before it is stored (errors name the line), so a job never starts on a broken file.
"""

from __future__ import annotations

from typing import Annotated, Literal

from anyio.to_thread import run_sync
from fastapi import APIRouter, File, Form, Query, Response, UploadFile

from gateway.protocol.errors import InvalidRequest, NotFound
from gateway.protocol.fine_tuning_schemas import FileDeleted, FileList, FileObject
from gateway.fine_tuning.service import FineTuningDep
from gateway.state import GatewayDep, TenantDep
from gateway.fine_tuning.training_data import TrainingFileError, parse_examples
from gateway.fine_tuning.uploads import LimitedUploadRoute, read_upload

router = APIRouter(route_class=LimitedUploadRoute)

PURPOSES = ("fine-tune",)
MAX_FILENAME = 255


def file_not_found(file_id: str, param: str | None = None) -> NotFound:
    return NotFound(f"No such File object: {file_id}", param=param, code="file_not_found")


@router.post("/v1/files")
async def create_file(
    file: Annotated[UploadFile, File(
        description="JSONL chat examples: one {\"messages\": [...]} per line.", json_schema_extra={"minLength": 1})],
    purpose: Annotated[str, Form(description="Only `fine-tune` for now.", json_schema_extra={"enum": ["fine-tune"]})],
    gateway: GatewayDep,
    fine_tuning: FineTuningDep,
    tenant: TenantDep,
) -> FileObject:
    if purpose not in PURPOSES:
        raise InvalidRequest(
            f"Invalid purpose '{purpose}': this gateway accepts only {', '.join(PURPOSES)} files.", param="purpose"
        )
    filename = file.filename or "upload.jsonl"
    if len(filename) > MAX_FILENAME:
        raise InvalidRequest(f"The file name is longer than {MAX_FILENAME} characters.", param="file")
    content = await read_upload(file, gateway.settings.max_upload_bytes)
    try:
        await run_sync(parse_examples, content)
    except TrainingFileError as error:
        raise InvalidRequest(str(error), param="file", code="invalid_file_format") from None
    return await run_sync(fine_tuning.files.create, tenant, filename, purpose, content)


@router.get("/v1/files")
async def list_files(
    fine_tuning: FineTuningDep,
    tenant: TenantDep,
    purpose: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    order: Literal["asc", "desc"] = "desc",
    after: str | None = None,
) -> FileList:
    files, has_more = fine_tuning.files.list(
        tenant, purpose=purpose, limit=limit, after=after, descending=order == "desc"
    )
    return FileList(
        data=files,
        first_id=files[0].id if files else None,
        last_id=files[-1].id if files else None,
        has_more=has_more,
    )


@router.get("/v1/files/{file_id}")
async def retrieve_file(file_id: str, fine_tuning: FineTuningDep, tenant: TenantDep) -> FileObject:
    if (file := fine_tuning.files.get(tenant, file_id)) is None:
        raise file_not_found(file_id)
    return file


@router.get(
    "/v1/files/{file_id}/content",
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}}, "description": "The file as uploaded."}},
)
async def retrieve_file_content(file_id: str, fine_tuning: FineTuningDep, tenant: TenantDep) -> Response:
    if (content := await run_sync(fine_tuning.files.read, tenant, file_id)) is None:
        raise file_not_found(file_id)
    return Response(content, media_type="application/octet-stream")


@router.delete("/v1/files/{file_id}")
async def delete_file(file_id: str, fine_tuning: FineTuningDep, tenant: TenantDep) -> FileDeleted:
    if not await run_sync(fine_tuning.files.delete, tenant, file_id):
        raise file_not_found(file_id)
    return FileDeleted(id=file_id)
