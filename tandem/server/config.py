"""`ServerConfig`: the HTTP front end's settings (the engine's are in tandem/config.py).

Every field is a `tandem serve` flag (`--max-request-body-bytes`, ...), its help text the
field's comment. Limits here bound the work one client can cause: request body size,
sequences per request, and the waiting queue (a full queue answers 503 + Retry-After).
"""

from __future__ import annotations

import re

from dataclasses import dataclass

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"  # address to listen on
    port: int = 8000  # port to listen on
    api_key: str | None = None  # require 'Authorization: Bearer KEY' (default: $TANDEM_API_KEY)
    # the model name(s) clients pass (default: the model path); with several, requests may
    # name any of them and responses carry the first (vLLM's rule)
    served_model_name: tuple[str, ...] | None = None
    shutdown_timeout: float = 30.0  # seconds in-flight requests get to finish on SIGTERM
    log_level: str = "info"  # tandem's log level
    uvicorn_log_level: str = "info"  # uvicorn's log level (its access log is at info)
    status_interval: float = 10.0  # seconds between status log lines while busy
    disable_log_stats: bool = False  # no status log lines (/metrics keeps its series)
    enable_log_requests: bool = False  # log each request's id, sizes and sampling parameters
    max_request_body_bytes: int = 16 * 2**20  # larger bodies get 413, checked while reading
    # Most sequences (prompts x n) one request may create (default: 16 x --max-num-seqs).
    max_seqs_per_request: int | None = None
    # Most requests waiting for the engine (a prompt with n samples counts n); past it new
    # requests get 503 with Retry-After
    # (default: 16 x --max-num-seqs; 0: no limit).
    max_waiting_requests: int | None = None
    # Run the engine in its own process (HTTP, SSE and tokenizing never take its GIL);
    # off: an engine thread in the server process.
    engine_process: bool = True
    # Let requests bring their own chat_template (jinja, sandboxed; off: only the model's
    # or --chat-template)
    trust_request_chat_template: bool = False
    # CORS: comma-separated origins allowed to call the API from a browser ("*" for any);
    # off when unset.
    allowed_origins: str | None = None
    # Prefix of the Prometheus series' names (`vllm`: dashboards made for vLLM read them)
    metrics_prefix: str = "tandem"

    def __post_init__(self) -> None:
        for name in ("log_level", "uvicorn_log_level"):
            if getattr(self, name) not in LOG_LEVELS:
                raise ValueError(f"{name} must be one of {LOG_LEVELS}, got {getattr(self, name)!r}")
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in [1, 65535], got {self.port}")
        if self.max_request_body_bytes <= 0:
            raise ValueError("max_request_body_bytes must be positive")
        if self.max_seqs_per_request is not None and self.max_seqs_per_request <= 0:
            raise ValueError("max_seqs_per_request must be positive")
        if self.max_waiting_requests is not None and self.max_waiting_requests < 0:
            raise ValueError("max_waiting_requests must be non-negative")
        names = self.served_model_name
        if names is not None:  # one name (from Python) or the flag's list: a tuple
            object.__setattr__(self, "served_model_name",
                               (names,) if isinstance(names, str) else tuple(names))
        if self.served_model_name is not None and (
                not self.served_model_name or not all(n.strip() for n in self.served_model_name)):
            raise ValueError("served_model_name: every name must be non-empty")
        if self.shutdown_timeout < 0:
            raise ValueError("shutdown_timeout must be non-negative")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.metrics_prefix):
            raise ValueError(f"metrics_prefix must be a Prometheus name, got "
                             f"{self.metrics_prefix!r}")

    @property
    def origins(self) -> list[str]:
        return [o.strip() for o in (self.allowed_origins or "").split(",") if o.strip()]
