"""The CPU attention backend: the reference, with decode attention in a small C kernel.

Decode steps on CPU are bound by reading K/V: the reference gathers every sequence's blocks
into a padded copy before attending, so each KV byte crosses memory three times. The C
kernel (`paged_decode.c`) reads the blocks in place through the block table, once. It is
compiled with the system C compiler on first use into a per-user cache (keyed by source,
flags and CPU), then loaded with ctypes; the call releases the GIL and runs on OpenMP
threads (torch's own runtime: both load `libgomp.so.1`). Where there is no compiler, or for
what the kernel does not cover (dtypes other than float32, head_dim > 256, GQA groups
> 64), the reference runs instead. `TANDEM_CPU_KERNELS=0` turns the kernel off.

The same library holds `decode_step.c`, a whole decode step of a float32 Llama in one call
(runner/cpu_decode.py loads it from here), and `gemm.c`, the matmul of float32 linear
layers on their packed weights (layers/cpu_gemm.py).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from tandem import envs
from tandem.kernels import TorchReferenceBackend, reference
from tandem.kernels.reference.attention import decode_batch
from tandem.layers.attention_metadata import AttentionMetadata

logger = logging.getLogger(__name__)

# One library: decode attention, the fused decode step of runner/cpu_decode.py, the
# packed-weight matmul of layers/cpu_gemm.py, and RMSNorm and rotary (elementwise.py).
_SOURCES = [Path(__file__).with_name(name)
            for name in ("paged_decode.c", "decode_step.c", "gemm.c", "elementwise.c")]
# -ffp-contract=fast: a * b + c as one fused multiply-add (ISO C mode turns it off)
_FLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp", "-shared", "-fPIC",
          "-std=c11"]
_HEADER = Path(__file__).with_name("vec.h")  # included by the sources
_MAX_GROUP, _MAX_HEAD_DIM, _MAX_BLOCK = 64, 256, 256  # as in paged_decode.c


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), platform.processor())
    except OSError:
        return platform.processor()


def _cache_dir() -> Path:
    return Path(envs.cache_dir()) / "kernels"


@functools.cache
def load_library() -> ctypes.CDLL | None:
    """The compiled kernel library, building it if needed; None where it cannot be had."""
    if not envs.cpu_kernels_enabled():
        return None
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        logger.warning("no C compiler found: CPU decode attention uses the PyTorch reference")
        return None
    key = hashlib.sha256(b"".join(src.read_bytes() for src in [*_SOURCES, _HEADER])
                         + " ".join([compiler, *_FLAGS]).encode()
                         + _cpu_signature().encode()).hexdigest()[:16]
    path = _cache_dir() / f"tandem_cpu-{key}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
        os.close(fd)
        try:
            subprocess.run([compiler, *_FLAGS, *map(str, _SOURCES), "-o", tmp, "-lm"],
                           check=True, capture_output=True, text=True, timeout=120)
            os.replace(tmp, path)  # atomic: concurrent builders race harmlessly
        except (subprocess.SubprocessError, OSError) as e:
            detail = getattr(e, "stderr", "") or e
            logger.warning("building the CPU kernels failed (%s): using the PyTorch "
                           "reference", str(detail).strip()[:500])
            Path(tmp).unlink(missing_ok=True)
            return None
    lib = ctypes.CDLL(str(path))
    fn = lib.tandem_paged_decode_f32
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ptr, i64, ptr, ptr, ptr, ptr, i64, ptr, i64, i64, i64, i64, i64,
                   ctypes.c_float, ptr, i64]
    fn.restype = None
    lib.tandem_heads_per_item.argtypes = [i64, i64, i64, i64]
    lib.tandem_heads_per_item.restype = i64
    step = lib.tandem_llama_decode_f32
    step.argtypes = [ptr, i64, ptr, ptr, ptr, ptr, i64, ptr, ptr, ctypes.c_int, i64, ptr]
    step.restype = ctypes.c_int
    lib.tandem_panel_width.argtypes = []
    lib.tandem_panel_width.restype = i64
    lib.tandem_linear_f32.argtypes = [ptr, i64, i64, ptr, i64, i64, ptr, ptr, ctypes.c_int,
                                      ctypes.c_int]
    lib.tandem_linear_f32.restype = None
    f32 = ctypes.c_float
    lib.tandem_rms_norm_f32.argtypes = [ptr, i64, ptr, ptr, ptr, ptr, i64, i64, f32,
                                        ctypes.c_int]
    lib.tandem_rms_norm_f32.restype = None
    lib.tandem_rotary_f32.argtypes = [ptr, ptr, i64, i64, ptr, ptr, i64, i64, ptr, ptr, ptr,
                                      i64, i64, ctypes.c_int]
    lib.tandem_rotary_f32.restype = None
    return lib


def supported(query: torch.Tensor, kv_cache: torch.Tensor) -> bool:
    """Whether the C kernel covers this layer's shapes and dtypes."""
    _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    return (query.device.type == "cpu" and query.dtype == kv_cache.dtype == torch.float32
            and kv_cache.is_contiguous() and query.stride(-1) == 1
            and query.stride(1) == head_dim and head_dim <= _MAX_HEAD_DIM
            and query.shape[1] // num_kv_heads <= _MAX_GROUP and block_size <= _MAX_BLOCK)


def paged_decode(query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                 scale: float, seqs: list[int], starts: list[int], out: torch.Tensor,
                 kv_scale: tuple[float, float] = (1.0, 1.0)) -> None:
    """`reference.attention.decode_batch` through the C kernel (same signature). An FP8
    cache takes the reference's dequantizing path (the kernel reads float32)."""
    lib = load_library()
    if lib is None or not supported(query, kv_cache) or not out.is_contiguous():
        decode_batch(query, kv_cache, meta, scale, seqs, starts, out, kv_scale)
        return
    _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    every = len(seqs) == meta.num_seqs  # all decodes: use the metadata's tensors as they are
    sel = None if every else torch.tensor(seqs)
    rows = torch.tensor(starts[:-1] if every else [starts[i] for i in seqs], dtype=torch.int64)
    tables = meta.block_tables if every else meta.block_tables.index_select(0, sel)
    lens = meta.seq_lens if every else meta.seq_lens.index_select(0, sel)
    tables = tables.to(torch.int32).contiguous()
    lens = lens.to(torch.int32).contiguous()
    lib.tandem_paged_decode_f32(
        query.data_ptr(), query.stride(0), rows.data_ptr(), kv_cache[0].data_ptr(),
        kv_cache[1].data_ptr(), tables.data_ptr(), tables.stride(0), lens.data_ptr(),
        len(seqs), query.shape[1], num_kv_heads, head_dim, block_size, scale, out.data_ptr(),
        out.stride(0))


class CpuAttentionBackend(TorchReferenceBackend):
    """The reference (K/V writes, chunks) with decodes through the C kernel."""

    name = "cpu"

    def __init__(self) -> None:
        load_library()  # build (or fail over to the reference) at start-up, not mid-step

    def forward(self, query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                scale: float, key: torch.Tensor | None = None,
                value: torch.Tensor | None = None,
                kv_scale: tuple[float, float] = (1.0, 1.0)) -> torch.Tensor:
        return reference.paged_attention(query, kv_cache, meta, scale, key, value,
                                         decode=paged_decode, kv_scale=kv_scale)
