"""Workers started on their own, on any machine, and joined by address.

    machine B:  TANDEM_WORKER_KEY=secret tandem worker MODEL --listen 0.0.0.0:7001 [engine flags]
    machine C:  TANDEM_WORKER_KEY=secret tandem worker MODEL --listen 0.0.0.0:7002 ...
    machine A:  TANDEM_WORKER_KEY=secret tandem serve MODEL --decode-workers 1 \\
                    --remote-prefill B:7001,C:7002 --kv-group-address A

A `tandem worker` waits for one front end. The front end connects (multiprocessing's
authenticated connections: an HMAC challenge on TANDEM_WORKER_KEY, then pickled messages),
sends the worker its role (disagg/worker.py's WorkerRole), and from then on talks to it
exactly as to an engine process it spawned (engine/core_process.py: commands down, events
and control messages up, on one connection). The worker builds its engine from its own
flags and model copy, which must match the front end's (same model, dtype, block size).
When the front end goes, the worker's engine stops and the command exits.

Between machines only point-to-point sends carry KV (`--kv-connector nccl`, or auto with
remote workers): the front end gives every worker the group's address
(`--kv-group-address`, this machine's by default, which suits one machine).
"""

from __future__ import annotations

import argparse
import logging
from multiprocessing.connection import Client, Listener
from typing import Any

from tandem import envs
from tandem.disagg.config import parse_address
from tandem.engine.core_process import ProcessCore

logger = logging.getLogger(__name__)


def _key() -> bytes:
    key = envs.worker_key()
    if not key:
        raise ValueError("set TANDEM_WORKER_KEY (the same on the worker and the front end): "
                         "it authenticates the connection between them")
    return key.encode()


class RemoteCore(ProcessCore):
    """A `tandem worker` reached by address, in place of a spawned engine process."""

    def __init__(self, config: Any, address: tuple[str, int], log_level: int, role: Any
                 ) -> None:
        super().__init__(config, log_level, role)
        self.address = address

    def _open(self) -> None:
        try:
            conn = Client(self.address, authkey=_key())
        except (OSError, EOFError) as e:
            raise ValueError(f"cannot reach the worker at {self.address[0]}:"
                             f"{self.address[1]}: {e}") from e
        conn.send(("role", self.role))
        self._cmd_w = self._evt_r = conn  # one duplex connection both ways

    def _stop(self) -> None:
        self._cmd_w.close()

    def join(self, timeout: float) -> None:
        """After an Exit: the worker's engine stops and it closes the connection."""
        if self._rx is not None:
            self._rx.join(timeout)
        try:
            self._cmd_w.close()
        except OSError:
            pass


def serve_worker(config: Any, listen: tuple[str, int], log_level: int) -> int:
    """`tandem worker`: wait for a front end, take its role, run the engine until it goes."""
    from tandem.engine.core_process import core_main
    with Listener(listen, authkey=_key()) as listener:
        logger.info("worker for %s listening on %s:%d", config.model.model, *listen)
        while True:
            try:
                conn = listener.accept()
                break
            except Exception as e:  # a wrong key, or a probe: wait for the next
                logger.warning("refused a connection: %r", e)
    with conn:
        kind, role = conn.recv()
        if kind != "role":
            raise ValueError(f"expected the front end's role message, got {kind!r}")
        logger.info("front end connected: %s worker %d", role.role, role.index)
        try:
            core_main(config, conn, conn, log_level, role)
        except (EOFError, OSError):  # the front end went without an Exit
            logger.warning("the front end is gone; stopping")
    return 0


def add_worker_parser(sub: Any) -> argparse.ArgumentParser:
    from tandem.cli import add_engine_args
    p = sub.add_parser("worker", help="an engine for a disaggregated `tandem serve` elsewhere")
    p.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                   help="model directory (default: embedded model)")
    p.add_argument("--listen", required=True, help="HOST:PORT to wait on for the front end")
    p.add_argument("--log-level", default="info")
    add_engine_args(p)
    p.set_defaults(func=_cmd_worker)
    return p


def _cmd_worker(args: argparse.Namespace) -> int:
    from tandem.cli import engine_kwargs
    from tandem.config import EngineConfig
    level = getattr(logging, args.log_level.upper(), logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _key()  # fail before loading anything
    model = args.model_tag
    if model is None:
        from tandem.assets import default_model_dir
        model = default_model_dir()
    return serve_worker(EngineConfig.from_kwargs(model, **engine_kwargs(args)),
                        parse_address(args.listen), level)
