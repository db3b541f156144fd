"""The ASGI layers in front of the routes, outermost first:

    CatchAll     an exception no handler took -> a generic 500 (details only in the log);
                 the app returns normally, so a keep-alive connection stays usable
    CORS         with --allowed-origins only (starlette's CORSMiddleware)
    APIKeyAuth   with --api-key: 401 before a byte of the body is read
    BodyLimit    --max-request-body-bytes: 413 from the Content-Length header at once, or
                 while reading a chunked body, before anything parses it

Pure ASGI (no BaseHTTPMiddleware), so streaming responses pass through untouched.
"""

from __future__ import annotations

import hmac
import logging
from typing import Any

from starlette.exceptions import HTTPException as StarletteHTTPException

from tandem.server.errors import APIError, error_response, internal_error_response

logger = logging.getLogger("tandem.server")

Scope = dict[str, Any]
OPEN_PATHS = frozenset({"/health", "/metrics", "/ping", "/version"})  # probes, scrapers


class CatchAll:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            logger.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if not started:
                await internal_error_response()(scope, receive, send)


class APIKeyAuth:
    def __init__(self, app: Any, api_key: str) -> None:
        self.app = app
        self.expected = api_key.encode()

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if (scope["type"] == "http" and scope["path"] not in OPEN_PATHS
                and scope["method"] != "OPTIONS" and not self._authorized(scope)):
            error = APIError(401, "Invalid or missing API key: send 'Authorization: Bearer "
                                  "<key>'.", code="invalid_api_key",
                             headers=_close_if_unread_body(scope))
            return await error_response(error)(scope, receive, send)
        await self.app(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        header = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        scheme, _, token = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(),
                                                                   self.expected)


def _close_if_unread_body(scope: Scope) -> dict[str, str] | None:
    """Connection: close for a refused request with a sizeable body still unread: reading
    it only to keep the connection would cost more than the client's reconnect."""
    headers = dict(scope["headers"])
    length = headers.get(b"content-length", b"0")
    large = not length.isdigit() or int(length) > 65536
    return {"Connection": "close"} if large or b"transfer-encoding" in headers else None


class BodyLimit:
    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> APIError:
        # Connection: close, so the server need not read (and discard) the rest of the body.
        return APIError(413, f"request body larger than {self.max_bytes} bytes "
                             f"(--max-request-body-bytes)", code="request_too_large",
                        headers={"Connection": "close"})

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await error_response(self._too_large())(scope, receive, send)
        seen = 0

        async def counting_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:  # FastAPI passes HTTPExceptions from body reading
                    error = self._too_large()
                    raise StarletteHTTPException(413, error.message)
            return message

        await self.app(scope, counting_receive, send)
