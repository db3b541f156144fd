"""The attention layer: new K/V into the paged cache, then causal attention over it.

Holds no weights. The model runner allocates one KV cache tensor per layer and binds it:

    for layer, cache in zip(model.attention_layers(), caches):
        layer.kv_cache = cache   # (2, num_blocks, block_size, num_kv_heads, head_dim)

The arithmetic is the backend's (`tandem.kernels`); this layer only reshapes. Llama-family
models call `rotary_attend`: `rotary_write_kv` (their q/k norms and rotary with the K/V
write, one kernel on CUDA) and then `attend`, or at decode on Triton all of it in the decode
launch; `forward` writes and attends for callers that rotate themselves.
One knob bypasses the backend: `fp8_attention = True` runs the layer's attention through the
reference's FP8 emulation (`reference.attention.fp8_sdpa`), whatever the backend, so the
sensitivity map can measure reduced-precision attention one layer at a time. Off (the
default) costs one attribute read.
"""

from __future__ import annotations

import torch
from torch import nn

from tandem import envs
from tandem.kernels import AttentionBackend, get_attention_backend, kv_cache_shape, reference
from tandem.layers.attention_metadata import AttentionMetadata


class Attention(nn.Module):
    def __init__(self, num_heads: int, head_dim: int, scale: float, num_kv_heads: int,
                 backend: AttentionBackend | None = None) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} is not a multiple of "
                             f"num_kv_heads {num_kv_heads}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.backend = backend if backend is not None else get_attention_backend("torch")
        self.kv_cache = torch.empty(0)  # bound by the model runner; a plain attribute, not a buffer
        self.kv_scale = (1.0, 1.0)  # (k_scale, v_scale) of an FP8 cache, bound alongside
        self.fp8_attention = False  # emulate FP8 QK^T / softmax / PV (a probe; no kernel)

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        return kv_cache_shape(num_blocks, block_size, self.num_kv_heads, self.head_dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata | None) -> torch.Tensor:
        """q: (T, H*D), k, v: (T, Hkv*D) -> (T, H*D)."""
        if meta is None:
            raise ValueError("Attention.forward needs AttentionMetadata "
                             "(built by the model runner)")
        if self.kv_cache.numel() == 0:
            raise RuntimeError("Attention.kv_cache is not bound; the model runner allocates it")
        num_tokens = q.shape[0]
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        self.backend.write_kv(k, v, self.kv_cache, meta.slot_mapping, self.kv_scale)
        if self.fp8_attention:  # only the reference emulates it (no C or Triton kernel)
            out = reference.paged_attention(q, self.kv_cache, meta, self.scale, k, v,
                                            kv_scale=self.kv_scale, fp8_attention=True)
        else:
            out = self.backend.forward(q, self.kv_cache, meta, self.scale, k, v,
                                       self.kv_scale)  # (T, H, D)
        return out.reshape(num_tokens, self.num_heads * self.head_dim)

    def attend(self, q: torch.Tensor, meta: AttentionMetadata, k: torch.Tensor | None = None,
               v: torch.Tensor | None = None) -> torch.Tensor:
        """q: (T, H*D) -> (T, H*D), over a cache that already holds this step's K/V
        (rotary_write_kv below wrote them); k, v (T, Hkv,
        D), if given, are those K/V (a fresh prompt may read them directly)."""
        num_tokens = q.shape[0]
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        if self.fp8_attention:  # only the reference emulates it (no C or Triton kernel)
            out = reference.paged_attention(q, self.kv_cache, meta, self.scale, k, v,
                                            kv_scale=self.kv_scale, fp8_attention=True)
        else:
            out = self.backend.forward(q, self.kv_cache, meta, self.scale, k, v,
                                       self.kv_scale)
        return out.reshape(num_tokens, self.num_heads * self.head_dim)

    def rotary_attend(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                      v: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor,
                      norms: tuple[nn.Module, nn.Module] | None, meta: AttentionMetadata
                      ) -> torch.Tensor:
        """rotary_write_kv, then attend: q (T, H, D), k, v (T, Hkv, D) -> (T, H*D). A
        decode-only step whose rows are distinct sequences runs both in the backend's
        decode launch where it has one (`rotary_decode`: Triton), one launch a layer
        fewer (TANDEM_DECODE_ROTARY=0 keeps them apart)."""
        fused = getattr(self.backend, "rotary_decode", None)
        if (fused is not None and meta is not None and meta.decode_rows_distinct
                and meta.max_query_len <= 1 and not self.fp8_attention
                and self.kv_cache.numel() and envs.decode_rotary_fused()):
            out = fused(positions, q, k, v, cos_cache, sin_cache, self.kv_cache, meta,
                        self.scale, self.kv_scale, *_norm_args(norms))
            if out is not None:
                return out.reshape(q.shape[0], self.num_heads * self.head_dim)
        q, k = self.rotary_write_kv(positions, q, k, v, cos_cache, sin_cache, norms, meta)
        return self.attend(q.reshape(q.shape[0], -1), meta, k, v)

    def rotary_write_kv(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                        v: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor,
                        norms: tuple[nn.Module, nn.Module] | None, meta: AttentionMetadata
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """q (T, H, D), k, v (T, Hkv, D): [each head RMSNormed by norms (q_norm, k_norm),]
        q and k rotated, K and V written to the cache: one kernel on the Triton backend (q
        and k rotated in place there), the reference ops composed on the others. Returns
        the rotated (q, k); then `attend`."""
        if meta is None:
            raise ValueError("Attention.rotary_write_kv needs AttentionMetadata "
                             "(built by the model runner)")
        if self.kv_cache.numel() == 0:
            raise RuntimeError("Attention.kv_cache is not bound; the model runner allocates it")
        return self.backend.rotary_write_kv(positions, q, k, v, cos_cache, sin_cache,
                                            self.kv_cache, meta.slot_mapping, self.kv_scale,
                                            *_norm_args(norms))


def _norm_args(norms: tuple[nn.Module, nn.Module] | None
               ) -> tuple[torch.Tensor | None, torch.Tensor | None, float]:
    """(q_norm weight, k_norm weight, eps) for the backends' q/k norm arguments."""
    if norms is None:
        return None, None, 1e-6
    return norms[0].weight, norms[1].weight, norms[0].eps
