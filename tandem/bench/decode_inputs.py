"""Inputs for the decode-attention kernel benchmarks (scripts/bench_decode_*.py): a batch
of single-token queries over a paged cache whose blocks are shuffled across sequences."""

from __future__ import annotations

import random

import torch

from tandem.kernels import kv_cache_shape
from tandem.layers.attention_metadata import AttentionMetadata


def decode_batch(num_seqs: int, ctx: int, kv_heads: int, heads: int, dtype: torch.dtype,
                 seed: int, block: int = 16, head_dim: int = 128, device: str = "cuda"):
    """-> (query (num_seqs, heads, head_dim) bf16, kv_cache, metadata, kv_scale): every
    sequence `ctx` tokens long; an FP8 cache holds N(0, 1) / 0.05 with scales 0.05."""
    rng = random.Random(seed)
    need = -(-ctx // block)
    num_blocks = num_seqs * need + 1
    pool = list(range(num_blocks))
    rng.shuffle(pool)
    tables = [[pool.pop() for _ in range(need)] for _ in range(num_seqs)]
    cache = torch.randn(kv_cache_shape(num_blocks, block, kv_heads, head_dim), device=device)
    scale = (1.0, 1.0)
    if dtype == torch.float8_e4m3fn:
        scale = (0.05, 0.05)
        cache = (cache / 0.05).clamp(-448, 448)
    cache = cache.to(dtype)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(num_seqs, dtype=torch.int64, device=device),
        query_start_loc=torch.arange(num_seqs + 1, dtype=torch.int32, device=device),
        seq_lens=torch.full((num_seqs,), ctx, dtype=torch.int32, device=device),
        block_tables=torch.tensor(tables, dtype=torch.int32, device=device),
        query_lens_cpu=[1] * num_seqs, seq_lens_cpu=[ctx] * num_seqs, max_query_len=1,
        max_seq_len=ctx, block_size=block)
    q = torch.randn(num_seqs, heads, head_dim, device=device).to(torch.bfloat16)
    return q, cache, meta, scale
