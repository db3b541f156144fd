"""The FastAPI app: routes, the ASGI layers in front of them, the engine thread's lifetime.

    POST /v1/completions, /v1/chat/completions   completions.py, chat.py
    GET  /v1/models, /v1/models/{id}
    POST /tokenize, /detokenize; GET /tokenizer_info
    GET|HEAD /health, GET|POST /ping, GET /version, GET /metrics   open even with an API key

In front of the routes (middleware.py): a catch-all that turns any unhandled exception
into a generic 500, CORS (--allowed-origins), the API key check (before the body is read)
and the body size limit (before it is parsed). The lifespan starts the `AsyncEngine`
thread and, on shutdown, aborts whatever the drain (server/cli.py) left and stops it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.middleware.cors import CORSMiddleware

from tandem import __version__
from tandem.server.chat import create_chat_completion, render_chat
from tandem.server.completions import create_completion
from tandem.server.errors import APIError, install_error_handlers
from tandem.server.metrics import ServerMetrics
from tandem.server.middleware import APIKeyAuth, BodyLimit, CatchAll
from tandem.server.protocol import (ChatCompletionRequest, CompletionRequest,
                                    DetokenizeRequest, ModelCard, ModelList, TokenizeRequest)
from tandem.server.serving import ServerState, check_model

logger = logging.getLogger("tandem.server")


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

    app = FastAPI(title="tandem", version=__version__, lifespan=lifespan, docs_url=None,
                  redoc_url=None)
    app.state.tandem = state
    install_error_handlers(app)
    config = state.config
    app.add_middleware(BodyLimit, max_bytes=config.max_request_body_bytes)
    if config.api_key:
        app.add_middleware(APIKeyAuth, api_key=config.api_key)
    if config.origins:
        app.add_middleware(CORSMiddleware, allow_origins=config.origins, allow_methods=["*"],
                           allow_headers=["*"])
    app.add_middleware(CatchAll)
    engine = state.engine
    api = APIRouter()

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> Response:
        serving, body = engine.health()  # disaggregated: "degraded" while a worker is down
        return JSONResponse(body, status_code=200 if serving else 503)

    @app.api_route("/ping", methods=["GET", "POST"])
    async def ping() -> Response:
        return await health()

    @app.get("/version")
    async def version() -> dict:
        return {"version": __version__}

    @app.get("/metrics")
    async def get_metrics() -> Response:
        body = metrics.render() if metrics is not None else b""
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    def card(name: str) -> ModelCard:
        return ModelCard(id=name, root=state.model_dir, max_model_len=engine.max_model_len)

    @api.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[card(name) for name in state.model_names])

    @api.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> ModelCard:
        check_model(state, model_id)
        return card(model_id)

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
            _, tokens = await engine.run_blocking(render_chat, state, body.messages,
                                                  body.add_generation_prompt is not False)
        else:
            tokens = await engine.run_blocking(engine.inputs.encode_text, body.prompt,
                                               add_special_tokens=body.add_special_tokens
                                               is not False)
        out = {"tokens": tokens, "count": len(tokens), "max_model_len": engine.max_model_len}
        if body.return_token_strs:  # vLLM's: the vocabulary's string of each token
            tok = engine.tokenizer
            out["token_strs"] = [tok.id_to_token(t) for t in tokens]
        return out

    @api.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        check_model(state, body.model)
        bad = [t for t in body.tokens if not 0 <= t < engine.vocab_size]
        if bad:
            raise APIError(400, f"tokens out of the vocabulary [0, {engine.vocab_size}): "
                                f"{bad[:5]}", param="tokens")
        return {"prompt": await engine.run_blocking(engine.tokenizer.decode, body.tokens)}

    @api.get("/tokenizer_info")
    async def tokenizer_info() -> dict:
        """The tokenizer's settings (as vLLM's endpoint): special tokens, lengths, template."""
        tok = engine.tokenizer
        if tok is None:
            raise APIError(404, "this model has no tokenizer", code="no_tokenizer")
        return {"tokenizer_class": "PreTrainedTokenizerFast", "vocab_size": tok.vocab_size,
                "model_max_length": engine.max_model_len, "bos_token": tok.bos_token,
                "eos_token": tok.eos_token, "add_bos_token": tok.add_bos_token,
                "eos_token_ids": sorted(tok.eos_token_ids), "chat_template": tok.chat_template}

    app.include_router(api)
    return app
