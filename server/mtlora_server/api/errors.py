"""One error schema for every failure: `{"error": {"message", "type", "param", "code"}}` (OpenAI's shape).

Contract:
- `error_from_exception(exc)` maps domain exceptions (mtlora.errors) to (HTTP status, body, headers):
  InvalidRequestError / ContextLengthError / AdapterLoadError / ConfigError / CheckpointError -> 400,
  AdapterNotFoundError -> 404, AdapterBusyError (unloading an adapter that requests use) -> 409,
  EngineOverloadedError -> 429 with Retry-After, EngineDeadError (and its EngineDrainingError) -> 503,
  RequestFailedError -> 500 with its message (the engine logged the traceback), anything else -> 500 (a server
  bug, logged with its traceback).
- `install_error_handlers(app)` routes FastAPI's request-validation errors (normally 422) to 400 naming the
  offending field (an InvalidRequestError raised inside a model validator keeps its own message and param), and
  HTTP errors (404 unknown route, 405, 401, a body FastAPI cannot parse) through the same schema.
- `error_body` is the one place every error message passes: it makes message and param encodable as UTF-8 (a lone
  surrogate a client sent, e.g. in `model`, is written as `\ud800`) and cuts them to `MAX_MESSAGE_CHARS`, so an
  error response can always be sent.
"""

from __future__ import annotations

import logging
import math
import re
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mtlora.errors import (
    AdapterBusyError,
    AdapterLoadError,
    AdapterNotFoundError,
    CheckpointError,
    ConfigError,
    ContextLengthError,
    EngineDeadError,
    EngineOverloadedError,
    InvalidRequestError,
    MtloraError,
    RequestFailedError,
)

logger = logging.getLogger(__name__)


class ApiError(Exception):
    """An HTTP error raised by the API layer itself (auth, disabled features, ...)."""

    def __init__(self, status: int, message: str, err_type: str, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.err_type = err_type
        self.param = param
        self.headers = headers or {}


MAX_MESSAGE_CHARS = 2000


def _encodable(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """`text` as valid UTF-8 (lone surrogates backslash-escaped), at most about `limit` characters."""
    if len(text) > limit:
        text = f"{text[:limit]}... ({len(text) - limit} more characters)"
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_body(message: str, err_type: str, status: int, param: str | None = None) -> dict:
    return {"error": {"message": _encodable(str(message)), "type": err_type,
                      "param": None if param is None else _encodable(str(param), 200), "code": status}}


def error_from_exception(exc: BaseException) -> tuple[int, dict, dict[str, str]]:
    """(status, body, headers) for any exception; order matters because of subclassing."""
    headers: dict[str, str] = {}
    if isinstance(exc, ApiError):
        return exc.status, error_body(str(exc), exc.err_type, exc.status, exc.param), exc.headers
    if isinstance(exc, AdapterNotFoundError):
        status, err_type, param = 404, "NotFoundError", "model"
    elif isinstance(exc, AdapterBusyError):
        status, err_type, param = 409, "ConflictError", "lora_name"
    elif isinstance(exc, ContextLengthError):
        status, err_type, param = 400, "BadRequestError", exc.param or "max_tokens"
    elif isinstance(exc, InvalidRequestError):
        status, err_type, param = 400, "BadRequestError", exc.param
    elif isinstance(exc, (AdapterLoadError, CheckpointError, ConfigError)):
        status, err_type = 400, "BadRequestError"
        param = getattr(exc, "field", None) or getattr(exc, "param", None)
    elif isinstance(exc, EngineOverloadedError):
        status, err_type, param = 429, "RateLimitError", None
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    elif isinstance(exc, EngineDeadError):
        status, err_type, param = 503, "ServiceUnavailableError", None
    elif isinstance(exc, RequestFailedError):
        status, err_type, param = 500, "InternalServerError", None
    else:
        logger.error("internal error while serving a request", exc_info=exc)
        return 500, error_body("internal server error", "InternalServerError", 500), headers
    return status, error_body(str(exc), err_type, status, param), headers


def error_response(exc: BaseException) -> JSONResponse:
    status, body, headers = error_from_exception(exc)
    return JSONResponse(body, status_code=status, headers=headers)


# pydantic names the member of a union that failed ("str", "list[int]", "function-after[...]"): not a field.
_UNION_TAG = re.compile(r"^(str|int|float|bool|none|.*\[.*\])$")


def _param_of(loc: tuple) -> str | None:
    """`("body", "messages", 0, "content")` -> "messages.0.content"; the body itself -> None."""
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    parts = [p for p in parts if not _UNION_TAG.match(p)]
    return ".".join(parts) or None


def _body_parse_failure(cause: BaseException | None) -> str | None:
    """Why FastAPI could not parse a JSON body (it says only "There was an error parsing the body")."""
    if isinstance(cause, RecursionError):
        return "request body is nested too deeply to parse"
    if isinstance(cause, UnicodeDecodeError):
        return "request body is not valid UTF-8"
    if isinstance(cause, ValueError) and "integer string conversion" in str(cause):
        return "request body has an integer literal with too many digits"
    if isinstance(cause, ValueError):
        return f"request body is not valid JSON: {cause}"
    return None


def install_error_handlers(app: FastAPI) -> None:
    """Every failure of `app` answers with `error_body`: domain errors, ApiError, validation, HTTP, anything else."""
    @app.exception_handler(MtloraError)
    async def _domain(request: Request, exc: MtloraError):
        return error_response(exc)

    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        cause = (first.get("ctx") or {}).get("error")
        if isinstance(cause, InvalidRequestError):      # raised by a model validator: it names its field itself
            return error_response(cause)
        param = _param_of(tuple(first.get("loc", ())))
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            message, param = "request body is not valid JSON", None
        elif param:
            message = f"{param}: {message}"
        return JSONResponse(error_body(message, "BadRequestError", 400, param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        try:
            err_type = HTTPStatus(exc.status_code).phrase.replace(" ", "") + "Error"
        except ValueError:
            err_type = "Error"
        message = _body_parse_failure(exc.__cause__) if exc.status_code == 400 else None
        return JSONResponse(error_body(message or str(exc.detail), err_type, exc.status_code),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _any(request: Request, exc: Exception):
        return error_response(exc)
