"""glibc's malloc thresholds for CPU engines: a step's activations reuse freed memory
instead of faulting in fresh pages.

glibc serves a request above M_MMAP_THRESHOLD (128 KiB at start, raised up to 32 MiB as
mmapped blocks are freed) with a fresh mmap, and gives free memory at the top of the
heap back above M_TRIM_THRESHOLD. A CPU prefill step makes and frees activations of
several MB per op (a 5,287-token step of the embedded model: 10.8 MB per hidden state),
so under the defaults many of them arrive as new pages, and the first touch of each 4 KiB
page is a fault. On the 2-core development box (AMD EPYC, AVX-512), a second 48-prompt
prefill took 10-69 minor faults with these thresholds against 15,877-34,918 without, and
the 48-prompt workload's prefill step, alternating in one process, ran 3-7% faster in each
of six adjacent pairs (1.11-1.34 s against 1.20-1.37 s); end to end the difference is
inside that box's noise (bench/README.md, twenty-fourth session). PyTorch's and vLLM's CPU
guides get the same effect by preloading tcmalloc or jemalloc.

`tune()` sets both thresholds once per process (malloc-wide: it affects every allocation
in the process). TANDEM_CPU_MALLOPT=0 leaves glibc's defaults; other C libraries are left
alone.
"""

from __future__ import annotations

import ctypes
import functools
import sys

from tandem import envs

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's largest: blocks up to 32 MiB come from the heap
TRIM_THRESHOLD = 256 << 20  # free heap top kept up to this, above it given back


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)  # the C library this process runs on
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") else None


@functools.cache
def tune() -> bool:
    """Set the thresholds (once per process); True when they are set."""
    libc = _glibc() if envs.cpu_mallopt() else None
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
