"""`tandem serve`: build the engine, wrap it in an `AsyncEngine`, run the app under uvicorn.

SIGTERM / SIGINT: uvicorn stops accepting connections and lets in-flight responses finish
for up to --shutdown-timeout seconds (then cancels them, which aborts their requests); the
app's lifespan then aborts whatever is left and stops the engine thread; the process exits 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
from typing import Any

from tandem.cli import add_engine_args, engine_kwargs

API_KEY_ENV = "TANDEM_API_KEY"  # the API key when --api-key is not given
logger = logging.getLogger("tandem.server")


def add_serve_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("serve", help="serve an OpenAI-compatible HTTP API")
    p.add_argument("--model", default=None, help="model directory (default: embedded model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}); "
                        f"/health and /metrics stay open")
    p.add_argument("--served-model-name", default=None,
                   help="the model name clients pass (default: --model, or 'default')")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish on SIGTERM/SIGINT")
    p.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--status-interval", type=float, default=10.0,
                   help="seconds between status log lines while busy")
    add_engine_args(p)
    p.set_defaults(func=_cmd_serve)
    return p


def _summary(engine: Any, name: str, host: str, port: int) -> str:
    stats = engine.stats()
    kv_tokens = stats.num_kv_blocks_total * engine.config.cache.block_size
    runner = engine.runner
    return (f"serving {name!r} from {engine.config.model.model}: dtype {runner.dtype}, "
            f"device {runner.device}, max_model_len {engine.max_model_len}, KV cache "
            f"{kv_tokens} tokens ({stats.num_kv_blocks_total} blocks), maximum concurrency "
            f"{kv_tokens / engine.max_model_len:.2f}x full-length requests, "
            f"prefix caching {'on' if engine.config.cache.enable_prefix_caching else 'off'}, "
            f"on http://{host}:{port}")


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from tandem.config import EngineConfig
    from tandem.engine.async_engine import AsyncEngine
    from tandem.engine.engine import Engine
    from tandem.server.api import build_app
    from tandem.server.metrics import ServerMetrics, StatusLogger
    from tandem.server.serving import ServerState

    level = getattr(logging, args.log_level.upper())
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model_dir = args.model
    if model_dir is None:
        from tandem.assets import default_model_dir
        try:
            model_dir = default_model_dir()
        except FileNotFoundError as e:
            raise ValueError(f"{e}; pass --model DIR") from e
    engine = Engine(EngineConfig.from_kwargs(model_dir, **engine_kwargs(args)))
    metrics, status = ServerMetrics(), StatusLogger(args.status_interval)

    def on_step(outputs: list, stats: Any) -> None:
        metrics.observe(outputs, stats)
        status.observe(stats)

    name = args.served_model_name or args.model or "default"
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    state = ServerState(AsyncEngine(engine, on_step), name, model_dir, api_key)
    app = build_app(state, metrics)
    logger.info(_summary(engine, name, args.host, args.port))
    if api_key:
        logger.info("API key required (Authorization: Bearer ...); /health and /metrics open")
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.shutdown_timeout)
    server = uvicorn.Server(config)
    # uvicorn installs its own handlers while it runs and re-raises the signal that stopped
    # it once it restores the previous ones; these no-ops underneath make a drained shutdown
    # end here, with exit status 0, instead of dying by the signal.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    server.run()
    return 0 if server.started else 1
