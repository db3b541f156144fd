"""Typed engine configuration: small frozen dataclasses composed into one `EngineConfig`.

Each component reads only its own sub-config. Every field is an engine argument with the
vLLM spelling (`LLM(model, block_size=..., max_num_seqs=...)`, `--block-size` on the CLI);
`EngineConfig.from_kwargs` routes keyword arguments to the sub-config that owns them and
rejects unknown names. Validation lives in `__post_init__` so a bad value fails at once,
with the field named.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
from dataclasses import dataclass, field
from typing import Any

_DTYPES = ("auto", "float32", "float16", "bfloat16")  # and vLLM's "half", "float"
_LOAD_FORMATS = ("auto", "safetensors", "dummy")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    model: str  # local Hugging Face-format directory
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    load_format: str = "auto"  # "dummy": random weights of the right shapes from config.json
    device: str = "auto"  # auto: cuda if available, else cpu
    seed: int = 0  # seeds dummy weights and unseeded sampling
    max_model_len: int | None = None  # prompt + output limit (None: max_position_embeddings)
    chat_template: str | None = None  # path or literal jinja; overrides the model's own
    # Always run the model's PyTorch forward: no CUDA graphs, no fused CPU decode step
    # (runner/cpu_decode.py); for debugging, profiling, and as the reference.
    enforce_eager: bool = False
    # Most top-N logprobs one request may ask for (per token); -1: up to the vocabulary
    max_logprobs: int = 20
    # A directory holding tokenizer.json (and the chat template) when it is not the
    # model's own
    tokenizer: str | None = None
    # Accepted for vLLM's command lines: tandem runs its built-in architectures and never
    # a checkpoint's own code, so there is nothing for it to allow (a warning says so)
    trust_remote_code: bool = False
    # Sampling defaults for what a request leaves unset: "auto" reads the model's
    # generation_config.json, "vllm" (or "none") keeps the built-in defaults, any other
    # value is a directory holding a generation_config.json.
    generation_config: str = "auto"
    # Quantize linear weights at load: fp8 (W8A8), int8 (W8A16), int4 / int4_asym (W4A16,
    # group size 128), or a policy JSON choosing per layer (tandem/quantization/policy.py).
    quantization: str | None = None

    def __post_init__(self) -> None:
        if not os.path.isdir(self.model):
            raise ValueError(f"model directory {self.model!r} does not exist (tandem loads "
                             f"local Hugging Face-format directories; it downloads nothing)")
        if not os.path.isfile(os.path.join(self.model, "config.json")):
            raise ValueError(f"model directory {self.model!r} has no config.json")
        alias = {"half": "float16", "float": "float32"}.get(self.dtype)  # vLLM's spellings
        if alias is not None:
            object.__setattr__(self, "dtype", alias)
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if self.load_format not in _LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {_LOAD_FORMATS}, got {self.load_format!r}")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ValueError(f"max_model_len must be positive, got {self.max_model_len}")
        if self.max_logprobs < -1:
            raise ValueError(f"max_logprobs must be -1 (no cap) or non-negative, got "
                             f"{self.max_logprobs}")
        if self.tokenizer is not None and not os.path.isfile(
                os.path.join(self.tokenizer, "tokenizer.json")):
            raise ValueError(f"tokenizer {self.tokenizer!r} is not a directory holding a "
                             f"tokenizer.json")
        if self.quantization is not None:
            from tandem.quantization.policy import QuantPolicy
            QuantPolicy.parse(self.quantization)  # ValueError naming what is wrong


KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "bfloat16", "float16", "float32")


@dataclass(frozen=True, slots=True)
class CacheConfig:
    block_size: int = 16  # tokens per KV block
    num_kv_blocks: int | None = None  # KV pool size in blocks (overrides the memory sizing)
    gpu_memory_utilization: float = 0.90  # CUDA: fraction of device memory the engine may use
    cpu_kv_cache_gib: float = 2.0  # CPU: memory budget for the KV pool
    enable_prefix_caching: bool = True  # reuse the KV blocks of prompts seen before
    # auto: the model dtype (a checkpoint's kv_cache_scheme: fp8, as in vLLM); fp8 (or
    # fp8_e4m3): e4m3 (half the bytes of bf16), one K and one V scale per layer (1.0 unless
    # calculate_kv_scales or the checkpoint's); bfloat16 / float16 / float32: the model
    # dtype by name, kept even when the checkpoint quantized its KV cache
    kv_cache_dtype: str = "auto"
    kv_cache_dtype_skip_layers: str | None = None  # comma-separated layer indices kept in
    # the model dtype under kv_cache_dtype=fp8, e.g. "0,31"
    # fp8 KV: set each layer's scales from the K/V amax of one calibration forward at
    # start-up instead of 1.0
    calculate_kv_scales: bool = False

    def __post_init__(self) -> None:
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks <= 0:
            raise ValueError(f"num_kv_blocks must be positive, got {self.num_kv_blocks}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.cpu_kv_cache_gib <= 0:
            raise ValueError(f"cpu_kv_cache_gib must be positive, got {self.cpu_kv_cache_gib}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, "
                             f"got {self.kv_cache_dtype!r}")
        self.skip_layers()  # ValueError if malformed

    def skip_layers(self) -> set[int]:
        """The layers kv_cache_dtype_skip_layers keeps in the model dtype."""
        text = self.kv_cache_dtype_skip_layers
        if not text:
            return set()
        try:
            return {int(x) for x in text.split(",") if x.strip()}
        except ValueError:
            raise ValueError(f"kv_cache_dtype_skip_layers must be comma-separated layer "
                             f"indices, got {text!r}") from None


_SPEC_METHODS = ("ngram", "suffix", "draft_model")


@dataclass(frozen=True, slots=True)
class SpeculativeConfig:
    """vLLM's `speculative_config`: `{"method": ..., "num_speculative_tokens": K, ...}`
    (`--speculative-config JSON`). Unknown keys are refused."""

    method: str  # "ngram" (prompt lookup) | "suffix" | "draft_model"
    num_speculative_tokens: int  # most draft tokens verified per request per step
    model: str | None = None  # draft_model: its directory (default: the embedded draft)
    prompt_lookup_max: int = 4  # ngram: longest suffix n-gram matched
    prompt_lookup_min: int = 1  # ngram: shortest
    # Decide k every step from profiled costs and acceptance (spec_decode/switch.py);
    # False: always verify up to num_speculative_tokens drafts, as vLLM does.
    auto_switch: bool = True
    # Benchmarking only: accept each proposed token with this probability instead of
    # checking it (vLLM's load-testing mode; output is then NOT the model's). Refused
    # outside `tandem bench`.
    synthetic_acceptance_rate: float | None = None

    def __post_init__(self) -> None:
        if self.method not in _SPEC_METHODS:
            raise ValueError(f"speculative_config.method must be one of {_SPEC_METHODS}, "
                             f"got {self.method!r}")
        if not 1 <= self.num_speculative_tokens <= 16:
            raise ValueError(f"speculative_config.num_speculative_tokens must be in "
                             f"[1, 16], got {self.num_speculative_tokens}")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError("speculative_config needs 1 <= prompt_lookup_min <= "
                             "prompt_lookup_max")
        rate = self.synthetic_acceptance_rate
        if rate is not None and not 0.0 <= rate <= 1.0:
            raise ValueError(f"speculative_config.synthetic_acceptance_rate must be in "
                             f"[0, 1], got {rate}")
        if self.model is not None and self.method != "draft_model":
            raise ValueError("speculative_config.model is for method 'draft_model'")

    @staticmethod
    def parse(value: Any) -> SpeculativeConfig:
        """From a dict, a JSON string (the CLI flag) or a SpeculativeConfig."""
        if isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            import json
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"speculative_config is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config must be a JSON object, got {value!r}")
        known = {f.name for f in dataclasses.fields(SpeculativeConfig)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown speculative_config keys {unknown}; known: "
                             f"{sorted(known)}")
        for key in ("method", "num_speculative_tokens"):
            if key not in value:
                raise ValueError(f"speculative_config needs {key!r}")
        return SpeculativeConfig(**value)


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 8192  # token budget of one step (decodes + prefill chunks)
    max_num_seqs: int = 256  # most requests running at once
    max_model_len: int = 0  # prompt + output limit (resolved from the model at load)
    # Schedule step N+1 while step N runs on the device (host work off the critical path).
    # None: on for CUDA, off for CPU (where host and "device" are the same cores).
    async_scheduling: bool | None = None
    # Speculative decoding, vLLM's JSON: {"method": "ngram" | "suffix" | "draft_model",
    # "num_speculative_tokens": K, ...} (docs/speculative.md). Off by default.
    speculative_config: SpeculativeConfig | None = None

    def __post_init__(self) -> None:
        if self.speculative_config is not None:
            object.__setattr__(self, "speculative_config",
                               SpeculativeConfig.parse(self.speculative_config))
        if self.max_num_batched_tokens <= 0:
            raise ValueError(
                f"max_num_batched_tokens must be positive, got {self.max_num_batched_tokens}"
            )
        if self.max_num_seqs <= 0:
            raise ValueError(f"max_num_seqs must be positive, got {self.max_num_seqs}")


_EXECUTOR_BACKENDS = ("uni", "mp")
EXPERT_DISPATCH = ("allreduce", "alltoall")  # distributed/expert_dispatch.py


@dataclass(frozen=True, slots=True)
class ParallelConfig:
    tensor_parallel_size: int = 1  # ranks that split every layer (one worker process each)
    # "uni": the runner in the engine's process (one rank only); "mp": one worker process
    # per rank. None: uni for one rank on one node, else mp.
    distributed_executor_backend: str | None = None
    nnodes: int = 1  # machines the ranks span (torchrun's --nnodes)
    node_rank: int = 0  # this machine's index; 0 runs the engine, the others only workers
    master_addr: str = "127.0.0.1"  # node 0's address, reachable from every node
    # node 0's port for torch.distributed's rendezvous (the executor's sockets use the next
    # two); None: a free port (one node only)
    master_port: int | None = None
    # MoE models: shard the experts over the tensor-parallel ranks (whole experts per rank)
    # instead of splitting every expert's intermediate size; attention stays tensor parallel
    enable_expert_parallel: bool = False
    # expert parallelism's token exchange: "allreduce" (every rank runs its experts on the
    # tokens it already has; one all-reduce combines) or "alltoall" (tokens sent to their
    # experts' ranks and back; eager steps only): distributed/expert_dispatch.py
    expert_dispatch: str = "allreduce"

    def __post_init__(self) -> None:
        if self.expert_dispatch not in EXPERT_DISPATCH:
            raise ValueError(f"expert_dispatch must be one of {EXPERT_DISPATCH}, "
                             f"got {self.expert_dispatch!r}")
        if self.expert_dispatch != "allreduce" and not self.enable_expert_parallel:
            raise ValueError(f"expert_dispatch={self.expert_dispatch!r} needs "
                             f"enable_expert_parallel")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be at least 1, "
                             f"got {self.tensor_parallel_size}")
        backend = self.distributed_executor_backend
        if backend is not None and backend not in _EXECUTOR_BACKENDS:
            raise ValueError(f"distributed_executor_backend must be one of "
                             f"{_EXECUTOR_BACKENDS}, got {backend!r}")
        if backend == "uni" and self.tensor_parallel_size > 1:
            raise ValueError("distributed_executor_backend 'uni' runs one rank; "
                             "tensor_parallel_size > 1 needs 'mp'")
        if self.nnodes < 1 or not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"node_rank must be in [0, nnodes), got node_rank="
                             f"{self.node_rank}, nnodes={self.nnodes}")
        if self.tensor_parallel_size % self.nnodes:
            raise ValueError(f"tensor_parallel_size ({self.tensor_parallel_size}) must be a "
                             f"multiple of nnodes ({self.nnodes})")
        if self.nnodes > 1 and self.master_port is None:
            raise ValueError("nnodes > 1 needs master_port (and master_addr): every node "
                             "must find node 0")
        if self.master_port is not None and not 0 < self.master_port < 65534:
            raise ValueError(f"master_port must be in (0, 65534), got {self.master_port}")

    @property
    def executor_backend(self) -> str:
        if self.distributed_executor_backend is not None:
            return self.distributed_executor_backend
        return "uni" if self.tensor_parallel_size == 1 and self.nnodes == 1 else "mp"

    @property
    def ranks_per_node(self) -> int:
        return self.tensor_parallel_size // self.nnodes


@dataclass(frozen=True, slots=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    @staticmethod
    def from_kwargs(model: str, **kwargs: Any) -> EngineConfig:
        """Route vLLM-style engine arguments to their sub-configs; unknown names raise."""
        parts: dict[type, dict[str, Any]] = {ModelConfig: {"model": model}, CacheConfig: {},
                                             SchedulerConfig: {}, ParallelConfig: {}}
        owners = {f.name: cls for cls in parts for f in dataclasses.fields(cls)}
        for name, value in kwargs.items():
            if name not in owners or name == "model":
                raise ValueError(f"unknown engine argument {name!r}")
            if name == "max_model_len":  # read by both the model and the scheduler
                parts[SchedulerConfig][name] = value or 0
                parts[ModelConfig][name] = value
            else:
                parts[owners[name]][name] = value
        return EngineConfig(ModelConfig(**parts[ModelConfig]), CacheConfig(**parts[CacheConfig]),
                            SchedulerConfig(**parts[SchedulerConfig]),
                            ParallelConfig(**parts[ParallelConfig]))

    def with_max_model_len(self, max_model_len: int) -> EngineConfig:
        """The config once the model's context length is known (resolved at load time)."""
        model = dataclasses.replace(self.model, max_model_len=max_model_len)
        sched = dataclasses.replace(self.scheduler, max_model_len=max_model_len)
        return dataclasses.replace(self, model=model, scheduler=sched)


def field_comments(cls: type) -> dict[str, str]:
    """Each field's comment in `cls`'s source: the trailing `# ...` of its line, or the
    `# ...` lines right above it. The one source of every config flag's help text."""
    comments: dict[str, str] = {}
    above: list[str] = []
    for line in inspect.getsource(cls).splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# "))
            continue
        m = re.match(r"(\w+): [^=#]+(?:= .*?)?(?:\s+#\s*(.*))?$", stripped)
        if m and not stripped.startswith(("def ", "return ", "@")):
            comments[m.group(1)] = " ".join(above + [m.group(2) or ""]).strip()
        above = []
    return comments


ENGINE_CONFIGS = (ModelConfig, CacheConfig, SchedulerConfig, ParallelConfig)


def engine_arg_fields() -> list[dataclasses.Field]:
    """Every engine argument (for generating CLI flags), in declaration order."""
    out = []
    for cls in ENGINE_CONFIGS:
        out += [f for f in dataclasses.fields(cls) if f.name not in [g.name for g in out]]
    return out
