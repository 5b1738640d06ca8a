"""OpenAI's error envelope for every failure, so SDKs raise their usual typed exceptions.

Every error leaves as `{"error": {"message", "type", "param", "code"}}` with OpenAI's status
codes: request validation is a 400 naming the offending field (never FastAPI's 422), and
unexpected exceptions are a bare 500 whose details stay in the server log.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.backend import BlocksUnavailable, SwarmBusy, SwarmUnreachable
from gateway.protocol.schemas import ErrorDetail, ErrorResponse

log = logging.getLogger(__name__)


class APIError(Exception):
    """An error the API reports to the client as is."""

    status_code = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def detail(self) -> ErrorDetail:
        return ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code)


class InvalidRequest(APIError):
    status_code = 400
    type = "invalid_request_error"


class AuthenticationFailed(APIError):
    status_code = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class ModelNotFound(APIError):
    status_code = 404
    type = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, model: str):
        super().__init__(f"The model '{model}' does not exist or you do not have access to it.", param="model")


class NotFound(APIError):
    """A tenant's resource (file, job, ...) that does not exist, or belongs to another tenant."""

    status_code = 404
    type = "invalid_request_error"


class PayloadTooLarge(APIError):
    status_code = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class RateLimited(APIError):
    status_code = 429
    type = "requests"
    code = "rate_limit_exceeded"


class ServiceUnavailable(APIError):
    status_code = 503
    type = "server_error"
    code = "blocks_unavailable"


class ClientDisconnected(Exception):
    """The client left before its answer was ready; nothing is sent (logged as status 499)."""


INTERNAL_ERROR = "The server had an error while processing your request. Sorry about that!"


def error_body(error: APIError) -> dict[str, Any]:
    """The JSON of an error, also used for errors inside an already started stream."""
    return ErrorResponse(error=error.detail()).model_dump()


def from_exception(exc: BaseException) -> APIError:
    """Map any exception to the APIError the client sees; unknown ones become an opaque 500."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, SwarmBusy):
        return RateLimited(str(exc) or "The swarm is at capacity, please retry later.", code="swarm_busy")
    if isinstance(exc, (BlocksUnavailable, SwarmUnreachable)):
        return ServiceUnavailable(str(exc))
    log.error("internal error", exc_info=exc)
    return APIError(INTERNAL_ERROR)


def _json(error: APIError) -> JSONResponse:
    return JSONResponse(error_body(error), status_code=error.status_code)


_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _is_union_tag(part: str | int) -> bool:
    """Pydantic names the member of a union that failed (`str`, `list[TextPart]`); params don't."""
    return isinstance(part, str) and (part in _UNION_TAGS or "[" in part or part.startswith("function-"))


def _param(loc: Sequence[str | int]) -> str | None:
    """Pydantic's error location as OpenAI writes a param: `messages[0].content`."""
    path = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if _is_union_tag(part):
            continue
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else str(part)
    return path or None


def validation_error(exc: RequestValidationError) -> InvalidRequest:
    errors = exc.errors()
    if any(error["type"] == "json_invalid" for error in errors):
        return InvalidRequest(
            "We could not parse the JSON body of your request. The OpenAI API expects a JSON payload."
        )
    # The deepest location is the most precise one (a union reports its members' errors too).
    param = _param(max(errors, key=lambda error: len(error["loc"]))["loc"])
    messages = dict.fromkeys(f"{_param(e['loc']) or 'body'}: {e['msg']}" for e in errors)
    return InvalidRequest("Invalid request: " + "; ".join(messages), param=param)


async def _on_api_error(_: Request, exc: Exception) -> JSONResponse:
    return _json(from_exception(exc))


async def _on_validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return _json(validation_error(exc))


async def _on_client_disconnected(_: Request, exc: Exception) -> Response:
    return Response(status_code=499)  # nginx's "client closed request"; nobody reads it


_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")


def _allowed_methods(request: Request) -> str:
    """Every method some route of this path answers (Starlette names only the first route's)."""
    routes = request.app.router.routes
    scope = {key: value for key, value in request.scope.items() if key not in ("path_params", "endpoint", "route")}
    return ", ".join(
        method for method in _METHODS
        if any(route.matches({**scope, "method": method})[0] == Match.FULL for route in routes)
    )


async def _on_http_error(request: Request, exc: Exception) -> JSONResponse:
    """Starlette's own errors (unknown route, wrong method) in the same envelope; a 405 names in
    ``Allow`` every method of the path (OPTIONS included: no CORS preflight is served)."""
    assert isinstance(exc, StarletteHTTPException)
    body = ErrorResponse(error=ErrorDetail(message=str(exc.detail), type="invalid_request_error"))
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        headers["Allow"] = _allowed_methods(request) or headers.get("Allow", "")
    return JSONResponse(body.model_dump(), status_code=exc.status_code, headers=headers or None)


class _InternalErrors:
    """Unexpected exceptions -> a logged, opaque 500 envelope.

    Starlette's own `Exception` handler answers too, but then re-raises, and uvicorn resets the
    connection, sometimes before the client has read the answer.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def send_tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracked)
        except Exception as exc:
            if started or scope["type"] != "http":
                raise
            await _json(from_exception(exc))(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _on_api_error)
    app.add_exception_handler(SwarmBusy, _on_api_error)
    app.add_exception_handler(BlocksUnavailable, _on_api_error)
    app.add_exception_handler(SwarmUnreachable, _on_api_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(ClientDisconnected, _on_client_disconnected)
    app.add_middleware(_InternalErrors)
