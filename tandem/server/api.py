"""The FastAPI app: routes, authentication and the engine thread's lifetime.

    POST /v1/completions, /v1/chat/completions   completions.py, chat.py
    GET  /v1/models
    POST /tokenize, /detokenize
    GET  /health, /metrics                        open even with an API key (probes, scrapers)

With an API key (--api-key or TANDEM_API_KEY) every other route wants
`Authorization: Bearer <key>`, else a 401. The lifespan starts the `AsyncEngine` thread; on
shutdown (after uvicorn has let in-flight responses finish, up to --shutdown-timeout) it
aborts whatever is left and stops the thread.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from tandem.server.chat import create_chat_completion, render_chat
from tandem.server.completions import create_completion
from tandem.server.errors import APIError, install_error_handlers
from tandem.server.metrics import ServerMetrics
from tandem.server.protocol import (ChatCompletionRequest, CompletionRequest,
                                    DetokenizeRequest, ModelCard, ModelList, TokenizeRequest)
from tandem.server.serving import ServerState, check_model

logger = logging.getLogger("tandem.server")


def _auth(api_key: str | None):
    expected = api_key.encode() if api_key else None

    async def check(request: Request) -> None:
        if expected is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                 expected):
            raise APIError(401, "Invalid or missing API key: send 'Authorization: Bearer "
                                "<key>'.", code="invalid_api_key")

    return check


def build_app(state: ServerState, metrics: ServerMetrics | None = None) -> FastAPI:
    """The app for one engine; `metrics` is what /metrics exposes (fed by the engine hook)."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.engine.start()
        yield
        left = state.engine.num_live_requests
        if left:
            logger.info("shutting down: aborting %d unfinished request(s)", left)
        await state.engine.shutdown(timeout=0.0)
        logger.info("engine stopped")

    app = FastAPI(title="tandem", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.tandem = state
    install_error_handlers(app)
    api = APIRouter(dependencies=[Depends(_auth(state.api_key))])

    @app.get("/health")
    async def health() -> Response:
        if not state.engine.is_running:
            return JSONResponse({"status": "stopping"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def get_metrics() -> Response:
        body = metrics.render() if metrics is not None else b""
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    @api.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=state.model_name, root=state.model_dir,
                                         max_model_len=state.engine.max_model_len)])

    @api.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request) -> Response:
        return await create_completion(body, raw, state)

    @api.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, raw: Request) -> Response:
        return await create_chat_completion(body, raw, state)

    @api.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        check_model(state, body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", param="prompt")
        if body.messages is not None:
            _, tokens = render_chat(state, body.messages, body.add_generation_prompt is not False)
        else:
            tokens = state.engine.tokenizer.encode(body.prompt,
                                                   add_special_tokens=body.add_special_tokens
                                                   is not False)
        return {"tokens": tokens, "count": len(tokens),
                "max_model_len": state.engine.max_model_len}

    @api.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        check_model(state, body.model)
        bad = [t for t in body.tokens if not 0 <= t < state.engine.vocab_size]
        if bad:
            raise APIError(400, f"tokens out of the vocabulary [0, {state.engine.vocab_size}): "
                                f"{bad[:5]}", param="tokens")
        return {"prompt": state.engine.tokenizer.decode(body.tokens)}

    app.include_router(api)
    return app
