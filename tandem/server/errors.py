"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` for every failure.

Bad input of any kind is a 4xx, never a 500: handler code raises `APIError` (or lets a
`ValueError` from `SamplingParams` / the engine through, which becomes a 400), FastAPI's
request validation (wrong types, malformed JSON) is turned from 422 into 400 naming the
field, and unknown routes keep their 404/405 but in the same shape. A 500 says only that
something failed (the details go to the log), and error bodies are ASCII-escaped JSON, so
no input can make an error unrenderable.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tandem.engine.input_processor import ContextLengthError
from tandem.request import SamplingParams

logger = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
          499: "client_closed_request", 500: "internal_server_error",
          503: "service_unavailable"}


class APIError(Exception):
    def __init__(self, status_code: int, message: str, param: str | None = None,
                 code: str | None = None, type: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status_code, "invalid_request_error")
        self.headers = headers


class ErrorResponse(JSONResponse):
    """JSON with non-ASCII escaped: renders any message, lone surrogates included."""

    def render(self, content: object) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode()


def error_body(status_code: int, message: str, param: str | None = None,
               code: str | None = None, type: str | None = None) -> dict:
    return {"error": {"message": message,
                      "type": type or _TYPES.get(status_code, "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(e: APIError) -> JSONResponse:
    return ErrorResponse(error_body(e.status_code, e.message, e.param, e.code, e.type),
                         status_code=e.status_code, headers=e.headers)


def internal_error_response() -> JSONResponse:
    return ErrorResponse(error_body(500, "internal server error; see the server log",
                                    code="internal_error"), status_code=500)


_FIELD = re.compile(r"^([a-z_]+)[ :]")
_PARAMS = {f.name for f in dataclasses.fields(SamplingParams)} | {
    "prompt", "prompt_token_ids", "messages", "suffix", "echo", "best_of", "logit_bias",
    "max_completion_tokens", "top_logprobs", "tokens", "model", "stop_token_ids"}


def bad_request(e: ValueError) -> APIError:
    """A ValueError from SamplingParams or the engine; its first word names the field
    (a ContextLengthError names it itself)."""
    if isinstance(e, ContextLengthError):
        return APIError(400, str(e), param=e.param, code="context_length_exceeded")
    message = str(e)
    m = _FIELD.match(message)
    return APIError(400, message, param=m.group(1) if m and m.group(1) in _PARAMS else None)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    parts, param = [], None
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            return f"request body is not valid JSON: {err.get('msg', '')}", None
        field = (err.get("ctx") or {}).get("field")  # our own checks name the field
        if field:
            loc = str(field).split(".")
        where = ".".join(loc) or "body"
        param = param or (loc[0] if loc else None)
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts[:5]), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return ErrorResponse(error_body(400, message, param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return ErrorResponse(error_body(exc.status_code, str(exc.detail)),
                             status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(ValueError)
    async def _value(_: Request, exc: ValueError) -> JSONResponse:
        return error_response(bad_request(exc))
