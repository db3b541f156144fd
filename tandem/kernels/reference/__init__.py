"""Pure-PyTorch reference kernels: the spec, and the CPU path of the whole engine.

Each function here has a fast twin (Triton, later) with the same signature; parity tests
compare the two on random inputs.

    attention.py   write_kv (scatter new K/V into cache slots), rotary_write_kv (q/k norm and
                   rotary, then write_kv), paged_attention
"""

from __future__ import annotations

from tandem.kernels.reference.attention import paged_attention, rotary_write_kv, write_kv

__all__ = ["paged_attention", "rotary_write_kv", "write_kv"]
