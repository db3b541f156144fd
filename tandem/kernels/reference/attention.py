"""Paged attention in plain PyTorch: the spec every fast kernel is tested against.

KV cache layout, one tensor per attention layer (index 0 = K, 1 = V):

    kv_cache: (2, num_blocks, block_size, num_kv_heads, head_dim)

    block b:  | slot b*bs+0 | slot b*bs+1 | ... | slot b*bs+bs-1 |
    a sequence's position p lives in block block_table[p // bs], offset p % bs

`write_kv` scatters the step's new K/V into their slots (`rotary_write_kv`: after Qwen3's
per-head q/k RMSNorm, if any, and rotary, the ops the Triton kernel of that name fuses);
`paged_attention` gathers each
sequence's context through its block table and attends causally. The new tokens of a
sequence are always the LAST `query_len` positions of its `seq_len`-long context, so query
row j sits at absolute position `seq_len - query_len + j` and sees positions <= that.

Decodes (query_len == 1) are batched into padded gathers + masked SDPA; longer chunks
(prefills, chunked prefills, draft verification) run one SDPA each with an explicit causal
mask whose diagonal is shifted by the cached prefix. Runs on CPU and CUDA.

An FP8 cache (float8_e4m3fn) holds K / k_scale and V / v_scale (`kv_scale`, per layer);
reads multiply back. Then every chunk reads its K/V from the cache, never this step's
unquantized rows, so a prompt sees exactly what its later decodes will.

Over an FP8 cache, multi-row chunks (prompts, chunked prefill) also round Q to e4m3, with
one scale per (token, head) row (its amax / 448), and take Q K^T from e4m3 operands, as the
Triton prefill kernel does on FP8 tensor cores (`FP8_PREFILL_QUERY`); P and V stay in
16 bits, and single-token decodes keep Q unrounded.

`fp8_attention=True` swaps the exact SDPA for `fp8_sdpa`, an emulation of FP8 attention
math (QK^T and PV on e4m3 operands). No kernel serves it; it exists so the sensitivity map
can measure what reduced-precision attention would cost.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tandem.layers.attention_metadata import AttentionMetadata

KVScale = tuple[float, float]  # (k_scale, v_scale): cached value = K / k_scale (FP8 caches)
NO_SCALE: KVScale = (1.0, 1.0)
# Prefill chunks over an FP8 cache round Q to e4m3 (see above). H200, two 4096-token prompts,
# 32/8 heads of 128: 0.700 ms against 0.870 with Q in fp16 (and 0.742 for a bf16 cache);
# attention output error against exact attention over the same cache: 2.3% rms, from 0.22%
# (bench/results/2026-12-02-h200-fp8-qk-443d922/).
FP8_PREFILL_QUERY = True


def fp8_prefill_query(head_dim: int) -> bool:
    """Whether prefill chunks over an FP8 cache round Q (FP8 tensor cores take 32 values
    of the head at a time: smaller heads keep Q)."""
    return FP8_PREFILL_QUERY and head_dim >= 32


def is_fp8(kv_cache: torch.Tensor) -> bool:
    return kv_cache.dtype == torch.float8_e4m3fn


def _raw(t: torch.Tensor) -> torch.Tensor:
    """FP8 tensors as bytes for copies and gathers (CPU kernels lack FP8 index ops)."""
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def _select(cache: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return _raw(cache).index_select(0, index).view(cache.dtype)


def _load(cached: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """Cache contents as `dtype` (dequantized from FP8)."""
    if cached.dtype == torch.float8_e4m3fn:
        return (cached.float() * scale).to(dtype)
    return cached.to(dtype)


def _e4m3(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """x / scale rounded to e4m3 (saturating), back as float32: the value an FP8 operand
    holds, in units of `scale`."""
    return (x.float() / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).float()


def e4m3_rows(q: torch.Tensor) -> torch.Tensor:
    """q (..., D) rounded to e4m3 with one scale per row (amax over D / 448), back in
    q.dtype: the query an FP8 prefill kernel multiplies."""
    s = q.float().abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / 448.0
    return (_e4m3(q, s) * s).to(q.dtype)


def _amax_scale(x: torch.Tensor) -> torch.Tensor:
    """One dynamic scale per sequence (dim 0): amax / 448 over heads, positions, dims."""
    return x.float().abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12) / 448.0


def fp8_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             attn_mask: torch.Tensor | None = None, is_causal: bool = False,
             scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
    """Attention as an FP8 kernel (FlashAttention-3's FP8 forward) computes it, emulated in
    float32, with `F.scaled_dot_product_attention`'s signature (attn_mask bool, True =
    attend). q: (B, H, Lq, D), k, v: (B, Hkv, L, D) -> (B, H, Lq, D) in q.dtype.

      1. Q, K and V to e4m3, each with ONE dynamic scale per sequence (per tensor: amax / 448
         over all its heads and positions; K/V positions no query attends, such as decode
         padding, are left out of the amax);
      2. S = (Qq Kq^T) * sq * sk * scale: e4m3 products are exact, accumulation in float32;
      3. P = exp(S - rowmax(S)) in [0, 1], the kernel's unnormalized softmax, and its row
         sum l in float32 from P before rounding (the kernel sums its float32 registers);
      4. P to e4m3 with scale 1 (3 mantissa bits, fewer below 2^-6; P below 2^-10 rounds to
         zero), then O = (Pq Vq) * sv / l.

    Unlike the kernel, the row max is the whole row's, not a running max over key blocks
    (there, P of earlier blocks is rounded against a smaller max). Accumulation order aside,
    that is the only difference.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    lq, lk = q.shape[-2], k.shape[-2]
    if is_causal:  # top-left aligned, as SDPA's
        attn_mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril()
    if attn_mask is not None:  # K/V positions no query attends (padding) stay out of amax
        used = attn_mask.any(dim=-2)[..., None]  # (..., L, 1), broadcasts over (B, Hkv, L, D)
        k, v = k.masked_fill(~used, 0.0), v.masked_fill(~used, 0.0)
    sq, sk, sv = _amax_scale(q), _amax_scale(k), _amax_scale(v)  # (B, 1, 1, 1) each
    qq, kq, vq = _e4m3(q, sq), _e4m3(k, sk), _e4m3(v, sv)
    if enable_gqa and q.shape[1] != k.shape[1]:
        group = q.shape[1] // k.shape[1]
        kq, vq = kq.repeat_interleave(group, dim=1), vq.repeat_interleave(group, dim=1)
    s = (qq @ kq.transpose(-1, -2)) * (sq * sk * scale)  # (B, H, Lq, L)
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf"))
    p = torch.exp(s - s.amax(dim=-1, keepdim=True))
    o = (_e4m3(p, 1.0) @ vq) * sv / p.sum(dim=-1, keepdim=True)
    return o.to(q.dtype)


def write_kv(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
             slot_mapping: torch.Tensor, kv_scale: KVScale = NO_SCALE) -> None:
    """Scatter new K/V rows into their cache slots (every slot must be valid, >= 0).

    key, value: (num_tokens, num_kv_heads, head_dim); slot_mapping: (num_tokens,) int64.
    """
    _, num_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape
    flat = kv_cache.view(2, num_blocks * block_size, num_kv_heads, head_dim)
    if is_fp8(kv_cache):  # saturate to the e4m3 range, then round
        key = (key.float() / kv_scale[0]).clamp(-448.0, 448.0)
        value = (value.float() / kv_scale[1]).clamp(-448.0, 448.0)
    _raw(flat[0]).index_copy_(0, slot_mapping, _raw(key.to(kv_cache.dtype)))
    _raw(flat[1]).index_copy_(0, slot_mapping, _raw(value.to(kv_cache.dtype)))


def paged_attention(query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                    scale: float, key: torch.Tensor | None = None,
                    value: torch.Tensor | None = None, decode=None,
                    kv_scale: KVScale = NO_SCALE, fp8_attention: bool = False
                    ) -> torch.Tensor:
    """Causal attention of each sequence's new query rows over its cached context.

    query: (num_tokens, num_heads, head_dim) -> (num_tokens, num_heads, head_dim).
    key, value: optional (num_tokens, num_kv_heads, head_dim), this step's new K/V (already
    written to the cache); a chunk with nothing cached before it reads them directly.
    num_heads must be a multiple of num_kv_heads (GQA/MQA). decode: a replacement for
    `decode_batch` (same signature), how a backend plugs in a faster single-token path.
    fp8_attention: `fp8_sdpa` instead of exact SDPA everywhere (a quality probe); decodes
    then take `decode_batch` whatever `decode` says.
    """
    out = torch.empty_like(query)
    starts = [0]
    for q_len in meta.query_lens_cpu:
        starts.append(starts[-1] + q_len)
    decodes = [i for i, q_len in enumerate(meta.query_lens_cpu) if q_len == 1]
    if decodes and fp8_attention:  # the emulation lives in the reference only
        decode_batch(query, kv_cache, meta, scale, decodes, starts, out, kv_scale, True)
    elif decodes:
        (decode or decode_batch)(query, kv_cache, meta, scale, decodes, starts, out, kv_scale)
    for i, q_len in enumerate(meta.query_lens_cpu):
        if q_len > 1:
            rows = slice(starts[i], starts[i] + q_len)
            fresh = None
            if key is not None and q_len == meta.seq_lens_cpu[i] and not is_fp8(kv_cache):
                fresh = (key[rows], value[rows])
            out[rows] = _prefill_one(query[rows], kv_cache, meta.block_tables[i],
                                     meta.seq_lens_cpu[i], scale, fresh, kv_scale,
                                     fp8_attention)
    return out


def _gather_context(kv_cache: torch.Tensor, block_table: torch.Tensor,
                    num_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of the first `num_positions` positions reached through `block_table` (1-D).

    -> K, V: (num_positions, num_kv_heads, head_dim).
    """
    block_size = kv_cache.shape[2]
    num_blocks = -(-num_positions // block_size)
    blocks = block_table[:num_blocks].long()
    k = _select(kv_cache[0], blocks).flatten(0, 1)
    v = _select(kv_cache[1], blocks).flatten(0, 1)
    return k[:num_positions], v[:num_positions]


_DECODE_GROUP = 16  # decodes per padded gather: sorted by length, so padding stays small


def decode_batch(query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                  scale: float, seqs: list[int], starts: list[int], out: torch.Tensor,
                  kv_scale: KVScale = NO_SCALE, fp8_attention: bool = False) -> None:
    """Single-token queries (sequences `seqs`, query row `starts[i]`) into `out`, in
    groups of similar context length.

    Each group gathers its blocks once, (b, L, Hkv, D), and runs one masked SDPA on
    head-major strided views of them (no transposed copy of K or V; GQA by the kernel).
    """
    _, num_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape
    device = query.device
    order = sorted(seqs, key=lambda i: meta.seq_lens_cpu[i])
    for g0 in range(0, len(order), _DECODE_GROUP):
        idx = order[g0:g0 + _DECODE_GROUP]
        b = len(idx)
        lens = [meta.seq_lens_cpu[i] for i in idx]
        nb = -(-max(lens) // block_size)
        sel = torch.tensor(idx, device=device)
        blocks = meta.block_tables[sel, :nb].reshape(-1).long()
        # (b, Hkv, L, D) views of the gathered (b, L, Hkv, D) blocks
        dtype = query.dtype if is_fp8(kv_cache) else kv_cache.dtype
        k = _load(_select(kv_cache[0], blocks), kv_scale[0], dtype).view(
            b, nb * block_size, num_kv_heads, head_dim).transpose(1, 2)
        v = _load(_select(kv_cache[1], blocks), kv_scale[1], dtype).view(
            b, nb * block_size, num_kv_heads, head_dim).transpose(1, 2)
        rows = torch.tensor([starts[i] for i in idx], device=device)
        q = query.index_select(0, rows).unsqueeze(2).to(k.dtype)  # (b, H, 1, D)
        # (b, 1, 1, L): True where the position is inside the sequence
        lens_t = torch.tensor(lens, device=device)
        valid = torch.arange(nb * block_size, device=device)[None, :] < lens_t[:, None]
        sdpa = fp8_sdpa if fp8_attention else F.scaled_dot_product_attention
        o = sdpa(q, k, v, attn_mask=valid[:, None, None, :], scale=scale,
                 enable_gqa=q.shape[1] != num_kv_heads)
        out.index_copy_(0, rows, o.squeeze(2).to(query.dtype))


def _prefill_one(query: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                 seq_len: int, scale: float,
                 fresh: tuple[torch.Tensor, torch.Tensor] | None = None,
                 kv_scale: KVScale = NO_SCALE, fp8_attention: bool = False) -> torch.Tensor:
    """query: (query_len, num_heads, head_dim), the last query_len positions of seq_len.
    fresh: the chunk's own K/V when it is the whole context (nothing to gather)."""
    q_len = query.shape[0]
    # (seq_len, num_kv_heads, head_dim)
    k, v = fresh if fresh is not None else _gather_context(kv_cache, block_table, seq_len)
    if is_fp8(kv_cache) and fp8_prefill_query(query.shape[-1]) and not fp8_attention:
        query = e4m3_rows(query)
    k, v = _load(k, kv_scale[0], query.dtype), _load(v, kv_scale[1], query.dtype)
    q = query.transpose(0, 1).unsqueeze(0)  # (1, num_heads, query_len, head_dim)
    k = k.transpose(0, 1).unsqueeze(0).to(q.dtype)  # (1, num_kv_heads, seq_len, head_dim)
    v = v.transpose(0, 1).unsqueeze(0).to(q.dtype)
    gqa = q.shape[1] != k.shape[1]
    sdpa = fp8_sdpa if fp8_attention else F.scaled_dot_product_attention
    if q_len == seq_len:  # nothing cached before the chunk: plain causal
        o = sdpa(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        # Row j is absolute position seq_len - q_len + j: the diagonal shifts right.
        pos_q = torch.arange(seq_len - q_len, seq_len, device=query.device)
        mask = torch.arange(seq_len, device=query.device)[None, :] <= pos_q[:, None]
        o = sdpa(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return o.squeeze(0).transpose(0, 1)  # (query_len, num_heads, head_dim)


def rotary_write_kv(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor,
                    kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                    kv_scale: KVScale = NO_SCALE, q_norm: torch.Tensor | None = None,
                    k_norm: torch.Tensor | None = None, eps: float = 1e-6,
                    write=write_kv) -> tuple[torch.Tensor, torch.Tensor]:
    """q (T, H, D), k, v (T, Hkv, D): [each head RMSNormed with q_norm / k_norm,] rotary,
    then K and V into the cache through `write` (a backend's write_kv). Returns the
    rotated (q, k). The spec of kernels/triton/kv_write.rotary_write_kv."""
    from tandem.kernels import ops  # the layers' elementwise ops (no cycle at import)

    if q_norm is not None:
        q, k = ops.rms_norm(q, q_norm, eps), ops.rms_norm(k, k_norm, eps)
    q, k = ops.rotary(positions, q, k, cos_cache, sin_cache)
    write(k, v, kv_cache, slot_mapping, kv_scale)
    return q, k
