"""Multipart uploads under the gateway's size limit (`Settings.max_upload_bytes`).

FastAPI parses (and spools to disk) a multipart body before any dependency runs, API-key
check included, so the limit is enforced on the declared length first, by a route class, and
then on the file part itself as it is read.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import Request, Response, UploadFile
from fastapi.routing import APIRoute

from gateway.protocol.errors import APIError, PayloadTooLarge

FORM_OVERHEAD = 64 * 1024  # boundaries, part headers and the small text fields beside the file
CHUNK = 1024 * 1024


class LengthRequired(APIError):
    status_code = 411
    type = "invalid_request_error"


class LimitedUploadRoute(APIRoute):
    """Refuses multipart bodies without a Content-Length or over the limit before they are parsed."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()

        async def limited(request: Request) -> Response:
            if request.headers.get("content-type", "").startswith("multipart/"):
                limit = request.app.state.gateway.settings.max_upload_bytes
                length = request.headers.get("content-length", "")
                if not length.isdigit():
                    raise LengthRequired("Uploads must declare their Content-Length.")
                if int(length) > limit + FORM_OVERHEAD:
                    raise _too_large(limit)
            return await handler(request)

        return limited


async def read_upload(file: UploadFile, limit: int) -> bytes:
    """The whole file part, or a 413 once it exceeds `limit` bytes."""
    chunks, size = [], 0
    while chunk := await file.read(CHUNK):
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"The upload is larger than this gateway's limit of {limit} bytes.", param="file")
