"""Read a tensor into the GPU's L2 cache from inside another launch: Hopper's bulk L2
prefetch (`cp.async.bulk.prefetch.L2.global`), one instruction per thread and chunk, no
registers, nothing to wait for.

At batch-1 decode the attention part of a layer is latency-bound: the split-K decode
attention runs ~8 us and reads a few hundred KB, so HBM idles there. Its programs each
issue a share of the prefetch of the next GEMV's weights (o_proj: 17 MB for Qwen3-30B-A3B,
34 MB for Llama-3.1-8B; the H200's L2 holds 50 MB), right after their wait on the kernel
before them (pdl.py), so it never competes with the qkv GEMV:

    qkv GEMV | rotary + K/V write | decode attention ............ | o_proj GEMV
                                   +- prefetch of o_proj's weights -> L2 hits

Shares: the tensor's bytes split evenly over the launch's programs, each program's share
over its threads, in 16-byte multiples (the instruction's unit; `supported` checks the
tensor). The layer picks the tensor (layers/l2_prefetch.py). A side-stream prefetch kernel
(a fork after qkv, a join before o_proj) measured slower: the graph's cross-stream edges
cost more than the L2 hits saved (docs/decode.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def prefetch_share(ptr, nbytes, prog, num_progs, THREADS: tl.constexpr):
    """Program `prog` of `num_progs` prefetches its share of ptr[0:nbytes] (u8 pointer);
    THREADS = the program's threads, one chunk each."""
    share = tl.cdiv(tl.cdiv(nbytes, num_progs), 16) * 16
    chunk = tl.cdiv(tl.cdiv(share, THREADS), 16) * 16
    off = prog.to(tl.int64) * share + tl.arange(0, THREADS).to(tl.int64) * chunk
    end = tl.minimum(prog.to(tl.int64) * share + share, nbytes)
    size = tl.minimum(end - off, chunk).to(tl.int32)  # <= 0: nothing left for this thread
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.gt.s32 p, $2, 0; "
        "@p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
        "=r,l,r", [ptr + off, size], dtype=tl.int32, is_pure=False, pack=1)


def supported(t: torch.Tensor) -> bool:
    return (t.is_cuda and t.is_contiguous() and t.data_ptr() % 16 == 0
            and t.numel() * t.element_size() % 16 == 0
            and torch.cuda.get_device_capability(t.device) >= (9, 0))


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """t's storage as a flat uint8 tensor (t contiguous)."""
    return t.view(-1).view(torch.uint8)
