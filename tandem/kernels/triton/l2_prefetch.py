"""Read a tensor into the GPU's L2 cache without using it: Hopper's bulk L2 prefetch
(`cp.async.bulk.prefetch.L2.global`, one instruction per chunk, no registers, no wait).

At batch-1 decode the attention part of a layer is latency-bound (rotary + K/V write and
the split-K decode attention take ~10 us and read a few hundred KB), so HBM idles there.
Launched on a side stream beside them (layers/prefetch.py), this kernel reads the next
GEMV's weights (o_proj: 17 MB for Qwen3-30B-A3B, 34 MB for Llama-3.1-8B; L2 holds 50 MB),
which then come from L2 instead of HBM:

    main stream   qkv GEMV | rotary + KV write | decode attention |  o_proj GEMV (L2 hits)
    side stream            | prefetch o_proj's weights ..... |   (joined before o_proj)

Each thread issues one prefetch of up to CHUNK bytes; sizes and addresses are multiples of
16 bytes, as the instruction requires (`supported`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 16384  # bytes per thread's prefetch
THREADS = 128  # threads (and chunks) per program: 2 MB a program


@triton.jit
def _l2_prefetch_kernel(ptr, nbytes, CHUNK: tl.constexpr, THREADS: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * THREADS + tl.arange(0, THREADS)
    off = i * CHUNK
    size = tl.minimum(nbytes - off, CHUNK).to(tl.int32)  # <= 0 past the end: skipped
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.gt.s32 p, $2, 0; "
        "@p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
        "=r,l,r", [ptr + off, size], dtype=tl.int32, is_pure=False, pack=1)


def supported(t: torch.Tensor) -> bool:
    return (t.is_cuda and t.is_contiguous() and t.data_ptr() % 16 == 0
            and t.numel() * t.element_size() % 16 == 0
            and torch.cuda.get_device_capability(t.device) >= (9, 0))


def l2_prefetch(t: torch.Tensor) -> None:
    """Start reading t's bytes into L2 (t contiguous, `supported`); returns at once."""
    flat = t.view(-1).view(torch.uint8)
    nbytes = flat.numel()
    _l2_prefetch_kernel[(triton.cdiv(nbytes, CHUNK * THREADS),)](
        flat, nbytes, CHUNK=CHUNK, THREADS=THREADS, num_warps=THREADS // 32)
