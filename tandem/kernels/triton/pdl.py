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
"""

from __future__ import annotations

import functools

import torch
import triton

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

__all__ = ["gdc_launch_dependents", "gdc_wait", "launch_options"]


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
