"""`TritonAttentionBackend`: the CUDA attention backend, same signatures as the reference.

One step's batch, split by query length (the order of sequences does not matter):

    sequences  | s0: 1 | s1: chunk of 300 | s2: 1 | s3: fresh prompt of 80 |
    decode.py    s0, s2      grid (decodes, Hkv, partitions) + log-sum-exp merge
    prefill.py   s1, s3      grid (heads, query tiles, chunks), FlashAttention-2 tiles

A decode-only step (max_query_len == 1) launches on the metadata tensors as they are: no
host sync, no tensor built from a Python list, a grid that depends only on the batch size
and meta.max_seq_len, so it can be captured in a CUDA graph. A mixed step copies the two
index lists to the device (pinned, non-blocking). Head sizes that are not a power of two
in [16, 256] fall back to the PyTorch reference.
"""

from __future__ import annotations

import torch

from tandem.kernels import reference
from tandem.kernels.triton.decode import NewTokens, decode_attention
from tandem.kernels.triton.kv_write import rotary_write_kv, write_kv
from tandem.kernels.triton.prefill import prefill_attention
from tandem.layers.attention_metadata import AttentionMetadata


def _supported(head_dim: int) -> bool:
    return 16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0


def _device_ids(ids: list[int], device: torch.device) -> torch.Tensor:
    """(len(ids),) int32 on device, copied without blocking the host."""
    host = torch.tensor(ids, dtype=torch.int32)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


class TritonAttentionBackend:
    """Paged attention in Triton: split-K decode, FlashAttention-2 prefill, slot writes."""

    name = "triton"
    supports_cuda_graphs = True  # decode-only steps: device lengths, batch-sized grids

    def write_kv(self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                 slot_mapping: torch.Tensor, kv_scale: tuple[float, float] = (1.0, 1.0)
                 ) -> None:
        write_kv(key, value, kv_cache, slot_mapping, kv_scale)

    def rotary_write_kv(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                        v: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor,
                        kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                        kv_scale: tuple[float, float], q_norm: torch.Tensor | None,
                        k_norm: torch.Tensor | None, eps: float
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """[Per-head RMSNorm of q and k,] rotary in place, then write_kv: one launch
        (kv_write.rotary_write_kv) instead of up to four."""
        return rotary_write_kv(positions, q, k, v, cos_cache, sin_cache, kv_cache,
                               slot_mapping, kv_scale, q_norm, k_norm, eps)

    def rotary_decode(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                      v: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor,
                      kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                      kv_scale: tuple[float, float], q_norm: torch.Tensor | None,
                      k_norm: torch.Tensor | None, eps: float) -> torch.Tensor | None:
        """rotary_write_kv then forward, in the decode launch (decode.NewTokens), for a
        decode-only step whose rows are distinct sequences; None when this backend cannot
        (the caller composes the two)."""
        d = q.shape[-1]  # (head_dim 16 is left to the two launches: not measured)
        if (meta.max_query_len > 1 or not meta.decode_rows_distinct or not _supported(d)
                or d < 32 or q.shape[0] == 0 or q.stride(-1) != 1 or k.stride(-1) != 1
                or v.stride(-1) != 1):
            return None
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        decode_attention(q, kv_cache, out, meta.query_start_loc, meta.seq_lens,
                         meta.block_tables, scale, max_seq_len=meta.max_seq_len,
                         num_decodes=meta.seq_lens.shape[0], kv_scale=kv_scale,
                         new=NewTokens(positions, k, v, meta.slot_mapping, cos_cache,
                                       sin_cache, q_norm, k_norm, eps))
        return out

    def forward(self, query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                scale: float, key: torch.Tensor | None = None,
                value: torch.Tensor | None = None,
                kv_scale: tuple[float, float] = (1.0, 1.0)) -> torch.Tensor:
        """query: (num_tokens, num_heads, head_dim) -> (num_tokens, num_heads, head_dim).
        An FP8 cache (float8_e4m3fn) is dequantized with kv_scale as it is read."""
        if not _supported(query.shape[-1]) or query.shape[0] == 0:
            return reference.paged_attention(query, kv_cache, meta, scale, key, value,
                                             kv_scale=kv_scale)
        if query.stride(-1) != 1:
            query = query.contiguous()
        out = (torch.zeros if meta.pad_rows else torch.empty)(query.shape, dtype=query.dtype,
                                                              device=query.device)
        common = (query, kv_cache, out, meta.query_start_loc, meta.seq_lens, meta.block_tables,
                  scale)
        if meta.max_query_len <= 1:  # decode-only: the CUDA-graph path
            decode_attention(*common, max_seq_len=meta.max_seq_len,
                             num_decodes=meta.seq_lens.shape[0], kv_scale=kv_scale)
            return out

        q_lens, s_lens = meta.query_lens_cpu, meta.seq_lens_cpu
        decodes = [i for i, n in enumerate(q_lens) if n == 1]
        chunks = [i for i, n in enumerate(q_lens) if n > 1]
        if decodes:
            decode_attention(*common, max_seq_len=max(s_lens[i] for i in decodes),
                             seq_ids=_device_ids(decodes, query.device), kv_scale=kv_scale)
        # Chunks with no cached prefix attend only to their own rows: read those directly
        # (not from an FP8 cache: a prompt must see what its decodes will).
        fresh = key is not None and value is not None and all(
            q_lens[i] == s_lens[i] for i in chunks) and kv_cache.dtype != torch.float8_e4m3fn
        prefill_attention(*common, max_query_len=max(q_lens[i] for i in chunks),
                          seq_ids=None if not decodes else _device_ids(chunks, query.device),
                          num_chunks=len(chunks),
                          key=key if fresh else None, value=value if fresh else None,
                          kv_scale=kv_scale)
        return out
