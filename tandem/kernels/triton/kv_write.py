r"""`write_kv` in Triton: scatter this step's new K/V rows into their paged cache slots.

One program per new token copies its whole (num_kv_heads, head_dim) row of K and of V:

    key[t]   (Hkv, D) --\                      kv_cache[0] viewed flat: (num_slots, Hkv, D)
                         >-- slot_mapping[t] --> | ... | slot s | ... |
    value[t] (Hkv, D) --/                      kv_cache[1] likewise

A negative slot is skipped (padding rows of a CUDA-graph batch write nothing); the PyTorch
reference requires every slot to be valid, so on valid input the two agree bit for bit
(a plain copy, cast to the cache dtype).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tandem.kernels.triton.pdl import gdc_launch_dependents, gdc_wait, launch_options


@triton.jit
def _write_kv_kernel(key_ptr, value_ptr, cache_ptr, slot_ptr,
                     stride_kt, stride_kh, stride_vt, stride_vh,
                     kv_stride,  # elements between kv_cache[0] and kv_cache[1]
                     k_scale, v_scale,
                     NUM_KV_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr,
                     HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, FP8: tl.constexpr,
                     PDL: tl.constexpr):
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    h = tl.arange(0, HEADS_PAD)[:, None]  # (HEADS_PAD, 1)
    d = tl.arange(0, DIM_PAD)[None, :]  # (1, DIM_PAD)
    mask = (h < NUM_KV_HEADS) & (d < HEAD_DIM)
    row = t.to(tl.int64)
    k = tl.load(key_ptr + row * stride_kt + h * stride_kh + d, mask=mask)
    v = tl.load(value_ptr + row * stride_vt + h * stride_vh + d, mask=mask)
    dst = cache_ptr + slot * (NUM_KV_HEADS * HEAD_DIM) + h * HEAD_DIM + d
    if FP8:  # e4m3 of K / k_scale, V / v_scale, saturated to its range
        k = tl.clamp(k.to(tl.float32) / k_scale, -448.0, 448.0)
        v = tl.clamp(v.to(tl.float32) / v_scale, -448.0, 448.0)
    tl.store(dst, k.to(cache_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + kv_stride, v.to(cache_ptr.dtype.element_ty), mask=mask)


def write_kv(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
             slot_mapping: torch.Tensor, kv_scale: tuple[float, float] = (1.0, 1.0)) -> None:
    """key, value: (num_tokens, num_kv_heads, head_dim), any row/head strides, last dim
    contiguous; kv_cache: (2, num_blocks, block_size, num_kv_heads, head_dim), contiguous;
    slot_mapping: (num_tokens,) int, negative = skip."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    assert kv_cache.is_contiguous() and kv_cache.shape[3:] == (num_kv_heads, head_dim)
    if key.stride(-1) != 1:
        key = key.contiguous()
    if value.stride(-1) != 1:
        value = value.contiguous()
    _write_kv_kernel[(num_tokens,)](
        key, value, kv_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        kv_cache.stride(0), float(kv_scale[0]), float(kv_scale[1]),
        FP8=kv_cache.dtype == torch.float8_e4m3fn, NUM_KV_HEADS=num_kv_heads, HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM=head_dim, DIM_PAD=triton.next_power_of_2(head_dim),
        num_warps=4 if num_kv_heads * head_dim >= 1024 else 1, **launch_options(key))
