r"""`write_kv` in Triton: scatter this step's new K/V rows into their paged cache slots;
`rotary_write_kv`: the same after rotary (and Qwen3's per-head q/k RMSNorm) in one launch.

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

from tandem.kernels.triton.elementwise import norm_rotate_heads
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
    tl.store(dst, cached(k, k_scale, cache_ptr, FP8), mask=mask)
    tl.store(dst + kv_stride, cached(v, v_scale, cache_ptr, FP8), mask=mask)


@triton.jit
def cached(x, scale, cache_ptr, FP8: tl.constexpr):
    """x as the cache stores it: e4m3 of x / scale saturated to its range (FP8), or cast."""
    if FP8:
        x = tl.clamp(x.to(tl.float32) / scale, -448.0, 448.0)
    return x.to(cache_ptr.dtype.element_ty)


@triton.jit
def load_e4m3(ptrs, mask=None):
    """An FP8 (e4m3) cache tile as fp16 for the attention dots: its bytes loaded (masked
    rows as 0, +0.0 in e4m3: stale bytes may be NaN), then the hardware conversion, two
    values an instruction. H200, decode at batch 256 x 4096: 894 us a layer, against 1,176
    loading e4m3 and zeroing masked rows after the conversion, and 1,106 moving the bits
    into fp16's places with integer ops (bench/results/2026-12-02-h200-fp8-kv-load-d9c8d6c/)."""
    if mask is None:
        b = tl.load(ptrs.to(tl.pointer_type(tl.uint8)))
    else:
        b = tl.load(ptrs.to(tl.pointer_type(tl.uint8)), mask=mask, other=0)
    return _e4m3_f16(b)


@triton.jit
def _e4m3_f16(b):
    """e4m3 bytes (uint8) as fp16: the hardware conversion, two values an instruction."""
    return b.to(tl.float8e4nv, bitcast=True).to(tl.float16)


@triton.jit
def load_e4m3_pairs(words, mask):
    """An FP8 cache tile read as 16-bit words, words (rows, D / 2) pointers to uint16, each
    two dims: (even dims, odd dims) as fp16, (rows, D / 2) each (masked rows 0). As words
    the tile reaches an attention dot's B operand through the 16-bit transposing ldmatrix;
    as bytes, V's rows (keys: the dot's inner dimension) were gathered a byte at a time
    (sm_90 has no transposing ldmatrix for bytes: 128 LDS.U8 a thread per 128-key tile)."""
    w = tl.load(words, mask=mask, other=0)
    return _e4m3_f16((w & 0xFF).to(tl.uint8)), _e4m3_f16((w >> 8).to(tl.uint8))


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


@triton.jit
def _rotary_write_kv_kernel(pos_ptr, q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, qw_ptr, kw_ptr,
                            cache_ptr, slot_ptr, stride_qt, stride_qh, stride_kt, stride_kh,
                            stride_vt, stride_vh, stride_c, kv_stride, n_q_heads, eps,
                            k_scale, v_scale, NUM_KV_HEADS: tl.constexpr,
                            BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr,
                            HALF: tl.constexpr, NORM: tl.constexpr, FP8: tl.constexpr,
                            PDL: tl.constexpr):
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    t = tl.program_id(0)
    row = t.to(tl.int64)
    pos = tl.load(pos_ptr + t)
    d = tl.arange(0, HALF)
    cos = tl.load(cos_ptr + pos * stride_c + d)[None, :]  # first half; the halves are equal
    sin = tl.load(sin_ptr + pos * stride_c + d)[None, :]
    norm_rotate_heads(q_ptr + row * stride_qt, stride_qh, n_q_heads, qw_ptr, eps, cos, sin, d,
                      BLOCK_QH, HALF, NORM)
    k1, k2 = norm_rotate_heads(k_ptr + row * stride_kt, stride_kh, NUM_KV_HEADS, kw_ptr, eps,
                               cos, sin, d, BLOCK_KH, HALF, NORM)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:  # a padding row of a CUDA-graph batch
        return
    h = tl.arange(0, BLOCK_KH)[:, None]
    mask = h < NUM_KV_HEADS
    pv = v_ptr + row * stride_vt + h * stride_vh + d[None, :]
    v1 = tl.load(pv, mask=mask, other=0.0)
    v2 = tl.load(pv + HALF, mask=mask, other=0.0)
    dst = cache_ptr + slot * (NUM_KV_HEADS * 2 * HALF) + h * (2 * HALF) + d[None, :]
    tl.store(dst, cached(k1, k_scale, cache_ptr, FP8), mask=mask)
    tl.store(dst + HALF, cached(k2, k_scale, cache_ptr, FP8), mask=mask)
    tl.store(dst + kv_stride, cached(v1, v_scale, cache_ptr, FP8), mask=mask)
    tl.store(dst + kv_stride + HALF, cached(v2, v_scale, cache_ptr, FP8), mask=mask)


def rotary_write_kv(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor,
                    kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                    kv_scale: tuple[float, float] = (1.0, 1.0),
                    q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None,
                    eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """[q_norm / k_norm: RMSNorm over each head (Qwen3),] rotary on q (T, H, D) and k
    (T, Hkv, D) in place, and K, V into their cache slots: elementwise.rms_norm, rotary and
    write_kv in one launch (a program per token). q, k, v may be strided views of the fused
    QKV output (unit stride along D). Returns (q, k)."""
    t, h, d = q.shape
    hkv = k.shape[1]
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
    assert d % 2 == 0 and (d & (d - 1)) == 0 and kv_cache.is_contiguous()
    assert (q_norm is None) == (k_norm is None)
    if t:
        _rotary_write_kv_kernel[(t,)](
            positions, q, k, v, cos_cache, sin_cache,
            q_norm if q_norm is not None else cos_cache,
            k_norm if k_norm is not None else cos_cache, kv_cache, slot_mapping,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            cos_cache.stride(0), kv_cache.stride(0), h, eps, float(kv_scale[0]),
            float(kv_scale[1]), NUM_KV_HEADS=hkv, BLOCK_QH=triton.next_power_of_2(h),
            BLOCK_KH=triton.next_power_of_2(hkv), HALF=d // 2, NORM=q_norm is not None,
            FP8=kv_cache.dtype == torch.float8_e4m3fn, num_warps=4, **launch_options(q))
    return q, k
