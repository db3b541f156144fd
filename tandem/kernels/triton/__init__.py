"""Triton kernels for CUDA: the fast twins of `tandem.kernels.reference`, same signatures.

    kv_write.py  write_kv: one program per new token scatters its K and V rows into slots
    decode.py    decode_attention: split-K flash-decoding over the paged cache (GQA-aware)
                 + a log-sum-exp merge kernel
    prefill.py   prefill_attention: FlashAttention-2 tiles over chunks with a cached prefix
    backend.py   TritonAttentionBackend: splits a batch into decodes and chunks

Importing this package needs `triton`; `tandem.kernels` registers the backend for "cuda"
only when that import succeeds, so CPU-only installs never touch it.
"""

from __future__ import annotations

from tandem.kernels.triton.backend import TritonAttentionBackend
from tandem.kernels.triton.decode import decode_attention, decode_num_partitions
from tandem.kernels.triton.kv_write import write_kv
from tandem.kernels.triton.prefill import prefill_attention, prefill_config

__all__ = ["TritonAttentionBackend", "decode_attention", "decode_num_partitions",
           "prefill_attention", "prefill_config", "write_kv"]
