"""Programmatic dependent launch (PDL, Hopper and later) for the decode chain.

A batch-1 decode step is ~300 short kernels in a row; between two of them the GPU drains
the first, then launches and ramps up the second (~1-2 us each, the same order as an int4
GEMV itself). With PDL a kernel may start while the one before it is still running:

    kernel A  | ... its last wave ...........|
    kernel B       | launch, weights in flight | gdc_wait | x, compute, store |

  - each kernel calls `gdc_launch_dependents()` first, so the next one may be scheduled
    once all of this one's programs are resident;
  - before `gdc_wait()` a kernel touches only what no kernel writes during a step (weights,
    scales, norm weights); every load of activations and EVERY store comes after it (the
    wait returns once the previous grid has finished and its writes are visible, so
    neither a read-after-write nor a write-after-read can race).

Kernels take a `PDL` constexpr and launch with `launch_pdl` (Triton's knob that sets the
programmatic-stream-serialization attribute; CUDA graphs keep it as a programmatic edge)
through `launch_options`. A kernel launched after a plain one (a PyTorch op) simply starts
when that one ends. TANDEM_PDL=0 turns it off.

L2 prefetch ahead of the wait. While the small kernels of a layer run (norm, rotary and the
KV write, attention, SiLU-and-mul: ~10 us a layer at batch 1) the HBM is idle, and the next
GEMV's resident programs sit in gdc_wait holding one tile. `prefetch_l2` lets each of them
also ask L2 for the next bytes of its weight rows (one `prefetch.global.L2` per 128-byte
line, nothing waits on it), so the GEMV's first wave reads from L2 once x is ready.
`l2_prefetch_bytes` sizes it: the programs that can be resident at once times their rows
times the bytes a row stay under L2_PREFETCH_BUDGET, so lines are not evicted before the
loop reads them. Later waves pass the wait at once and prefetch what they load next anyway
(a few requests a thread). Off without PDL, off the GPU (inline PTX), and with
TANDEM_L2_PREFETCH=0.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from tandem import envs

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    HAS_GDC = True
except ImportError:  # an older Triton: the kernels compile without it
    HAS_GDC = False

    @triton.jit
    def gdc_wait():
        pass

    @triton.jit
    def gdc_launch_dependents():
        pass

__all__ = ["gdc_launch_dependents", "gdc_wait", "launch_options", "prefetch_l2",
           "l2_prefetch_bytes"]

L2_PREFETCH_BUDGET = 24 << 20  # bytes asked of L2 at once by one launch's resident programs
MAX_WARPS_PER_SM = 64  # Hopper
MAX_PROGRAMS_PER_SM = 32


@triton.jit
def prefetch_l2(w_ptr, rows, stride_bytes, lo, hi, LINES: tl.constexpr):
    """Ask L2 for bytes [lo, hi) of each weight row in `rows` (valid row indices), one
    128-byte line a request, LINES requests a row (lines past hi repeat the last one). The
    answer is never read here: the kernel's own loads find the lines in L2 later."""
    off = tl.minimum(lo + tl.arange(0, LINES) * 128, hi - 1)
    ptrs = (w_ptr.to(tl.pointer_type(tl.int8)) + rows.to(tl.int64)[:, None] * stride_bytes
            + off[None, :])
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs],
                              dtype=tl.int32, is_pure=False, pack=1)


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=4096)
def _prefetch_bytes(index: int, programs: int, rows: int, num_warps: int,
                    row_bytes_left: int) -> tuple[int, int]:
    resident = min(programs, _num_sms(index) * min(MAX_PROGRAMS_PER_SM,
                                                   max(1, MAX_WARPS_PER_SM // num_warps)))
    nbytes = min(row_bytes_left, L2_PREFETCH_BUDGET // (resident * rows)) // 128 * 128
    if nbytes <= 0:
        return 0, 0
    return nbytes, triton.next_power_of_2(nbytes // 128)


def l2_prefetch_bytes(t: torch.Tensor, programs: int, rows: int, num_warps: int,
                      row_bytes_left: int) -> tuple[int, int]:
    """(bytes a row, LINES) for `prefetch_l2` in a GEMV of `programs` programs of `rows`
    weight rows each, with `row_bytes_left` bytes of a row not loaded ahead of the wait;
    (0, 0): no prefetch (PDL off, not CUDA, TANDEM_L2_PREFETCH=0, or nothing left)."""
    if row_bytes_left <= 0 or not envs.l2_prefetch_enabled():
        return 0, 0
    if not launch_options(t)["PDL"]:
        return 0, 0
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    return _prefetch_bytes(index, programs, rows, num_warps, row_bytes_left)


@functools.lru_cache(maxsize=None)
def _supported(index: int) -> bool:
    return HAS_GDC and torch.cuda.get_device_capability(index) >= (9, 0)


def launch_options(t: torch.Tensor) -> dict:
    """Keyword arguments for a kernel launch on t's device: PDL (the kernel's constexpr)
    and, when on, launch_pdl."""
    if not (t.is_cuda and envs.pdl_enabled()
            and _supported(t.device.index if t.device.index is not None
                           else torch.cuda.current_device())):
        return {"PDL": False}
    return {"PDL": True, "launch_pdl": True}
