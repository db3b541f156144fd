"""Every environment variable tandem reads, declared once, typed, read when asked.

    TANDEM_API_KEY        the server's API key when --api-key is not given
    TANDEM_WORKER_KEY     authenticates a disaggregated front end to its `tandem worker`s
    TANDEM_CPU_KERNELS    "0": never build or use the C kernels (decode attention and the
                          fused decode step: the PyTorch reference instead)
    TANDEM_CPU_MALLOPT    "0": a CPU engine leaves glibc's malloc thresholds as they are
                          (runner/host_malloc.py)
    TANDEM_CACHE_DIR      where compiled CPU kernels are cached (default ~/.cache/tandem)
    TANDEM_GIT_COMMIT     the commit benchmarks report, for a tree copied without .git
    TANDEM_PDL            "0": launch the Triton kernels without programmatic dependent
                          launch (kernels/triton/pdl.py), for A/B runs and bisecting
    TANDEM_NORM_CHAIN     whether batch-1 decode carries its RMSNorms in the matmuls around
                          them instead of launching them (models/norm_chain.py): "quantized"
                          (the default: int8/int4 weights only), "all", or "0" (never)
    TANDEM_PREFILL_TMA    "0": fresh prompts' prefill attention loads its tiles by pointer
                          instead of through Hopper tensor descriptors (the default "1";
                          kernels/triton/prefill.py), for A/B runs
    TANDEM_DECODE_ROTARY  "0": decode steps launch rotary + K/V write apart from attention
                          (the default "1" does all three in the decode kernel on Triton)
    TANDEM_DECODE_MIN_PART for tuning runs: the shortest split-K partition of the decode
                          attention kernel, in tokens (a power of two >= 16)
    TANDEM_MOE_ONE_LAUNCH how one token's MoE runs gate/up and down: "auto" (the default:
                          one launch where moe_one.one_launch_pays says so), "1" always one
                          launch (kernels/triton/moe_one.py), "0" always two
    TANDEM_MOE_ONE_CONFIG for tuning runs: that launch's tiles
                          "BN1,BK1,BN2,BK2,num_warps,num_stages" instead of its defaults
    TANDEM_FP8_CAST_HALF  "1" (the default): the one-row FP8 W8A8 GEMV forms its products and
                          sums of eight in fp16 (kernels/triton/quant_gemm.py, _float_tile)
                          with its own tiles, the LM head's row included; "0": float32
    TANDEM_FP8_AMAX_K     for A/B runs: x values a load in that GEMV's amax pass: "auto" (the
                          default: eight a thread, at least BLOCK_K), "0" (BLOCK_K, as
                          before) or a power of two >= 16
    TANDEM_FAULT_TOKEN_ID testing only: a step that samples for a request whose prompt holds
                          this token id raises `InjectedFault` (fault-isolation tests)

Set, not read: `NO_NVLINK_MULTICAST`, in every process tandem starts that may touch NCCL.
"""

from __future__ import annotations

import os


# NVLink multicast (NVLS) can take shared GPUs out of service on the hosts tandem runs on:
# every worker, test and benchmark process starts with it off, whatever its caller's
# environment says.
NO_NVLINK_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                       "NVSHMEM_DISABLE_NVLS": "1"}


def worker_key() -> str | None:
    return os.environ.get("TANDEM_WORKER_KEY") or None


def api_key() -> str | None:
    return os.environ.get("TANDEM_API_KEY") or None


def cpu_mallopt() -> bool:
    return os.environ.get("TANDEM_CPU_MALLOPT", "1") != "0"


def cpu_kernels_enabled() -> bool:
    return os.environ.get("TANDEM_CPU_KERNELS", "1") != "0"


def cache_dir() -> str:
    return os.environ.get("TANDEM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tandem")


def pdl_enabled() -> bool:
    return os.environ.get("TANDEM_PDL", "1") != "0"


def norm_chain_mode() -> str:
    """"off", "quantized" or "all" (TANDEM_NORM_CHAIN; "0" means off, "1" all)."""
    value = os.environ.get("TANDEM_NORM_CHAIN", "quantized").strip().lower()
    mode = {"0": "off", "off": "off", "1": "all", "all": "all",
            "quantized": "quantized"}.get(value)
    if mode is None:
        raise ValueError(f"TANDEM_NORM_CHAIN={value!r}: use quantized, all or 0")
    return mode


def prefill_tma() -> bool:
    return os.environ.get("TANDEM_PREFILL_TMA", "1") != "0"


def fp8_cast_half() -> bool:
    value = os.environ.get("TANDEM_FP8_CAST_HALF", "1")
    if value not in ("0", "1"):
        raise ValueError(f"TANDEM_FP8_CAST_HALF={value!r}: use 0 or 1")
    return value == "1"


def fp8_decode() -> str:
    """TANDEM_FP8_DECODE: "auto" (the default), "dot" or "cast", the FP8 W8A8 decode kernel,
    for A/B runs (kernels/triton/quant_gemm.py). "dot" also keeps FP8 layers out of the
    batch-1 norm chain, whose carried GEMV is the cast kernel (models/norm_chain.py)."""
    value = os.environ.get("TANDEM_FP8_DECODE", "auto")
    if value not in ("auto", "dot", "cast"):
        raise ValueError(f"TANDEM_FP8_DECODE must be 'auto', 'dot' or 'cast', not {value!r}")
    return value


def fp8_amax_k() -> int | None:
    """None ("auto"), 0 (the kernel's BLOCK_K) or a power of two >= 16 (TANDEM_FP8_AMAX_K)."""
    value = os.environ.get("TANDEM_FP8_AMAX_K", "auto")
    if value == "auto":
        return None
    n = int(value) if value.isdigit() else -1
    if n != 0 and (n < 16 or n & (n - 1)):
        raise ValueError(f"TANDEM_FP8_AMAX_K={value!r}: auto, 0 or a power of two >= 16")
    return n


def decode_rotary_fused() -> bool:
    return os.environ.get("TANDEM_DECODE_ROTARY", "1") != "0"


def decode_min_part() -> int | None:
    value = os.environ.get("TANDEM_DECODE_MIN_PART")
    if not value:
        return None
    if not value.isdigit() or int(value) < 16 or int(value) & (int(value) - 1):
        raise ValueError(f"TANDEM_DECODE_MIN_PART={value!r}: a power of two >= 16")
    return int(value)


def _ints(value: str) -> tuple[int, ...]:
    """Comma-separated integers, or () where any is not one (the caller names the variable
    in its error)."""
    try:
        return tuple(int(v) for v in value.split(","))
    except ValueError:
        return ()


def decode_tiles() -> tuple[int, int, int] | None:
    """TANDEM_DECODE_TILES=BLOCK_N,num_warps,num_stages: decode attention's tiles for every
    cache dtype, for tuning runs (kernels/triton/decode.py picks them per dtype otherwise)."""
    value = os.environ.get("TANDEM_DECODE_TILES")
    if not value:
        return None
    cfg = _ints(value)
    if len(cfg) != 3 or cfg[0] < 16 or cfg[0] & (cfg[0] - 1) or cfg[1] not in (1, 2, 4, 8) \
            or not 1 <= cfg[2] <= 8:
        raise ValueError(f"TANDEM_DECODE_TILES={value!r}: BLOCK_N (a power of two >= 16),"
                         "num_warps (1, 2, 4 or 8),num_stages (1-8)")
    return cfg  # type: ignore[return-value]


def moe_one_launch() -> str:
    """"auto", "always" or "never" (TANDEM_MOE_ONE_LAUNCH: auto, 1 or 0)."""
    value = os.environ.get("TANDEM_MOE_ONE_LAUNCH", "auto").strip().lower()
    mode = {"auto": "auto", "1": "always", "0": "never"}.get(value)
    if mode is None:
        raise ValueError(f"TANDEM_MOE_ONE_LAUNCH={value!r}: use auto, 1 or 0")
    return mode


def moe_one_config() -> tuple[int, int, int, int, int, int] | None:
    value = os.environ.get("TANDEM_MOE_ONE_CONFIG")
    if not value:
        return None
    cfg = _ints(value)
    if len(cfg) != 6 or any(v <= 0 for v in cfg) or any(v & (v - 1) for v in cfg[:5]):
        raise ValueError(f"TANDEM_MOE_ONE_CONFIG={value!r}: BN1,BK1,BN2,BK2,num_warps "
                         "(powers of two),num_stages")
    return cfg  # type: ignore[return-value]


def git_commit() -> str | None:
    return os.environ.get("TANDEM_GIT_COMMIT") or None


def fault_token_id() -> int | None:
    value = os.environ.get("TANDEM_FAULT_TOKEN_ID")
    return int(value) if value else None
