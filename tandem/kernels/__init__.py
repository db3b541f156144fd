"""Kernels: attention backends behind one small interface and one dispatcher.

An `AttentionBackend` owns the operations an attention layer needs per step:

    Attention.forward(q, k, v, meta)
        -> backend.write_kv(k, v, kv_cache, meta.slot_mapping)     new K/V into cache slots
        -> backend.forward(q, kv_cache, meta, scale, k, v)          paged causal attention
    Attention.rotary_attend(positions, q, k, v, ...)   (Llama): rotary_write_kv + attend
        -> backend.rotary_write_kv(...)   [q/k RMSNorm,] rotary and write_kv: one launch on
                                          Triton, the reference ops composed elsewhere
        -> backend.forward(q, kv_cache, meta, scale, k, v)
      (a decode-only step whose rows are distinct sequences, on a backend that has it:
        -> backend.rotary_decode(...)   all of the above in the decode launch: Triton)

Every backend uses the same KV cache layout, `kv_cache_shape(...)`:
(2, num_blocks, block_size, num_kv_heads, head_dim), index 0 = K, 1 = V. The pure-PyTorch
reference (`reference/`) is the spec and runs anywhere; fast backends (Triton, later)
register themselves in `ATTENTION_BACKENDS` with the same signatures and are picked by
`get_attention_backend(device)`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from tandem.kernels import reference
from tandem.layers.attention_metadata import AttentionMetadata


@runtime_checkable
class AttentionBackend(Protocol):
    name: str

    def write_kv(self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                 slot_mapping: torch.Tensor, kv_scale: tuple[float, float] = (1.0, 1.0)
                 ) -> None:
        """key, value: (num_tokens, num_kv_heads, head_dim) into kv_cache at slot_mapping.
        An FP8 (float8_e4m3fn) cache stores key / kv_scale[0] and value / kv_scale[1]."""
        ...

    def rotary_write_kv(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                        v: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor,
                        kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                        kv_scale: tuple[float, float], q_norm: torch.Tensor | None,
                        k_norm: torch.Tensor | None, eps: float
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """q (T, H, D), k, v (T, Hkv, D): [per-head RMSNorm of q and k with q_norm / k_norm,]
        rotary (cos/sin caches (max_pos, D)), then write_kv. Returns the rotated (q, k)."""
        ...

    def forward(self, query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                scale: float, key: torch.Tensor | None = None,
                value: torch.Tensor | None = None,
                kv_scale: tuple[float, float] = (1.0, 1.0)) -> torch.Tensor:
        """query: (num_tokens, num_heads, head_dim) -> (num_tokens, num_heads, head_dim).
        key, value: this step's new K/V, already in the cache; a backend may read them
        directly instead of the cache (chunks with no cached prefix), unless the cache is
        FP8 (then every read dequantizes with kv_scale)."""
        ...


class TorchReferenceBackend:
    """The pure-PyTorch reference: CPU and CUDA, correct first, batched where it is cheap."""

    name = "torch"

    def write_kv(self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                 slot_mapping: torch.Tensor, kv_scale: tuple[float, float] = (1.0, 1.0)
                 ) -> None:
        reference.write_kv(key, value, kv_cache, slot_mapping, kv_scale)

    def rotary_write_kv(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                        v: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor,
                        kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                        kv_scale: tuple[float, float], q_norm: torch.Tensor | None,
                        k_norm: torch.Tensor | None, eps: float
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """[q/k RMSNorm,] rotary, then this backend's write_kv: the ops composed."""
        return reference.rotary_write_kv(positions, q, k, v, cos_cache, sin_cache, kv_cache,
                                         slot_mapping, kv_scale, q_norm, k_norm, eps,
                                         write=self.write_kv)

    def forward(self, query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                scale: float, key: torch.Tensor | None = None,
                value: torch.Tensor | None = None,
                kv_scale: tuple[float, float] = (1.0, 1.0)) -> torch.Tensor:
        return reference.paged_attention(query, kv_cache, meta, scale, key, value,
                                         kv_scale=kv_scale)


ATTENTION_BACKENDS: dict[str, type] = {"torch": TorchReferenceBackend}
# Preferred backend per device type, first available wins (Triton will go first for "cuda").
_PREFERRED: dict[str, list[str]] = {"cpu": ["torch"], "cuda": ["torch"]}


def register_attention_backend(name: str, cls: type, device_types: tuple[str, ...] = ()) -> None:
    """Add a backend; listed device types will prefer it over the reference."""
    ATTENTION_BACKENDS[name] = cls
    for device_type in device_types:
        _PREFERRED.setdefault(device_type, ["torch"]).insert(0, name)


def get_attention_backend(name_or_device: str | torch.device = "torch") -> AttentionBackend:
    """A backend by registered name ("torch"), or the preferred one for a device ("cuda:0")."""
    if isinstance(name_or_device, str) and name_or_device in ATTENTION_BACKENDS:
        return ATTENTION_BACKENDS[name_or_device]()
    try:
        device = torch.device(name_or_device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown attention backend {name_or_device!r}; "
                         f"registered: {sorted(ATTENTION_BACKENDS)}") from None
    name = _PREFERRED.get(device.type, ["torch"])[0]
    return ATTENTION_BACKENDS[name]()


def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int,
                   head_dim: int) -> tuple[int, int, int, int, int]:
    """Shape of one layer's KV cache tensor; index 0 = K, 1 = V."""
    return (2, num_blocks, block_size, num_kv_heads, head_dim)


def _triton_importable() -> bool:
    """The Triton backend needs the `triton` package (GPU machines); CPU installs skip it."""
    import importlib

    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


from tandem.kernels.cpu import CpuAttentionBackend  # noqa: E402  (needs the names above)

register_attention_backend("cpu", CpuAttentionBackend, device_types=("cpu",))

if _triton_importable():
    from tandem.kernels.triton.backend import TritonAttentionBackend

    register_attention_backend("triton", TritonAttentionBackend, device_types=("cuda",))

__all__ = ["ATTENTION_BACKENDS", "AttentionBackend", "TorchReferenceBackend",
           "get_attention_backend", "kv_cache_shape", "register_attention_backend"]
