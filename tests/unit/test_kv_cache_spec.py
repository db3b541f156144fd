"""The per-layer KV-cache spec: FP8 layers take a byte per value, skipped layers keep the
model dtype, and the pool's size follows; the FP8 reference write/read round trip."""

from __future__ import annotations

import pytest
import torch

from tandem.config import CacheConfig
from tandem.kernels import reference
from tandem.runner.kv_memory import (allocate_kv_caches, kv_block_bytes, kv_cache_spec,
                                     num_blocks_for)
from tests.model_factory import make_attn_metadata


def test_fp8_spec_halves_bf16_bytes_and_skips_layers():
    bf16 = kv_cache_spec(CacheConfig(), 4, torch.bfloat16)
    fp8 = kv_cache_spec(CacheConfig(kv_cache_dtype="fp8"), 4, torch.bfloat16)
    assert kv_block_bytes(fp8, 16, 8, 128) * 2 == kv_block_bytes(bf16, 16, 8, 128)
    mixed = kv_cache_spec(CacheConfig(kv_cache_dtype="fp8", kv_cache_dtype_skip_layers="0,3"),
                          4, torch.bfloat16)
    assert [s.dtype for s in mixed] == [torch.bfloat16, torch.float8_e4m3fn,
                                        torch.float8_e4m3fn, torch.bfloat16]
    caches = allocate_kv_caches(4, 3, 16, 2, 8, mixed, torch.device("cpu"))
    assert [c.dtype for c in caches] == [s.dtype for s in mixed]
    with pytest.raises(ValueError, match="layers \\[7\\]"):
        kv_cache_spec(CacheConfig(kv_cache_dtype="fp8", kv_cache_dtype_skip_layers="7"), 4,
                      torch.bfloat16)
    with pytest.raises(ValueError, match="comma-separated"):
        CacheConfig(kv_cache_dtype_skip_layers="a,b")
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        CacheConfig(kv_cache_dtype="int4")


def test_the_model_dtype_by_name_is_an_unquantized_cache():
    scales = [(0.5, 0.25)] * 4  # a checkpoint's kv_cache_scheme
    auto = kv_cache_spec(CacheConfig(), 4, torch.bfloat16, scales)
    assert [s.dtype for s in auto] == [torch.float8_e4m3fn] * 4  # auto: the checkpoint's
    named = kv_cache_spec(CacheConfig(kv_cache_dtype="bfloat16"), 4, torch.bfloat16, scales)
    assert [s.dtype for s in named] == [torch.bfloat16] * 4
    assert named == kv_cache_spec(CacheConfig(), 4, torch.bfloat16)
    with pytest.raises(ValueError, match="kv_cache_dtype float16 is not the model dtype "
                                         "\\(bfloat16\\)"):
        kv_cache_spec(CacheConfig(kv_cache_dtype="float16"), 4, torch.bfloat16)


def test_fp8_reference_round_trip_and_attention():
    torch.manual_seed(0)
    meta = make_attn_metadata([5, 1], [5, 9], [[0, 1], [2, 3, 4]], 4)
    cache = torch.zeros(2, 6, 4, 2, 16, dtype=torch.float8_e4m3fn)
    full = torch.zeros(2, 6, 4, 2, 16)
    k, v = torch.randn(6, 2, 16) * 3, torch.randn(6, 2, 16) * 3
    scale = (0.04, 0.05)  # K/V reach ~13: inside 448 x scale
    reference.write_kv(k, v, cache, meta.slot_mapping, scale)
    reference.write_kv(k, v, full, meta.slot_mapping)
    back = cache.float() * torch.tensor(scale).view(2, 1, 1, 1, 1)
    # e4m3 keeps 3 mantissa bits: within 1/16 relative, plus the subnormal floor
    assert ((back - full).abs() <= full.abs() / 16 + 2 ** -9 * 0.05).all()
    q = torch.randn(6, 4, 16)
    out8 = reference.paged_attention(q, cache, meta, 0.25, k, v, kv_scale=scale)
    q_ref = q.clone()  # heads of 16: the prompt's rows keep Q (no FP8 Q K^T below 32)
    assert not reference.attention.fp8_prefill_query(16)
    ref = reference.paged_attention(q_ref, back.view_as(full), meta, 0.25)
    torch.testing.assert_close(out8, ref)  # reads dequantize; prompts read the cache too


def test_cuda_pool_sizing_takes_the_budget_and_refuses_memory_that_is_not_free(monkeypatch):
    """CUDA: blocks = (total x gpu_memory_utilization - peak) // block bytes; a budget
    above the device's free memory (other processes or engines hold it) is a clear
    ValueError, as vLLM's start-up check, not an out-of-memory error mid-allocation.
    num_kv_blocks bypasses both."""
    gib = 2**30
    free = {"bytes": 100 * gib}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 140 * gib))
    cached = {"reserved": 0, "allocated": 0}  # torch's cache in this process
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: cached["reserved"])
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: cached["allocated"])
    cuda = torch.device("cuda")
    cache = CacheConfig(gpu_memory_utilization=0.5)
    assert num_blocks_for(cache, gib, cuda, peak_bytes=20 * gib) == 50  # 70 - 20 GiB
    free["bytes"] = 40 * gib  # e.g. another engine holds 60 GiB
    with pytest.raises(ValueError, match=r"needs 50.0 GiB .* only 40.0 GiB of the device is "
                                         r"free.*Lower gpu_memory_utilization"):
        num_blocks_for(cache, gib, cuda, peak_bytes=20 * gib)
    cached.update(reserved=25 * gib, allocated=5 * gib)  # 20 GiB cached and unused: usable
    assert num_blocks_for(cache, gib, cuda, peak_bytes=20 * gib) == 50
    cached.update(reserved=0, allocated=0)
    with pytest.raises(ValueError, match="no memory left for the KV cache"):
        num_blocks_for(cache, gib, cuda, peak_bytes=80 * gib)
    assert num_blocks_for(CacheConfig(num_kv_blocks=7), gib, cuda, peak_bytes=20 * gib) == 7
