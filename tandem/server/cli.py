"""`tandem serve [MODEL]`: build the engine, wrap it in an `AsyncEngine`, run the app under
uvicorn. Server flags come from `ServerConfig`, engine flags from the engine configs.

The engine runs in its own process unless --no-engine-process (engine/core_process.py).
SIGTERM / SIGINT: the server stops accepting connections and new requests (503), lets
in-flight requests finish for up to --shutdown-timeout seconds, then aborts the rest: each
open stream gets its choices' finish_reason "abort", an error event and `data: [DONE]`
before its connection closes. The process then exits 0. If the engine cannot go on (its
process or a tensor-parallel worker died), live requests fail, /health turns 503 and the
server shuts down the same way, exiting 1.

With --nnodes N, node 0 runs the server and the engine; `tandem serve MODEL --node-rank K`
on node K > 0 (same model path, parallel flags and --master-addr/--master-port) only
starts that node's tensor-parallel workers and exits when they do.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import signal
from typing import Any

from tandem import envs
from tandem.cli import add_config_args, add_engine_args, engine_kwargs
from tandem.config import field_comments
from tandem.disagg.config import KV_CONNECTORS, DisaggConfig
from tandem.disagg.policy import POLICIES
from tandem.server.config import LOG_LEVELS, ServerConfig

logger = logging.getLogger("tandem.server")
_SERVER_FIELDS = list(dataclasses.fields(ServerConfig))
_DISAGG_FIELDS = list(dataclasses.fields(DisaggConfig))
# Slack on top of --shutdown-timeout for aborted streams to send their last events.
_ABORT_GRACE_S = 5.0


def add_serve_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("serve", help="serve an OpenAI-compatible HTTP API")
    p.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                   help="model directory, as `vllm serve MODEL` (default: embedded model)")
    p.add_argument("--model", default=None, help="model directory (same as MODEL)")
    group = p.add_argument_group("server")
    add_config_args(group, _SERVER_FIELDS, field_comments(ServerConfig),
                    choices={"log_level": LOG_LEVELS, "uvicorn_log_level": LOG_LEVELS})
    group.add_argument("--disable-log-requests", dest="enable_log_requests",
                       action="store_false", help="do not log each request (the default)")
    disagg = p.add_argument_group("prefill/decode disaggregation (docs/disaggregation.md)")
    add_config_args(disagg, _DISAGG_FIELDS, field_comments(DisaggConfig),
                    choices={"disagg_policy": POLICIES, "kv_connector": KV_CONNECTORS})
    add_engine_args(p)
    p.set_defaults(func=_cmd_serve)
    return p


def server_config(args: argparse.Namespace) -> ServerConfig:
    given = {f.name: getattr(args, f.name) for f in _SERVER_FIELDS
             if getattr(args, f.name, None) is not None}
    given.setdefault("api_key", envs.api_key())
    return ServerConfig(**given)


def disagg_config(args: argparse.Namespace) -> DisaggConfig:
    return DisaggConfig(**{f.name: getattr(args, f.name) for f in _DISAGG_FIELDS
                           if getattr(args, f.name, None) is not None})


def _model_dir(args: argparse.Namespace) -> str:
    if args.model_tag and args.model and args.model_tag != args.model:
        raise ValueError(f"two models given: {args.model_tag!r} and --model {args.model!r}")
    model_dir = args.model_tag or args.model
    if model_dir is None:
        from tandem.assets import default_model_dir
        try:
            model_dir = default_model_dir()
        except FileNotFoundError as e:
            raise ValueError(f"{e}; pass a model directory") from e
    return model_dir


def _summary(engine: Any, name: str, host: str, port: int) -> str:
    info, config = engine.describe(), engine.config
    kv_tokens = info["num_kv_blocks"] * info["block_size"]
    where = info.get("layout") or (f"engine process {info['pid']}" if "pid" in info
                                   else "engine thread")
    return (f"serving {name!r} from {config.model.model}: dtype {info['dtype']}, "
            f"device {info['device']} ({where}), max_model_len {engine.max_model_len}, KV "
            f"cache {kv_tokens} tokens ({info['num_kv_blocks']} blocks), maximum concurrency "
            f"{kv_tokens / engine.max_model_len:.2f}x full-length requests, "
            f"prefix caching {'on' if config.cache.enable_prefix_caching else 'off'}, "
            f"on http://{host}:{port}")


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from tandem.config import EngineConfig
    from tandem.engine.async_engine import AsyncEngine
    from tandem.engine.engine import Engine
    from tandem.server.api import build_app
    from tandem.server.metrics import ServerMetrics, StatusLogger
    from tandem.server.serving import ServerState

    config = server_config(args)
    logging.basicConfig(level=getattr(logging, config.log_level.upper(), logging.DEBUG),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model_dir = _model_dir(args)
    engine_config = EngineConfig.from_kwargs(model_dir, **engine_kwargs(args))
    if engine_config.parallel.node_rank > 0:  # a worker node: no server, no engine
        from tandem.executor.multiproc import run_node
        logger.info("node %d of %d: starting tensor-parallel workers for %s:%s",
                    engine_config.parallel.node_rank, engine_config.parallel.nnodes,
                    engine_config.parallel.master_addr, engine_config.parallel.master_port)
        return run_node(engine_config)
    names = config.served_model_name or (args.model_tag or args.model or "default",)
    name = names[0]
    metrics = ServerMetrics(name, prefix=config.metrics_prefix)
    status = StatusLogger(config.status_interval)

    def on_step(outputs: list, stats: Any) -> None:
        metrics.observe(outputs, stats)
        if not config.disable_log_stats:
            status.observe(stats)

    layout = disagg_config(args)
    if layout.enabled:
        from tandem.disagg.frontend import DisaggAsyncEngine
        from tandem.disagg.metrics import DisaggMetrics
        if not config.engine_process:
            raise ValueError("--prefill-workers / --decode-workers run engine processes: "
                             "drop --no-engine-process")
        if engine_config.parallel.tensor_parallel_size > 1 or engine_config.parallel.nnodes > 1:
            raise ValueError("disaggregation with tensor parallelism is not built yet: "
                             "use --tensor-parallel-size 1 with --prefill-workers / "
                             "--decode-workers")
        engine = DisaggAsyncEngine(engine_config, layout, on_step, logging.getLogger().level,
                                   DisaggMetrics(name, metrics.registry, metrics.prefix))
    elif config.engine_process:
        engine = AsyncEngine.in_process(engine_config, on_step, logging.getLogger().level)
    else:
        engine = AsyncEngine(Engine(engine_config), on_step)
    fatal: list[BaseException] = []
    servers: list[Any] = []

    def on_dead(error: BaseException) -> None:  # from an engine-side thread
        logger.critical("the engine is gone (%s); shutting down", error)
        fatal.append(error)
        for s in servers:
            s.should_exit = True

    engine.on_dead = on_dead
    engine.start()  # the model loads here: errors surface before the server listens
    state = ServerState(engine, name, model_dir, config, tuple(names[1:]))
    app = build_app(state, metrics)
    logger.info(_summary(engine, name, config.host, config.port))
    if config.api_key:
        logger.info("API key required (Authorization: Bearer ...); probes and /metrics open")

    class Server(uvicorn.Server):
        """uvicorn's server, whose shutdown drains the engine alongside: new requests get
        503, live ones have --shutdown-timeout seconds, then the rest end with abort events
        while their connections are still open (uvicorn's own deadline comes later)."""

        async def shutdown(self, sockets: Any = None) -> None:
            drain = asyncio.ensure_future(state.engine.shutdown(config.shutdown_timeout))
            await super().shutdown(sockets)
            await drain

    server = Server(uvicorn.Config(
        app, host=config.host, port=config.port, log_level=config.uvicorn_log_level,
        timeout_graceful_shutdown=config.shutdown_timeout + _ABORT_GRACE_S))
    servers.append(server)
    if fatal:  # died between start-up and here
        server.should_exit = True
    # uvicorn installs its own handlers while it runs and re-raises the signal that stopped
    # it once it restores the previous ones; these no-ops underneath make a drained shutdown
    # end here, with exit status 0, instead of dying by the signal.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    server.run()
    return 1 if fatal or not server.started else 0
